#!/bin/bash
# The GPU figures of benchmarks/ in one pass, on a machine with one CUDA GPU and JAX for CUDA
# installed (the project's requirements beside it), run from the repository root:
#
#   bash benchmarks/gpu_checks.sh OUT_DIR [quick]
#
#   1. the tests whose code depends on the platform (precision, mixed precision, accelerator
#      defaults, the step), on the GPU: their log, failures included, is a finding, not a stop;
#   2. python -m arco_jax.benchmark: the ARCO stage-2 step at 128 and 256 px in float32 and
#      bfloat16, arco.remat_student off (the GPU default) and on, and the plain UNet step;
#   3. the same UNet step in PyTorch (benchmarks/torch_unet_step.py), float32 and bfloat16, when
#      torch is importable;
#   4. a short training run of configs/demo.py with its progress lines and results.
#
# Everything lands in OUT_DIR (gpu_benchmark.json, torch_unet_*.json, logs, the run's
# results.md); `quick` keeps to the 256 px cases and fewer repeats. Nothing is downloaded.
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu_checks.sh OUT_DIR [quick]}
mode=${2:-full}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
python -c "import jax; d = jax.devices(); assert d[0].platform == 'gpu', d; print(d)" || {
    echo "gpu_checks: JAX sees no GPU" >&2; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.csv" 2>&1

repeats=10
cases=step:128,step:256,step:256:dtype=bfloat16,step:256:remat=on,step:256:dtype=bfloat16:remat=on,unet:128,unet:256,unet:256:dtype=bfloat16
if [ "$mode" = quick ]; then
    repeats=5
    cases=step:256,step:256:dtype=bfloat16,unet:256,unet:256:dtype=bfloat16
fi

echo "== 1. platform-dependent tests on the GPU"
JAX_PLATFORMS=cuda timeout 300 python -m pytest -q -n 0 -x --no-header -p no:cacheprovider \
    tests/test_accelerator_defaults.py tests/test_mixed_precision.py tests/test_step.py \
    > "$out/tests.log" 2>&1
echo "tests exit $? (log: tests.log)"; tail -3 "$out/tests.log"

echo "== 2. arco_jax.benchmark"
timeout 900 python -m arco_jax.benchmark --cases="$cases" --repeats=$repeats --out="$out/gpu_benchmark.json" \
    > "$out/benchmark.log" 2>&1
echo "benchmark exit $?"; tail -25 "$out/benchmark.log"

echo "== 3. the PyTorch UNet step"
if python -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
    for dtype in float32 bfloat16; do
        timeout 300 python benchmarks/torch_unet_step.py --size=256 --batch=8 --dtype=$dtype --repeats=$((2 * repeats)) \
            --out="$out/torch_unet_256_$dtype.json" > "$out/torch_unet_256_$dtype.log" 2>&1
        echo "torch $dtype exit $?: $(grep median_s "$out/torch_unet_256_$dtype.log")"
    done
else
    echo "torch with CUDA is not importable: skipped"
fi

echo "== 4. a short training run (configs/demo.py)"
workdir=$(mktemp -d)
timeout 600 python -m arco_jax.main --config=configs/demo.py --workdir="$workdir" > "$out/demo_run.log" 2>&1
echo "demo exit $?"; grep -E "compiled|steps/s|test \(best\)" "$out/demo_run.log" | tail -8
cp "$workdir/results.md" "$out/demo_results.md" 2>/dev/null || true
