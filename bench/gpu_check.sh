#!/usr/bin/env bash
# GPU checks for a machine with CUDA: the GPU tests (the Triton kernels' parity on CUDA without the
# interpreter, cuda-graph backend vs reference on fixed seeds, graphed beam search parity), the kernel
# bandwidth benchmark and the latency benchmark (base preset, batch 1/8/64/256), then training on the GPU. A
# short table against the targets is printed last. Results go to the folder given as $1 (default $OUT, else
# ./gpu_results), as at most eight files, since that is all the device tool brings back: table.md, tests.log
# (the GPU tests, then training's), the five JSON results and logs.tgz (every log, the GPU and the versions),
# re-packed after each stage so a time limit keeps what ran. STAGES="tests profile" runs only those stages
# (after the install), for a second call that re-checks what a first one found; STAGES="blocks_tests blocks",
# STAGES=tune and STAGES=blocks_autotune run issues 21 and 22's stages, STAGES="ort_cuda ort_bench" issue 23's,
# each a call of its own (they are not in the default run); LATENCY_BATCHES="1 64" narrows the latency stage.
# Each stage has a time limit, in order of what the issue needs most; every stage at its limit adds up to under
# nine minutes (the device tool allows ten a command; tests/test_gpu_bench_scripts.py keeps them under 560 s),
# a normal run to far less.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-gpu_results}}"
mkdir -p "$out"
logs="$(mktemp -d)"
unset TRITON_INTERPRET

# stages that fill most of a device call alone run only when STAGES names them (STAGES=blocks ...)
OPT_IN=" blocks_tests blocks tune blocks_autotune ort_cuda ort_bench "
wanted() {  # the install always runs; without STAGES, every stage but the opt-in ones
  [[ "$1" == install* || " ${STAGES:-} " == *" $1 "* ]] || [[ -z "${STAGES:-}" && "$OPT_IN" != *" $1 "* ]]
}
pack() { tar czf "$out/logs.tgz" -C "$logs" . ; }
# stage NAME SECONDS COMMAND...: run with a time limit, its output in NAME.log; on failure show its tail
stage() {
  local name="$1" limit="$2"; shift 2
  wanted "$name" || return 0
  timeout "$limit" "$@" > "$logs/$name.log" 2>&1
  local code=$?
  if [ "$code" -eq 124 ]; then echo "== $name stopped at its ${limit}s limit; its tail:"; fi
  if [ "$code" -ne 0 ] && [ "$code" -ne 124 ]; then echo "== $name exited $code; its tail:"; fi
  [ "$code" -eq 0 ] || tail -8 "$logs/$name.log"
  pack
  return "$code"
}

# `python -m pip`: a bare `pip` may belong to another interpreter than `python` (it did on the device image)
# -e is setuptools' strict editable mode (pyproject.toml); an older setuptools that ignores the setting makes a
# lenient one, which cannot find the namespace subpackages ldlm.kernels and ldlm.export: then a plain install
stage install 45 python -m pip install --no-deps --no-build-isolation -e . || exit 1
python -c "import ldlm.kernels.reference, ldlm.export.manifest" 2>/dev/null || stage install_plain 45 python -m pip install --no-deps --no-build-isolation . || exit 1
python -c "import ldlm; print('ldlm from', ldlm.__file__)" 2>&1 | tee "$logs/ldlm.txt" || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$logs/gpu.txt" 2>&1
python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, \
'transformers', transformers.__version__)" 2>&1 | tee "$logs/versions.txt"

stage tests 100 python -m pytest -q --durations=15 tests/test_gpu.py tests/test_fused_update.py tests/test_add_layer_norm.py \
  tests/test_folded_reverse.py tests/test_fused_sampler.py tests/test_static_beam_search.py tests/test_backends.py \
  tests/test_beam_attention.py tests/test_conditional_engine.py
code=$?
if wanted tests; then
  echo "tests exit $code" >> "$logs/tests.log"
  cp "$logs/tests.log" "$out/tests.log"
  tail -3 "$out/tests.log"
fi

stage kernel 45 python bench/gpu/kernel_bandwidth.py --json "$out/kernel.json"
stage latency 150 python bench/gpu/latency.py --preset base --batch-sizes ${LATENCY_BATCHES:-1 8 64 256} --repeats 3 \
  --json "$out/latency.json"
stage granularity 40 python bench/gpu/graph_granularity.py --preset base --batch 64 --chunks 1 10 100 999 \
  --json "$out/granularity.json"
stage latency_bf16 50 python bench/gpu/latency.py --preset base --batch-sizes 64 --repeats 3 --dtype bfloat16 \
  --json "$out/latency_bf16.json"
# where the time goes: per-kernel device time of a step and a decoded token (each attention), fp32 and bf16;
# cuBLAS's rates on the step's shapes
stage profile 90 python bench/gpu/gpu_profile.py --preset base --batch-sizes 1 64 --modes fp32 bf16 --json "$out/profile.json"

# issues 21 and 22 (opt-in): the loop with every matmul fused with its neighbours (ldlm.kernels.fused_linear), also
# with float8 weights, against the engine and torch.compile of the reference; then the beam decode with fused
# blocks and the fused beam step against the engine and Hugging Face generate; same run. max-autotune compiles
# for minutes, so a call of its own
# (its call: STAGES="blocks_tests blocks"; the kernels' parity on CUDA first, their log beside the table)
stage blocks_tests 100 python -m pytest -q tests/test_fused_linear.py tests/test_beam_head.py
if wanted blocks_tests; then cp "$logs/blocks_tests.log" "$out/blocks_tests.log"; fi
stage blocks 400 python bench/gpu/fused_blocks.py --preset base --batch-sizes 1 64 --dtypes bfloat16 float32 --fp8 \
  --compile-modes reduce-overhead --compile-batches 64 --decode --decode-peers --json "$out/blocks.json"
# issue 21 (opt-in): fused_linear's tiles tuned per shape the engine launches, most important first, kept under
# kernels/tiles.json once committed (bench/gpu/tune_tiles.py --merge): then no run tunes at start-up
stage tune 420 python bench/gpu/tune_tiles.py --preset base --budget-s 330 --out "$out/tiles.json"
stage blocks_autotune 480 python bench/gpu/fused_blocks.py --preset base --batch-sizes 64 --dtypes bfloat16 float32 \
  --compile-modes max-autotune --no-engine --json "$out/blocks_autotune.json"

# issue 23 (opt-in, one call: STAGES="ort_cuda ort_bench", after the calls that bring onnxruntime-gpu in parts:
# `python bench/gpu/ort_gpu_wheel.py prepare` prints them): the wheel joined, checked and installed into a private
# folder first on PYTHONPATH (the image's CPU build stays); ORT's CUDA parity tests, then `ldlm bench` of the
# base preset: the onnx backend on CUDA with and without its CUDA graph beside the engine and the reference
ort_site=/tmp/ort-gpu
stage ort_cuda 170 bash -c "python bench/gpu/ort_gpu_wheel.py install --parts .ort-gpu --target $ort_site && \
  PYTHONPATH=$ort_site python -m pytest -q tests/test_gpu.py -k onnx"
if wanted ort_cuda; then cp "$logs/ort_cuda.log" "$out/ort_cuda.log"; fi
stage ort_bench 330 env PYTHONPATH=$ort_site ldlm bench --preset base --device cuda --onnx-cuda-graph \
  --backends reference cuda-graph onnx --batch-sizes 1 8 64 --iters 2 --no-progress --json "$out/ort_bench.json"

# not issue 3's: training on the GPU (same draws as the CPU, resume to the same weights, bf16 autocast)
stage training 40 python -m pytest -q -k cuda tests/test_training.py
code=$?
if wanted training; then
  echo "training exit $code" >> "$logs/training.log"
  { echo "== training"; cat "$logs/training.log"; } >> "$out/tests.log"
fi

python bench/gpu/gpu_table.py "$out" | tee "$out/table.md"
pack
