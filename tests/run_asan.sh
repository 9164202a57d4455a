#!/usr/bin/env bash
# The op tests against t2t_fast._C built with AddressSanitizer: every memory access of the C++ kernels and of
# the checks in front of them is checked. Builds a copy of the package into .asan-build/ (the installed package
# is left as it is) and runs pytest on it; extra arguments go to pytest.
#
#   bash tests/run_asan.sh                       # restructurize_unfold, the soft split's native path, the CPU kernels
#   bash tests/run_asan.sh tests/test_x.py -k y  # other tests
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import pybind11, setuptools" 2>/dev/null; then
    echo "run_asan.sh: the build needs pybind11 and setuptools here: pip install pybind11 setuptools" >&2
    exit 2
fi
build="$PWD/.asan-build"
rm -rf "$build"
mkdir -p "$build"
cp -r setup.py pyproject.toml README.md csrc kernels t2t_fast "$build"/
cp -r kernels "$build/t2t_fast/kernels"  # the layout an install gives: t2t_fast.kernels inside the package
rm -f "$build"/t2t_fast/_C*.so
(cd "$build" && T2T_FAST_SANITIZE=address T2T_FAST_CUDA=0 python setup.py -q build_ext --inplace >/dev/null)
# Python is not instrumented: the ASan runtime is preloaded, with libstdc++ (ASan's interceptor of C++ throws
# needs it loaded first). Leak checks are off: Python and torch keep memory until exit.
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)"
export ASAN_OPTIONS=detect_leaks=0 PYTHONPATH="$build"
# An editable install's import hook outranks PYTHONPATH: the tests would then run the normal build.
if [ "$(cd / && python -c 'import t2t_fast._C as c; print(c.__file__)')" != "$build"/t2t_fast/_C* ]; then
    echo "run_asan.sh: t2t_fast resolves to an editable install, which shadows the ASan build in $build;" \
         "run it where t2t_fast is installed with 'pip install .'" >&2
    exit 2
fi
if [ "$#" -eq 0 ]; then
    set -- tests/test_restructurize_unfold.py tests/test_soft_split_layernorm.py tests/test_cpu_kernels.py \
        tests/test_multihead_attention.py tests/test_add_layernorm.py tests/test_packed_linear.py \
        tests/test_encoder_blocks.py -k "not triton"
fi
python -m pytest "$@" -q -p no:cacheprovider
