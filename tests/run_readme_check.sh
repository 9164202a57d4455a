#!/usr/bin/env bash
# README's install block and its "Use" block, run literally in a fresh venv that already has a CPU torch (as a
# user's machine may): checks that the install keeps that torch, that the Use snippet runs and gives what its
# comments say, and that the training commands explain a torchvision that does not match torch in one line.
#
#   bash tests/run_readme_check.sh [TORCH_REQUIREMENT]    (default torch==2.13.0: a CPU build)
#
# The install block's own `pip install torch ...` lines are the step the pre-installed torch stands for; every
# other line of the block runs as written. Work happens in a temporary folder, removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
torch_req=${1:-torch==2.13.0}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# the fenced block that follows `<!-- readme-check: NAME -->` in README.md
block() {
    awk -v marker="<!-- readme-check: $1 -->" '
        $0 == marker { found = 1; next }
        found && /^```/ { if (inside) exit; inside = 1; next }
        inside { print }' README.md
}
install=$(block install)
use=$(block use)
if [ -z "$install" ] || [ -z "$use" ]; then
    echo "readme check: README.md lacks the install or use block (<!-- readme-check: ... --> markers)" >&2
    exit 1
fi

python3 -m venv "$work/venv"
. "$work/venv/bin/activate"
python -m pip install --quiet --upgrade pip
python -m pip install --quiet "$torch_req"
before=$(python -c 'import torch; print(torch.__version__)' 2>/dev/null)  # (NumPy is not installed yet)
echo "readme check: fresh venv with torch $before"

grep -v '^pip install torch ' <<<"$install" >"$work/install.sh"
# the Use block runs on the CPU: skip compiling the CUDA kernels (about a minute with nvcc), as README allows
export T2T_FAST_CUDA=0
echo "readme check: running README's install block:"
sed 's/^/    /' "$work/install.sh"
bash -euo pipefail "$work/install.sh" >"$work/install.log" 2>&1 || {
    tail -30 "$work/install.log" >&2
    echo "readme check: README's install block failed" >&2
    exit 1
}
after=$(python -c 'import torch; print(torch.__version__)')
if [ "$after" != "$before" ]; then
    echo "readme check: the install replaced torch $before with $after" >&2
    exit 1
fi
echo "readme check: torch is still $after"

# the Use block, then what its comments promise; outside the checkout, so the installed package runs
cd "$work"
printf '%s\n' "$use" >use.py
python - <<'EOF'
import runpy

names = runpy.run_path("use.py")
assert tuple(names["logits"].shape) == (1, 1000), names["logits"].shape
assert names["names"] == ["t2t_vit_t_14", "t2t_vit_t_19", "t2t_vit_t_24"], names["names"]
assert names["model"].num_classes == 10 and type(names["ref"]).__module__.startswith("t2t_fast.reference")
print("readme check: the Use block ran")
EOF

# with a torchvision that does not load beside this torch, the training commands say so in one line, exit 2
if ! python -c 'import torchvision' >/dev/null 2>&1; then
    set +e
    t2t-fast train --epochs 1 >out.txt 2>err.txt
    rc=$?
    set -e
    if [ "$rc" -ne 2 ] || [ "$(wc -l <err.txt)" -ne 1 ] || ! grep -q "torchvision" err.txt || [ -e output ]; then
        echo "readme check: t2t-fast train with an unusable torchvision: exit $rc, stderr:" >&2
        cat err.txt >&2
        exit 1
    fi
    echo "readme check: t2t-fast train explains the torchvision mismatch: $(cat err.txt)"
fi
cd "$repo"
echo "readme check: passed"
