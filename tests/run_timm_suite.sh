#!/usr/bin/env bash
# timm's own model test suite (tests/test_models.py from the sdist of the installed timm) on the T2T-ViT
# models, treated as timm treats its ViTs: listed among the non-standard models (no conv-style spatial
# features) and among the modules with forward_intermediates / features_only. Needs PyPI for the sdist (kept in
# .timm-suite/). The two tests that download weights read stand-in files of the released names instead, unless
# T2T_FAST_TIMM_DOWNLOAD=1 (see tests/timm_suite/conftest.py). Extra arguments go to pytest.
#
#   bash tests/run_timm_suite.sh                         # all 14 variants
#   bash tests/run_timm_suite.sh -k "t2t_vit_7 or ghost" # a selection (pytest -k on the test ids)
set -euo pipefail
cd "$(dirname "$0")/.."
if ! version=$(python -c "import timm; print(timm.__version__)" 2>/dev/null); then
    echo "run_timm_suite.sh: timm is not installed here: pip install '.[train]'" >&2
    exit 2
fi
work="$PWD/.timm-suite/timm-$version"
if [ ! -f "$work/tests/test_models.py" ]; then
    rm -rf "$work" && mkdir -p "$work"
    python -m pip download --quiet --no-deps --no-binary :all: "timm==$version" -d "$work"
    tar -xzf "$work/timm-$version.tar.gz" -C "$work" --strip-components=1 "timm-$version/tests"
fi
suite="$work/t2t_suite"
rm -rf "$suite" && mkdir -p "$suite"
python tests/timm_suite/adapt.py "$work/tests/test_models.py" "$suite/test_models.py"
cp tests/timm_suite/conftest.py tests/timm_suite/pytest.ini "$suite"/
# timm's suite lists every timm model too: without a -k of the caller's, select the T2T-ViT ones.
case " $* " in
    *" -k "*) ;;
    *) set -- -k "t2t_vit" "$@" ;;
esac
# The suite's own pytest.ini makes its folder the root: neither the repository's configuration nor its
# conftest applies there.
cd "$suite" && python -m pytest test_models.py -c pytest.ini -q -p no:cacheprovider -rfE "$@"
