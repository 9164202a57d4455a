"""The experimental families (squeeze-excite, dense, ghost) in the reference and the fast model: official
state_dicts and MACs, fast-vs-reference parity, the dense stage-indexed drop-path, argument checks."""
import json
import pathlib

import pytest
import torch

import t2t_fast
import t2t_fast.reference as ref
from t2t_fast.testing import assert_official_layout, assert_relative_close

OFFICIAL = json.loads((pathlib.Path(__file__).parent / "data" / "official_state_dicts.json").read_text())
VARIANTS = ["t2t_vit_14_se", "t2t_vit_dense", "t2t_vit_16_ghost"]
IMPLEMENTATIONS = {"reference": ref, "fast": t2t_fast}
CLASSES = {"t2t_vit_14_se": "T2TViTSE", "t2t_vit_dense": "T2TViTDense", "t2t_vit_16_ghost": "T2TViTGhost"}


# The dense models are built with drop_path_rate=0.55 so the same pair also serves the drop-path tests
# (eval-mode parity is unaffected); building each 20M-parameter model once keeps this file fast.
BUILD_KWARGS = {"t2t_vit_dense": dict(drop_path_rate=0.55)}


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(name, impl):
        if (name, impl) not in cache:
            torch.manual_seed(0)
            cache[name, impl] = IMPLEMENTATIONS[impl].create_model(name, **BUILD_KWARGS.get(name, {}))
        return cache[name, impl]

    return get


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("name", VARIANTS)
def test_state_dict_and_parameter_counts(models, name, impl):
    model = models(name, impl)
    assert type(model) is getattr(IMPLEMENTATIONS[impl], CLASSES[name])
    expected = OFFICIAL[name]
    assert_official_layout(model, expected)
    assert model.num_features == expected["structure"]["head"][0]
    assert len(model.blocks) == expected["structure"]["num_block_entries"]


@pytest.mark.parametrize("name", VARIANTS)
def test_reference_macs_match_official(models, name):
    # per-op totals pin down e.g. that SE pools after proj and that the ghost cheap ops are per-token convs
    from torch.utils.flop_counter import FlopCounterMode

    model = models(name, "reference").eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    assert counter.get_total_flops() // 2 == OFFICIAL[name]["macs_224"]
    by_op = {str(op): flops // 2 for op, flops in counter.get_flop_counts()["Global"].items()}
    assert by_op == OFFICIAL[name]["macs_by_op"]


def _grads(model, x, probe):
    model.zero_grad()
    logits = model(x)
    (logits * probe).sum().backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name", VARIANTS)
def test_fast_matches_reference_cpu_fp32(models, name):
    reference, fast = models(name, "reference").eval(), models(name, "fast").eval()
    with torch.no_grad():  # move the parameters init leaves at exactly 1 / 0 off those values
        for n, p in reference.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    fast.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 3, 224, 224)
    probe = torch.randn(2, reference.num_classes)
    ref_logits, ref_grads = _grads(reference, x, probe)
    fast_logits, fast_grads = _grads(fast, x, probe)
    assert_relative_close(fast_logits, ref_logits, 1e-5, "logits")
    assert ref_grads.keys() == fast_grads.keys()
    for n in ref_grads:
        assert ref_grads[n].abs().max() > 0, n
        assert_relative_close(fast_grads[n], ref_grads[n], 1e-4, f"grad of {n}")


def _dense_blocks_by_stage(model):
    stages, stage = [[]], 0
    for block in model.blocks:
        if hasattr(block, "dense_linear"):
            stages[stage].append(block)
        else:
            stage += 1
            stages.append([])
    return stages


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_dense_drop_path_rate_is_indexed_by_stage(models, impl):
    # upstream: dpr = linspace(0, rate, 12) (its default depth) and every block of stage s uses dpr[s]
    model = models("t2t_vit_dense", impl)
    stages = _dense_blocks_by_stage(model)
    assert [len(s) for s in stages] == [3, 6, 6, 4]
    for s, blocks in enumerate(stages):
        for block in blocks:
            assert block.drop_path.drop_prob == pytest.approx(0.05 * s)


def test_dense_drop_path_train_mode_behaviour(models):
    reference, fast = models("t2t_vit_dense", "reference"), models("t2t_vit_dense", "fast")
    fast.load_state_dict(reference.state_dict(), strict=True)
    ref_stages, fast_stages = _dense_blocks_by_stage(reference), _dense_blocks_by_stage(fast)
    for stage, rate in ((0, 0.0), (3, 0.15)):
        ref_block, fast_block = ref_stages[stage][0], fast_stages[stage][0]
        x = torch.randn(64, 5, ref_block.norm1.normalized_shape[0])
        ref_block.eval()
        expected = ref_block(x)
        ref_block.train()
        fast_block.train()
        assert ref_block.drop_path.drop_prob == fast_block.drop_path.drop_prob == pytest.approx(rate)
        torch.manual_seed(1)
        ref_out = ref_block(x)
        torch.manual_seed(1)
        fast_out = fast_block(x)
        assert ref_out.shape == (64, 5, x.shape[-1] + 64)
        assert torch.equal(ref_out[..., :x.shape[-1]], x)        # the dense connection keeps the input
        assert_relative_close(fast_out, ref_out, 1e-5, f"stage {stage} train-mode output")
        if rate == 0.0:
            assert torch.equal(ref_out, expected)   # stage 0 never drops, even in train mode
        else:
            assert not torch.allclose(ref_out, expected)
        ref_block.eval()
        fast_block.eval()


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_dense_reset_classifier_uses_final_width(impl):
    # widths 64 -> 112 | 56 -> 152 | 76 -> 172 | 86 -> 150 (upstream would build the new head at 64)
    model = IMPLEMENTATIONS[impl].create_model("t2t_vit_dense", img_size=32, embed_dim=64, num_heads=2,
                                               growth_rate=16)
    assert model.head.in_features == model.num_features == 150
    model.reset_classifier(7)
    assert model.head.in_features == 150
    assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 7)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_bad_arguments_raise(impl):
    create = IMPLEMENTATIONS[impl].create_model
    with pytest.raises(ValueError, match="mlp_ratio=3"):
        create("t2t_vit_16_ghost", mlp_ratio=4.0)
    with pytest.raises(ValueError, match="even embed_dim"):
        create("t2t_vit_16_ghost", embed_dim=387, num_heads=3)
    with pytest.raises(TypeError, match="per-stage block counts"):
        create("t2t_vit_dense", depth=12)
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        create("t2t_vit_dense", growth_rate=60)
