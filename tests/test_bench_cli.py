"""Smoke tests of ``t2t-fast bench`` (t2t_fast.cli.bench, t2t_fast.bench) on a tiny configuration, and of its MAC
figures."""
import json

import pytest
import torch

import t2t_fast.reference
from t2t_fast import bench
from t2t_fast.cli import bench as bench_cli
from t2t_fast.cli import main as cli_main


def run_cli(tmp_path, *extra):
    return cli_main(["bench", "--device", "cpu", "--model", "t2t_vit_7", "--img-size", "32", "--batch", "1,2",
                     "--warmup", "1", "--reps", "2", "--no-compile", "--output", str(tmp_path), *extra])


def test_bench_cli_writes_table_json_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert run_cli(tmp_path) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if "provider" in line and "img/s" in line)
    assert "vs ref" in header and "% matmul ceil" in header
    rows = [line.split() for line in out.splitlines() if line.split()[:1] == ["t2t_vit_7"]]
    assert sorted((r[2], r[3]) for r in rows) == [("1", "fused"), ("1", "reference"), ("2", "fused"),
                                                  ("2", "reference")]
    assert not any("FAILED" in line for line in out.splitlines())

    data = json.loads((tmp_path / "t2t_fast_bench_cpu.json").read_text())
    assert data["environment"]["threads"] == bench.CPU_THREADS
    title = next(line for line in out.splitlines() if line.startswith("t2t-fast bench:"))
    assert f"CPU class {data['environment']['cpu_class']}, kernels {data['environment']['cpu_isa']}," in title
    assert data["environment"]["malloc"] in title  # what the CPU run set (or that it kept the defaults)
    assert data["ceilings"]["copy_bytes_per_s"] > 0 and data["ceilings"]["matmul_flops_per_s"] > 0
    results = data["results"]
    assert len(results) == 4
    macs = bench.count_macs(t2t_fast.reference.create_model("t2t_vit_7", img_size=32), torch.randn(1, 3, 32, 32))
    for r in results:
        assert r["mode"] == "infer" and r["dtype"] == "float32" and r["rounds"] == 2
        assert r["img_per_s"] > 0 and r["ms_per_step"] > 0 and 0 < r["pct_of_matmul_ceiling"] < 100
        assert r["macs_per_image"] == macs
        expected = 1.0 if r["provider"] == "reference" else None
        assert r["speedup_vs_reference"] > 0 and (expected is None or r["speedup_vs_reference"] == expected)
        assert "speedup_vs_compiled" not in r  # compile was skipped

    png = (tmp_path / "t2t_fast_bench_cpu.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_bench_cli_training_mode(tmp_path, capsys):
    assert run_cli(tmp_path, "--mode", "train", "--providers", "reference", "--batch", "2", "--no-ceilings") == 0
    results = json.loads((tmp_path / "t2t_fast_bench_cpu.json").read_text())["results"]
    assert [(r["mode"], r["batch"], r["provider"]) for r in results] == [("train", 2, "reference")]
    assert results[0]["img_per_s"] > 0 and "pct_of_matmul_ceiling" not in results[0]


def test_bench_cli_times_the_t2t_module(tmp_path):
    assert run_cli(tmp_path, "--part", "tokens_to_token", "--mode", "both", "--batch", "2", "--no-ceilings") == 0
    results = json.loads((tmp_path / "t2t_fast_bench_cpu.json").read_text())["results"]
    assert sorted((r["mode"], r["provider"]) for r in results) == [("infer", "fused"), ("infer", "reference"),
                                                                  ("train", "fused"), ("train", "reference")]
    module = t2t_fast.reference.create_model("t2t_vit_7", img_size=32).tokens_to_token
    macs = bench.count_macs(module, torch.randn(1, 3, 32, 32))
    assert all(r["model"] == "t2t_vit_7.tokens_to_token" and r["macs_per_image"] == macs and r["img_per_s"] > 0
               for r in results)


def test_bench_cli_reports_a_failing_provider(tmp_path, capsys):
    # an invalid backend makes the fused model fail to build: the row says why and the exit code is 1
    assert run_cli(tmp_path, "--backend", "no-such-backend", "--batch", "1", "--no-ceilings") == 1
    out = capsys.readouterr().out
    failed = [line for line in out.splitlines() if "FAILED" in line]
    assert len(failed) == 1 and "fused" in failed[0] and "no-such-backend" in failed[0]
    results = json.loads((tmp_path / "t2t_fast_bench_cpu.json").read_text())["results"]
    assert {r["provider"]: ("error" in r) for r in results} == {"reference": False, "fused": True}


@pytest.mark.parametrize("argv", [["--providers", "eager"], ["--batch", "0"], ["--dtype", "int8"],
                                  ["--model", "resnet50", "--part", "tokens_to_token"], ["--img-size", "0"],
                                  ["--threads", "0"], ["--reps", "0"], ["--warmup", "-1"], ["--model", "bogus"],
                                  ["--providers", "compiled", "--no-compile"], ["--device", "gpu"]])
def test_bench_cli_rejects_bad_arguments(tmp_path, argv, capsys):
    try:
        code = bench_cli.main(["--device", "cpu", "--output", str(tmp_path), *argv])
    except SystemExit as exc:  # argparse errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "t2t-fast bench: error: " in err, err
    assert not (tmp_path / "t2t_fast_bench_cpu.json").exists()


@pytest.mark.parametrize("name", sorted(bench.MACS_224))
def test_recorded_macs_match_the_reference_model(name):
    """The MAC figures the benchmarks divide by are those of the models benchmarked (224 px, one image)."""
    model = t2t_fast.reference.create_model(name).eval()
    image = torch.randn(1, 3, 224, 224)
    assert bench.count_macs(model, image) == bench.MACS_224[name]
    assert bench.count_macs(model.tokens_to_token, image) == bench.T2T_MODULE_MACS_224[name]


def test_plot_title_fits_the_figure(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure to measure it
    title = ("t2t-fast bench: a CPU with a long model name (8 cores), fp32, torch 2.14.1, triton 3.8.0, "
             "2026-01-01T00:00:00Z, commit abcdef0, load average 5.0 4.0 3.0")
    results = [{"model": "t2t_vit_7", "mode": "infer", "provider": "fused", "batch": 1, "img_per_s": 10.0}]
    bench.plot(results, str(tmp_path / "p.png"), title)
    fig = figures[0]
    renderer = fig.canvas.get_renderer()
    box = fig._suptitle.get_window_extent(renderer)
    assert 0 <= box.x0 and box.x1 <= fig.bbox.width and box.y1 <= fig.bbox.height, (box, fig.bbox)


def test_commit_of_the_benchmarked_checkout(tmp_path):
    import subprocess

    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q",
                    "--allow-empty", "-m", "x"], check=True)
    head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
    assert bench.git_commit(tmp_path) == head
    assert bench.git_commit(tmp_path / "nowhere") is None


def test_keep_freed_memory_reports_what_it_set(monkeypatch):
    """With glibc, malloc's trim and mmap thresholds are set and said so; elsewhere nothing is changed (None)."""
    import ctypes
    import platform

    described = bench.keep_freed_memory()
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert described.startswith("glibc malloc keeps freed memory")
    else:
        assert described is None
    monkeypatch.setattr(ctypes, "CDLL", lambda name: (_ for _ in ()).throw(OSError("no C library")))
    assert bench.keep_freed_memory() is None
