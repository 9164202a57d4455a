"""``t2t-fast train`` (also ``python -m t2t_fast.train``): train a T2T-ViT from scratch.

With ``--data DIR`` (an ImageFolder tree with ``train/`` and ``val/``) the defaults are the official
ImageNet recipe (T2T-ViT ``main.py``: AdamW, lr 5e-4 per 512 images, wd 0.05, cosine over 300 epochs
+ 10 cool-down, 10 warm-up, RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25, mixup 0.8 / cutmix
1.0, label smoothing 0.1, drop-path 0.1, EMA 0.99996, autocast on GPU). Without ``--data`` it trains
the built-in demo: ``t2t_vit_7`` at 32 px on scikit-learn's 8x8 digits, a recipe sized for a laptop CPU.
Every option given on the command line overrides the recipe.

Multi-GPU / multi-node: launch with ``torchrun`` (DDP; ``--batch-size`` is per process).
Outputs in ``--output``: ``last.pth`` (everything needed to resume, written atomically every epoch),
``best.pth`` (best EMA top-1), ``summary.csv`` / ``summary.json`` and ``log.txt``.
"""
import argparse
import sys

from t2t_fast.cli._options import (CommandParser, add_common_arguments, check_schedule, given_options, recipe_table,
                                   run_command)
from t2t_fast.training.recipes import DIGITS_RECIPE, OFFICIAL_RECIPE, apply_recipe


def build_parser():
    parser = CommandParser(
        prog="t2t-fast train", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a T2T-ViT from scratch: the official recipe on an ImageFolder (--data), or without "
                    "--data the built-in demo (t2t_vit_7, 32 px, scikit-learn's digits; a few minutes on a CPU).",
        epilog=recipe_table({"with --data (official)": OFFICIAL_RECIPE, "without (digits demo)": DIGITS_RECIPE}))
    return add_common_arguments(parser)


def parse_args(argv=None):
    """The options of ``argv`` with the recipe's defaults filled in."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args = apply_recipe(args, DIGITS_RECIPE if args.data is None else OFFICIAL_RECIPE)
    try:
        return check_schedule(args, given_options(parser, argv))
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))


def main(argv=None, callbacks=()):
    """Entry point of ``t2t-fast train``; returns the process exit code. ``callbacks`` go to
    :func:`t2t_fast.training.run.train`."""
    from t2t_fast.training.run import train

    argv = sys.argv[1:] if argv is None else list(argv)
    return run_command(train, parse_args(argv), argv=argv, command="train", callbacks=callbacks,
                       explicit=given_options(build_parser(), argv))


if __name__ == "__main__":
    sys.exit(main())
