"""``t2t-fast eval``: top-1 / top-5 of a checkpoint.

Loads official checkpoint files (``81.5_T2T_ViT_14.pth.tar``: EMA weights preferred) and checkpoints
written by ``t2t-fast train`` / ``finetune``. For the latter, the model, image size, model kwargs and
evaluation transform of the run are read from the checkpoint, so the command reproduces the accuracy the
run logged; without ``--data`` such a checkpoint of the digits demo is evaluated on the digits split.
Otherwise the official evaluation transform is used: resize to img_size / 0.9, center crop, bicubic,
ImageNet mean/std.

    t2t-fast eval --model t2t_vit_14 --checkpoint 81.5_T2T_ViT_14.pth.tar --data /data/imagenet
"""
import argparse
import contextlib
import functools
import json
import logging
import os
import sys

import torch

from t2t_fast import registry
from t2t_fast.cli._options import (FINITE, INTERPOLATIONS, NON_NEGATIVE_INT, POSITIVE, POSITIVE_INT, CommandParser,
                                   add_checkpoint_run_options, run_command)
from t2t_fast.training import data as data_lib

_logger = logging.getLogger(__name__)


def build_parser():
    parser = CommandParser(
        prog="t2t-fast eval", description="Top-1 / top-5 of a checkpoint (official files or ours) on an ImageFolder; "
        "checkpoints of t2t-fast runs are evaluated with their run's model and transform.")
    parser.add_argument("--checkpoint", required=True, metavar="FILE", help="checkpoint file (official or ours)")
    parser.add_argument("--model", help="variant (default: the one recorded in the checkpoint)")
    parser.add_argument("--data", metavar="DIR",
                        help="ImageFolder root: DIR/val when it exists, else DIR itself (one folder per class)")
    parser.add_argument("--dataset", choices=("imagefolder", "cifar10", "cifar100"),
                        help="dataset kind of --data (default: the checkpoint's, else imagefolder)")
    parser.add_argument("--img-size", type=POSITIVE_INT,
                        help="input resolution (default: the checkpoint's run, else 224)")
    parser.add_argument("--num-classes", type=POSITIVE_INT, help="default: the checkpoint's head")
    parser.add_argument("--model-kwargs", nargs="*", metavar="K=V", help="extra model constructor arguments")
    parser.add_argument("--backend", help="kernel backend (auto/triton/cuda/cpp/torch)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                        help="run the model as t2t_fast.optimize_for_inference converts it to this dtype, without "
                        "autocast (default: the checkpoint's fp32 weights, autocast as --amp)")
    parser.add_argument("--no-ema", action="store_true", help="use the raw weights even when EMA weights exist")
    parser.add_argument("--batch-size", "-b", type=POSITIVE_INT, help="default: the checkpoint's run, else 100")
    parser.add_argument("--crop-pct", type=POSITIVE)
    parser.add_argument("--interpolation", choices=INTERPOLATIONS)
    parser.add_argument("--mean", type=FINITE, nargs=3)
    parser.add_argument("--std", type=POSITIVE, nargs=3)
    parser.add_argument("--workers", "-j", type=NON_NEGATIVE_INT, help="data loader processes (default: min(4, CPUs))")
    add_checkpoint_run_options(parser)
    parser.add_argument("--results-file", help="also write the metrics as JSON here")
    parser.add_argument("--log-interval", type=POSITIVE_INT, default=50)
    return parser


def checkpoint_settings(args, checkpoint):
    """Fill the unset model options of ``args`` (model, image size, model kwargs, evaluation transform, threads,
    autocast; those ``args`` has) from the training run a checkpoint records (a ``t2t-fast train``/``finetune``
    run's, or the model options of a timm ``train.py`` run's); returns the ``t2t-fast`` run's options ({} for
    other files)."""
    saved = checkpoint.get("args")
    run = saved if isinstance(saved, dict) else {}
    recorded_options = run or (_timm_train_options(saved) if isinstance(saved, argparse.Namespace) else {})
    if args.model is None:
        recorded = recorded_options.get("model") or checkpoint.get("arch")
        if recorded not in registry.VARIANTS:  # official files record timm's class name ('t2t_vit'), if anything
            raise data_lib.DataError(f"the checkpoint does not record which variant it is (arch={recorded!r}): "
                                     f"pass --model NAME")
        args.model = recorded
    if args.model not in registry.VARIANTS:
        raise data_lib.DataError(str(registry.unknown_model_error(args.model)))
    for key in ("img_size", "crop_pct", "interpolation", "mean", "std", "model_kwargs", "threads", "amp",
                "amp_dtype"):
        if hasattr(args, key) and getattr(args, key) is None and recorded_options.get(key) is not None:
            setattr(args, key, recorded_options[key])
    return run


# timm train.py's --model-kwargs this command sets otherwise (the head from the weights) or does not need
_TIMM_KWARGS_SET_HERE = ("num_classes", "drop_rate", "drop_path_rate", "pretrained")


def _timm_train_options(namespace):
    """The model options a timm ``train.py`` run records (its ``args`` Namespace) in this command's terms: the
    variant, ``--img-size``, ``--model-kwargs`` (its ``model_kwargs`` dict without the image size) and the
    evaluation transform it set."""
    found = vars(namespace)
    kwargs = dict(found.get("model_kwargs") or {})
    sizes = [kwargs.pop("img_size", None), found.get("img_size"), (found.get("input_size") or [None])[-1]]
    model = found.get("model")
    options = {"model": model.lower() if isinstance(model, str) and model.lower() in registry.VARIANTS else model,
               "img_size": next((size for size in sizes if size is not None), None),
               "model_kwargs": [f"{key}={value!r}" for key, value in kwargs.items()
                                if key not in _TIMM_KWARGS_SET_HERE],
               "mean": found.get("mean"), "std": found.get("std"), "crop_pct": found.get("crop_pct"),
               "interpolation": found.get("interpolation") or None}
    return {key: value for key, value in options.items() if value is not None}


def _settings(args, checkpoint):
    """Fill unset options: the training run's settings when the checkpoint has them, else the official ones."""
    run = checkpoint_settings(args, checkpoint)
    cfg = registry.DEFAULT_CFG
    defaults = dict(img_size=cfg["input_size"][-1], batch_size=run.get("batch_size", 100),
                    crop_pct=cfg["crop_pct"], interpolation=cfg["interpolation"], mean=cfg["mean"], std=cfg["std"],
                    model_kwargs=[], dataset=run.get("dataset", "imagefolder"),
                    workers=min(4, os.cpu_count() or 1), amp=False, amp_dtype="bfloat16")
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.mean, args.std = tuple(args.mean), tuple(args.std)
    if args.data is None and run and run.get("data") is None and "model" in run:
        args.digits = True
    elif args.data is None:
        raise data_lib.DataError("--data DIR is required (an ImageFolder root, or the folder holding val/)")
    else:
        args.digits = False
    return args


def eval_dataset(args, transform):
    if args.digits:
        return data_lib.DigitsDataset("val", args.img_size, transform)
    if args.dataset in ("cifar10", "cifar100"):
        return data_lib.cifar_splits(args.dataset, args.data, None, transform)[1]
    root = os.path.join(args.data, "val") if os.path.isdir(os.path.join(args.data, "val")) else args.data
    return data_lib.SafeImageFolder(root, transform)


def _read(args):
    """The checkpoint with ``args`` completed from it, and whether its EMA weights are used."""
    from t2t_fast.checkpoint import extract_state_dict
    from t2t_fast.checkpoint import read_checkpoint

    _check_results_file(args)
    checkpoint = read_checkpoint(args.checkpoint)
    if not isinstance(checkpoint, dict):
        raise data_lib.DataError(f"{args.checkpoint} does not hold a checkpoint dict")
    _settings(args, checkpoint)
    use_ema = not args.no_ema
    head = extract_state_dict(checkpoint, use_ema=use_ema).get("head.weight")
    if head is not None and args.num_classes not in (None, head.shape[0]):
        raise data_lib.DataError(f"--num-classes {args.num_classes} differs from the checkpoint's "
                                 f"{head.shape[0]}-class head, which eval scores: leave --num-classes out")
    if args.num_classes is None:
        args.num_classes = head.shape[0] if head is not None else 1000
    return checkpoint, use_ema


def _check_results_file(args):
    """Refuse a --results-file that cannot be written or would replace something else than earlier results,
    before the evaluation runs."""
    path = args.results_file
    if not path:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path) or not os.path.isdir(folder):
        raise data_lib.DataError(f"--results-file {path}: " + ("is a folder; give a file name such as "
                                 f"{os.path.join(path, 'results.json')}" if os.path.isdir(path) else
                                 f"its folder {folder} does not exist"))
    if os.path.exists(path):
        try:
            with open(path) as f:
                json.load(f)
        except (ValueError, UnicodeDecodeError):
            raise data_lib.DataError(f"--results-file {path} exists and is not a JSON results file: refusing to "
                                     f"replace it; give another file name") from None


def _validate(args, checkpoint, use_ema, dist_info):
    from t2t_fast.checkpoint import load_checkpoint
    from t2t_fast.training import recipes
    from t2t_fast.training.distributed import ShardSampler
    from t2t_fast.training.loop import validate

    dataset = eval_dataset(args, recipes.eval_transform(args))
    if len(dataset.classes) != args.num_classes:
        raise data_lib.DataError(f"the model has {args.num_classes} classes (the checkpoint's head, or "
                                 f"--num-classes) but the evaluation data has {len(dataset.classes)}")
    trained = checkpoint.get("classes")
    if isinstance(trained, list) and list(dataset.classes) != trained:
        differ = [f"{i}: {ours!r} vs {theirs!r}" for i, (ours, theirs) in enumerate(zip(dataset.classes, trained))
                  if ours != theirs]
        raise data_lib.DataError(f"the evaluation data's classes are not the ones the checkpoint was trained on, in "
                                 f"order (index: data vs checkpoint): {', '.join(differ[:3])}"
                                 f"{' ...' if len(differ) > 3 else ''}; each image would be scored against another "
                                 f"class")
    model = recipes.create_model(args, args.num_classes)
    load_checkpoint(model, checkpoint, use_ema=use_ema)
    model.to(dist_info.device)
    if getattr(args, "dtype", None):
        from t2t_fast.inference import optimize_for_inference

        model, args.amp = optimize_for_inference(model, args.dtype), False
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, num_workers=args.workers,
        sampler=ShardSampler(len(dataset), dist_info.rank, dist_info.world_size),
        collate_fn=data_lib.collate_skip_unreadable, pin_memory=dist_info.device.type == "cuda")
    autocast = (functools.partial(torch.autocast, device_type=dist_info.device.type,
                                  dtype=getattr(torch, args.amp_dtype)) if args.amp else contextlib.nullcontext)
    _logger.info("evaluating %s (%s weights of %s) on %d images", args.model,
                 "EMA" if use_ema and "state_dict_ema" in checkpoint else "model", args.checkpoint, len(dataset))
    return validate(model, loader, dist_info, autocast, desc="Eval", log_interval=args.log_interval)


def evaluate(args):
    """Evaluate with resolved-or-partial ``args``; returns the metrics dict."""
    from t2t_fast.training.distributed import Distributed

    checkpoint, use_ema = _read(args)
    threads = torch.get_num_threads()
    dist_info = Distributed(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        metrics = _validate(args, checkpoint, use_ema, dist_info)
    finally:
        dist_info.close()
        torch.set_num_threads(threads)
    weights = "EMA" if use_ema and "state_dict_ema" in checkpoint else "model"
    metrics = {"model": args.model, "checkpoint": args.checkpoint, "weights": weights, "img_size": args.img_size,
               **({"dtype": args.dtype} if getattr(args, "dtype", None) else {}), **metrics}
    _logger.info("top-1 %.3f%%  top-5 %.3f%%  loss %.4f  (%d images%s)", metrics["top1"], metrics["top5"],
                 metrics["loss"], metrics["count"],
                 f", {metrics['skipped']} unreadable skipped" if metrics["skipped"] else "")
    if args.results_file and dist_info.primary:
        with open(args.results_file, "w") as f:
            json.dump(metrics, f, indent=1)
    return metrics


def main(argv=None):
    """Entry point of ``t2t-fast eval``; returns the process exit code."""
    from t2t_fast.training.logs import setup_logging

    args = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    setup_logging(int(os.environ.get("RANK", 0)) == 0)
    return run_command(evaluate, args)


if __name__ == "__main__":
    sys.exit(main())
