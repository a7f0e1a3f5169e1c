#!/usr/bin/env bash
# GPU checks for a machine with CUDA, in well under 8 minutes: the GPU tests (kernel parity on CUDA without
# the interpreter, cuda-graph backend vs reference on fixed seeds, graphed beam search parity), the kernel
# bandwidth benchmark and the latency benchmark (base preset, batch 1/8/64/256). Full results go to the
# folder given as $1 (default $OUT, else ./gpu_results); a short table against the targets is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-gpu_results}}"
mkdir -p "$out"
unset TRITON_INTERPRET

pip install --no-deps --no-build-isolation -e . > "$out/install.log" 2>&1 || { tail -20 "$out/install.log"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1
python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee "$out/versions.txt"

timeout 120 python -m pytest -q tests/test_gpu.py tests/test_fused_update.py tests/test_fused_sampler.py \
  tests/test_static_beam_search.py tests/test_backends.py > "$out/tests.log" 2>&1
echo "tests exit $?" >> "$out/tests.log"
tail -3 "$out/tests.log"

timeout 60 python bench/kernel_bandwidth.py --json "$out/kernel.json" > "$out/kernel.log" 2>&1 || tail -5 "$out/kernel.log"
timeout 180 python bench/latency.py --preset base --batch-sizes 1 8 64 256 --repeats 3 \
  --json "$out/latency.json" > "$out/latency.log" 2>&1 || tail -5 "$out/latency.log"

timeout 60 python bench/graph_granularity.py --preset base --batch 64 --chunks 1 10 100 999 \
  --json "$out/granularity.json" > "$out/granularity.log" 2>&1 || tail -5 "$out/granularity.log"
timeout 60 python bench/latency.py --preset base --batch-sizes 64 --repeats 3 --dtype bfloat16 --skip-hf \
  --json "$out/latency_bf16.json" > "$out/latency_bf16.log" 2>&1 || tail -5 "$out/latency_bf16.log"

python bench/gpu_table.py "$out" | tee "$out/table.md"
