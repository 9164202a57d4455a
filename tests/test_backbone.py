"""T2T-ViT as a backbone: forward_intermediates / prune_intermediate_layers with timm's semantics (both models),
checked against the blocks' own outputs captured by hooks."""
import copy

import pytest
import torch

import t2t_fast
import t2t_fast.reference as ref

FACTORIES = {"reference": ref.create_model, "fast": t2t_fast.create_model}
SIZE = 80  # a 5x5 token grid


def _model(impl, name):
    torch.manual_seed(0)
    return FACTORIES[impl](name, img_size=SIZE).eval()


def _block_outputs(model, x):
    """Each block's output (B, 1 + N, C), captured by forward hooks during a plain forward."""
    outputs = []
    hooks = [block.register_forward_hook(lambda _m, _i, out: outputs.append(out)) for block in model.blocks]
    with torch.no_grad():
        logits = model(x)
    for hook in hooks:
        hook.remove()
    return outputs, logits


def _as_map(tokens, grid):
    batch, _, channels = tokens.shape
    return tokens[:, 1:].reshape(batch, *grid, channels).permute(0, 3, 1, 2)


@pytest.mark.parametrize("impl", FACTORIES)
@pytest.mark.parametrize("name", ["t2t_vit_7", "t2t_vit_dense"])
def test_intermediates_are_the_block_outputs(impl, name):
    model = _model(impl, name)
    x = torch.randn(2, 3, SIZE, SIZE)
    blocks, _ = _block_outputs(model, x)
    grid = model.grid_size
    assert [info["num_chs"] for info in model.feature_info] == [b.shape[-1] for b in blocks]
    assert {info["reduction"] for info in model.feature_info} == {16}
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x), rtol=0, atol=0)
        assert len(maps) == len(blocks)
        for got, block in zip(maps, blocks):
            assert got.shape == (2, block.shape[-1], *grid) and got.is_contiguous()
            torch.testing.assert_close(got, _as_map(block, grid), rtol=0, atol=0)

        picked = model.forward_intermediates(x, indices=[0, -1], output_fmt="NLC", intermediates_only=True)
        for got, block in zip(picked, [blocks[0], blocks[-1]]):
            torch.testing.assert_close(got, block[:, 1:], rtol=0, atol=0)
        last_two = model.forward_intermediates(x, indices=2, return_prefix_tokens=True, intermediates_only=True)
        for (got, prefix), block in zip(last_two, blocks[-2:]):
            torch.testing.assert_close(prefix, block[:, :1], rtol=0, atol=0)
            torch.testing.assert_close(got, _as_map(block, grid), rtol=0, atol=0)
        early = model.forward_intermediates(x, indices=[1], stop_early=True, intermediates_only=True)
        torch.testing.assert_close(early[0], _as_map(blocks[1], grid), rtol=0, atol=0)
        if name == "t2t_vit_7":
            final, _ = model.forward_intermediates(x, indices=[1], stop_early=True)
            torch.testing.assert_close(final, model.norm(blocks[1]), rtol=0, atol=0)
            normed = model.forward_intermediates(x, indices=[2], norm=True, intermediates_only=True)
            torch.testing.assert_close(normed[0], _as_map(model.norm(blocks[2]), grid), rtol=0, atol=0)
        else:  # the dense blocks' widths differ from the final norm's
            with pytest.raises(ValueError, match="norm=True: the final norm takes 584 channels"):
                model.forward_intermediates(x, indices=[2], norm=True)
            with pytest.raises(ValueError, match="stop_early=True: block 1 outputs 256 channels"):
                model.forward_intermediates(x, indices=[1], stop_early=True)


@pytest.mark.parametrize("impl", FACTORIES)
def test_bad_feature_arguments(impl):
    model = _model(impl, "t2t_vit_7")
    x = torch.randn(1, 3, SIZE, SIZE)
    with pytest.raises(ValueError, match="out of range for a model with 7 blocks"):
        model.forward_intermediates(x, indices=[7])
    with pytest.raises(ValueError, match="last 8 blocks; the model has 7"):
        model.forward_intermediates(x, indices=8)
    with pytest.raises(ValueError, match="output_fmt must be 'NCHW' or 'NLC'"):
        model.forward_intermediates(x, output_fmt="NHWC")


@pytest.mark.parametrize("impl", FACTORIES)
@pytest.mark.parametrize("name", ["t2t_vit_7", "t2t_vit_dense"])
def test_prune_keeps_the_taps(impl, name):
    model = _model(impl, name)
    x = torch.randn(2, 3, SIZE, SIZE)
    blocks, logits = _block_outputs(model, x)
    pruned = copy.deepcopy(model)
    assert pruned.prune_intermediate_layers([-1], prune_head=False) == [len(blocks) - 1]
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), logits, rtol=0, atol=0)
    pruned = copy.deepcopy(model)
    assert pruned.prune_intermediate_layers([1, 3], prune_norm=True) == [1, 3]
    assert len(pruned.blocks) == 4 and pruned.num_classes == 0 and isinstance(pruned.norm, torch.nn.Identity)
    assert len(pruned.feature_info) == 4 and pruned.num_features == blocks[3].shape[-1]
    with torch.no_grad():
        torch.testing.assert_close(pruned.forward_features(x), blocks[3], rtol=0, atol=0)
        taps = pruned.forward_intermediates(x, indices=[1, 3], intermediates_only=True)
    for got, block in zip(taps, [blocks[1], blocks[3]]):
        torch.testing.assert_close(got, _as_map(block, model.grid_size), rtol=0, atol=0)
