"""``t2t-fast predict``: classify image files (or folders of them) with a checkpoint.

    t2t-fast predict cat.jpg dog.png --model t2t_vit_14 --checkpoint 81.5_T2T_ViT_14.pth.tar
    t2t-fast predict photos/ --checkpoint output/t2t_vit_7-digits/best.pth --topk 3 --json

Each image goes through the model's own evaluation transform: the model's ``pretrained_cfg`` (resize to
size / crop_pct, center crop, interpolation, mean/std), or for a checkpoint written by ``t2t-fast
train``/``finetune`` the transform its run validated with, so the predictions are those ``t2t-fast eval``
scores. Class names: the class folders of a ``t2t-fast train`` run, ImageNet's for a 1000-class checkpoint
(timm's ImageNet info), else ``class <index>``. The fused model runs by default (``--reference``: the
pure-PyTorch one). Folders are searched recursively for image files; unreadable files are reported on stderr
and skipped. Output: per image its top-k classes with probabilities, or with ``--json`` one JSON list on stdout.
"""
import argparse
import contextlib
import functools
import json
import os
import sys

import torch

from t2t_fast import registry
from t2t_fast.cli._options import (FINITE, INTERPOLATIONS, NON_NEGATIVE_INT, POSITIVE, POSITIVE_INT, CommandParser,
                                   add_checkpoint_run_options, run_command)
from t2t_fast.training import data as data_lib

# a progress line every this many batches when stderr is not a terminal
_PROGRESS_EVERY = 10


def build_parser():
    parser = CommandParser(
        prog="t2t-fast predict", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Classify image files or folders with a checkpoint (official files or ours): top-k classes "
                    "and probabilities per image.",
        epilog="examples:\n" + __doc__.split("\n\n")[1])
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files and/or folders (searched recursively)")
    parser.add_argument("--checkpoint", required=True, metavar="FILE", help="checkpoint file (official or ours)")
    parser.add_argument("--model", help="variant (default: the one recorded in the checkpoint)")
    parser.add_argument("--topk", type=POSITIVE_INT, default=5, help="classes shown per image (default 5)")
    parser.add_argument("--json", action="store_true", help="print one JSON list instead of text")
    parser.add_argument("--img-size", type=POSITIVE_INT, help="input resolution (default: the checkpoint's run, "
                        "else 224)")
    parser.add_argument("--model-kwargs", nargs="*", metavar="K=V", help="extra model constructor arguments")
    parser.add_argument("--backend", help="kernel backend of the fused model (auto/triton/cuda/cpp/torch)")
    parser.add_argument("--reference", action="store_true", help="run the pure-PyTorch reference model instead "
                        "of the fused one")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                        help="run the model as t2t_fast.optimize_for_inference converts it to this dtype, without "
                        "autocast (default: the checkpoint's fp32 weights, autocast as --amp)")
    parser.add_argument("--no-ema", action="store_true", help="use the raw weights even when EMA weights exist")
    parser.add_argument("--batch-size", "-b", type=POSITIVE_INT, default=32, help="images per batch (default 32)")
    parser.add_argument("--workers", "-j", type=NON_NEGATIVE_INT, default=0,
                        help="image decoding processes (default 0: in this process)")
    parser.add_argument("--crop-pct", type=POSITIVE, help="default: the run's, else the model's pretrained_cfg")
    parser.add_argument("--interpolation", choices=INTERPOLATIONS,
                        help="default: the run's, else the model's pretrained_cfg")
    parser.add_argument("--mean", type=FINITE, nargs=3, help="default: the run's, else the model's pretrained_cfg")
    parser.add_argument("--std", type=POSITIVE, nargs=3, help="default: the run's, else the model's pretrained_cfg")
    add_checkpoint_run_options(parser)
    return parser


def image_files(paths):
    """The files of ``paths`` in order, folders expanded (recursively, sorted) to their image files."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(os.path.join(folder, name) for folder, _, names in os.walk(path) for name in names
                           if name.lower().endswith(data_lib.IMG_EXTENSIONS))
            if not found:
                raise data_lib.DataError(f"folder {path} holds no image files ({'/'.join(data_lib.IMG_EXTENSIONS)})")
            files += found
        elif os.path.exists(path):
            files.append(path)
        else:
            raise data_lib.DataError(f"{path}: no such file or folder")
    return files


class ImageFiles(torch.utils.data.Dataset):
    """``(transformed image, index)`` per file; ``None`` for a file PIL cannot read (reported once, on stderr)."""

    def __init__(self, files, transform):
        self.files, self.transform = files, transform

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        try:
            image = data_lib.load_rgb(self.files[i])
        except data_lib.unreadable_image_errors() as exc:
            print(f"t2t-fast: skipping unreadable image {self.files[i]}: {exc}", file=sys.stderr)
            return None
        return self.transform(image), i


def _collate(batch):
    kept = [sample for sample in batch if sample is not None]
    if not kept:
        return None
    images, indices = torch.utils.data.default_collate(kept)
    return images, indices


def class_names(checkpoint, num_classes):
    """Names of the model's classes: a ``t2t-fast train`` run's class folders, ImageNet's for 1000 classes,
    else ``class <index>``."""
    saved = checkpoint.get("classes")
    if isinstance(saved, (list, tuple)) and len(saved) == num_classes:
        return [str(name) for name in saved]
    if num_classes == 1000:
        from timm.data import ImageNetInfo

        info = ImageNetInfo()
        return [info.index_to_description(i) for i in range(num_classes)]
    return [f"class {i}" for i in range(num_classes)]


def _model(args, checkpoint, use_ema, num_classes):
    from t2t_fast.checkpoint import load_checkpoint
    from t2t_fast.training import recipes

    if args.reference:
        import t2t_fast.reference

        kwargs = recipes.model_kwargs(args, num_classes=num_classes, img_size=args.img_size)
        try:
            model = t2t_fast.reference.create_model(args.model, **kwargs)
        except (TypeError, ValueError) as exc:
            raise data_lib.DataError(f"--model-kwargs: {exc}") from None
    else:
        model = recipes.create_model(args, num_classes)
    load_checkpoint(model, checkpoint, use_ema=use_ema)
    return model.eval()


def _transform(args, model):
    """The evaluation transform: options given or recorded by the run, else the model's ``pretrained_cfg``."""
    from timm.data import create_transform

    cfg = model.pretrained_cfg
    return create_transform(args.img_size, is_training=False,
                            crop_pct=args.crop_pct if args.crop_pct is not None else cfg["crop_pct"],
                            crop_mode=cfg.get("crop_mode"),
                            interpolation=args.interpolation or cfg["interpolation"],
                            mean=tuple(args.mean or cfg["mean"]), std=tuple(args.std or cfg["std"]))


def predict(args, out=None):
    """Classify ``args.images``; returns ``[{'file', 'top': [{'index', 'label', 'prob'}, ...]}, ...]`` for the
    readable images, in the order given, and prints them to ``out`` (default stdout)."""
    from t2t_fast.checkpoint import extract_state_dict
    from t2t_fast.cli.evaluate import checkpoint_settings
    from t2t_fast.checkpoint import read_checkpoint

    out = sys.stdout if out is None else out
    if args.reference and args.backend:
        raise data_lib.DataError("--backend picks the fused model's kernels; --reference runs the pure-PyTorch "
                                 "model, which has none: give one of them")
    files = image_files(args.images)
    checkpoint = read_checkpoint(args.checkpoint)
    if not isinstance(checkpoint, dict):
        raise data_lib.DataError(f"{args.checkpoint} does not hold a checkpoint dict")
    checkpoint_settings(args, checkpoint)
    args.img_size = args.img_size or registry.DEFAULT_CFG["input_size"][-1]
    args.model_kwargs = args.model_kwargs or []
    use_ema = not args.no_ema
    head = extract_state_dict(checkpoint, use_ema=use_ema).get("head.weight")
    num_classes = head.shape[0] if head is not None else 1000
    names = class_names(checkpoint, num_classes)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = _model(args, checkpoint, use_ema, num_classes).to(device)
    transform = _transform(args, model)
    if getattr(args, "dtype", None):
        from t2t_fast.inference import optimize_for_inference

        model, args.amp = optimize_for_inference(model, args.dtype), False
    autocast = (functools.partial(torch.autocast, device_type=device.type, dtype=getattr(torch, args.amp_dtype
                or "bfloat16")) if args.amp else contextlib.nullcontext)
    loader = torch.utils.data.DataLoader(ImageFiles(files, transform), batch_size=args.batch_size,
                                         num_workers=args.workers, collate_fn=_collate)
    topk = min(args.topk, num_classes)
    results = [None] * len(files)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        with _progress(len(loader)) as advance, torch.inference_mode():
            for batch in loader:
                if batch is not None:
                    images, indices = batch
                    with autocast():
                        logits = model(images.to(device))
                    probs, classes = logits.float().softmax(-1).topk(topk, dim=-1)
                    for i, p, c in zip(indices.tolist(), probs.tolist(), classes.tolist()):
                        results[i] = {"file": files[i], "top": [{"index": k, "label": names[k], "prob": v}
                                                               for k, v in zip(c, p)]}
                advance()
    finally:
        torch.set_num_threads(threads)
    results = [r for r in results if r is not None]
    if not results:
        raise data_lib.DataError(f"none of the {len(files)} images could be read (see the lines above)")
    if args.json:
        json.dump(results, out, indent=1)
        out.write("\n")
    else:
        for result in results:
            out.write(result["file"] + "\n")
            out.writelines(f"  {top['prob'] * 100:6.2f}%  {top['label']}\n" for top in result["top"])
    skipped = len(files) - len(results)
    if skipped:
        print(f"t2t-fast: {skipped} of {len(files)} images were unreadable and skipped", file=sys.stderr)
    return results


@contextlib.contextmanager
def _progress(batches):
    """``advance()`` after each batch: a tqdm bar on a terminal, else a line on stderr every few batches;
    nothing for a single batch."""
    if batches <= 1:
        yield lambda: None
        return
    if sys.stderr.isatty():
        from tqdm import tqdm

        with tqdm(total=batches, desc="predict", unit="batch", leave=False, file=sys.stderr) as bar:
            yield lambda: bar.update(1)
        return
    done = [0]

    def advance():
        done[0] += 1
        if done[0] % _PROGRESS_EVERY == 0 or done[0] == batches:
            print(f"t2t-fast: predict: batch {done[0]}/{batches}", file=sys.stderr)

    yield advance


def main(argv=None):
    """Entry point of ``t2t-fast predict``; returns the process exit code."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    return run_command(predict, args)


if __name__ == "__main__":
    sys.exit(main())
