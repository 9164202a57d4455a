"""``t2t-fast train`` / ``python -m t2t_fast.train``: train a T2T-ViT from scratch.

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
import contextlib
import functools
import logging
import os
import shutil
import sys
import time

import torch

from t2t_fast import _config
from t2t_fast import data as data_lib

_logger = logging.getLogger("t2t_fast.train")

# The official recipe (../shared/spec/t2t_official.md section 7).
OFFICIAL_RECIPE = dict(
    model="t2t_vit_14", img_size=224, batch_size=64, epochs=300, cooldown_epochs=10, warmup_epochs=10,
    warmup_lr=1e-6, min_lr=1e-5, lr_base=5e-4, lr_base_size=512, opt="adamw", weight_decay=0.05, momentum=0.9,
    sched="cosine", sched_on_updates=False, clip_grad=None,
    aa="rand-m9-mstd0.5-inc1", scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5, color_jitter=0.4,
    train_interpolation="random", reprob=0.25, remode="pixel", recount=1,
    mixup=0.8, cutmix=1.0, mixup_prob=1.0, mixup_switch_prob=0.5, smoothing=0.1,
    drop_path=0.1, drop=0.0, model_ema=True, model_ema_decay=0.99996, model_ema_warmup=False,
    crop_pct=0.9, interpolation="bicubic", mean=_config.DEFAULT_CFG["mean"],
    std=_config.DEFAULT_CFG["std"], workers=8, threads=None,
)

# The built-in demo: 1,437 training digits, so small images, light augmentation (no flips: a mirrored
# digit is another glyph), no mixup, a short per-step cosine schedule and a fast-warming EMA.
DIGITS_RECIPE = dict(
    OFFICIAL_RECIPE, model="t2t_vit_7", img_size=32, batch_size=64, epochs=10, cooldown_epochs=0,
    warmup_epochs=2, lr_base=1e-3, lr_base_size=64, weight_decay=0.05, sched_on_updates=True,
    aa=None, scale=(0.75, 1.0), ratio=(0.85, 1.18), hflip=0.0, color_jitter=None, train_interpolation="bicubic",
    reprob=0.0, mixup=0.0, cutmix=0.0, smoothing=0.1, drop_path=0.0, model_ema_decay=0.998,
    model_ema_warmup=True, crop_pct=1.0, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), workers=0,
    threads=1,  # 32 px tensors are too small for intra-op threads to pay off; on a busy machine they thrash
)


class ResumeError(ValueError):
    """A ``--resume`` checkpoint that does not belong to this run."""


USER_ERRORS = (data_lib.DataError, ResumeError, FileNotFoundError)


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

    g = parser.add_argument_group("optimisation")
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

    g = parser.add_argument_group("augmentation and regularisation")
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

    g = parser.add_argument_group("evaluation transform")
    g.add_argument("--crop-pct", type=float)
    g.add_argument("--interpolation")
    g.add_argument("--mean", type=float, nargs=3)
    g.add_argument("--std", type=float, nargs=3)

    g = parser.add_argument_group("run")
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
    # testing hooks: stop like a killed process after N optimizer steps; dump every rank's weights
    g.add_argument("--stop-after-steps", type=int, help=argparse.SUPPRESS)
    g.add_argument("--save-rank-weights", action="store_true", help=argparse.SUPPRESS)
    return parser


def recipe_table(columns):
    """Help text: the recipe defaults side by side, ``columns`` = {title: recipe}."""
    keys = list(next(iter(columns.values())))
    lines = ["recipe defaults (an option given on the command line wins):",
             (f"  {'option':<22}" + "".join(f"{title:<26}" for title in columns)).rstrip()]
    for key in keys:
        cells = "".join(f"{str(recipe[key]):<26}" for recipe in columns.values())
        lines.append(f"  --{key.replace('_', '-'):<20}{cells}".rstrip())
    return "\n".join(lines)


def build_parser():
    parser = argparse.ArgumentParser(
        prog="t2t-fast train", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a T2T-ViT from scratch: the official recipe on an ImageFolder (--data), or without "
                    "--data the built-in demo (t2t_vit_7, 32 px, scikit-learn's digits; a few minutes on a CPU).",
        epilog=recipe_table({"with --data (official)": OFFICIAL_RECIPE, "without (digits demo)": DIGITS_RECIPE}))
    return add_common_arguments(parser)


def parse_model_kwargs(items):
    """``['depth=2', 'backend=torch']`` -> ``{'depth': 2, 'backend': 'torch'}`` (Python literals parsed)."""
    import ast

    kwargs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise data_lib.DataError(f"--model-kwargs expects KEY=VALUE items, got {item!r}")
        try:
            kwargs[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            kwargs[key] = value
    return kwargs


def apply_recipe(args, recipe):
    """Fill every option left unset on the command line from ``recipe``."""
    for key, value in recipe.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if isinstance(args.aa, str) and args.aa.lower() in ("", "none"):
        args.aa = None
    if not args.color_jitter:
        args.color_jitter = None
    for key in ("scale", "ratio", "mean", "std"):
        setattr(args, key, tuple(getattr(args, key)))
    return args


# ----------------------------------------------------------------------------------------------------------
# building blocks (the fine-tune command swaps some of them)

def default_transforms(args):
    """(train, eval) transforms from timm's ``create_transform``."""
    from timm.data import create_transform

    train = create_transform(args.img_size, is_training=True, scale=args.scale, ratio=args.ratio, hflip=args.hflip,
                             color_jitter=args.color_jitter, auto_augment=args.aa,
                             interpolation=args.train_interpolation, mean=args.mean, std=args.std,
                             re_prob=args.reprob, re_mode=args.remode, re_count=args.recount)
    for stage in getattr(train, "transforms", ()):
        for op in getattr(stage, "ops", ()):  # RandAugment / AutoAugment ops
            if op.name.startswith("Posterize"):
                op.aug_fn = _posterize
    return train, eval_transform(args)


def _posterize(img, bits_to_keep, **_):
    """timm's posterize, with 0 bits giving a black image as Pillow < 13 did. RandAugment 'inc1' asks
    for 0 bits at magnitude 10 (m9 + noise reaches it); Pillow 13 raises ValueError there instead."""
    from PIL import Image, ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def eval_transform(args):
    """The evaluation transform: resize to img_size / crop_pct, center crop, normalise (timm)."""
    from timm.data import create_transform

    return create_transform(args.img_size, is_training=False, crop_pct=args.crop_pct,
                            interpolation=args.interpolation, mean=args.mean, std=args.std)


def build_datasets(args, transforms):
    """(train, val) datasets: ``--data`` ImageFolder or the built-in digits."""
    train_tf, eval_tf = transforms
    if args.data is None:
        return (data_lib.DigitsDataset("train", args.img_size, train_tf),
                data_lib.DigitsDataset("val", args.img_size, eval_tf))
    return data_lib.image_folder_splits(args.data, train_tf, eval_tf)


def build_model(args, num_classes):
    import t2t_fast

    kwargs = dict(num_classes=num_classes, img_size=args.img_size, drop_path_rate=args.drop_path,
                  drop_rate=args.drop, **parse_model_kwargs(args.model_kwargs))
    if args.backend is not None:
        kwargs["backend"] = args.backend
    return t2t_fast.create_model(args.model, **kwargs)


def build_optimizer(args, model):
    """timm ``create_optimizer_v2``: it reads ``model.no_weight_decay()`` and leaves out frozen params."""
    from timm.optim import create_optimizer_v2

    return create_optimizer_v2(model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay,
                               momentum=args.momentum)


def build_loss(args):
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if args.mixup > 0 or args.cutmix > 0:
        return SoftTargetCrossEntropy()  # smoothing is inside the mixup targets
    if args.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    return torch.nn.CrossEntropyLoss()


# ----------------------------------------------------------------------------------------------------------

def _resolve_output(args):
    if args.output is None:
        data = "digits" if args.data is None else os.path.basename(os.path.normpath(args.data))
        args.output = os.path.join("output", f"{args.model}-{data}")
    return args.output


def _checkpoint_args(args):
    """The run's options as plain JSON-able values (stored in every checkpoint)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}


def _load_resume(path, args):
    from t2t_fast.checkpoint import read_checkpoint

    checkpoint = read_checkpoint(path)
    if not isinstance(checkpoint, dict) or "optimizer" not in checkpoint or "epoch" not in checkpoint:
        raise ResumeError(f"{path} is not a training checkpoint written by t2t-fast (it has no optimizer/epoch "
                          f"state); to start from its weights use `t2t-fast finetune --checkpoint {path}`")
    saved = checkpoint.get("args", {})
    for key in ("model", "img_size"):
        if saved.get(key) != getattr(args, key):
            raise ResumeError(f"{path} was written by a run with --{key.replace('_', '-')} {saved.get(key)}, "
                              f"but this run has {getattr(args, key)}; resume with the same options")
    return checkpoint


def run(args, build_model_fn=build_model, build_optimizer_fn=build_optimizer, transforms_fn=default_transforms,
        datasets_fn=build_datasets):
    """Train with the resolved ``args``; returns the final metrics dict (primary rank) or None."""
    from t2t_fast import _train_utils as tu

    threads = torch.get_num_threads()
    dist_info = tu.Distributed(args.device)
    try:
        return _run(args, dist_info, build_model_fn, build_optimizer_fn, transforms_fn, datasets_fn)
    finally:
        dist_info.close()
        torch.set_num_threads(threads)  # run() is also called in-process (tests, notebooks)


def _run(args, dist_info, build_model_fn, build_optimizer_fn, transforms_fn, datasets_fn):
    from timm.data import Mixup
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3, NativeScaler

    from t2t_fast import _train_utils as tu
    from t2t_fast.checkpoint import load_checkpoint

    started = time.perf_counter()
    if args.model not in _config.VARIANTS:
        raise data_lib.DataError(str(_config.unknown_model_error(args.model)))
    device = dist_info.device
    if args.threads:
        torch.set_num_threads(args.threads)
    output = _resolve_output(args)
    if dist_info.primary:
        os.makedirs(output, exist_ok=True)
        if not args.resume and os.path.exists(os.path.join(output, "last.pth")):
            print(f"t2t-fast: note: {output} holds an earlier run; it is overwritten epoch by epoch "
                  f"(use --resume {os.path.join(output, 'last.pth')} to continue it instead)", file=sys.stderr)
    tu.setup_logging(dist_info.primary, os.path.join(output, "log.txt") if dist_info.primary else None)
    if args.amp is None:
        args.amp = device.type == "cuda"
    tu.seed_everything(args.seed)  # the same initial weights (and EMA copy) on every rank

    train_set, val_set = datasets_fn(args, transforms_fn(args))
    num_classes = len(train_set.classes)
    global_batch = args.batch_size * dist_info.world_size
    if args.lr is None:
        args.lr = args.lr_base * global_batch / args.lr_base_size
    per_rank = len(train_set) // dist_info.world_size
    if args.batch_size > per_rank:
        raise data_lib.DataError(
            f"--batch-size {args.batch_size} is larger than the {len(train_set)} training images"
            + (f" ({per_rank} per process over {dist_info.world_size} processes)" if dist_info.distributed else "")
            + "; use a smaller batch")

    model = build_model_fn(args, num_classes).to(device)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    optimizer = build_optimizer_fn(args, model)
    amp_dtype = torch.bfloat16 if args.amp_dtype == "bfloat16" else torch.float16
    amp_autocast = (functools.partial(torch.autocast, device_type=device.type, dtype=amp_dtype) if args.amp
                    else contextlib.nullcontext)
    scaler = NativeScaler(device=device.type) if args.amp and amp_dtype == torch.float16 else None
    ema = None
    if args.model_ema:  # before compile and the DDP wrap (timm train.py)
        ema = ModelEmaV3(model, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup)
    tu.seed_everything(args.seed + dist_info.rank)  # then a data / dropout stream per rank (timm's seed + rank)

    sampler = torch.utils.data.DistributedSampler(train_set, num_replicas=dist_info.world_size,
                                                  rank=dist_info.rank, shuffle=True, seed=args.seed, drop_last=True)
    loader_kwargs = dict(num_workers=min(args.workers, os.cpu_count() or 1),
                         collate_fn=data_lib.collate_skip_unreadable, pin_memory=device.type == "cuda")
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, sampler=sampler,
                                               drop_last=True, **loader_kwargs)
    val_loader = torch.utils.data.DataLoader(
        val_set, batch_size=args.batch_size, sampler=tu.ShardSampler(len(val_set), dist_info.rank,
                                                                     dist_info.world_size), **loader_kwargs)
    updates_per_epoch = len(train_loader)
    scheduler, num_epochs = create_scheduler_v2(
        optimizer, sched=args.sched, num_epochs=args.epochs, warmup_epochs=args.warmup_epochs,
        warmup_lr=args.warmup_lr, min_lr=args.min_lr, cooldown_epochs=args.cooldown_epochs,
        step_on_epochs=not args.sched_on_updates, updates_per_epoch=updates_per_epoch)

    start_epoch, num_updates, best = 0, 0, None
    if args.resume:
        checkpoint = _load_resume(args.resume, args)
        load_checkpoint(model, checkpoint, use_ema=False)
        if ema is not None and "state_dict_ema" in checkpoint:
            ema.module.load_state_dict(checkpoint["state_dict_ema"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        if scaler is not None and checkpoint.get("scaler"):
            scaler.load_state_dict(checkpoint["scaler"])
        start_epoch, num_updates, best = checkpoint["epoch"] + 1, checkpoint["step"], checkpoint.get("best")
        rng = checkpoint.get("rng") or []
        if len(rng) == dist_info.world_size:
            tu.set_rng_state(rng[dist_info.rank])
        else:
            _logger.warning("the checkpoint holds RNG states of %d processes, this run has %d: continuing with "
                            "fresh random streams (not bit-exact)", len(rng), dist_info.world_size)
        _logger.info("resumed %s at epoch %d (step %d)", args.resume, start_epoch, num_updates)
        del checkpoint

    # Put the lr of this point of the schedule (and each group's lr_scale) in place before the first step.
    if args.sched_on_updates:
        scheduler.step_update(num_updates)
    else:
        scheduler.step(start_epoch)

    model_raw = model
    if args.compile:
        model = torch.compile(model)
    if dist_info.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    mixup_fn = None
    if args.mixup > 0 or args.cutmix > 0:
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=args.mixup_prob,
                         switch_prob=args.mixup_switch_prob, mode="batch", label_smoothing=args.smoothing,
                         num_classes=num_classes)
    loss_fn = build_loss(args).to(device)
    summary = tu.Summary(output)

    n_params = sum(p.numel() for p in model_raw.parameters())
    _logger.info("%s: %.2fM params, %d classes, %d train / %d val images, %d processes x batch %d, lr %.3g, "
                 "%d epochs (%d updates/epoch), device %s%s, output %s", args.model, n_params / 1e6, num_classes,
                 len(train_set), len(val_set), dist_info.world_size, args.batch_size, args.lr, num_epochs,
                 updates_per_epoch, device, f" autocast {args.amp_dtype}" if args.amp else "", output)

    metrics = None
    for epoch in range(start_epoch, num_epochs):
        sampler.set_epoch(epoch)
        t0 = time.perf_counter()
        train_metrics, num_updates = _train_one_epoch(
            epoch, num_epochs, model, model_raw, train_loader, optimizer, loss_fn, mixup_fn, scheduler, ema,
            scaler, amp_autocast, args, dist_info, num_updates)
        scheduler.step(epoch + 1)
        train_time = time.perf_counter() - t0
        row = {"epoch": epoch, "step": num_updates, "lr": optimizer.param_groups[0]["lr"],
               "train_loss": train_metrics["loss"], "train_skipped": train_metrics["skipped"],
               "train_time_s": round(train_time, 2)}
        val = tu.validate(model_raw, val_loader, device, dist_info, amp_autocast, desc=f"Val {epoch}",
                          log_interval=args.log_interval)
        row.update({f"val_{k}": v for k, v in val.items()})
        if ema is not None:
            val_ema = tu.validate(ema.module, val_loader, device, dist_info, amp_autocast,
                                  desc=f"Val EMA {epoch}", log_interval=args.log_interval)
            row.update({f"val_ema_{k}": v for k, v in val_ema.items()})
        score = row.get("val_ema_top1", row["val_top1"])
        is_best = best is None or score > best
        if is_best:
            best = score
        row["best_top1"] = best
        row["time_s"] = round(time.perf_counter() - t0, 2)
        if args.save_rank_weights:
            torch.save({"model": model_raw.state_dict(), "ema": ema.module.state_dict() if ema else None},
                       os.path.join(output, f"rank{dist_info.rank}_weights.pt"))
        rng = dist_info.gather_objects(tu.get_rng_state())
        if dist_info.primary:
            _save_epoch(output, args, epoch, num_updates, model_raw, ema, optimizer, scheduler, scaler, rng,
                        best, row, is_best)
            summary.append(row)
            _log_epoch(row, ema is not None)
        metrics = row
    if dist_info.primary and metrics is not None:
        final = f"validation top-1 {metrics['val_top1']:.2f}%" + (
            f" (EMA {metrics['val_ema_top1']:.2f}%)" if "val_ema_top1" in metrics else "")
        _logger.info("done in %.0fs: %s, best %.2f%%; checkpoints and summary in %s", time.perf_counter() - started,
                     final, best, output)
    return metrics if dist_info.primary else None


class _Stopped(Exception):
    """Raised by --stop-after-steps: the run ends like a killed process (nothing saved for this epoch)."""


def _train_one_epoch(epoch, num_epochs, model, model_raw, loader, optimizer, loss_fn, mixup_fn, scheduler, ema,
                     scaler, amp_autocast, args, dist_info, num_updates):
    from t2t_fast import _train_utils as tu

    model.train()
    device = dist_info.device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    seen, skipped = 0, 0
    progress = tu.Progress(len(loader), f"Train {epoch}/{num_epochs}", dist_info.primary, args.log_interval)

    def status():
        return f"Loss {loss_sum.item() / max(seen, 1):.4f} LR {optimizer.param_groups[0]['lr']:.3g}"

    for step, (images, targets, n_skipped) in enumerate(loader, 1):
        skipped += n_skipped
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        if mixup_fn is not None:
            images, targets = mixup_fn(images, targets)
        with amp_autocast():
            loss = loss_fn(model(images), targets)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler(loss, optimizer, clip_grad=args.clip_grad, parameters=model_raw.parameters())
        else:
            loss.backward()
            if args.clip_grad:
                torch.nn.utils.clip_grad_norm_(model_raw.parameters(), args.clip_grad)
            optimizer.step()
        num_updates += 1
        if ema is not None:
            ema.update(model_raw, step=num_updates)
        scheduler.step_update(num_updates)
        loss_sum += loss.detach().double() * images.shape[0]
        seen += images.shape[0]
        progress.update(step, status)
        if step % args.log_interval == 0:
            _check_finite(loss_sum, epoch, step)
        if args.stop_after_steps is not None and num_updates >= args.stop_after_steps:
            progress.close()
            raise _Stopped(f"stopped after {num_updates} steps (--stop-after-steps)")
    progress.close()
    _check_finite(loss_sum, epoch, len(loader))
    total, count, skipped = dist_info.all_reduce_sum([loss_sum.item(), seen, skipped])
    if skipped:
        _logger.warning("epoch %d: skipped %d unreadable training images", epoch, int(skipped))
    return {"loss": total / max(count, 1), "skipped": int(skipped)}, num_updates


def _check_finite(loss_sum, epoch, step):
    if not torch.isfinite(loss_sum):
        raise FloatingPointError(
            f"the training loss became {loss_sum.item()} in epoch {epoch} (by step {step}); stopping without "
            f"saving this epoch (the last checkpoint is intact). Try a lower --lr, --clip-grad 1, or "
            f"--amp-dtype bfloat16 instead of float16")


def _save_epoch(output, args, epoch, num_updates, model, ema, optimizer, scheduler, scaler, rng, best, row,
                is_best):
    from t2t_fast import _train_utils as tu

    checkpoint = {
        "arch": args.model, "epoch": epoch, "step": num_updates, "state_dict": model.state_dict(),
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None, "rng": rng, "best": best,
        "metrics": row, "num_classes": model.num_classes, "args": _checkpoint_args(args),
    }
    if ema is not None:
        checkpoint["state_dict_ema"] = ema.module.state_dict()
    last = os.path.join(output, "last.pth")
    tu.save_atomic(checkpoint, last)
    if is_best:
        tmp = os.path.join(output, ".best.pth.tmp")
        shutil.copyfile(last, tmp)
        os.replace(tmp, os.path.join(output, "best.pth"))


def _log_epoch(row, has_ema):
    text = (f"epoch {row['epoch']}: train loss {row['train_loss']:.4f}, val top-1 {row['val_top1']:.2f}% "
            f"top-5 {row['val_top5']:.2f}%")
    if has_ema and "val_ema_top1" in row:
        text += f", EMA top-1 {row['val_ema_top1']:.2f}%"
    _logger.info("%s (%.1fs)", text, row["time_s"])


def main(argv=None):
    """Entry point of ``t2t-fast train``; returns the process exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    apply_recipe(args, DIGITS_RECIPE if args.data is None else OFFICIAL_RECIPE)
    return run_cli(run, args)


def run_cli(fn, args, **kwargs):
    """Run ``fn(args)`` turning user errors (bad data, bad checkpoint, bad options) into a message + exit 2."""
    from t2t_fast.checkpoint import CheckpointMismatchError

    try:
        fn(args, **kwargs)
    except _Stopped as exc:
        print(f"t2t-fast: {exc}", file=sys.stderr)
        return 3
    except (*USER_ERRORS, CheckpointMismatchError, FloatingPointError) as exc:
        print(f"t2t-fast: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
