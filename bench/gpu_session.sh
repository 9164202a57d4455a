#!/usr/bin/env bash
# The GPU work of a session lent an H100/H200, in steps that each fit the device tool's 10-minute limit.
# Run from the repository root on the GPU machine (the device tool's `run` does), one step per call:
#
#   bash bench/gpu_session.sh install      # build t2t_fast._C with its CUDA kernels (~1-2 min)
#   bash bench/gpu_session.sh test         # pytest tests/ on CUDA (every CUDA-only test runs)
#   bash bench/gpu_session.sh bench-ops    # the op benchmarks: restructurize_unfold, soft split + LN, FAVOR+
#   bash bench/gpu_session.sh bench-model infer   # T2T-ViT-14 bf16 inference, B=64/256, vs eager/compiled
#   bash bench/gpu_session.sh bench-model train   # the same for a training step (torch.compile takes minutes)
#
# Each step installs first if t2t_fast is missing (a fresh machine), and writes its log and pytest-benchmark
# JSON to $OUT (the device tool brings that folder back) or to bench/out. The GPU images have no network:
# the install uses the image's own torch, triton, pybind11 and setuptools (no build isolation, no deps).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python=python3

install() {
    "$python" -m pip install --no-build-isolation --no-deps --no-cache-dir . 2>&1 | tail -3
    (cd /tmp && "$python" -m t2t_fast.info) | tee "$out/info.txt"
}

ensure_installed() {
    if ! (cd /tmp && "$python" -c "import t2t_fast._C" 2>/dev/null); then
        install
    fi
}

run_pytest() {  # log name, pytest arguments...
    local name=$1
    shift
    set +e
    "$python" -m pytest "$@" -p no:cacheprovider 2>&1 | tee "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    set -e
    echo "$name: pytest exit code $rc"
    return "$rc"
}

case "${1:-}" in
    install)
        install ;;
    test)
        ensure_installed
        run_pytest tests_cuda tests/ -q -rs ;;
    bench-ops)
        ensure_installed
        run_pytest bench_ops bench/bench_restructurize_unfold.py bench/bench_soft_split_layernorm.py \
            bench/bench_favor_attention.py --benchmark-only -m gpu \
            --benchmark-json "$out/bench_ops_cuda.json" ;;
    bench-model)
        mode=${2:-}
        if [ "$mode" != infer ] && [ "$mode" != train ]; then
            echo "usage: bash bench/gpu_session.sh bench-model infer|train" >&2
            exit 2
        fi
        ensure_installed
        run_pytest "bench_model_$mode" bench/bench_models.py --benchmark-only \
            -k "gpu and (ceiling or t2t_vit_14-$mode)" --benchmark-json "$out/bench_model_${mode}_cuda.json" ;;
    *)
        echo "usage: bash bench/gpu_session.sh install|test|bench-ops|bench-model infer|train" >&2
        exit 2 ;;
esac
