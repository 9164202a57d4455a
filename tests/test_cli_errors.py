"""Every bad input a user gives the t2t-fast commands is one line on stderr naming the problem and the fix, exit
code 2, no traceback, nothing written and no checkpoint changed; Ctrl-C during `t2t-fast train` (a real SIGINT)
says where the last checkpoint is and the exact command that resumes it; resuming a finished run does nothing."""
import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("timm")
pytest.importorskip("sklearn")

import t2t_fast  # noqa: E402
from t2t_fast import cli  # noqa: E402

# a ~20k-parameter T2T-ViT-7 on the built-in digits: the real code paths, little compute
TINY = ["--model", "t2t_vit_7", "--img-size", "32", "--model-kwargs", "depth=1", "embed_dim=32", "num_heads=2",
        "token_dim=8", "--workers", "0", "--threads", "1", "--device", "cpu", "--batch-size", "256"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A finished one-epoch digits run, and files that are not checkpoints."""
    root = tmp_path_factory.mktemp("files")
    run = root / "run"
    assert cli.main(["train", "--output", str(run), "--epochs", "1", "--no-model-ema", *TINY]) == 0
    last = (run / "last.pth").read_bytes()
    (root / "truncated.pth").write_bytes(last[: len(last) // 2])
    (root / "empty.pth").write_bytes(b"")
    (root / "notes.txt").write_text("these are not weights\n")
    older = root / "older"  # a run whose best.pth is an epoch before its last.pth
    older.mkdir()
    later = torch.load(run / "last.pth", weights_only=False)
    torch.save(later, older / "best.pth")
    later["epoch"] += 1
    torch.save(later, older / "last.pth")
    swapped = torch.load(run / "last.pth", weights_only=False)
    swapped["classes"][:2] = swapped["classes"][1::-1]
    torch.save(swapped, root / "other_classes.pth")
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 30, 30)).save(root / "red.png")
    return root


def _cases():
    run = "{root}/run"
    train = [
        ("epochs -1", ["train", "--epochs", "-1"], "--epochs: expected an integer >= 1, got -1"),
        ("epochs 0", ["train", "--epochs", "0"], "--epochs: expected an integer >= 1, got 0"),
        ("lr -1", ["train", "--lr", "-1"], "--lr: expected a finite number > 0, got -1"),
        ("lr inf", ["train", "--lr", "inf"], "--lr: expected a finite number > 0, got inf"),
        ("mean nan", ["train", "--mean", "nan", "0", "0"], "--mean: expected a finite number, got nan"),
        ("seed too large", ["train", "--seed", str(2**64)], "--seed: expected an integer in [0, 4294967295]"),
        ("predict crop-pct inf", ["predict", "x.png", "--checkpoint", run + "/last.pth", "--crop-pct", "inf"],
         "--crop-pct: expected a finite number > 0, got inf"),
        ("warmup > epochs", ["train", "--epochs", "2", "--warmup-epochs", "3"],
         "--warmup-epochs 3 is longer than --epochs 2: give --warmup-epochs at most 2"),
        ("batch 0", ["train", "--batch-size", "0"], "--batch-size/-b: expected an integer >= 1, got 0"),
        ("workers -1", ["train", "--workers", "-1"], "--workers/-j: expected an integer >= 0, got -1"),
        ("epochs text", ["train", "--epochs", "ten"], "--epochs: expected an integer >= 1, got 'ten'"),
        ("unknown model", ["train", "--model", "t2t_vit_77"], "Did you mean t2t_vit_7"),
        ("unknown model kwarg", ["train", *TINY, "--model-kwargs", "dept=1"], "Did you mean depth?"),
        ("model kwarg img_size", ["train", *TINY, "--model-kwargs", "depth=1", "img_size=64"],
         "--model-kwargs: img_size is set by --img-size, not by --model-kwargs"),
        ("model kwarg drop_path_rate", ["train", *TINY, "--model-kwargs", "drop_path_rate=0.2"],
         "--model-kwargs: drop_path_rate is set by --drop-path"),
        ("resume csv", ["train", "--resume", run + "/summary.csv"], "is not a readable PyTorch checkpoint"),
        ("resume folder", ["train", "--resume", run], "is a folder, not a checkpoint file"),
        ("resume other batch", ["train", *TINY, "--epochs", "1", "--no-model-ema", "--resume", run + "/last.pth",
                                "--batch-size", "32"], "(--batch-size 256 -> 32); resume with the same options"),
        ("finetune epochs 0", ["finetune", "--epochs", "0"], "--epochs: expected an integer >= 1, got 0"),
        ("opt unknown", ["train", *TINY, "--opt", "bogus"], "--opt bogus: Optimizer bogus not found"),
        ("sched none", ["train", "--sched", "none"], "argument --sched: invalid choice: 'none' (choose from 'cosine'"),
        ("aa unknown", ["train", "--aa", "bogus"], "argument --aa: 'bogus' is not a timm auto-augment policy"),
        ("remode unknown", ["train", "--remode", "bogus"], "argument --remode: invalid choice: 'bogus'"),
        ("eval interpolation", ["eval", "--interpolation", "nearest-exact"],
         "argument --interpolation: invalid choice: 'nearest-exact'"),
        ("device gpu", ["train", "--device", "gpu"], "argument --device: expected cpu, cuda or cuda:N, got 'gpu'"),
        ("backend cuda on cpu", ["train", *TINY, "--device", "cpu", "--backend", "cuda"],
         "--backend cuda: the CUDA extension runs CUDA tensors only"),
        ("output is a file", ["train", *TINY, "--output", "{root}/notes.txt"],
         "notes.txt is a file, not a folder; give a folder path"),
        ("output under a file", ["train", *TINY, "--output", "{root}/notes.txt/run"], "notes.txt is a file"),
        ("output empty", ["train", *TINY, "--output", ""], "--output: give a folder path (got an empty one)"),
        ("resume best.pth of a run that went on", ["train", "--resume", "{root}/older/best.pth"],
         "best.pth holds epoch 0, but its run went on to epoch 1: resume from"),
        ("finetune resumes a train run", ["finetune", "--resume", "{root}/older/last.pth"],
         "was written by `t2t-fast train`: resume it with `t2t-fast train --resume"),
        ("in_chans 1 on RGB data", ["train", *TINY, "--model-kwargs", "depth=1", "embed_dim=32", "num_heads=2",
                                    "token_dim=8", "in_chans=1"], "--model-kwargs in_chans=1: the training images "
                                                                  "are RGB (3 channels)"),
        ("img-size too small", ["train", *TINY, "--img-size", "1"], "--img-size 1: image size (1, 1) is too small"),
        ("finetune checkpoint and pretrained", ["finetune", "--checkpoint", run + "/best.pth", "--pretrained",
                                                "--data", "{root}"], "give --checkpoint FILE or --pretrained"),
        ("predict reference with backend", ["predict", "{root}/red.png", "--checkpoint", run + "/last.pth",
                                            "--reference", "--backend", "torch"], "--backend picks the fused model"),
        ("odd batch with mixup", ["train", *TINY, "--batch-size", "3", "--mixup", "0.8"],
         "--batch-size 3 is odd, but mixup / cutmix pair the images of a batch: give an even --batch-size, or "
         "--mixup 0 --cutmix 0"),
        ("output holds a run", ["train", *TINY, "--epochs", "1", "--output", run],
         "run holds another run (its checkpoints are never overwritten): give another --output, continue that "
         "run with --resume"),
        ("finetune output holds its checkpoint's run", ["finetune", "--checkpoint", run + "/best.pth", "--data",
                                                         "{root}/run", *TINY, "--output", run], "holds another run"),
    ]
    evaluate = [(f"eval {name}", ["eval", "--checkpoint", path], expected) for name, path, expected in [
        ("truncated", "{root}/truncated.pth", "truncated.pth"),
        ("empty", "{root}/empty.pth", "empty.pth (0 bytes) is not a readable PyTorch checkpoint"),
        ("text", "{root}/notes.txt", "notes.txt"),
        ("csv", run + "/summary.csv", "summary.csv"),
        ("folder", run, "is a folder, not a checkpoint file: give the .pth file inside it (it holds best.pth"),
        ("missing", "{root}/nope.pth", "checkpoint file not found"),
    ]]
    evaluate.append(("eval batch 0", ["eval", "--checkpoint", run + "/last.pth", "--batch-size", "0"],
                     "--batch-size/-b: expected an integer >= 1"))
    evaluate += [(f"eval {name}", ["eval", "--checkpoint", run + "/last.pth", *options], expected)
                 for name, options, expected in [
        ("num-classes differs", ["--num-classes", "7"], "--num-classes 7 differs from the checkpoint's 10-class "
                                                        "head, which eval scores: leave --num-classes out"),
        ("results file is a checkpoint", ["--results-file", run + "/best.pth"],
         "best.pth exists and is not a JSON results file: refusing to replace it"),
        ("results file is a folder", ["--results-file", run], "run: is a folder; give a file name such as"),
        ("results file in no folder", ["--results-file", "{root}/nodir/r.json"], "nodir does not exist")]]
    evaluate.append(("eval other classes", ["eval", "--checkpoint", "{root}/other_classes.pth"],
                     "the evaluation data's classes are not the ones the checkpoint was trained on, in order "
                     "(index: data vs checkpoint): 0: '0' vs '1', 1: '1' vs '0'"))
    predict = [
        ("predict missing image", ["predict", "{root}/nope.png", "--checkpoint", run + "/last.pth"],
         "nope.png: no such file or folder"),
        ("predict topk 0", ["predict", "x.png", "--checkpoint", run + "/last.pth", "--topk", "0"],
         "--topk: expected an integer >= 1"),
        ("predict csv checkpoint", ["predict", "{root}/red.png", "--checkpoint", run + "/summary.csv"],
         "is not a readable PyTorch checkpoint"),
        *[(f"predict{' --reference' * reference} model kwarg num_classes",
           ["predict", "{root}/red.png", "--checkpoint", run + "/last.pth", *TINY, "--model-kwargs", "depth=1",
            "num_classes=10", *["--reference"] * reference],
           "--model-kwargs: num_classes is set by the command (the dataset's classes, the checkpoint's head")
          for reference in (False, True)],
    ]
    return train + evaluate + predict


CASES = _cases()


@pytest.mark.parametrize("argv, expected", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_input_is_one_line_and_exit_code_2(argv, expected, files, tmp_path, capsys):
    last = files / "run" / "last.pth"
    before = (last.read_bytes(), os.path.getmtime(last))
    argv = [item.format(root=files) for item in argv]
    out = tmp_path / "out"
    if argv[0] in ("train", "finetune") and "--output" not in argv and "--resume" not in argv:
        argv += ["--output", str(out)]
    capsys.readouterr()
    try:
        rc = cli.main(argv)
    except SystemExit as exc:  # argparse errors
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1, err
    assert expected in err and "Traceback" not in err, err
    assert not out.exists()
    assert (last.read_bytes(), os.path.getmtime(last)) == before
    assert sorted(os.listdir(files / "run")) == ["best.pth", "last.pth", "log.txt", "summary.csv", "summary.json"]


@pytest.mark.parametrize("variable", ["T2T_FAST_BACKEND", "T2T_FAST_CPU_ATTENTION", "T2T_FAST_CPU_ISA"])
def test_bad_kernel_settings_are_one_line(variable, files, monkeypatch, capsys):
    """A T2T_FAST_* variable naming no choice there is: one line naming the choices, exit code 2 (any command)."""
    monkeypatch.setenv(variable, "bogus")
    rc = cli.main(["predict", str(files / "red.png"), "--checkpoint", str(files / "run" / "last.pth"), "--device",
                   "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"t2t-fast: error: {variable}") and "'bogus'" in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda_is_one_line(capsys):
    for argv in (["train", "--device", "cuda"], ["eval", "--checkpoint", "x.pth", "--device", "cuda:1"],
                 ["bench", "--device", "cuda"]):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and "no CUDA device is available here" in err, err


def test_unknown_model_kwarg_names_the_closest_valid_ones():
    with pytest.raises(TypeError) as info:
        t2t_fast.create_model("t2t_vit_7", num_class=10)
    message = str(info.value)
    assert "unknown keyword argument 'num_class'. Did you mean num_classes" in message
    assert "Valid: " in message and "drop_path_rate" in message and "img_size" in message


def _t2t_fast_command():
    script = os.path.join(os.path.dirname(sys.executable), "t2t-fast")
    if not os.path.exists(script):
        pytest.skip("the t2t-fast script is not installed beside this Python")
    return script


def test_ctrl_c_names_the_checkpoint_and_the_resume_command(tmp_path):
    script = _t2t_fast_command()
    out = tmp_path / "run"
    argv = ["train", "--output", str(out), "--epochs", "8", *TINY]
    proc = subprocess.Popen([script, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300  # a guard against a hung run, not a timing assertion
    while not (out / "last.pth").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stdout[-2000:] + stderr[-2000:]
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1, stderr
    last = out / "last.pth"
    epoch = torch.load(last, weights_only=False)["epoch"]
    assert epoch < 7
    assert f"the last checkpoint is {last}; resume with: " in stderr
    command = shlex.split(stderr.split("resume with: ")[1])
    assert command == ["t2t-fast", *argv, "--resume", str(last)]

    # the printed command finishes the run; resuming the finished run then has nothing left to do
    done = subprocess.run([script, *command[1:]], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert f"resumed {last} at epoch {epoch + 1}" in done.stdout
    final = torch.load(last, weights_only=False)
    assert final["epoch"] == 7
    before = (last.read_bytes(), os.path.getmtime(last))
    again = subprocess.run([script, "train", "--resume", str(last)], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert "is the end of a finished run (all 8 epochs): nothing left to do" in again.stdout
    assert (last.read_bytes(), os.path.getmtime(last)) == before


def test_ctrl_c_before_the_first_checkpoint(tmp_path):
    """Interrupted before its first epoch ended, a run has no checkpoint to resume, even when its folder holds an
    earlier run's last.pth: the line says to start again, with the same command."""
    from types import SimpleNamespace

    from t2t_fast.cli._options import interrupted_message

    (tmp_path / "last.pth").write_bytes(b"an earlier run's")
    started = os.path.getmtime(tmp_path / "last.pth") + 1
    args = SimpleNamespace(output=str(tmp_path), resume=None)
    line = interrupted_message(args, ["--epochs", "3", "--output", str(tmp_path)], "train", started)
    assert line == (f"t2t-fast: interrupted before the first epoch finished, so there is no checkpoint in {tmp_path} "
                    f"yet; start again with: t2t-fast train --epochs 3 --output {tmp_path}")
    resumed = SimpleNamespace(output=str(tmp_path), resume=str(tmp_path / "last.pth"))
    line = interrupted_message(resumed, ["--resume", str(tmp_path / "last.pth")], "train", started)
    assert line.endswith(f"resume with: t2t-fast train --resume {tmp_path / 'last.pth'}")


def test_resume_may_change_how_it_runs_and_says_so(files, caplog):
    """Options that change what a run computes are refused (the table above); those that change only how it runs
    are taken and logged; options left out are the run's, not the recipe's."""
    from t2t_fast.cli import train as train_cli
    from t2t_fast.training import state

    argv = ["--resume", str(files / "run" / "last.pth"), "--workers", "1", "--log-interval", "7"]
    args = train_cli.parse_args(argv)
    with caplog.at_level("INFO", logger=state.__name__):
        checkpoint = state.read_resume_checkpoint(args.resume, args,
                                                  train_cli.given_options(train_cli.build_parser(), argv))
    assert caplog.messages == ["resuming with --workers 1 (the run had 0)",
                               "resuming with --log-interval 7 (the run had 50)"]
    assert (args.workers, args.log_interval) == (1, 7)
    assert args.model_kwargs == ["depth=1", "embed_dim=32", "num_heads=2", "token_dim=8"]
    assert (args.batch_size, args.epochs, args.model_ema) == (256, 1, False)
    assert state.finished(checkpoint)


def _copy_run(files, tmp_path):
    import shutil

    return shutil.copytree(files / "run", tmp_path / "run")


def test_a_folder_in_use_is_refused_with_its_pid(files, tmp_path, capsys):
    """A live run holds its folder: another run given it as --output, or resuming it, is refused with the pid."""
    from t2t_fast.training import state

    run = _copy_run(files, tmp_path)
    busy = tmp_path / "busy"
    busy.mkdir()
    locks = [state.lock_folder(str(busy)), state.lock_folder(str(run))]
    try:
        rc = cli.main(["train", *TINY, "--output", str(busy)])
        err = capsys.readouterr().err
        assert rc == 2 and len(err.strip().splitlines()) == 1, err
        assert f"--output {busy} is in use by a live run (pid {os.getpid()}): give another --output" in err, err
        rc = cli.main(["train", "--resume", str(run / "last.pth")])
        err = capsys.readouterr().err
        assert rc == 2 and len(err.strip().splitlines()) == 1, err
        assert f"--resume {run / 'last.pth'}: {run} is in use by a live run (pid {os.getpid()}); resume it" in err
    finally:
        for lock in locks:
            lock.release()
    assert os.listdir(busy) == [] and ".lock" not in os.listdir(run)


def test_resume_needs_the_runs_number_of_processes(files, tmp_path, monkeypatch, capsys):
    """The schedule and the global batch depend on the number of processes: resuming with another is refused, with
    the command that resumes with the run's number."""
    last = files / "run" / "last.pth"
    monkeypatch.setenv("WORLD_SIZE", "2")
    rc = cli.main(["train", "--resume", str(last)])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert (f"{last} was written by a run of 1 process, this one has 2: its schedule and global batch depend on "
            f"the number, so resume with 1: t2t-fast train --resume {last}") in err, err
    monkeypatch.delenv("WORLD_SIZE")
    two = torch.load(last, weights_only=False)
    two["rng"] *= 2
    (tmp_path / "two").mkdir()
    torch.save(two, tmp_path / "two" / "last.pth")
    rc = cli.main(["train", "--resume", str(tmp_path / "two" / "last.pth")])
    err = capsys.readouterr().err
    assert rc == 2 and f"resume with 2: torchrun --nproc_per_node=2 -m t2t_fast.train --resume {tmp_path}" in err


def test_ctrl_c_under_torchrun_prints_torchruns_command(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from t2t_fast.cli._options import interrupted_message

    monkeypatch.setenv("WORLD_SIZE", "2")
    (tmp_path / "last.pth").write_bytes(b"")
    args = SimpleNamespace(output=str(tmp_path), resume=None)
    line = interrupted_message(args, ["--data", "d"], "finetune", 0)
    assert line.endswith(f"resume with: torchrun --nproc_per_node=2 -m t2t_fast.cli.finetune --data d --resume "
                         f"{tmp_path / 'last.pth'}")
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    line = interrupted_message(args, ["--data", "d"], "train", 0)
    assert "resume with: torchrun --nnodes=2 --nproc_per_node=8 -m t2t_fast.train --data d --resume" in line


def test_resume_repairs_a_run_stopped_while_saving(files, tmp_path, capsys):
    """Stopped after last.pth was written but before best.pth and the summary were: resuming brings them up to
    last.pth (here the run is finished, so that is all it does)."""
    run = _copy_run(files, tmp_path)
    last = run / "last.pth"
    (run / "best.pth").write_bytes(b"an earlier epoch's")
    os.utime(run / "best.pth", (os.path.getmtime(last) - 60,) * 2)
    (run / "summary.json").unlink()
    (run / "summary.csv").unlink()
    assert cli.main(["train", "--resume", str(last)]) == 0
    assert "nothing left to do" in capsys.readouterr().out
    assert (run / "best.pth").read_bytes() == last.read_bytes()
    rows = json.loads((run / "summary.json").read_text())
    assert rows == [torch.load(last, weights_only=False)["metrics"]]
    assert sorted(os.listdir(run)) == ["best.pth", "last.pth", "log.txt", "summary.csv", "summary.json"]


def test_resume_best_with_a_damaged_last(files, tmp_path, capsys, caplog):
    """--resume best.pth where last.pth is damaged: a warning that last.pth is unreadable and will be replaced."""
    run = _copy_run(files, tmp_path)
    (run / "last.pth").write_bytes((files / "truncated.pth").read_bytes())
    with caplog.at_level("WARNING"):
        assert cli.main(["train", "--resume", str(run / "best.pth")]) == 0
    assert "nothing left to do" in capsys.readouterr().out
    assert caplog.messages == [f"{run / 'last.pth'} is unreadable (damaged or truncated); resuming from "
                               f"{run / 'best.pth'}, the next epoch writes a new last.pth"]


def test_unwritable_files_are_one_line(capsys):
    """A read-only run folder, a full disk: one line, exit code 2."""
    from types import SimpleNamespace

    from t2t_fast.cli._options import run_command

    def read_only(args):
        raise OSError(30, "Read-only file system", "out/log.txt")

    assert run_command(read_only, SimpleNamespace()) == 2
    assert capsys.readouterr().err == "t2t-fast: error: [Errno 30] Read-only file system: 'out/log.txt'\n"


def test_predict_into_a_closed_pipe_is_no_error(files):
    """`t2t-fast predict ... | head`: the reader leaving is no error (exit code 0, nothing on stderr)."""
    script = _t2t_fast_command()
    proc = subprocess.Popen([script, "predict", *[str(files / "red.png")] * 300, "--checkpoint",
                             str(files / "run" / "last.pth"), "--device", "cpu"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # the reader leaves before the first line
    stderr = proc.stderr.read()
    assert proc.wait(timeout=300) == 0, stderr
    assert "error" not in stderr and "Traceback" not in stderr, stderr


@pytest.mark.parametrize("workers", ["0", "2"])
def test_sigterm_ends_a_run_like_ctrl_c(tmp_path, workers):
    """SIGTERM (a scheduler's or a container's stop, sent to the whole process group, loader workers included):
    the Ctrl-C line with the resume command, exit code 143, no temp file left."""
    script = _t2t_fast_command()
    out = tmp_path / "run"
    argv = ["train", "--output", str(out), "--epochs", "8", *TINY, "--workers", workers]
    proc = subprocess.Popen([script, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 300  # a guard against a hung run, not a timing assertion
    while not (out / "last.pth").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 143, stdout[-2000:] + stderr[-2000:]
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert stderr.startswith(f"t2t-fast: stopped by SIGTERM; the last checkpoint is {out / 'last.pth'}; resume "
                             f"with: t2t-fast train"), stderr
    assert not [name for name in os.listdir(out) if name.startswith(".")]
