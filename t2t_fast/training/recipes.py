"""Training recipes: the hyper-parameter tables of ``t2t-fast train`` / ``finetune`` and the builders that
turn resolved options into transforms, datasets, a model, an optimizer and a loss.

* :data:`OFFICIAL_RECIPE`: the official ImageNet recipe (T2T-ViT ``main.py``).
* :data:`DIGITS_RECIPE`: the built-in demo on scikit-learn's 8x8 digits, sized for a laptop CPU.
* :data:`FINETUNE_RECIPE`: the official CIFAR transfer (T2T-ViT ``transfer_learning.py``).

:class:`Builders` bundles the builders a run calls; :data:`FROM_SCRATCH` and :data:`FINETUNE` are the two
sets the commands use.
"""
import ast
import dataclasses
from typing import Callable

import torch

from t2t_fast import registry
from t2t_fast.geometry import image_size, token_grids
from t2t_fast.training import data as data_lib

OFFICIAL_RECIPE = dict(
    model="t2t_vit_14", img_size=224, batch_size=64, epochs=300, cooldown_epochs=10, warmup_epochs=10,
    warmup_lr=1e-6, min_lr=1e-5, lr_base=5e-4, lr_base_size=512, opt="adamw", weight_decay=0.05, momentum=0.9,
    sched="cosine", sched_on_updates=False, clip_grad=None,
    aa="rand-m9-mstd0.5-inc1", scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5, color_jitter=0.4,
    train_interpolation="random", reprob=0.25, remode="pixel", recount=1,
    mixup=0.8, cutmix=1.0, mixup_prob=1.0, mixup_switch_prob=0.5, smoothing=0.1,
    drop_path=0.1, drop=0.0, model_ema=True, model_ema_decay=0.99996, model_ema_warmup=False,
    crop_pct=0.9, interpolation="bicubic", mean=registry.DEFAULT_CFG["mean"],
    std=registry.DEFAULT_CFG["std"], workers=8, threads=None,
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

# The lr is per 64 images of global batch (the official single-GPU batch).
FINETUNE_RECIPE = dict(
    OFFICIAL_RECIPE, model="t2t_vit_14", img_size=224, batch_size=64, epochs=60, cooldown_epochs=0,
    warmup_epochs=0, min_lr=2e-4, lr_base=0.05, lr_base_size=64, opt="sgd", momentum=0.9, weight_decay=5e-4,
    sched="cosine", sched_on_updates=False, aa=None, reprob=0.0, mixup=0.0, cutmix=0.0, smoothing=0.0,
    drop_path=0.1, model_ema=False, crop_pct=1.0, interpolation="bilinear", workers=4,
)


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


def parse_model_kwargs(items):
    """``['depth=2', 'backend=torch']`` -> ``{'depth': 2, 'backend': 'torch'}`` (Python literals parsed)."""
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


# constructor arguments the commands set themselves, and from what: --model-kwargs may not name them
_SET_BY_COMMAND = {"num_classes": "the command (the dataset's classes, the checkpoint's head or eval's --num-classes)",
                   "img_size": "--img-size", "drop_path_rate": "--drop-path", "drop_rate": "--drop"}


def model_kwargs(args, **fixed):
    """The model constructor's arguments of a command: ``fixed`` (what the command sets: num_classes, img_size,
    ...) and ``--model-kwargs``, which may not name any of those."""
    extra = parse_model_kwargs(args.model_kwargs)
    for key in sorted(extra.keys() & fixed.keys()):
        raise data_lib.DataError(f"--model-kwargs: {key} is set by {_SET_BY_COMMAND.get(key, 'the command')}, "
                                 f"not by --model-kwargs")
    return {**fixed, **extra}


def create_model(args, num_classes, **kwargs):
    """The fast model of a run: ``--model`` at ``--img-size`` with ``--model-kwargs`` and ``--backend``."""
    import t2t_fast

    if args.img_size is not None:
        try:
            token_grids(image_size(args.img_size))
        except (TypeError, ValueError) as exc:
            raise data_lib.DataError(f"--img-size {args.img_size}: {exc}") from None
    kwargs = model_kwargs(args, num_classes=num_classes, img_size=args.img_size, **kwargs)
    if args.backend is not None:
        kwargs["backend"] = args.backend
    try:
        return t2t_fast.create_model(args.model, **kwargs)
    except (TypeError, ValueError) as exc:  # a --model-kwargs name or value the constructor refuses
        raise data_lib.DataError(f"--model-kwargs / --backend: {exc}") from None


# --------------------------------------------------------------------------------------- from scratch
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
    return create_model(args, num_classes, drop_path_rate=args.drop_path, drop_rate=args.drop)


def build_optimizer(args, model):
    """timm ``create_optimizer_v2``: it reads ``model.no_weight_decay()`` and leaves out frozen params."""
    return _timm_optimizer(args, model)


def _timm_optimizer(args, params):
    """timm's optimizer ``--opt`` over ``params`` (a model or parameter groups); an optimizer timm does not know
    is a DataError."""
    from timm.optim import create_optimizer_v2

    try:
        return create_optimizer_v2(params, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay,
                                   momentum=args.momentum)
    except (ValueError, AssertionError, KeyError) as exc:
        raise data_lib.DataError(f"--opt {args.opt}: {exc}") from None


def build_loss(args):
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if args.mixup > 0 or args.cutmix > 0:
        return SoftTargetCrossEntropy()  # smoothing is inside the mixup targets
    if args.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    return torch.nn.CrossEntropyLoss()


# ------------------------------------------------------------------------------------------ fine-tune
def finetune_transforms(args):
    """Official transfer transforms: resize, padded random crop, flip (train); resize (eval, via timm)."""
    from torchvision import transforms

    size = args.img_size
    train_tf = transforms.Compose([
        transforms.Resize(size), transforms.RandomCrop(size, padding=size // 8),
        transforms.RandomHorizontalFlip(args.hflip), transforms.ToTensor(),
        transforms.Normalize(args.mean, args.std)])
    return train_tf, eval_transform(args)


def finetune_datasets(args, transforms):
    if args.dataset in ("cifar10", "cifar100"):
        return data_lib.cifar_splits(args.dataset, args.data, *transforms)
    return data_lib.image_folder_splits(args.data, *transforms)


def finetune_model(args, num_classes):
    """The variant with the checkpoint's weights and a fresh head of ``num_classes``."""
    from t2t_fast.checkpoint import load_checkpoint, load_pretrained

    model = build_model(args, num_classes)
    if not args.resume:  # a resumed run gets every weight from its own checkpoint
        if args.checkpoint:
            from t2t_fast.checkpoint import read_checkpoint

            load_checkpoint(model, read_checkpoint(args.checkpoint))
        else:
            load_pretrained(model, args.model)
        model.reset_classifier(num_classes)
    return model


def finetune_optimizer(args, model):
    """SGD param groups: the head at lr, everything else (backbone + T2T module) at lr x transfer_ratio."""
    head, body = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (head if name.startswith("head.") else body).append(param)
    groups = [{"params": body, "lr_scale": args.transfer_ratio}, {"params": head, "lr_scale": 1.0}]
    return _timm_optimizer(args, groups)


@dataclasses.dataclass(frozen=True)
class Builders:
    """What a run builds its pieces with: ``transforms(args) -> (train, eval)``, ``datasets(args, transforms)
    -> (train, val)``, ``model(args, num_classes)`` and ``optimizer(args, model)``; ``output_suffix`` ends the
    default run folder's name (``output/<model>-<data><suffix>``)."""

    transforms: Callable = default_transforms
    datasets: Callable = build_datasets
    model: Callable = build_model
    optimizer: Callable = build_optimizer
    output_suffix: str = ""


FROM_SCRATCH = Builders()
FINETUNE = Builders(transforms=finetune_transforms, datasets=finetune_datasets, model=finetune_model,
                    optimizer=finetune_optimizer, output_suffix="-finetune")
