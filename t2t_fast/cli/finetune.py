"""``t2t-fast finetune``: transfer a checkpoint to a new dataset with the official recipe.

The official CIFAR transfer (T2T-ViT ``transfer_learning.py``): images resized to the model's input size,
random crop with padding size/8 (28 at 224) and horizontal flip; SGD momentum 0.9, weight decay 5e-4,
lr 0.05 for the new head and 0.01x (``--transfer-ratio``) for the backbone and the T2T module; cosine
over 60 epochs down to 2e-4; plain cross-entropy; drop-path 0.1; no EMA. The lr is per 64 images of
global batch (64 = the official single-GPU batch).

    t2t-fast finetune --model t2t_vit_14 --checkpoint 81.5_T2T_ViT_14.pth.tar --dataset cifar10 --data ~/cifar
    t2t-fast finetune --checkpoint output/t2t_vit_7-digits/best.pth --data my_images/   # train/ + val/

The data: ``--dataset cifar10|cifar100`` reads torchvision's extracted CIFAR python folder (never
downloaded); otherwise ``--data`` is an ImageFolder root with train/ and val/. Checkpoints, resume,
summaries and torchrun (``torchrun -m t2t_fast.cli.finetune``) work as for ``t2t-fast train``.
"""
import argparse
import sys

from t2t_fast import registry
from t2t_fast.cli._options import (FRACTION, CommandParser, add_common_arguments, check_schedule, given_options,
                                   recipe_table, run_command)
from t2t_fast.training import data as data_lib
from t2t_fast.training.recipes import FINETUNE_RECIPE, apply_recipe


def build_parser():
    parser = CommandParser(
        prog="t2t-fast finetune", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fine-tune a checkpoint on a new dataset with the official transfer recipe (SGD, head lr 0.05, "
                    "backbone 0.01x, cosine over 60 epochs).",
        epilog=recipe_table({"fine-tune": FINETUNE_RECIPE}))
    g = parser.add_argument_group("transfer")
    g.add_argument("--checkpoint", metavar="FILE", help="weights to start from (official file or ours)")
    g.add_argument("--pretrained", action="store_true", help="start from the official ImageNet weights (download)")
    g.add_argument("--dataset", choices=("imagefolder", "cifar10", "cifar100"), default="imagefolder")
    g.add_argument("--transfer-ratio", type=FRACTION, default=0.01,
                   help="lr multiplier of the backbone and T2T module (the head gets the full lr)")
    add_common_arguments(parser)
    return parser


# train's augmentation options, which the official transfer transform does not use
_TRAIN_AUGMENTATION = ("aa", "scale", "ratio", "color_jitter", "train_interpolation", "reprob", "remode", "recount")


def resolve(args, explicit=()):
    """Check the transfer options; fill the model from the checkpoint's run and the rest from the recipe.
    ``explicit``: the option names given on the command line."""
    if args.data is None and not args.resume:  # a resumed run reads its own
        raise data_lib.DataError("--data DIR is required (an ImageFolder root with train/ and val/, or the CIFAR "
                                 "folder with --dataset cifar10/cifar100)")
    if not (args.checkpoint or args.pretrained or args.resume):
        raise data_lib.DataError("give --checkpoint FILE (or --pretrained) to fine-tune from")
    if args.checkpoint and args.pretrained:
        raise data_lib.DataError("give --checkpoint FILE or --pretrained (the released weights), not both")
    unused = [name for name in _TRAIN_AUGMENTATION if name in explicit]
    if unused:
        raise data_lib.DataError(
            f"{', '.join('--' + name.replace('_', '-') for name in unused)}: fine-tuning augments as the official "
            f"transfer does (resize, padded random crop, --hflip; then --mean/--std), not with train's options")
    if args.checkpoint and not args.resume:  # a resumed run takes its model and weights from its own checkpoint
        from t2t_fast.checkpoint import read_checkpoint

        saved = read_checkpoint(args.checkpoint)
        run = (saved.get("args") or {}) if isinstance(saved, dict) else {}
        if args.model is None and isinstance(saved, dict):
            args.model = run.get("model") or saved.get("arch")
        if "model_kwargs" not in explicit and run.get("model_kwargs") and args.model == run.get("model"):
            args.model_kwargs = list(run["model_kwargs"])  # the architecture the checkpoint's run trained
    recipe = dict(FINETUNE_RECIPE)
    if args.dataset in data_lib.CIFAR_MEAN:
        recipe.update(mean=data_lib.CIFAR_MEAN[args.dataset], std=data_lib.CIFAR_STD[args.dataset])
    args = check_schedule(apply_recipe(args, recipe), explicit)
    if args.pretrained and not args.checkpoint and not args.resume and not registry.checkpoint_url(args.model):
        released = [name for name in registry.VARIANTS if registry.checkpoint_url(name)]
        raise data_lib.DataError(f"--pretrained: no official checkpoint was released for {args.model} (released: "
                                 f"{', '.join(released)}); give --checkpoint FILE")
    return args


def finetune(args, callbacks=(), explicit=None):
    """Fine-tune with the parsed ``args``; returns the last epoch's metrics (primary rank)."""
    from t2t_fast.training.recipes import FINETUNE
    from t2t_fast.training.run import train

    try:
        resolve(args, explicit or ())
    except argparse.ArgumentTypeError as exc:
        build_parser().error(str(exc))
    return train(args, builders=FINETUNE, callbacks=callbacks, explicit=explicit)


def main(argv=None, callbacks=()):
    """Entry point of ``t2t-fast finetune``; returns the process exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    return run_command(finetune, parser.parse_args(argv), argv=argv, command="finetune", callbacks=callbacks,
                       explicit=given_options(parser, argv))


if __name__ == "__main__":
    sys.exit(main())
