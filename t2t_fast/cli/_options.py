"""What the training commands share: their common options, the recipe table of ``--help``, and how a
command's errors become exit codes."""
import argparse
import sys


def add_common_arguments(parser):
    """Options shared by ``train`` and ``finetune`` (defaults of None are filled from the recipe)."""
    g = parser.add_argument_group("data and model")
    g.add_argument("--data", metavar="DIR", help="ImageFolder root with train/ and val/ (default: built-in digits)")
    g.add_argument("--model", help="variant name (t2t_fast.list_models())")
    g.add_argument("--img-size", type=int, help="input resolution (square)")
    g.add_argument("--model-kwargs", nargs="*", default=[], metavar="K=V",
                   help="extra model constructor arguments, e.g. depth=2 backend=torch")
    g.add_argument("--backend", help="kernel backend of the model (auto/triton/cuda/cpp/torch)")
    g.add_argument("--drop-path", type=float, help="stochastic depth rate")
    g.add_argument("--drop", type=float, help="dropout rate")
    g.add_argument("--workers", "-j", type=int, help="data loader processes per rank")
    _add_optimisation_arguments(parser.add_argument_group("optimisation"))
    _add_augmentation_arguments(parser.add_argument_group("augmentation and regularisation"))

    g = parser.add_argument_group("evaluation transform")
    g.add_argument("--crop-pct", type=float)
    g.add_argument("--interpolation")
    g.add_argument("--mean", type=float, nargs=3)
    g.add_argument("--std", type=float, nargs=3)
    _add_run_arguments(parser.add_argument_group("run"))
    return parser


def _add_optimisation_arguments(g):
    g.add_argument("--batch-size", "-b", type=int, help="images per step per process")
    g.add_argument("--epochs", type=int, help="epochs of the schedule (cool-down epochs are added)")
    g.add_argument("--lr", type=float, help="peak learning rate (default: --lr-base scaled to the global batch)")
    g.add_argument("--lr-base", type=float, help="learning rate per --lr-base-size images of global batch")
    g.add_argument("--lr-base-size", type=int)
    g.add_argument("--opt", help="timm optimizer name")
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--momentum", type=float)
    g.add_argument("--clip-grad", type=float)
    g.add_argument("--sched", help="timm scheduler name")
    g.add_argument("--sched-on-updates", action=argparse.BooleanOptionalAction, default=None,
                   help="step the schedule every optimizer update instead of every epoch")
    g.add_argument("--warmup-epochs", type=int)
    g.add_argument("--warmup-lr", type=float)
    g.add_argument("--min-lr", type=float)
    g.add_argument("--cooldown-epochs", type=int)


def _add_augmentation_arguments(g):
    g.add_argument("--aa", help="timm auto-augment policy ('none' disables)")
    g.add_argument("--scale", type=float, nargs=2, help="RandomResizedCrop scale range")
    g.add_argument("--ratio", type=float, nargs=2, help="RandomResizedCrop aspect range")
    g.add_argument("--hflip", type=float)
    g.add_argument("--color-jitter", type=float)
    g.add_argument("--train-interpolation")
    g.add_argument("--reprob", type=float, help="random erasing probability")
    g.add_argument("--remode")
    g.add_argument("--recount", type=int)
    g.add_argument("--mixup", type=float, help="mixup alpha (0 off)")
    g.add_argument("--cutmix", type=float, help="cutmix alpha (0 off)")
    g.add_argument("--mixup-prob", type=float)
    g.add_argument("--mixup-switch-prob", type=float)
    g.add_argument("--smoothing", type=float, help="label smoothing")
    g.add_argument("--model-ema", action=argparse.BooleanOptionalAction, default=None,
                   help="keep an EMA of the weights (validated every epoch; chooses best.pth)")
    g.add_argument("--model-ema-decay", type=float)
    g.add_argument("--model-ema-warmup", action=argparse.BooleanOptionalAction, default=None)


def _add_run_arguments(g):
    g.add_argument("--output", default=None, help="run folder (default: ./output/<model>-<data>)")
    g.add_argument("--resume", metavar="CKPT", help="continue a run from its last.pth")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--device", help="cpu / cuda (default: cuda when available); torchrun sets the index")
    g.add_argument("--threads", type=int, help="CPU threads per process (torch.set_num_threads)")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="autocast (default: on for CUDA, off on CPU)")
    g.add_argument("--amp-dtype", choices=("bfloat16", "float16"), default="bfloat16")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute block activations in backward")
    g.add_argument("--log-interval", type=int, default=50)


def recipe_table(columns):
    """Help text: the recipe defaults side by side, ``columns`` = {title: recipe}."""
    keys = list(next(iter(columns.values())))
    lines = ["recipe defaults (an option given on the command line wins):",
             (f"  {'option':<22}" + "".join(f"{title:<26}" for title in columns)).rstrip()]
    for key in keys:
        cells = "".join(f"{str(recipe[key]):<26}" for recipe in columns.values())
        lines.append(f"  --{key.replace('_', '-'):<20}{cells}".rstrip())
    return "\n".join(lines)


def run_command(fn, args, **kwargs):
    """Run ``fn(args, **kwargs)``: user errors (bad data, bad checkpoint, bad options, a diverged loss) become a
    message and exit code 2, a run ended by a callback's StopTraining exit code 3."""
    from t2t_fast.checkpoint import CheckpointMismatchError
    from t2t_fast.training.data import DataError
    from t2t_fast.training.loop import StopTraining
    from t2t_fast.training.state import ResumeError

    try:
        fn(args, **kwargs)
    except StopTraining as exc:
        print(f"t2t-fast: {exc}", file=sys.stderr)
        return 3
    except (DataError, ResumeError, FileNotFoundError, CheckpointMismatchError, FloatingPointError) as exc:
        print(f"t2t-fast: error: {exc}", file=sys.stderr)
        return 2
    return 0
