#!/usr/bin/env bash
# The GPU check of t2t_fast: one command on a machine with one GPU (H100/H200) and no network, at most
# 9 minutes. The steps run in order of value, so a time-out still leaves the most important results:
#   1. install   pip install --no-build-isolation --no-deps with T2T_FAST_CUDA=1 (a build without the CUDA
#                kernels is an error), then python -m t2t_fast.info
#   2. tests     the tests that need CUDA: every CUDA-only test, the kernels' parity on CUDA tensors, the
#                fast model's parity and bf16 autocast on CUDA, the launch recorder,
#                and the ahead-of-time compiles (registers, spills) with the machine's Triton
#   3. model     T2T-ViT-14 bf16 B=256, inference and training step: eager reference,
#                torch.compile(reference), fused (images/s, peak memory)
#   4. ops       the per-op benchmarks at the shapes T2T-ViT-14 runs (B=256 bf16): GB/s against the copy
#                bandwidth measured in the same run
# then the summary table, printed last. Everything goes to $OUT (else bench/out/gpu_check[_more|_cpu]):
# gpu_check.log, model.json and ops.json (pytest-benchmark), summary.md.
#
#   bash bench/gpu_check.sh          # the check; time estimate per step in bench/RESULTS.md
#   bash bench/gpu_check.sh more     # what does not fit, at most 5 minutes: torch.compile of the op
#                                    # references, fp32 and B=64 op rows, T2T-ViT-t-14 and T2T-ViT-24
#   bash bench/gpu_check.sh --cpu    # every step on CPU at tiny sizes, to check this script (CI runs it);
#                                    # installs (CPU only) just when t2t_fast is missing, writes only to
#                                    # the output folder
#
# Each step has a time limit within the run's budget, and each test one (--per-test-timeout, conftest.py).
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
mode=${1:-check}
case "$mode" in
    check) budget=540; out=${OUT:-$repo/bench/out/gpu_check} ;;
    more) budget=300; out=${OUT:-$repo/bench/out/gpu_check_more} ;;
    --cpu) budget=900; out=${OUT:-$repo/bench/out/gpu_check_cpu} ;;
    *) echo "usage: bash bench/gpu_check.sh [more|--cpu]" >&2; exit 2 ;;
esac
py=${PYTHON:-python3}
mkdir -p "$out"
out=$(cd "$out" && pwd)
log=$out/gpu_check.log
rm -f "$out"/{model,ops,ops_restructurize}.json "$out/summary.md"
: >"$log"
# Nothing lands in the checkout: pytest runs from a scratch folder (hypothesis' database, pytest's files),
# without bytecode files and without its cache.
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
export PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
start=$SECONDS
statuses=()

say() { echo "$*" | tee -a "$log"; }

limit_for() {  # CAP: the seconds a step may take: CAP, or what the budget has left (15 s kept for the summary)
    local left=$((budget - (SECONDS - start) - 15))
    echo $(($1 < left ? $1 : left))
}

# step NAME LIMIT COMMAND...: run COMMAND for at most LIMIT seconds (SIGINT, then SIGKILL 30 s later).
step() {
    local name=$1 limit=$2
    shift 2
    if [ "$limit" -lt 20 ]; then
        statuses+=("$name: not run (the ${budget} s budget is spent)")
        say "== $name: not run, the ${budget} s budget is spent"
        return 1
    fi
    say "== $name (at most ${limit} s): $*"
    local began=$SECONDS
    (cd "$scratch" && timeout --signal=INT --kill-after=30 "$limit" "$@") 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    local took=$((SECONDS - began))
    if [ "$rc" -eq 0 ]; then
        statuses+=("$name: ok, ${took} s")
    elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] || tail -n 5 "$log" | grep -q -- "--run-timeout:"; then
        statuses+=("$name: TIMED OUT after ${took} s (limit ${limit} s)")
    else
        statuses+=("$name: FAILED (exit code $rc), ${took} s")
    fi
    return "$rc"
}

install() {  # $1: T2T_FAST_CUDA value. Builds in a copy, so the checkout gets no build/ or egg-info.
    local src=$scratch/src
    mkdir -p "$src"
    cp -r "$repo"/{setup.py,pyproject.toml,README.md,t2t_fast,kernels,csrc} "$src"/
    find "$src" \( -name '*.so' -o -name __pycache__ \) -prune -exec rm -rf {} +
    step install "$(limit_for 240)" env T2T_FAST_CUDA="$1" "$py" -m pip install --no-build-isolation --no-deps \
        --no-cache-dir -q "$src"
}

installed() {  # t2t_fast imports from outside the checkout, with its extension (and, $1 = cuda, CUDA kernels)
    (cd "$scratch" && "$py" -c "
import sys
from t2t_fast._native import native_cuda_compiled, native_module
sys.exit(native_module() is None or ('$1' == 'cuda' and not native_cuda_compiled()))" 2>/dev/null)
}

missing_modules() {  # what the tests and benchmarks import beyond the package (no network: say so early)
    "$py" -c "
import importlib.util
print(' '.join(m for m in ('pytest', 'pytest_benchmark', 'hypothesis') if importlib.util.find_spec(m) is None))"
}

# pytest_ NAME CAP ARGS...: pytest ends its own run a little before the step's limit (--run-timeout,
# conftest.py), so that even then it writes its reports and benchmark JSON; the step's SIGINT is the backstop.
pytest_() {
    local limit
    limit=$(limit_for "$2")
    step "$1" "$limit" "$py" -m pytest -p no:cacheprovider -q -rfEs --run-timeout $((limit - 5 - limit / 8)) "${@:3}"
}

summary() {
    shopt -s nullglob
    local jsons=("$out"/*.json)
    {
        echo
        echo "## t2t_fast GPU check ($mode), $(date -u '+%Y-%m-%d %H:%M UTC'), $((SECONDS - start)) s"
        echo
        for s in "${statuses[@]}"; do
            echo "* $s"
        done
        echo
        "$py" "$repo/bench/gpu_check_summary.py" "${jsons[@]}"
    } >"$out/summary.md" 2>&1
    tee -a "$log" <"$out/summary.md"
}

# The ahead-of-time compiles come first: on all cores, into the kernel cache the launches read (the same
# cache keys), so the kernel tests after them compile little. Of the model tests, those that touch CUDA
# (parity, bf16 autocast); the torch.compile tests of the fast model run on CPU tensors (CI runs them).
tests=(tests/test_compile_specs.py tests/test_info_cli.py tests/test_fast_model.py
       tests/test_restructurize_unfold.py tests/test_soft_split_layernorm.py tests/test_favor_attention.py)
tests=("${tests[@]/#/$repo/}")
tests_k="not test_fast_model or cuda or bf16"
ops=("$repo"/bench/bench_{restructurize_unfold,soft_split_layernorm,favor_attention}.py)

# 1. install
if [ "$mode" = --cpu ]; then
    if installed cpu; then
        say "== install: t2t_fast is installed, not reinstalled"
    else
        install 0 || { summary; exit 1; }
    fi
else
    if [ "$mode" = check ] || ! installed cuda; then
        install 1 || { summary; exit 1; }
    fi
fi
step info "$(limit_for 30)" "$py" -m t2t_fast.info
if [ "$mode" != --cpu ] && ! installed cuda; then
    statuses+=("install: t2t_fast has no CUDA kernels: the check stops")
    summary
    exit 1
fi
missing=$(missing_modules)
if [ -n "$missing" ]; then
    statuses+=("missing Python modules (no network to install them): $missing")
    if [[ " $missing " == *" pytest "* ]]; then
        summary
        exit 1
    fi
fi

rc=0
case "$mode" in
    check)
        pytest_ tests 240 "${tests[@]}" -k "$tests_k" --per-test-timeout 120 || rc=1
        pytest_ model 240 "$repo/bench/bench_models.py" -k test_check --benchmark-only \
            --benchmark-json "$out/model.json" --per-test-timeout 200 || rc=1
        pytest_ ops 150 "${ops[@]}" -m gpu -k "not compiled and (not restructurize or (B256 and bfloat16))" \
            --benchmark-only --benchmark-json "$out/ops.json" --per-test-timeout 60 || rc=1 ;;
    more)
        # the compiled op references (with the fused rows again: the speedups need both in one run), then
        # the other restructurize rows, then two more models without torch.compile
        pytest_ ops 200 "${ops[@]}" -m gpu -k "not restructurize and not reference" --benchmark-only \
            --benchmark-json "$out/ops.json" --per-test-timeout 90 || rc=1
        pytest_ ops-restructurize 60 "${ops[0]}" -m gpu -k "not (B256 and bfloat16)" --benchmark-only \
            --benchmark-json "$out/ops_restructurize.json" --per-test-timeout 30 || rc=1
        pytest_ model 120 "$repo/bench/bench_models.py" -k "test_gpu and B256 and infer and not compiled and \
(t2t_vit_t_14 or t2t_vit_24)" --benchmark-only --benchmark-json "$out/model.json" --per-test-timeout 60 || rc=1 ;;
    --cpu)
        pytest_ tests 300 "${tests[@]}" -k "($tests_k) and (test_info or test_every_launch)" \
            --per-test-timeout 120 || rc=1
        pytest_ model 300 "$repo/bench/bench_models.py" -k test_check --tiny --benchmark-only \
            --benchmark-json "$out/model.json" --per-test-timeout 200 || rc=1
        # CPU rows at the smallest T2T shape stand in for the CUDA op rows (the others have none)
        pytest_ ops 120 "${ops[0]}" -k "cpu and B8 and tokens28" --benchmark-only \
            --benchmark-json "$out/ops.json" --per-test-timeout 60 || rc=1 ;;
esac
summary
exit "$rc"
