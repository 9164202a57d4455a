"""`t2t-fast predict`: end to end on image files the test writes (an official-layout 1000-class checkpoint:
the model's pretrained_cfg transform, ImageNet names, batching, progress, unreadable files skipped), and on the
digits demo's checkpoint, where its predictions score exactly what `t2t-fast eval` reports."""
import json

import numpy as np
import pytest
import torch

pytest.importorskip("timm")
pytest.importorskip("sklearn")

import t2t_fast  # noqa: E402
from t2t_fast import cli  # noqa: E402

KWARGS = dict(depth=1, embed_dim=32, num_heads=2, token_dim=8)
TINY_MODEL = ["--model", "t2t_vit_7", "--img-size", "32", "--model-kwargs", *[f"{k}={v}" for k, v in KWARGS.items()]]


def _predict(argv, capsys):
    capsys.readouterr()
    rc = cli.main(["predict", *argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """A 1000-class tiny model saved in the released files' layout (EMA weights, timm's arch name), and images of
    several sizes, modes and formats: a folder (with a sub-folder) and a loose file, one of them unreadable."""
    root = tmp_path_factory.mktemp("official")
    torch.manual_seed(0)
    model = t2t_fast.create_model("t2t_vit_7", img_size=32, num_classes=1000, **KWARGS)
    torch.nn.init.normal_(model.head.weight, std=2.0)  # a fresh head's near-uniform output would hide differences
    torch.save({"arch": "t2t_vit", "epoch": 309, "state_dict_ema": model.state_dict()}, root / "weights.pth.tar")
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "photos" / "more").mkdir(parents=True)
    for size, mode, name in [((40, 30), "RGB", "photos/a.png"), ((32, 32), "L", "photos/b.jpg"),
                             ((50, 64), "RGB", "photos/more/c.png"), ((36, 36), "RGBA", "d.png"),
                             ((33, 47), "RGB", "photos/e.jpeg")]:
        pixels = rng.integers(0, 256, (size[1], size[0], len(mode)), dtype=np.uint8)
        Image.fromarray(pixels.squeeze(-1) if mode == "L" else pixels, mode).save(root / name)
    (root / "photos" / "broken.png").write_bytes(b"\x89PNG not really")
    return root, model


def test_predict_official_layout_json(official, capsys):
    from PIL import Image
    from timm.data import ImageNetInfo, create_transform, resolve_model_data_config

    root, model = official
    photos, loose = root / "photos", root / "d.png"
    rc, out, err = _predict([str(photos), str(loose), "--checkpoint", str(root / "weights.pth.tar"), *TINY_MODEL,
                             "--topk", "3", "--json", "--batch-size", "2"], capsys)
    assert rc == 0, err
    results = json.loads(out)
    expected_files = [str(photos / n) for n in ("a.png", "b.jpg", "e.jpeg", "more/c.png")] + [str(loose)]
    assert [r["file"] for r in results] == expected_files
    # the broken file is reported once and skipped; 6 files in batches of 2 report progress at the last batch
    assert [line for line in err.splitlines() if "broken.png" in line] == [
        line for line in err.splitlines() if line.startswith("t2t-fast: skipping unreadable image")]
    assert len([line for line in err.splitlines() if "broken.png" in line]) == 1
    assert "1 of 6 images were unreadable and skipped" in err and "batch 3/3" in err

    # the same numbers from the model itself, through its pretrained_cfg transform as timm resolves it
    transform = create_transform(**resolve_model_data_config(model))
    model.eval()
    names = ImageNetInfo()
    for result in results:
        with Image.open(result["file"]) as image:
            x = transform(image.convert("RGB")).unsqueeze(0)
        with torch.no_grad():
            probs, classes = model(x).softmax(-1).topk(3)
        assert [t["index"] for t in result["top"]] == classes[0].tolist()
        torch.testing.assert_close(torch.tensor([t["prob"] for t in result["top"]]), probs[0], rtol=1e-4, atol=1e-7)
        assert [t["label"] for t in result["top"]] == [names.index_to_description(i) for i in classes[0].tolist()]


def test_predict_text_output_and_reference_model(official, capsys):
    root, _ = official
    argv = [str(root / "d.png"), "--checkpoint", str(root / "weights.pth.tar"), *TINY_MODEL, "--topk", "2"]
    rc, text, err = _predict(argv, capsys)
    assert rc == 0, err
    rc, fused, err = _predict([*argv, "--json"], capsys)
    assert rc == 0, err
    top = json.loads(fused)[0]["top"]
    assert text.splitlines() == [str(root / "d.png")] + [f"  {t['prob'] * 100:6.2f}%  {t['label']}" for t in top]
    rc, reference, err = _predict([*argv, "--json", "--reference"], capsys)
    assert rc == 0, err
    ref_top = json.loads(reference)[0]["top"]
    assert [t["index"] for t in ref_top] == [t["index"] for t in top]
    assert [t["prob"] for t in ref_top] == pytest.approx([t["prob"] for t in top], rel=1e-4)


def test_predict_all_unreadable_is_an_error(official, tmp_path, capsys):
    root, _ = official
    (tmp_path / "x.png").write_bytes(b"nothing")
    rc, out, err = _predict([str(tmp_path / "x.png"), "--checkpoint", str(root / "weights.pth.tar"), *TINY_MODEL],
                            capsys)
    assert rc == 2 and out == ""
    assert "none of the 1 images could be read" in err and "Traceback" not in err


def test_predict_digits_checkpoint_matches_eval(tmp_path, capsys):
    from t2t_fast.checkpoint import read_checkpoint
    from t2t_fast.training.data import DigitsDataset

    run = tmp_path / "digits"
    assert cli.main(["train", "--output", str(run), "--epochs", "2", "--batch-size", "64", "--no-model-ema",
                     *TINY_MODEL, "--workers", "0", "--threads", "1", "--device", "cpu"]) == 0
    checkpoint = run / "last.pth"
    assert read_checkpoint(str(checkpoint))["classes"] == [str(d) for d in range(10)]
    results_file = tmp_path / "eval.json"
    assert cli.main(["eval", "--checkpoint", str(checkpoint), "--workers", "0", "--device", "cpu",
                     "--results-file", str(results_file)]) == 0
    evaluated = json.load(open(results_file))

    # the validation digits as image files, as the demo's dataset makes them, named <index>-<class> so that they
    # come in eval's order and batches (the same batches give bit-identical logits, ties included)
    val = DigitsDataset("val", 32)
    (tmp_path / "images").mkdir()
    for i, (image, target) in enumerate(zip(val.images, val.targets)):
        image.save(tmp_path / "images" / f"{i:03d}-{target}.png")
    rc, out, err = _predict([str(tmp_path / "images"), "--checkpoint", str(checkpoint), "--json", "--topk", "5",
                             "--batch-size", "64", "--device", "cpu"], capsys)
    assert rc == 0, err
    results = json.loads(out)
    assert len(results) == evaluated["count"] == 360
    truth = [r["file"].rsplit("-", 1)[1].removesuffix(".png") for r in results]
    top1 = 100 * np.mean([r["top"][0]["label"] == t for r, t in zip(results, truth)])
    top5 = 100 * np.mean([t in [c["label"] for c in r["top"]] for r, t in zip(results, truth)])
    # eval averages in float32: equal to well within one image (100 / 360 = 0.28 points)
    assert top1 == pytest.approx(evaluated["top1"], abs=1e-4) and top1 > 20  # a model that learnt something
    assert top5 == pytest.approx(evaluated["top5"], abs=1e-4)
