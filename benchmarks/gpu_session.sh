#!/usr/bin/env bash
# The GPU figures issues 15 and 16 ask for, taken in one lent session. The device tool gives a
# session 15 minutes of GPU time in all (the machine's start included) and 10 minutes a call,
# so the steps are sized for two calls, each under its own time limit, so that a slow step
# cannot eat the next one's time:
#
#   bash benchmarks/gpu_session.sh tests models     # call 1: about 9 minutes at most
#   bash benchmarks/gpu_session.sh dynconv          # call 2: about 5 minutes at most
#
# Run from the repository root (the checkout, on PYTHONPATH: the device has torch, Triton and
# timm but no package registry). Each step's output goes to $OUT/STEP.txt (OUT defaults to
# ./gpu-results), with the device's name in $OUT/device.txt.
set -uo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
out="${OUT:-gpu-results}"
mkdir -p "$out"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  python -c 'import numpy, torch, triton
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__, "numpy", numpy.__version__)'
} > "$out/device.txt" 2>&1
status=0
for step in "$@"; do
    case "$step" in
        # every cuda-marked test (fused gates, the Triton dynamic convolution, CUDA latency)
        tests) cmd=(timeout 240 python -m pytest -q -m cuda tests -p no:cacheprovider) ;;
        # issue 15's table: fused, unfused and timm, inference and a training step, then compile
        models) cmd=(timeout 300 python benchmarks/bench_models.py --device cuda --quick) ;;
        # issue 16's figures: per layer and DY-/ODConv-ResNet-18, the Triton form beside the others
        dynconv) cmd=(timeout 300 python benchmarks/bench_dynconv.py --gpu-protocol) ;;
        *) echo "gpu_session.sh: unknown step '$step' (tests, models, dynconv)" >&2; exit 2 ;;
    esac
    echo "== $step: ${cmd[*]}" | tee "$out/$step.txt"
    "${cmd[@]}" 2>&1 | tee -a "$out/$step.txt"
    rc=${PIPESTATUS[0]}
    echo "== $step: exit $rc" | tee -a "$out/$step.txt"
    [ "$rc" -eq 0 ] || status=1
done
exit $status
