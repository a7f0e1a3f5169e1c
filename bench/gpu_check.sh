#!/usr/bin/env bash
# GPU checks for a machine with CUDA: the GPU tests (the Triton kernels' parity on CUDA without the
# interpreter, cuda-graph backend vs reference on fixed seeds, graphed beam search parity), the kernel
# bandwidth benchmark and the latency benchmark (base preset, batch 1/8/64/256), then training on the GPU. A
# short table against the targets is printed last. Results go to the folder given as $1 (default $OUT, else
# ./gpu_results), as at most eight files, since that is all the device tool brings back: table.md, tests.log,
# training.log, the four JSON results and logs.tgz (every log, the GPU and the versions), re-packed after each
# stage so a time limit keeps what ran.
# Each stage has a time limit, in order of what the issue needs most; every stage at its limit adds up to under
# nine minutes (the device tool allows ten a command; tests/test_gpu_bench_scripts.py keeps them under 560 s),
# a normal run to far less.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-gpu_results}}"
mkdir -p "$out"
logs="$(mktemp -d)"
unset TRITON_INTERPRET

pack() { tar czf "$out/logs.tgz" -C "$logs" . ; }
# stage NAME SECONDS COMMAND...: run with a time limit, its output in NAME.log; on failure show its tail
stage() {
  local name="$1" limit="$2"; shift 2
  timeout "$limit" "$@" > "$logs/$name.log" 2>&1
  local code=$?
  if [ "$code" -eq 124 ]; then echo "== $name stopped at its ${limit}s limit; its tail:"; fi
  if [ "$code" -ne 0 ] && [ "$code" -ne 124 ]; then echo "== $name exited $code; its tail:"; fi
  [ "$code" -eq 0 ] || tail -8 "$logs/$name.log"
  pack
  return "$code"
}

stage install 45 pip install --no-deps --no-build-isolation -e . || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$logs/gpu.txt" 2>&1
python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, \
'transformers', transformers.__version__)" 2>&1 | tee "$logs/versions.txt"

stage tests 190 python -m pytest -q --durations=15 tests/test_gpu.py tests/test_fused_update.py tests/test_add_layer_norm.py \
  tests/test_folded_reverse.py tests/test_fused_sampler.py tests/test_static_beam_search.py tests/test_backends.py
echo "tests exit $?" >> "$logs/tests.log"
cp "$logs/tests.log" "$out/tests.log"
tail -3 "$out/tests.log"

stage kernel 45 python bench/kernel_bandwidth.py --json "$out/kernel.json"
stage latency 150 python bench/latency.py --preset base --batch-sizes 1 8 64 256 --repeats 3 --json "$out/latency.json"
stage granularity 40 python bench/graph_granularity.py --preset base --batch 64 --chunks 1 10 100 999 \
  --json "$out/granularity.json"
stage latency_bf16 40 python bench/latency.py --preset base --batch-sizes 64 --repeats 3 --dtype bfloat16 --skip-hf \
  --json "$out/latency_bf16.json"

# not issue 3's: training on the GPU (same draws as the CPU, resume to the same weights, bf16 autocast)
stage training 40 python -m pytest -q -k cuda tests/test_training.py
echo "training exit $?" >> "$logs/training.log"
cp "$logs/training.log" "$out/training.log"

python bench/gpu_table.py "$out" | tee "$out/table.md"
pack
