"""timm interop: every variant registered; timm.create_model(..., pretrained=True, pretrained_cfg_overlay=
dict(file=...)) returns t2t_fast's fast model with the weights of an official-format checkpoint."""
import argparse
import urllib.error

import pytest
import torch

timm = pytest.importorskip("timm")

import t2t_fast  # noqa: E402
from t2t_fast.testing import assert_relative_close  # noqa: E402
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


def test_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(RuntimeError, match="No pretrained weights exist for t2t_vit_14_se"):
        timm.create_model("t2t_vit_14_se", pretrained=True)

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("no network here")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    for create in (timm.create_model, t2t_fast.create_model):
        with pytest.raises(ConnectionError, match=r"could not download https://\S+71.7_T2T_ViT_7.pth.tar \(no "
                                                  r"network here\).*pretrained_cfg_overlay=dict\(file=PATH\)"):
            create("t2t_vit_7", pretrained=True)
    monkeypatch.undo()
    path = tmp_path / "seven.pth"
    _official_checkpoint(path, t2t_fast.create_model("t2t_vit_7", img_size=64))
    with pytest.raises(t2t_fast.CheckpointMismatchError, match="does not fit t2t_vit_10"):
        timm.create_model("t2t_vit_10", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), img_size=64)


def test_pretrained_cfg_takes_the_overlay_and_strictness(tmp_path):
    """The caller's pretrained_cfg_overlay reaches the model's pretrained_cfg (and so timm's data config), over
    the config of the model as built; the config is an ordinary attribute (assignable, its changes kept), and
    pretrained_strict=False loads a checkpoint that lacks keys, as it does for timm's own models."""
    from timm.data import resolve_model_data_config

    overlay = dict(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), crop_pct=1.0)
    model = timm.create_model("t2t_vit_7", img_size=64, num_classes=10, pretrained_cfg_overlay=overlay)
    config = resolve_model_data_config(model)
    assert (config["mean"], config["std"], config["crop_pct"]) == ((0.5,) * 3, (0.25,) * 3, 1.0)
    assert config["input_size"] == (3, 64, 64) and model.pretrained_cfg["num_classes"] == 10
    assert model.pretrained_cfg["architecture"] == "t2t_vit_7" and model.default_cfg is model.pretrained_cfg
    model.pretrained_cfg["interpolation"] = "bilinear"
    assert resolve_model_data_config(model)["interpolation"] == "bilinear"
    model.default_cfg = dict(model.pretrained_cfg, crop_pct=0.5)
    assert model.pretrained_cfg["crop_pct"] == 0.5
    plain = timm.create_model("t2t_vit_7", img_size=64)
    assert resolve_model_data_config(plain)["mean"] == (0.485, 0.456, 0.406)

    path = tmp_path / "three_blocks.pth"
    shallow = t2t_fast.create_model("t2t_vit_7", img_size=64, depth=3)
    torch.save(shallow.state_dict(), path)
    with pytest.raises(t2t_fast.CheckpointMismatchError, match="missing keys"):
        timm.create_model("t2t_vit_7", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), img_size=64,
                          depth=4)
    deeper = timm.create_model("t2t_vit_7", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                               img_size=64, depth=4, pretrained_strict=False)
    assert torch.equal(deeper.blocks[2].attn.qkv.weight, shallow.blocks[2].attn.qkv.weight)


def test_features_only_gives_the_block_outputs():
    torch.manual_seed(0)
    model = timm.create_model("t2t_vit_7", img_size=80).eval()
    x = torch.randn(2, 3, 80, 80)
    outputs = []
    hooks = [block.register_forward_hook(lambda _m, _i, out: outputs.append(out)) for block in model.blocks]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    torch.manual_seed(0)
    features = timm.create_model("t2t_vit_7", img_size=80, features_only=True, out_indices=(1, 4, -1)).eval()
    assert features.feature_info.channels() == [256] * 3 and features.feature_info.reduction() == [16] * 3
    assert len(features.model.blocks) == 7 and features.default_cfg["input_size"] == (3, 80, 80)
    with torch.no_grad():
        maps = features(x)
    for got, block in zip(maps, [outputs[1], outputs[4], outputs[6]]):
        expected = block[:, 1:].reshape(2, 5, 5, 256).permute(0, 3, 1, 2)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    pruned = timm.create_model("t2t_vit_7", img_size=80, features_only=True, out_indices=2)
    assert len(pruned.model.blocks) == 7 and pruned.feature_info.module_name() == ["blocks.5", "blocks.6"]
    pruned = timm.create_model("t2t_vit_7", img_size=80, features_only=True, out_indices=(0, 2))
    assert len(pruned.model.blocks) == 3
    with pytest.raises(TypeError, match="only apply with features_only=True"):
        timm.create_model("t2t_vit_7", out_indices=(1,))


@pytest.mark.parametrize("name", ["t2t_vit_7", "t2t_vit_t_14"])
def test_pretrained_in_chans_1_is_the_3_channel_model_on_grey_images(tmp_path, name):
    torch.manual_seed(0)
    ours = t2t_fast.create_model(name, img_size=64).eval()
    with torch.no_grad():  # a LayerNorm affine far from (1, 0), so the folding is exercised
        for param in ours.parameters():
            param.add_(0.1 * torch.randn_like(param))
    path = tmp_path / "weights.pth.tar"
    _official_checkpoint(path, ours)
    grey = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), img_size=64,
                             in_chans=1).eval()
    assert grey.default_cfg["input_size"] == (1, 64, 64)
    image = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        expected = ours(image.repeat(1, 3, 1, 1))
        assert_relative_close(grey(image), expected, 1e-5)  # fp32 rounding of the folded weights
    four = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), img_size=64,
                             in_chans=4, num_classes=5).eval()
    with torch.no_grad():
        out = four(torch.randn(2, 4, 64, 64))
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    first = t2t_fast.registry.FIRST_LAYER[ours.tokens_type]
    assert four.get_submodule(first).weight.shape[1] == 4 * 49


@pytest.mark.parametrize("name", ["t2t_vit_7", "t2t_vit_t_14"])
def test_pretrained_loads_as_timm_tests_it_with_a_local_file(tmp_path, name):
    # timm's test_model_load_pretrained / test_model_features_pretrained calls, on a local file
    path = tmp_path / "weights.pth.tar"
    _official_checkpoint(path, t2t_fast.create_model(name))
    overlay = dict(file=str(path))
    assert timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, in_chans=1,
                             num_classes=5).num_classes == 5
    assert timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, in_chans=1,
                             num_classes=0).num_classes == 0
    features = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, features_only=True)
    assert features.feature_info.channels() == [384] * 3 if "14" in name else [256] * 3


def test_factory_device_and_dtype():
    model = timm.create_model("t2t_vit_7", device="meta", dtype=torch.bfloat16)
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"meta"}
    assert {t.dtype for t in [*model.parameters(), *model.buffers()]} == {torch.bfloat16}
