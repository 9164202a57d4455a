"""``python -m t2t_fast.info`` and the ``t2t-fast`` dispatcher."""
import re
import subprocess
import sys

import pytest

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
    from t2t_fast import backend

    assert details["CPU class (kernel choices)"] == backend.cpu_class()
    assert details["CPU packed linears"] == info.packed_linears_line(backend.cpu_class(), backend.cpu_isa())
    assert details["CPU kernel ISA"].startswith(f"{backend.cpu_isa()} (this CPU runs: ")
    from t2t_fast.training import requirements_problem

    assert details["train extra (timm, torchvision, ...)"] == (requirements_problem() or "usable")
    if details["cuda device"] == "none":  # no backend is "available" on a device that is not there
        assert all(details[f"backend {name} on cuda"].startswith("unavailable")
                   for name in ("triton", "cuda", "cpp", "torch"))


def test_info_names_the_packed_linears(monkeypatch):
    """The packed-weight linears' row limits of the CPU class, or why none run."""
    import torch

    from t2t_fast import onednn

    monkeypatch.setattr(onednn, "PACKED_LINEAR_MAX_ROWS", {"amx": {torch.bfloat16: 800, torch.float32: 1600}})
    assert info.packed_linears_line("amx", "amx") == ("bfloat16 up to 800 rows, float32 up to 1600 rows (more rows: "
                                                      "oneDNN's primitive)")
    assert info.packed_linears_line("amx", "avx2") == "none with the CPU kernel ISA avx2 (oneDNN's primitive)"
    assert info.packed_linears_line("none", "avx512") == "none on this CPU class (oneDNN's primitive)"


def test_torchvision_pairs_with_torch(monkeypatch):
    pytest.importorskip("timm")
    import torch

    from t2t_fast import training

    assert training.expected_torchvision("2.13.0+cpu") == "0.28"
    assert training.expected_torchvision("2.4.1") == "0.19"
    assert training.requirements_problem() is None
    monkeypatch.setattr(torch, "__version__", "2.9.1+cpu")
    problem = training.requirements_problem()
    assert "was built for another torch than 2.9.1+cpu" in problem
    assert 'pip install "torchvision==0.24.*" --index-url https://download.pytorch.org/whl/cpu' in problem
    assert len(problem.splitlines()) == 1


def test_help_columns_never_touch():
    from t2t_fast.cli import train

    table = train.build_parser().format_help().split("recipe defaults")[1]
    rows = [line for line in table.splitlines() if line.startswith("  --")]
    assert any(line.split()[:3] == ["--ratio", "0.75", "1.33333"] for line in rows)
    for line in rows:  # the flag, then each of the two recipes' values, separated by at least two spaces
        assert len(re.split(r" {2,}", line.strip())) == 3, line


def test_cli_usage_and_unknown_command(capsys):
    assert cli.main([]) == 0
    assert "train" in capsys.readouterr().out
    assert cli.main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_info_help_and_unknown_options(capsys):
    assert cli.main(["info", "--help"]) == 0 and "usage: t2t-fast info" in capsys.readouterr().out
    assert cli.main(["info", "--verbose"]) == 2
    assert capsys.readouterr().err.strip() == "t2t-fast info: error: it takes no options, got --verbose"
