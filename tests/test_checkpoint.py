"""Checkpoint formats load strictly and reproduce logits bit for bit; adaptations and errors."""
import argparse

import pytest
import torch

import t2t_fast
import t2t_fast.reference as ref
from t2t_fast import CheckpointFileError, CheckpointMismatchError, load_checkpoint

NAME = "t2t_vit_7"


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(1)
    model = ref.create_model(NAME).eval()
    with torch.no_grad():  # make every parameter distinct from a fresh init
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        logits = model(x)
    return model.state_dict(), x, logits


def _formats(state):
    other = {k: torch.randn_like(v) for k, v in state.items()}
    return {
        "bare": state,
        "timm_ema": {"state_dict": other, "state_dict_ema": state, "epoch": 309, "arch": NAME,
                     "args": argparse.Namespace(model=NAME, lr=5e-4), "version": 2},
        "timm_no_ema": {"state_dict": state, "epoch": 3, "args": argparse.Namespace(model=NAME)},
        "finetune_net_dataparallel": {"net": {"module." + k: v for k, v in state.items()}, "acc": 98.3, "epoch": 59},
        "ddp_compiled_model": {"model": {"module._orig_mod." + k: v for k, v in state.items()}},
        "compiled_dataparallel_model": {"_orig_mod.module." + k: v for k, v in state.items()},
    }


@pytest.mark.parametrize("fmt", ["bare", "timm_ema", "timm_no_ema", "finetune_net_dataparallel",
                                 "ddp_compiled_model", "compiled_dataparallel_model"])
@pytest.mark.parametrize("factory", [ref.create_model, t2t_fast.create_model], ids=["reference", "fast"])
def test_each_format_loads_strictly_and_bit_exact(trained, fmt, factory, tmp_path):
    state, x, logits = trained
    path = tmp_path / "ckpt.pth.tar"
    torch.save(_formats(state)[fmt], path)
    torch.manual_seed(123)
    model = factory(NAME, checkpoint_path=str(path)).eval()
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    if factory is ref.create_model:
        with torch.no_grad():
            assert torch.equal(model(x), logits)


def test_load_from_dict_and_use_ema_false(trained):
    state, x, logits = trained
    model = ref.create_model(NAME).eval()
    fmt = _formats(state)["timm_ema"]
    load_checkpoint(model, fmt, use_ema=False)
    assert torch.equal(model.cls_token, fmt["state_dict"]["cls_token"])
    load_checkpoint(model, fmt)
    with torch.no_grad():
        assert torch.equal(model(x), logits)


def test_other_num_classes_keeps_fresh_head(trained):
    state, x, _ = trained
    model = ref.create_model(NAME, num_classes=10).eval()
    fresh_head = model.head.weight.detach().clone()
    load_checkpoint(model, state)
    assert torch.equal(model.head.weight, fresh_head)
    assert torch.equal(model.blocks[0].attn.qkv.weight, state["blocks.0.attn.qkv.weight"])
    headless = ref.create_model(NAME, num_classes=0).eval()
    load_checkpoint(headless, state)
    full = ref.create_model(NAME).eval()
    load_checkpoint(full, state)
    with torch.no_grad():
        assert torch.equal(headless(x), full.forward_head(full.forward_features(x), pre_logits=True))


def test_pos_embed_of_another_length_is_regenerated_or_interpolated():
    big = ref.create_model(NAME, img_size=384)
    state = big.state_dict()
    model = ref.create_model(NAME)
    load_checkpoint(model, state)
    torch.testing.assert_close(model.pos_embed[0, :197], state["pos_embed"][0, :197])  # same sinusoid rows
    model2 = ref.create_model(NAME)
    load_checkpoint(model2, state, pos_embed="interpolate")
    assert model2.pos_embed.shape == (1, 197, 256)
    assert torch.equal(model2.pos_embed[0, 0], state["pos_embed"][0, 0])
    with pytest.raises(ValueError, match="regenerate"):
        load_checkpoint(ref.create_model(NAME), state, pos_embed="stretch")
    with pytest.raises(ValueError, match="pos_embed must be 'regenerate' or 'interpolate', got 'stretch'"):
        load_checkpoint(ref.create_model(NAME), ref.create_model(NAME).state_dict(), pos_embed="stretch")


def test_whole_models_and_optimized_state_dicts(tmp_path):
    """A whole pickled model is named as such (not as a truncated file); the state_dict of an
    optimize_for_inference model (its keys under model.) loads."""
    model = t2t_fast.create_model(NAME, img_size=32, num_classes=10)
    torch.save(model, tmp_path / "whole.pth")
    with pytest.raises(CheckpointFileError, match=r"holds pickled Python objects besides tensors \(a whole model "
                                                  r"saved with torch.save\(model\)\?\).*save model.state_dict"):
        load_checkpoint(model, str(tmp_path / "whole.pth"))
    optimized = t2t_fast.optimize_for_inference(model, dtype=torch.float32)
    assert all(key.startswith("model.") for key in optimized.state_dict())
    again = t2t_fast.create_model(NAME, img_size=32, num_classes=10)
    load_checkpoint(again, optimized.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))
    # and into an optimized model: its converted model takes the weights
    fresh = t2t_fast.optimize_for_inference(t2t_fast.create_model(NAME, img_size=32, num_classes=10),
                                            dtype=torch.float32)
    load_checkpoint(fresh, model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(fresh(x), optimized(x))


def test_checkpoint_of_another_variant_lists_offending_keys(trained):
    state, _, _ = trained
    with pytest.raises(CheckpointMismatchError) as info:
        load_checkpoint(ref.create_model("t2t_vit_10"), state)
    message = str(info.value)
    assert "missing keys" in message and "blocks.7.norm1.weight" in message
    with pytest.raises(CheckpointMismatchError, match="shape mismatches"):
        load_checkpoint(ref.create_model("t2t_vit_14"), state)
    perf = ref.create_model("t2t_vit_t_14").state_dict()
    with pytest.raises(CheckpointMismatchError, match="unexpected keys"):
        load_checkpoint(ref.create_model("t2t_vit_14"), perf)


def test_bad_checkpoint_inputs(tmp_path):
    model = ref.create_model(NAME)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_checkpoint(model, str(tmp_path / "missing.pth"))
    with pytest.raises(CheckpointMismatchError, match="no state_dict found"):
        load_checkpoint(model, {"epoch": 3, "acc": 1.0})
    with pytest.raises(TypeError, match="must be a dict"):
        load_checkpoint(model, [1, 2])


def test_pretrained_without_release_raises():
    with pytest.raises(ValueError, match="no official checkpoint was released"):
        t2t_fast.create_model("t2t_vit_14_wide", pretrained=True)


def test_unreadable_checkpoint_files_say_what_to_give(tmp_path):
    model = ref.create_model(NAME)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "last.pth").write_bytes(b"")
    with pytest.raises(t2t_fast.CheckpointFileError, match=r"is a folder, not a checkpoint file.*last\.pth"):
        load_checkpoint(model, tmp_path / "run")
    (tmp_path / "notes.txt").write_text("epoch,top1\n1,50.0\n")
    for path in (tmp_path / "run" / "last.pth", tmp_path / "notes.txt"):
        with pytest.raises(t2t_fast.CheckpointFileError, match="is not a readable PyTorch checkpoint"):
            load_checkpoint(model, path)
