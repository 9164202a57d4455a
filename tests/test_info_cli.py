"""``python -m t2t_fast.info`` and the ``t2t-fast`` dispatcher."""
import re
import subprocess
import sys

from t2t_fast import cli
from t2t_fast.cli import info


def test_info_reports_versions_and_backends(tmp_path):
    # run outside the checkout so `-m` finds the installed package, not the source folder
    result = subprocess.run([sys.executable, "-m", "t2t_fast.info"], capture_output=True, text=True, check=True,
                            cwd=tmp_path)
    out = result.stdout
    for needle in ("torch", "triton", "native CUDA kernels", "backend triton on cuda"):
        assert needle in out, needle
    assert re.search(r"^native CPU kernels\s+compiled$", out, re.MULTILINE)
    details = info.collect()
    assert details["native CPU kernels"] == "compiled"
    assert details["backend torch on cpu"] == "available"
    assert details["backend cpp on cpu"] == "available"


def test_cli_usage_and_unknown_command(capsys):
    assert cli.main([]) == 0
    assert "train" in capsys.readouterr().out
    assert cli.main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err
