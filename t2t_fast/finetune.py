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
summaries and torchrun work as for ``t2t-fast train``.
"""
import argparse
import sys

from t2t_fast import data as data_lib
from t2t_fast import train

FINETUNE_RECIPE = dict(
    train.OFFICIAL_RECIPE, model="t2t_vit_14", img_size=224, batch_size=64, epochs=60, cooldown_epochs=0,
    warmup_epochs=0, min_lr=2e-4, lr_base=0.05, lr_base_size=64, opt="sgd", momentum=0.9, weight_decay=5e-4,
    sched="cosine", sched_on_updates=False, aa=None, reprob=0.0, mixup=0.0, cutmix=0.0, smoothing=0.0,
    drop_path=0.1, model_ema=False, crop_pct=1.0, interpolation="bilinear", workers=4,
)


def build_parser():
    parser = argparse.ArgumentParser(
        prog="t2t-fast finetune", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fine-tune a checkpoint on a new dataset with the official transfer recipe (SGD, head lr 0.05, "
                    "backbone 0.01x, cosine over 60 epochs).",
        epilog=train.recipe_table({"fine-tune": FINETUNE_RECIPE}))
    g = parser.add_argument_group("transfer")
    g.add_argument("--checkpoint", metavar="FILE", help="weights to start from (official file or ours)")
    g.add_argument("--pretrained", action="store_true", help="start from the official ImageNet weights (download)")
    g.add_argument("--dataset", choices=("imagefolder", "cifar10", "cifar100"), default="imagefolder")
    g.add_argument("--transfer-ratio", type=float, default=0.01,
                   help="lr multiplier of the backbone and T2T module (the head gets the full lr)")
    train.add_common_arguments(parser)
    return parser


def finetune_transforms(args):
    """Official transfer transforms: resize, padded random crop, flip (train); resize (eval, via timm)."""
    from torchvision import transforms

    size = args.img_size
    train_tf = transforms.Compose([
        transforms.Resize(size), transforms.RandomCrop(size, padding=size // 8),
        transforms.RandomHorizontalFlip(args.hflip), transforms.ToTensor(),
        transforms.Normalize(args.mean, args.std)])
    return train_tf, train.eval_transform(args)


def finetune_datasets(args, transforms):
    if args.dataset in ("cifar10", "cifar100"):
        return data_lib.cifar_splits(args.dataset, args.data, *transforms)
    return data_lib.image_folder_splits(args.data, *transforms)


def build_model(args, num_classes):
    """The variant with the checkpoint's weights and a fresh head of ``num_classes``."""
    import t2t_fast
    from t2t_fast.checkpoint import load_pretrained

    model = train.build_model(args, num_classes)
    if not args.resume:  # a resumed run gets every weight from its own checkpoint
        if args.checkpoint:
            t2t_fast.load_checkpoint(model, args.checkpoint)
        else:
            load_pretrained(model, args.model)
        model.reset_classifier(num_classes)
    return model


def build_optimizer(args, model):
    """SGD param groups: the head at lr, everything else (backbone + T2T module) at lr x transfer_ratio."""
    from timm.optim import create_optimizer_v2

    head, body = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (head if name.startswith("head.") else body).append(param)
    groups = [{"params": body, "lr_scale": args.transfer_ratio}, {"params": head, "lr_scale": 1.0}]
    return create_optimizer_v2(groups, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay,
                               momentum=args.momentum)


def _resolve(args):
    if args.data is None:
        raise data_lib.DataError("--data DIR is required (an ImageFolder root with train/ and val/, or the CIFAR "
                                 "folder with --dataset cifar10/cifar100)")
    if not (args.checkpoint or args.pretrained or args.resume):
        raise data_lib.DataError("give --checkpoint FILE (or --pretrained) to fine-tune from")
    if args.model is None and args.checkpoint:
        from t2t_fast.checkpoint import read_checkpoint

        saved = read_checkpoint(args.checkpoint)
        if isinstance(saved, dict):
            args.model = (saved.get("args") or {}).get("model") or saved.get("arch")
    recipe = dict(FINETUNE_RECIPE)
    if args.dataset in data_lib.CIFAR_MEAN:
        recipe.update(mean=data_lib.CIFAR_MEAN[args.dataset], std=data_lib.CIFAR_STD[args.dataset])
    train.apply_recipe(args, recipe)
    return args


def run(args):
    _resolve(args)
    return train.run(args, build_model_fn=build_model, build_optimizer_fn=build_optimizer,
                     transforms_fn=finetune_transforms, datasets_fn=finetune_datasets)


def main(argv=None):
    """Entry point of ``t2t-fast finetune``; returns the process exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    return train.run_cli(run, args)


if __name__ == "__main__":
    sys.exit(main())
