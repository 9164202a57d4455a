"""What the commands share: the parser whose errors are one line, checked number types, the common options of
``train`` and ``finetune``, the recipe table of ``--help``, and how a command's errors, Ctrl-C and SIGTERM
included, become one line and an exit code."""
import argparse
import copy
import math
import os
import shlex
import signal
import sys
import threading
import time


class CommandParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (the problem, then where the options are
    listed) and exit code 2, instead of the usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (`{self.prog} --help` lists the options)\n")


_FLOAT32_MAX = 3.4028234663852886e38


def _number(kind, low=-math.inf, high=None, low_open=False):
    """An argparse type: a finite ``kind`` (int, or float within float32's range, as torch keeps them) within
    [low, high] (``low_open``: above low)."""
    if high is not None:
        bounds = f" in [{low:g}, {high:g}]" if kind is float else f" in [{low}, {high}]"
    else:
        bounds = f" {'>' if low_open else '>='} {low:g}" if low > -math.inf else ""
    noun = "an integer" if kind is int else "a finite number"

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {noun}{bounds}, got {text!r}") from None
        if not math.isfinite(value) or (kind is float and abs(value) > _FLOAT32_MAX) or value < low or (
                low_open and value == low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {noun}{bounds}, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def DEVICE(text):
    """An argparse type: a device of this machine (``cpu``, ``cuda``, ``cuda:N``); also ``auto`` (bench)."""
    import torch

    if text == "auto":
        return text
    try:
        parsed = torch.device(text)
    except RuntimeError:
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        build = "" if torch.version.cuda else " (this torch is a CPU-only build)"
        raise argparse.ArgumentTypeError(f"{text}: no CUDA device is available here{build}; use --device cpu")
    if parsed.type == "cuda" and (parsed.index or 0) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return text


def AUTO_AUGMENT(text):
    """An argparse type: a timm auto-augment policy (``rand-m9-mstd0.5-inc1``, ``augmix-m5-w4-d2``, ``v0``,
    ``original``, ...) or ``none``, checked by building it."""
    if text == "none":
        return text
    from timm.data.auto_augment import augment_and_mix_transform, auto_augment_transform, rand_augment_transform

    build = (rand_augment_transform if text.startswith("rand") else
             augment_and_mix_transform if text.startswith("augmix") else auto_augment_transform)
    try:
        build(text, dict(translate_const=100, img_mean=(124, 116, 104)))
    except Exception as exc:  # timm's parsers fail with assertions, key and value errors
        raise argparse.ArgumentTypeError(f"{text!r} is not a timm auto-augment policy (e.g. rand-m9-mstd0.5-inc1, "
                                         f"augmix-m5-w4-d2, original, v0, or none): {type(exc).__name__} "
                                         f"{exc}".rstrip()) from None
    return text


# PIL resampling filters by timm's names; training also takes 'random' (bilinear or bicubic per image)
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
# timm schedulers that step by epoch or update without a metric to watch
SCHEDULERS = ("cosine", "tanh", "step", "multistep", "poly")

POSITIVE_INT = _number(int, 1)
NON_NEGATIVE_INT = _number(int, 0)
POSITIVE = _number(float, 0.0, low_open=True)
NON_NEGATIVE = _number(float, 0.0)
FRACTION = _number(float, 0.0, 1.0)
FINITE = _number(float)
SEED = _number(int, 0, 2**32 - 1)  # what NumPy's generator takes


def add_checkpoint_run_options(parser):
    """``--device``, ``--threads``, ``--amp`` and ``--amp-dtype`` of the commands that run a saved checkpoint
    (eval, predict): unset, they follow the run that wrote it."""
    parser.add_argument("--device", type=DEVICE, help="cpu / cuda (default: cuda when available)")
    parser.add_argument("--threads", type=POSITIVE_INT, help="CPU threads (default: the checkpoint's run setting)")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction,
                        help="autocast (default: as the checkpoint's run validated, else off)")
    parser.add_argument("--amp-dtype", choices=("bfloat16", "float16"),
                        help="autocast dtype (default: the checkpoint's run, else bfloat16)")


def add_common_arguments(parser):
    """Options shared by ``train`` and ``finetune`` (defaults of None are filled from the recipe)."""
    g = parser.add_argument_group("data and model")
    g.add_argument("--data", metavar="DIR", help="ImageFolder root with train/ and val/ (default: built-in digits)")
    g.add_argument("--model", help="variant name (t2t_fast.list_models())")
    g.add_argument("--img-size", type=POSITIVE_INT, help="input resolution (square)")
    g.add_argument("--model-kwargs", nargs="*", default=[], metavar="K=V",
                   help="extra model constructor arguments, e.g. depth=2 backend=torch")
    g.add_argument("--backend", help="kernel backend of the model (auto/triton/cuda/cpp/torch)")
    g.add_argument("--drop-path", type=FRACTION, help="stochastic depth rate")
    g.add_argument("--drop", type=FRACTION, help="dropout rate")
    g.add_argument("--workers", "-j", type=NON_NEGATIVE_INT, help="data loader processes per rank")
    _add_optimisation_arguments(parser.add_argument_group("optimisation"))
    _add_augmentation_arguments(parser.add_argument_group("augmentation and regularisation"))

    g = parser.add_argument_group("evaluation transform")
    g.add_argument("--crop-pct", type=_number(float, 0.0, 1.0, low_open=True))
    g.add_argument("--interpolation", choices=INTERPOLATIONS)
    g.add_argument("--mean", type=FINITE, nargs=3)
    g.add_argument("--std", type=POSITIVE, nargs=3)
    _add_run_arguments(parser.add_argument_group("run"))
    return parser


def _add_optimisation_arguments(g):
    g.add_argument("--batch-size", "-b", type=POSITIVE_INT, help="images per step per process")
    g.add_argument("--epochs", type=POSITIVE_INT, help="epochs of the schedule (cool-down epochs are added)")
    g.add_argument("--lr", type=POSITIVE, help="peak learning rate (default: --lr-base scaled to the global batch)")
    g.add_argument("--lr-base", type=POSITIVE, help="learning rate per --lr-base-size images of global batch")
    g.add_argument("--lr-base-size", type=POSITIVE_INT)
    g.add_argument("--opt", help="timm optimizer name")
    g.add_argument("--weight-decay", type=NON_NEGATIVE)
    g.add_argument("--momentum", type=FRACTION)
    g.add_argument("--clip-grad", type=POSITIVE)
    g.add_argument("--sched", choices=SCHEDULERS, help="timm scheduler")
    g.add_argument("--sched-on-updates", action=argparse.BooleanOptionalAction, default=None,
                   help="step the schedule every optimizer update instead of every epoch")
    g.add_argument("--warmup-epochs", type=NON_NEGATIVE_INT,
                   help="linear warm-up epochs (a recipe's warm-up longer than --epochs is cut to --epochs)")
    g.add_argument("--warmup-lr", type=NON_NEGATIVE)
    g.add_argument("--min-lr", type=NON_NEGATIVE)
    g.add_argument("--cooldown-epochs", type=NON_NEGATIVE_INT)


def _add_augmentation_arguments(g):
    g.add_argument("--aa", type=AUTO_AUGMENT, help="timm auto-augment policy ('none' disables)")
    g.add_argument("--scale", type=FRACTION, nargs=2, help="RandomResizedCrop scale range")
    g.add_argument("--ratio", type=POSITIVE, nargs=2, help="RandomResizedCrop aspect range")
    g.add_argument("--hflip", type=FRACTION)
    g.add_argument("--color-jitter", type=NON_NEGATIVE)
    g.add_argument("--train-interpolation", choices=(*INTERPOLATIONS, "random"))
    g.add_argument("--reprob", type=FRACTION, help="random erasing probability")
    g.add_argument("--remode", choices=("const", "rand", "pixel"), help="random erasing fill")
    g.add_argument("--recount", type=POSITIVE_INT)
    g.add_argument("--mixup", type=NON_NEGATIVE, help="mixup alpha (0 off)")
    g.add_argument("--cutmix", type=NON_NEGATIVE, help="cutmix alpha (0 off)")
    g.add_argument("--mixup-prob", type=FRACTION)
    g.add_argument("--mixup-switch-prob", type=FRACTION)
    g.add_argument("--smoothing", type=FRACTION, help="label smoothing")
    g.add_argument("--model-ema", action=argparse.BooleanOptionalAction, default=None,
                   help="keep an EMA of the weights (validated every epoch; chooses best.pth)")
    g.add_argument("--model-ema-decay", type=FRACTION)
    g.add_argument("--model-ema-warmup", action=argparse.BooleanOptionalAction, default=None)


def _add_run_arguments(g):
    g.add_argument("--output", default=None,
                   help="run folder, which must not hold another run (default: ./output/<model>-<data>, finetune "
                        "...-finetune, numbered -2, -3, ... past folders holding a run)")
    g.add_argument("--resume", metavar="CKPT", help="continue a run from its last.pth (options left out are the "
                   "run's own; options that change what it computes must stay as they were)")
    g.add_argument("--seed", type=SEED, default=42)
    g.add_argument("--device", type=DEVICE, help="cpu / cuda (default: cuda when available); torchrun sets the index")
    g.add_argument("--threads", type=POSITIVE_INT, help="CPU threads per process (torch.set_num_threads)")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="autocast (default: on for CUDA, off on CPU)")
    g.add_argument("--amp-dtype", choices=("bfloat16", "float16"), default="bfloat16")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute block activations in backward")
    g.add_argument("--log-interval", type=POSITIVE_INT, default=50)


def recipe_table(columns):
    """Help text: the recipe defaults side by side, ``columns`` = {title: recipe}."""
    keys = list(next(iter(columns.values())))
    cells = {title: [_cell(recipe[key]) for key in keys] for title, recipe in columns.items()}
    flags = ["--" + key.replace("_", "-") for key in keys]
    # every column as wide as its widest cell plus two spaces, so that neighbouring values never touch
    widths = {title: max(len(title), *map(len, column)) + 2 for title, column in cells.items()}
    flag_width = max(map(len, flags)) + 2
    lines = ["recipe defaults (an option given on the command line wins):",
             (f"  {'option':<{flag_width}}" + "".join(f"{title:<{widths[title]}}" for title in columns)).rstrip()]
    for row, flag in enumerate(flags):
        text = "".join(f"{cells[title][row]:<{widths[title]}}" for title in columns)
        lines.append(f"  {flag:<{flag_width}}{text}".rstrip())
    return "\n".join(lines)


def _cell(value):
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, tuple):
        return " ".join(_cell(v) for v in value)  # as typed on the command line
    return str(value)


def check_schedule(args, explicit):
    """Cross-option checks once the recipe is applied; ``explicit``: the option names given on the command line.
    A recipe's warm-up longer than a shorter ``--epochs`` is shortened to it; an explicit one is an error
    (``argparse.ArgumentTypeError``)."""
    if args.warmup_epochs > args.epochs:
        if "warmup_epochs" in explicit:
            raise argparse.ArgumentTypeError(
                f"--warmup-epochs {args.warmup_epochs} is longer than --epochs {args.epochs}: give "
                f"--warmup-epochs at most {args.epochs}")
        args.warmup_epochs = args.epochs
    return args


def given_options(parser, argv):
    """Names (dests) of the options present in ``argv``, however spelt (``--epochs=3``, ``--epoch 3``, ``-b 8``)."""
    unset = object()
    probe = copy.deepcopy(parser)
    probe.set_defaults(**{action.dest: unset for action in probe._actions if action.dest != "help"})
    return {dest for dest, value in vars(probe.parse_args(argv)).items() if value is not unset}


def run_command(fn, args, argv=None, command=None, **kwargs):
    """Run ``fn(args, **kwargs)`` once the train extra is found usable beside this torch. User errors (bad data,
    bad checkpoint, bad options, a diverged loss, released weights that cannot be downloaded, a file that cannot
    be read or written) become one line on stderr and exit code 2, a run ended by a callback's StopTraining exit
    code 3, and a closed stdout (``| head``) exit code 0. For a training command (``command``; ``argv`` rebuilds
    its command line), Ctrl-C and SIGTERM print one line saying where the last checkpoint is and how to resume,
    exit code 130 and 143."""
    from t2t_fast.training import requirements_problem

    problem = requirements_problem()
    if problem:
        print(f"t2t-fast: error: {problem}", file=sys.stderr)
        return 2
    from t2t_fast.checkpoint import CheckpointFileError, CheckpointMismatchError
    from t2t_fast.training import loop
    from t2t_fast.training.data import DataError
    from t2t_fast.training.loop import StopTraining
    from t2t_fast.training.state import ResumeError

    started = time.time()
    # signal handlers can only be set from the main thread (a notebook or a test may run a command in another)
    on_term = command is not None and threading.current_thread() is threading.main_thread()
    previous = None
    if on_term:
        loop.install_termination()
        previous = signal.signal(signal.SIGTERM, loop.terminate)
    try:
        fn(args, **kwargs)
    except BrokenPipeError:  # the reader of stdout left (`t2t-fast predict ... | head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit flush does not fail again
        return 0
    except StopTraining as exc:
        print(f"t2t-fast: {exc}", file=sys.stderr)
        return 3
    except (DataError, ResumeError, CheckpointFileError, CheckpointMismatchError, FloatingPointError,
            OSError) as exc:  # OSError: a missing file, a read-only folder, a full disk, a failed download
        print(f"t2t-fast: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        return _stopped(args, argv, command, started, isinstance(exc, loop.Terminated))
    except Exception:
        if not (on_term and loop.termination_requested()):
            raise
        return _stopped(args, argv, command, started, True)  # a loader worker the SIGTERM ended failed the run
    finally:
        if on_term:  # None: a handler set outside Python, which cannot be put back
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
    return 0


def _stopped(args, argv, command, started, terminated):
    """The one line and exit code of a run stopped by Ctrl-C (130) or SIGTERM (``terminated``: 143)."""
    # objects the stop left half-built (a loader iterator starting its workers) fail in __del__ as the process
    # ends: noise after the one line
    sys.unraisablehook = lambda unraisable: None
    if int(os.environ.get("RANK", 0)) == 0:
        print(interrupted_message(args, argv, command, started, "stopped by SIGTERM" if terminated else
                                  "interrupted"), file=sys.stderr)
    return 143 if terminated else 130


def interrupted_message(args, argv, command, started, what="interrupted"):
    """The line Ctrl-C prints (``what`` happened): for a training command, the last checkpoint and the command that
    resumes it (torchrun's, with the same processes, under torchrun). ``started``: when the command started (a
    ``last.pth`` older than that, and not resumed from, is an earlier run's)."""
    from t2t_fast.training.distributed import launch_command

    output = getattr(args, "output", None)
    if command is None or argv is None or output is None:
        return f"t2t-fast: {what}"
    last = os.path.join(output, "last.pth")
    kept, skip = [], False
    for item in argv:  # the same command without its --resume, which is added back pointing at last.pth
        if skip:
            skip = False
        elif item == "--resume":
            skip = True
        elif not item.startswith("--resume="):
            kept.append(item)
    processes = int(os.environ.get("WORLD_SIZE", 1))
    launcher = launch_command(command, processes, int(os.environ.get("LOCAL_WORLD_SIZE", processes)))
    if not os.path.isfile(last) or (not args.resume and os.path.getmtime(last) < started):
        return (f"t2t-fast: {what} before the first epoch finished, so there is no checkpoint in {output} "
                f"yet; start again with: {shlex.join([*launcher, *kept])}")
    return (f"t2t-fast: {what}; the last checkpoint is {last}; resume with: "
            f"{shlex.join([*launcher, *kept, '--resume', last])}")
