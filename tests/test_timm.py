"""timm interop: every variant registered; timm.create_model(..., pretrained=True, pretrained_cfg_overlay=
dict(file=...)) returns t2t_fast's fast model with the weights of an official-format checkpoint."""
import argparse

import pytest
import torch

timm = pytest.importorskip("timm")

import t2t_fast  # noqa: E402
import t2t_fast.timm_models  # noqa: E402,F401  (registers the variants)


def test_every_variant_is_registered():
    assert sorted(timm.list_models("t2t*")) == sorted(t2t_fast.list_models())
    released = [n for n in t2t_fast.list_models() if t2t_fast.registry.checkpoint_url(n)]
    assert sorted(timm.list_pretrained("t2t*")) == sorted(f"{n}.in1k" for n in released)
    cfg = timm.get_pretrained_cfg("t2t_vit_14")
    assert (cfg.crop_pct, cfg.interpolation, cfg.num_classes) == (0.9, "bicubic", 1000)


def _official_checkpoint(path, model):
    """The layout of the released files (timm CheckpointSaver): EMA weights + raw weights + optimizer + args."""
    other = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    torch.save({"epoch": 309, "arch": "t2t_vit_7", "state_dict": other, "state_dict_ema": model.state_dict(),
                "optimizer": {}, "args": argparse.Namespace(model="T2t_vit_7", lr=1e-3)}, path)


def test_pretrained_file_through_timm(tmp_path):
    ours = t2t_fast.create_model("t2t_vit_7", img_size=64).eval()
    path = tmp_path / "71.7_T2T_ViT_7.pth.tar"
    _official_checkpoint(path, ours)

    model = timm.create_model("t2t_vit_7", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                              img_size=64).eval()
    assert type(model) is type(ours)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), ours(x))

    # a new head for another class count; constructor kwargs pass through timm
    model = timm.create_model("t2t_vit_7", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                              img_size=64, num_classes=5, drop_path_rate=0.1)
    assert model.head.out_features == 5 and model.blocks[-1].drop_path.drop_prob == pytest.approx(0.1)
    assert torch.equal(model.blocks[0].mlp.fc1.weight, ours.blocks[0].mlp.fc1.weight)


def test_clear_errors(tmp_path):
    with pytest.raises(RuntimeError, match="No pretrained weights exist for t2t_vit_14_se"):
        timm.create_model("t2t_vit_14_se", pretrained=True)
    path = tmp_path / "seven.pth"
    _official_checkpoint(path, t2t_fast.create_model("t2t_vit_7", img_size=64))
    with pytest.raises(t2t_fast.CheckpointMismatchError, match="does not fit t2t_vit_10"):
        timm.create_model("t2t_vit_10", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), img_size=64)
