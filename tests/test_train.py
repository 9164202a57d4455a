"""t2t-fast train / eval / finetune: exact resume, 2-process DDP, eval reproducing the logged accuracy,
fine-tuning, and clear errors on bad input. Tiny models and datasets keep the file fast on 2 CPU cores."""
import argparse
import contextlib
import json
import logging
import os
import subprocess
import sys
import urllib.error

import numpy as np
import pytest
import torch

pytest.importorskip("timm")
pytest.importorskip("sklearn")

from t2t_fast import cli  # noqa: E402
from t2t_fast.checkpoint import read_checkpoint  # noqa: E402
from t2t_fast.cli import train as train_cli  # noqa: E402
from t2t_fast.training import data as data_lib  # noqa: E402
from t2t_fast.training.loop import StopTraining  # noqa: E402

# a ~20k-parameter T2T-ViT-7 geometry: the full T2T module and backbone code paths, little compute
# --device cpu: the runs are compared bit for bit (resume, DDP replicas, eval against the logged accuracy), which
# a GPU machine's default (CUDA, bf16 autocast, one device for two DDP ranks) would not give
TINY = ["--model", "t2t_vit_7", "--img-size", "32", "--model-kwargs", "depth=1", "embed_dim=32", "num_heads=2",
        "token_dim=8", "--workers", "0", "--log-interval", "2", "--threads", "1", "--device", "cpu"]


def _write_image_folder(root, classes, n_train, n_val, seed=0):
    """Colour-coded random 32x32 PNGs: learnable, tiny."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, count in (("train", n_train), ("val", n_val)):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 96, (32, 32, 3), dtype=np.uint8)
                pixels[..., c % 3] += 120
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return _write_image_folder(tmp_path_factory.mktemp("tiny"), ["cat", "dog", "emu"], n_train=8, n_val=4)


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    """One finished 2-epoch run on the tiny ImageFolder (official recipe: RandAugment, mixup, EMA, ...)."""
    out = tmp_path_factory.mktemp("run")
    rc = cli.main(["train", "--data", str(tiny_data), "--output", str(out), "--batch-size", "8", "--epochs", "2",
                   "--warmup-epochs", "1", "--cooldown-epochs", "0", "--model-ema-decay", "0.9", *TINY])
    assert rc == 0
    return out


def _train(data, out, *extra, callbacks=()):
    return train_cli.main(["--data", str(data), "--output", str(out), "--batch-size", "8", "--epochs", "3",
                           "--warmup-epochs", "1", "--cooldown-epochs", "0", "--model-ema-decay", "0.9", *TINY,
                           *extra], callbacks=callbacks)


class StopAfterSteps:
    """Ends the run like a killed process once it has taken ``steps`` optimizer steps."""

    def __init__(self, steps):
        self.steps = steps

    def on_step_end(self, run):
        if run.num_updates >= self.steps:
            raise StopTraining(f"stopped after {run.num_updates} steps")


def _assert_states_equal(a, b, what):
    assert a.keys() == b.keys(), what
    for key in a:
        assert torch.equal(a[key], b[key]), f"{what}: {key} differs"


def test_kill_and_resume_is_exact(tiny_data, tmp_path):
    # 3 epochs x 3 steps (24 images, batch 8); the killed run stops at step 5, inside epoch 1
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert _train(tiny_data, full) == 0
    assert _train(tiny_data, killed, callbacks=[StopAfterSteps(5)]) == 3
    survivor = read_checkpoint(str(killed / "last.pth"))
    assert survivor["epoch"] == 0 and survivor["step"] == 3  # the interrupted epoch left the checkpoint alone
    assert not [f for f in os.listdir(killed) if f.endswith(".tmp")]
    assert _train(tiny_data, killed, "--resume", str(killed / "last.pth")) == 0

    a, b = read_checkpoint(str(full / "last.pth")), read_checkpoint(str(killed / "last.pth"))
    assert a["step"] == b["step"] == 9 and a["epoch"] == b["epoch"] == 2
    _assert_states_equal(a["state_dict"], b["state_dict"], "weights")
    _assert_states_equal(a["state_dict_ema"], b["state_dict_ema"], "EMA weights")
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        _assert_states_equal(sa, sb, "optimizer state")
    # sanity: training moved the weights (so equality above is not trivial)
    first = read_checkpoint(str(killed / "last.pth"))["state_dict"]
    assert not torch.equal(first["head.weight"], survivor["state_dict"]["head.weight"])
    rows, rows_full = json.load(open(killed / "summary.json")), json.load(open(full / "summary.json"))
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    for key in ("train_loss", "val_top1", "val_ema_loss", "lr"):
        assert [r[key] for r in rows] == [r[key] for r in rows_full], key


# `t2t-fast train` with a callback that writes every rank's weights at the end of each epoch
TRAIN_SAVING_RANK_WEIGHTS = """
import os, sys, torch
from t2t_fast.cli import train

class SaveRankWeights:
    def on_epoch_end(self, run, row):
        torch.save({"model": run.model.state_dict(), "ema": run.ema.module.state_dict() if run.ema else None},
                   os.path.join(run.output, f"rank{run.dist.rank}_weights.pt"))

sys.exit(train.main(sys.argv[1:], callbacks=[SaveRankWeights()]))
"""


def test_ddp_two_processes_on_cpu(tiny_data, tmp_path):
    out = tmp_path / "ddp"
    script = tmp_path / "train_saving_rank_weights.py"
    script.write_text(TRAIN_SAVING_RANK_WEIGHTS)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), "--data", str(tiny_data), "--output", str(out), "--batch-size", "4",
           "--epochs", "1", "--warmup-epochs", "0", "--cooldown-epochs", "0", *TINY]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rank0 = torch.load(out / "rank0_weights.pt")
    rank1 = torch.load(out / "rank1_weights.pt")
    _assert_states_equal(rank0["model"], rank1["model"], "replicas")
    _assert_states_equal(rank0["ema"], rank1["ema"], "EMA replicas")
    saved = read_checkpoint(str(out / "last.pth"))
    _assert_states_equal(rank0["model"], saved["state_dict"], "saved weights")
    _assert_states_equal(rank0["ema"], saved["state_dict_ema"], "saved EMA weights")
    assert saved["step"] == 3  # 24 images / (2 processes x 4)
    assert len(saved["rng"]) == 2
    row = json.load(open(out / "summary.json"))[-1]
    assert row["val_count"] == 12  # every validation image exactly once across the two ranks
    assert "processes x batch" in proc.stdout and proc.stdout.count("t2t_vit_7:") == 1  # rank 0 logs only


def test_eval_reproduces_logged_accuracy(trained, tiny_data, tmp_path):
    logged = json.load(open(trained / "summary.json"))[-1]
    for extra, key in (([], "val_ema_top1"), (["--no-ema"], "val_top1")):
        results = tmp_path / "r.json"
        assert cli.main(["eval", "--checkpoint", str(trained / "last.pth"), "--data", str(tiny_data),
                         "--workers", "0", "--device", "cpu", "--results-file", str(results), *extra]) == 0
        got = json.load(open(results))
        assert got["count"] == 12
        assert got["top1"] == pytest.approx(logged[key], abs=1e-9)
        assert got["top5"] == pytest.approx(logged[key.replace("top1", "top5")], abs=1e-9)


@pytest.mark.parametrize("run, flags, expected", [
    ({"amp": True, "amp_dtype": "float16"}, [], (True, "float16")),
    ({"amp": True, "amp_dtype": "bfloat16"}, ["--no-amp"], (False, "bfloat16")),
    ({"amp": False}, [], (False, "bfloat16")),
    ({}, ["--amp"], (True, "bfloat16")),
    ({"amp": True, "amp_dtype": "float16"}, ["--amp-dtype", "bfloat16"], (True, "bfloat16")),
])
def test_eval_autocast_follows_the_run(run, flags, expected):
    """A run that validated under autocast (the default on GPU) is evaluated under the same autocast, so that
    eval reproduces its logged accuracy; the flags override."""
    from t2t_fast.cli import evaluate

    args = evaluate.build_parser().parse_args(["--checkpoint", "x.pth", "--data", "d", *flags])
    evaluate._settings(args, {"args": {"model": "t2t_vit_7", **run}})
    assert (args.amp, args.amp_dtype) == expected


def test_digits_demo_and_eval_without_data(tmp_path, capsys):
    out = tmp_path / "digits"
    assert cli.main(["train", "--output", str(out), "--epochs", "1", "--batch-size", "256", "--no-model-ema",
                     *TINY]) == 0
    assert "1437 train / 360 val images" in capsys.readouterr().out
    logged = json.load(open(out / "summary.json"))[-1]
    results = tmp_path / "r.json"
    assert cli.main(["eval", "--checkpoint", str(out / "last.pth"), "--workers", "0", "--device", "cpu",
                     "--results-file", str(results)]) == 0
    got = json.load(open(results))
    assert got["count"] == 360 and got["top1"] == pytest.approx(logged["val_top1"], abs=1e-9)


def test_finetune_new_head_and_transfer_lr(trained, tmp_path):
    target = _write_image_folder(tmp_path / "pets", ["a", "b"], n_train=4, n_val=2, seed=1)
    out = tmp_path / "ft"
    assert cli.main(["finetune", "--checkpoint", str(trained / "best.pth"), "--data", str(target), "--output",
                     str(out), "--epochs", "1", "--batch-size", "4", "--lr", "0.05", *TINY]) == 0
    ckpt = read_checkpoint(str(out / "last.pth"))
    assert ckpt["state_dict"]["head.weight"].shape == (2, 32)
    body, head = ckpt["optimizer"]["param_groups"]
    assert head["lr"] == pytest.approx(body["lr"] / 0.01) and body["momentum"] == 0.9
    assert json.load(open(out / "summary.json"))[-1]["lr"] == pytest.approx(head["lr"])  # the head's, not 1 %
    assert ckpt["args"]["opt"] == "sgd" and ckpt["args"]["weight_decay"] == 5e-4
    # the backbone started from the checkpoint, not from scratch
    source = read_checkpoint(str(trained / "best.pth"))["state_dict_ema"]
    moved = ckpt["state_dict"]["tokens_to_token.project.weight"] - source["tokens_to_token.project.weight"]
    assert moved.abs().max() < 0.05


@pytest.mark.parametrize("case", ["missing", "no_val", "empty", "batch", "model"])
def test_bad_input_is_a_clear_error(case, tiny_data, tmp_path, capsys):
    data, extra = tiny_data, []
    if case == "missing":
        data = tmp_path / "nope"
    elif case == "no_val":
        (tmp_path / "d" / "train" / "x").mkdir(parents=True)
        data = tmp_path / "d"
    elif case == "empty":
        for split in ("train", "val"):
            (tmp_path / "d" / split / "x").mkdir(parents=True)
        data = tmp_path / "d"
    elif case == "batch":
        extra = ["--batch-size", "64"]
    elif case == "model":
        extra = ["--model", "t2t_vit_77"]
    rc = cli.main(["train", "--data", str(data), "--output", str(tmp_path / "out"), "--epochs", "1", *TINY, *extra])
    err = capsys.readouterr().err
    assert rc == 2
    expected = {"missing": "does not exist", "no_val": "missing: val", "empty": "no valid file",
                "batch": "larger than the 24 training images", "model": "Did you mean t2t_vit_7"}[case]
    assert expected in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()  # refused before the run folder is created


def test_checkpoint_of_another_variant(trained, tiny_data, tmp_path, capsys):
    # the tiny run's checkpoint into the real t2t_vit_7 (no --model-kwargs): every mis-shaped key is listed
    rc = cli.main(["eval", "--checkpoint", str(trained / "last.pth"), "--data", str(tiny_data), "--model",
                   "t2t_vit_7", "--model-kwargs", "--workers", "0"])
    err = capsys.readouterr().err
    assert rc == 2 and "does not fit t2t_vit_7" in err and "blocks.0.attn.qkv.weight" in err, err
    # resuming with other options is refused before anything is written
    before = os.path.getmtime(trained / "last.pth")
    rc = _train(tiny_data, trained, "--resume", str(trained / "last.pth"), "--img-size", "64")
    assert rc == 2 and "resume with the same options" in capsys.readouterr().err
    # a weights-only file is not a training checkpoint
    torch.save(read_checkpoint(str(trained / "last.pth"))["state_dict"], tmp_path / "weights.pth")
    rc = _train(tiny_data, tmp_path / "o", "--resume", str(tmp_path / "weights.pth"))
    assert rc == 2 and "not a training checkpoint" in capsys.readouterr().err
    assert os.path.getmtime(trained / "last.pth") == before


def test_unreadable_images_are_skipped_and_counted(tiny_data, tmp_path, capsys):
    """Each unreadable file is warned about once per run, however many epochs and loader workers read it."""
    import shutil

    data = tmp_path / "d"
    shutil.copytree(tiny_data, data)
    (data / "train" / "cat" / "broken.png").write_bytes(b"not a png")
    (data / "train" / "dog" / "truncated.png").write_bytes((data / "train" / "dog" / "0.png").read_bytes()[:40])
    rc = cli.main(["train", "--data", str(data), "--output", str(tmp_path / "out"), "--epochs", "2",
                   "--batch-size", "26", "--warmup-epochs", "0", "--cooldown-epochs", "0", *TINY, "--workers", "2"])
    assert rc == 0
    warnings = [line for line in capsys.readouterr().out.splitlines() if "skipping unreadable image" in line]
    assert sorted(line.split()[3] for line in warnings) == [str(data / "train" / "cat" / "broken.png") + ":",
                                                            str(data / "train" / "dog" / "truncated.png") + ":"]
    rows = json.load(open(tmp_path / "out" / "summary.json"))
    assert [row["train_skipped"] for row in rows] == [2, 2]


def test_official_randaugment_posterize_zero_bits():
    # rand-m9-mstd0.5-inc1 asks PosterizeIncreasing for 0 bits at magnitude 10; Pillow 13 raises there
    from PIL import Image

    from t2t_fast.training import recipes

    args = recipes.apply_recipe(train_cli.build_parser().parse_args(["--data", "x", "--img-size", "32"]),
                                recipes.OFFICIAL_RECIPE)
    transform, _ = recipes.default_transforms(args)
    ops = {op.name: op for stage in transform.transforms for op in getattr(stage, "ops", ())}
    image = Image.new("RGB", (8, 8), (200, 100, 50))
    assert ops["PosterizeIncreasing"].aug_fn(image, 0).getextrema() == ((0, 0),) * 3
    assert ops["PosterizeIncreasing"].aug_fn(image, 2).getextrema() == ((192, 192), (64, 64), (0, 0))


def test_finetune_takes_the_checkpoints_architecture_and_resumes_alone(trained, tmp_path, capsys):
    """A t2t-fast checkpoint gives finetune its model and --model-kwargs (its run's architecture); --resume alone
    finds the run's data; --pretrained for a variant without released weights says to give --checkpoint."""
    target = _write_image_folder(tmp_path / "pets", ["a", "b"], n_train=4, n_val=2, seed=1)
    out = tmp_path / "ft"
    assert cli.main(["finetune", "--checkpoint", str(trained / "best.pth"), "--data", str(target), "--output",
                     str(out), "--epochs", "1", "--batch-size", "4", "--img-size", "32", "--workers", "0",
                     "--threads", "1", "--device", "cpu"]) == 0
    assert read_checkpoint(str(out / "last.pth"))["args"]["model_kwargs"] == TINY[TINY.index("--model-kwargs") + 1:
                                                                               TINY.index("--workers")]
    capsys.readouterr()
    assert cli.main(["finetune", "--resume", str(out / "last.pth")]) == 0
    assert "nothing left to do" in capsys.readouterr().out
    # the resume command as Ctrl-C prints it names the starting weights, which resuming does not read
    start = tmp_path / "start.pth"
    start.write_bytes((trained / "best.pth").read_bytes())
    out2 = tmp_path / "ft2"
    argv = ["finetune", "--checkpoint", str(start), "--data", str(target), "--output", str(out2), "--epochs", "1",
            "--batch-size", "4", "--img-size", "32", "--workers", "0", "--threads", "1", "--device", "cpu"]
    assert cli.main(argv) == 0
    start.unlink()
    capsys.readouterr()
    assert cli.main([*argv, "--resume", str(out2 / "last.pth")]) == 0
    assert "nothing left to do" in capsys.readouterr().out
    rc = cli.main(["finetune", "--pretrained", "--model", "t2t_vit_14_wide", "--data", str(target)])
    err = capsys.readouterr().err
    assert rc == 2 and "--pretrained: no official checkpoint was released for t2t_vit_14_wide" in err, err
    assert "give --checkpoint FILE" in err


def test_finetune_bad_input(trained, tmp_path, capsys):
    rc = cli.main(["finetune", "--data", str(tmp_path), *TINY])
    assert rc == 2 and "give --checkpoint FILE" in capsys.readouterr().err
    rc = cli.main(["finetune", "--checkpoint", str(trained / "best.pth"), "--dataset", "cifar10", "--data",
                   str(tmp_path), "--output", str(tmp_path / "o"), *TINY])
    err = capsys.readouterr().err
    assert rc == 2 and "cifar-10-batches-py" in err and "download=True" not in err, err


def test_oversized_images_are_unreadable_and_unreadable_val_batches_pass(tmp_path, monkeypatch):
    """An image past PIL's decompression-bomb limit is skipped as unreadable; a validation batch with no readable
    image is counted and passed over (a training one stops the run: every process must step)."""
    from PIL import Image

    from t2t_fast.training.distributed import Distributed
    from t2t_fast.training.loop import validate

    root = _write_image_folder(tmp_path / "d", ["a", "b"], n_train=1, n_val=2)
    Image.new("RGB", (80, 80)).save(root / "val" / "b" / "2_big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # PIL refuses images past twice this (6400 > 4000 > 1024)
    folder = data_lib.SafeImageFolder(str(root / "val"), lambda image: torch.zeros(3, 8, 8))
    unreadable = [isinstance(folder[i], data_lib.Unreadable) for i in range(len(folder))]
    assert unreadable == [False, False, False, False, True]
    skipped = [data_lib.Unreadable("a.png", "bad"), data_lib.Unreadable("b.png", "bad")]
    assert data_lib.collate_skip_unreadable(skipped) == (None, None, skipped)
    loader = torch.utils.data.DataLoader(folder, batch_size=2, collate_fn=data_lib.collate_skip_unreadable)
    batches = [batch[2] for batch in data_lib.readable_batches(loader)]
    assert batches == [0, 0, 1]  # the last batch: the big image alone
    dist = Distributed("cpu")
    try:
        metrics = validate(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 2)), loader, dist,
                           contextlib.nullcontext)
    finally:
        dist.close()
    assert metrics["count"] == 4 and metrics["skipped"] == 1


def test_mixup_takes_batches_left_odd_by_unreadable_images():
    """timm's mixup pairs a batch's images: a batch left odd by skipped images leaves out its last image; a batch of
    one is not mixed, its target only smoothed."""
    from timm.data import Mixup

    from t2t_fast.training.loop import _mix

    torch.manual_seed(0)
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=4)
    images, targets = torch.randn(3, 3, 8, 8), torch.tensor([0, 1, 2])
    mixed, soft = _mix(mixup, images, targets)
    assert mixed.shape == (2, 3, 8, 8) and soft.shape == (2, 4) and torch.allclose(soft.sum(1), torch.ones(2))
    single, smoothed = _mix(mixup, images[:1], targets[:1])
    assert torch.equal(single, images[:1])
    assert torch.allclose(smoothed, torch.tensor([[0.925, 0.025, 0.025, 0.025]]))


def test_default_run_folders_are_numbered_past_earlier_runs(tmp_path, monkeypatch):
    """Without --output a run goes to output/<model>-<data> (finetune: ...-finetune), or the first of -2, -3, ...
    that holds no run: an earlier run's checkpoints are never overwritten. --resume keeps its run's folder."""
    from t2t_fast.training.run import _claim_output

    monkeypatch.chdir(tmp_path)

    def claimed(suffix="", **options):
        args = argparse.Namespace(**{**dict(output=None, resume=None, model="t2t_vit_7", data=None), **options})
        _claim_output(args, suffix)
        return args.output

    first = os.path.join("output", "t2t_vit_7-digits")
    assert claimed() == first and claimed("-finetune") == first + "-finetune"
    os.makedirs(first)
    (tmp_path / first / "log.txt").write_text("")  # a folder without checkpoints is no run
    assert claimed() == first
    (tmp_path / first / "best.pth").write_bytes(b"")
    assert claimed() == first + "-2"
    os.makedirs(first + "-2")
    (tmp_path / (first + "-2") / "last.pth").write_bytes(b"")
    assert claimed() == first + "-3" and claimed(data="/x/pets/") == os.path.join("output", "t2t_vit_7-pets")
    assert claimed(resume=os.path.join(first, "last.pth")) == first
    assert claimed(resume=os.path.join(first, "last.pth"), output=first) == first
    assert claimed(resume=os.path.join(first, "last.pth"), output="elsewhere") == "elsewhere"
    with pytest.raises(data_lib.DataError, match="--output output/t2t_vit_7-digits-2 holds another run"):
        claimed(resume=os.path.join(first, "last.pth"), output=first + "-2")


def test_finetune_without_network_is_one_line(tmp_path, capsys, monkeypatch):
    """Fine-tuning from the released weights where they cannot be downloaded: one line saying how to give a local
    copy, exit code 2."""
    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("no network here")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    target = _write_image_folder(tmp_path / "pets", ["a", "b"], n_train=4, n_val=2, seed=1)
    rc = cli.main(["finetune", "--model", "t2t_vit_7", "--pretrained", "--data", str(target), "--output",
                   str(tmp_path / "o"), "--epochs", "1", "--batch-size", "4", "--workers", "0", "--threads", "1",
                   "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "could not download https://" in err and "no network here" in err and "--checkpoint PATH" in err, err
    assert not (tmp_path / "o").exists()


def test_eval_official_checkpoint_layout(trained, tiny_data, tmp_path, capsys):
    import argparse

    ours = read_checkpoint(str(trained / "last.pth"))
    official = tmp_path / "71.7_T2T_ViT_7.pth.tar"  # timm CheckpointSaver layout, as released upstream
    torch.save({"epoch": 309, "arch": "t2t_vit", "state_dict": ours["state_dict"],
                "state_dict_ema": ours["state_dict_ema"], "optimizer": {}, "args": argparse.Namespace(lr=1e-3)},
               official)
    rc = cli.main(["eval", "--checkpoint", str(official), "--data", str(tiny_data), "--workers", "0"])
    assert rc == 2 and "pass --model NAME" in capsys.readouterr().err
    results = tmp_path / "r.json"
    rc = cli.main(["eval", "--checkpoint", str(official), "--data", str(tiny_data), "--model", "t2t_vit_7",
                   "--img-size", "32", "--model-kwargs", "depth=1", "embed_dim=32", "num_heads=2", "token_dim=8",
                   "--workers", "0", "--results-file", str(results)])
    assert rc == 0
    got = json.load(open(results))
    assert got["count"] == 12 and got["weights"] == "EMA" and 0 <= got["top1"] <= 100


def test_eval_and_predict_read_a_timm_train_checkpoint(trained, tiny_data, tmp_path, capsys):
    """A checkpoint of timm's own train.py (its args a Namespace with model_kwargs a dict, the image size among
    them) is evaluated and predicted with its architecture and size, no options given."""
    import argparse

    ours = read_checkpoint(str(trained / "best.pth"))
    timm_run = tmp_path / "model_best.pth.tar"
    torch.save({"epoch": 1, "arch": "t2t_vit_7", "state_dict": ours["state_dict"], "version": 2,
                "args": argparse.Namespace(model="t2t_vit_7", img_size=None, input_size=None, mean=None, std=None,
                                           crop_pct=None, interpolation="", num_classes=10, model_kwargs=dict(
                                               depth=1, embed_dim=32, num_heads=2, token_dim=8, img_size=32,
                                               drop_path_rate=0.1))}, timm_run)
    results = [tmp_path / "timm.json", tmp_path / "ours.json"]
    assert cli.main(["eval", "--checkpoint", str(timm_run), "--data", str(tiny_data), "--workers", "0", "--no-ema",
                     "--results-file", str(results[0])]) == 0
    assert cli.main(["eval", "--checkpoint", str(trained / "best.pth"), "--data", str(tiny_data), "--workers", "0",
                     "--no-ema", "--results-file", str(results[1])]) == 0
    timm_metrics, our_metrics = (json.load(open(path)) for path in results)
    assert timm_metrics["img_size"] == 32 and timm_metrics["top1"] == pytest.approx(our_metrics["top1"], abs=1e-4)
    image = next(iter(sorted((tiny_data / "val").rglob("*.png"))))
    capsys.readouterr()
    assert cli.main(["predict", str(image), "--checkpoint", str(timm_run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["file"] == str(image)


def test_image_folders_skip_hidden_folders_and_need_two_classes(tmp_path, capsys):
    root = _write_image_folder(tmp_path / "d", ["a", "b"], n_train=2, n_val=1)
    for split in ("train", "val"):  # a notebook's checkpoint folder is no class
        (root / split / ".ipynb_checkpoints").mkdir()
        (root / split / ".ipynb_checkpoints" / "0.png").write_bytes((root / split / "a" / "0.png").read_bytes())
    assert data_lib.SafeImageFolder(str(root / "train")).classes == ["a", "b"]
    one = _write_image_folder(tmp_path / "one", ["a"], n_train=4, n_val=1)
    rc = cli.main(["train", "--data", str(one), "--output", str(tmp_path / "o"), "--batch-size", "2", *TINY])
    err = capsys.readouterr().err
    assert rc == 2 and "the training data holds 1 class (a): a classifier needs at least two" in err, err
    rc = cli.main(["finetune", "--checkpoint", "x.pth", "--data", str(root), "--aa", "v0", "--reprob", "0.5"])
    err = capsys.readouterr().err
    assert rc == 2 and "--aa, --reprob: fine-tuning augments as the official transfer does" in err, err


def test_resume_refuses_data_of_other_classes():
    from t2t_fast.training import state

    state.check_resumed_classes({"classes": ["a", "b"]}, ["a", "b"], "run/last.pth")
    state.check_resumed_classes({}, ["a", "b", "c"], "run/last.pth")  # an older checkpoint without its classes
    with pytest.raises(state.ResumeError, match=r"run/last.pth was trained on 2 classes \(a, b\), the data holds 3 "
                                                r"\(a, b, c\): resume with the run's data, or start a new run"):
        state.check_resumed_classes({"classes": ["a", "b"]}, ["a", "b", "c"], "run/last.pth")


@pytest.mark.parametrize("mode, pixels", [
    ("I;16", np.array([[0, 257, 32896], [65535, 514, 1000]], dtype=np.uint16)),
    ("I", np.array([[0, 257, 32896], [65535, 514, 1000]], dtype=np.int32)),
    ("I", np.array([[0, 1, 128], [255, 2, 4]], dtype=np.int32)),
    ("F", np.array([[0.0, 1 / 255, 128 / 255], [1.0, 2 / 255, 4 / 255]], dtype=np.float32)),
    ("F", np.array([[0.0, 1.0, 128.0], [255.0, 2.0, 4.0]], dtype=np.float32)),
])
def test_high_bit_depth_images_are_scaled_not_clipped(tmp_path, mode, pixels):
    """16-bit grayscale (and 32-bit integer / float) images become 8-bit RGB by their range, where PIL's
    convert("RGB") alone clips every value past 255 to white."""
    from PIL import Image

    path = tmp_path / "image.tiff"
    Image.fromarray(pixels).save(path)
    assert Image.open(path).mode == mode
    image = data_lib.load_rgb(str(path))
    full = float(pixels.max())
    expected = np.rint(pixels.astype(np.float64) * (255.0 / full)).astype(np.uint8)
    assert image.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(image), np.repeat(expected[..., None], 3, axis=-1))
    if mode == "I;16":  # and as a PNG, the usual 16-bit format, and a 16-bit PGM, even a dark one
        Image.fromarray(pixels).save(tmp_path / "image.png")
        np.testing.assert_array_equal(np.asarray(data_lib.load_rgb(str(tmp_path / "image.png"))), np.asarray(image))
        for scale in (1, 1 / 256):
            dark = np.rint(pixels * scale).astype(">u2")
            (tmp_path / "image.pgm").write_bytes(b"P5\n3 2\n65535\n" + dark.tobytes())
            expected = np.rint(dark.astype(np.float64) / 257).astype(np.uint8)
            np.testing.assert_array_equal(np.asarray(data_lib.load_rgb(str(tmp_path / "image.pgm")))[..., 0],
                                          expected)


def test_images_of_unknown_range_are_unreadable(tmp_path):
    from PIL import Image

    Image.fromarray(np.array([[-1.0, 300.0]], dtype=np.float32)).save(tmp_path / "f.tiff")
    Image.fromarray(np.array([[0, 70000]], dtype=np.int32)).save(tmp_path / "i.tiff")
    with pytest.raises(data_lib.unreadable_image_errors(), match=r"floating-point image with values -1\.\.300, "
                       r"outside 0\.\.1 or 0\.\.255: convert it to an 8-bit image first"):
        data_lib.load_rgb(str(tmp_path / "f.tiff"))
    with pytest.raises(ValueError, match=r"32-bit integer image with values 0\.\.70000, outside 0\.\.255 or "
                       r"0\.\.65535"):
        data_lib.load_rgb(str(tmp_path / "i.tiff"))


def test_summary_survives_a_damaged_or_deleted_json(tmp_path, caplog):
    """summary.json damaged or deleted: the earlier rows come back from summary.csv (as numbers), with a warning."""
    from t2t_fast.training.state import Summary

    summary = Summary(str(tmp_path))
    rows = [{"epoch": 0, "step": 3, "lr": 1e-05, "val_top1": 10.0, "train_skipped": 0},
            {"epoch": 1, "step": 6, "lr": 0.0007071, "val_top1": 33.333333333333336, "train_skipped": 1,
             "val_ema_top1": 25.0}]
    for row in rows:
        summary.append(row)
    (tmp_path / "summary.json").write_text("garbage{")
    with caplog.at_level("WARNING"):
        assert summary.rows() == rows
    assert "summary.json is unreadable" in caplog.text and "read from" in caplog.text
    summary.append({"epoch": 2, "step": 9})
    assert [row["epoch"] for row in json.load(open(tmp_path / "summary.json"))] == [0, 1, 2]
    (tmp_path / "summary.json").unlink()
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert summary.rows() == [*rows, {"epoch": 2, "step": 9}]
    assert "summary.json is missing" in caplog.text


def test_failed_checkpoint_writes_keep_the_previous_file(tmp_path, monkeypatch):
    """A full disk while writing last.pth (torch's writer raises RuntimeError) is an OSError saying so; the previous
    file stays, and no temp file is left (for the best.pth copy too)."""
    from t2t_fast.training import state

    last, best = tmp_path / "last.pth", tmp_path / "best.pth"
    state.save_atomic({"epoch": 0}, str(last))
    state.copy_atomic(str(last), str(best))
    before = last.read_bytes()

    def full(obj, f):
        f.write(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0\nmore")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError, match=r"could not write .*last.pth \(is the disk full\? \[enforce fail at "
                                      r"inline_container.cc:672\] . unexpected pos 64 vs 0\); the previous "
                                      r"last.pth is unchanged"):
        state.save_atomic({"epoch": 1}, str(last))

    def no_space(source, target):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(state.shutil, "copyfileobj", no_space)
    with pytest.raises(OSError, match="No space left"):
        state.copy_atomic(str(last), str(best))
    assert last.read_bytes() == best.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["best.pth", "last.pth"]


def test_a_run_holds_its_folder(tmp_path, monkeypatch):
    """A run holds its folder for its life: a default folder another run holds is numbered past (also when that
    run takes it between the check and the folder's creation), a given one is refused with its pid."""
    from types import SimpleNamespace

    from t2t_fast.training import run as run_lib
    from t2t_fast.training import state

    monkeypatch.chdir(tmp_path)
    handlers = logging.getLogger().handlers[:]
    base = os.path.join("output", "t2t_vit_7-digits")
    os.makedirs(base)
    lock = state.lock_folder(base)
    try:
        assert state.lock_holder(base) == os.getpid()
        with pytest.raises(state.FolderInUse, match=f"is in use by a live run \\(pid {os.getpid()}\\)"):
            state.lock_folder(base)
        args = argparse.Namespace(output=None, resume=None, model="t2t_vit_7", data=None)
        assert run_lib._claim_output(args, "") == base and args.output == base + "-2"
        args = argparse.Namespace(output=base, resume=None, model="t2t_vit_7", data=None)
        with pytest.raises(data_lib.DataError, match=f"--output {base} is in use by a live run \\(pid "
                                                     f"{os.getpid()}\\): give another --output"):
            run_lib._claim_output(args, "")
        # both runs found the default folder free; the one that creates it second moves on
        dist = SimpleNamespace(primary=True, gather_objects=lambda obj: [obj])
        args = argparse.Namespace(output=base, resume=None)
        second = run_lib.Run(args=args, dist=dist, output=base, numbered=base)
        run_lib._open_output(second)
        try:
            assert second.output == args.output == base + "-2"
            assert state.lock_holder(base + "-2") == os.getpid()
        finally:
            second.lock.release()
        given = run_lib.Run(args=argparse.Namespace(output=base, resume=None), dist=dist, output=base)
        with pytest.raises(data_lib.DataError, match="is in use by a live run"):
            run_lib._open_output(given)
        # a run that ended (lock released) after writing checkpoints into the folder this run had found free
        done = base + "-3"
        os.makedirs(done)
        open(os.path.join(done, "last.pth"), "wb").close()
        late = run_lib.Run(args=argparse.Namespace(output=done, resume=None), dist=dist, output=done, numbered=base)
        run_lib._open_output(late)
        try:
            assert late.output == base + "-2" and state.lock_holder(done) is None  # -2: its run has ended
        finally:
            late.lock.release()
        given = run_lib.Run(args=argparse.Namespace(output=done, resume=None), dist=dist, output=done)
        with pytest.raises(data_lib.DataError, match=f"--output {done} holds another run"):
            run_lib._open_output(given)
        # a resumed run's last.pth written by another run since it was read
        resumed = run_lib.Run(args=argparse.Namespace(output=done, resume=os.path.join(done, "last.pth")), dist=dist,
                              output=done, resumed_stamp=0)
        with pytest.raises(data_lib.DataError, match="was written by another run since this one read it"):
            run_lib._open_output(resumed)
    finally:
        lock.release()
        for handler in set(logging.getLogger().handlers) - set(handlers):  # the log.txt _open_output opened
            handler.close()
        logging.getLogger().handlers[:] = handlers
    assert state.lock_holder(base) is None and os.listdir(base) == []
    assert sorted(os.listdir(base + "-3")) == ["last.pth"]


def test_relative_data_resumes_from_another_directory(tiny_data, tmp_path, monkeypatch, capsys):
    """A run records its --data as an absolute path: it resumes from any directory; where the data is gone, the
    error says it is the run's recorded folder and that --data can be given."""
    import shutil

    shutil.copytree(tiny_data, tmp_path / "pets")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    assert _train("pets", out, "--epochs", "2", callbacks=[StopAfterSteps(4)]) == 3
    assert read_checkpoint(str(out / "last.pth"))["args"]["data"] == str(tmp_path / "pets")
    monkeypatch.chdir(tmp_path / "elsewhere")
    (tmp_path / "pets").rename(tmp_path / "moved")
    capsys.readouterr()
    assert train_cli.main(["--resume", str(out / "last.pth")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'pets'}, the data folder {out / 'last.pth'}'s run recorded, does not exist: give --data" \
        in err, err
    (tmp_path / "moved").rename(tmp_path / "pets")
    assert train_cli.main(["--resume", str(out / "last.pth")]) == 0
    assert read_checkpoint(str(out / "last.pth"))["epoch"] == 1


def test_lr_below_min_lr_is_a_warning(caplog):
    """A batch-scaled lr below --min-lr would make the schedule rise: the log says so, with both values."""
    from types import SimpleNamespace

    from t2t_fast.training import run as run_lib

    dataset = type("Images", (), {"classes": ["a", "b"], "__len__": lambda self: 4})()
    builders = SimpleNamespace(transforms=lambda args: None, datasets=lambda args, transforms: (dataset, dataset))
    args = argparse.Namespace(lr=None, lr_base=1e-4, lr_base_size=64, batch_size=2, min_lr=1e-5, mixup=0, cutmix=0)
    run = run_lib.Run(args=args, dist=SimpleNamespace(world_size=1, primary=True, distributed=False), output="o")
    with caplog.at_level("WARNING"):
        run_lib._data(run, builders)
    assert "the learning rate 3.13e-06 (for this global batch) is below --min-lr 1e-05" in caplog.text
