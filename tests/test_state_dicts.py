"""Every variant's state_dict (keys, order, shapes, dtypes) and parameter counts equal the official
model's, as recorded in tests/data/official_state_dicts.json."""
import json
import pathlib

import pytest
import torch

import t2t_fast
import t2t_fast.reference
from t2t_fast.testing import assert_official_layout, frozen_buffer_count

OFFICIAL = json.loads((pathlib.Path(__file__).parent / "data" / "official_state_dicts.json").read_text())
FACTORIES = {"reference": t2t_fast.reference.create_model, "fast": t2t_fast.create_model}


def test_every_official_variant_is_registered():
    assert sorted(t2t_fast.list_models()) == sorted(OFFICIAL)
    assert sorted(t2t_fast.reference.list_models()) == sorted(OFFICIAL)
    assert len(OFFICIAL) == 14


@pytest.mark.parametrize("implementation", FACTORIES)
@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_state_dict_and_parameter_counts(name, implementation):
    model = FACTORIES[implementation](name)
    expected = OFFICIAL[name]
    assert_official_layout(model, expected)
    # the official model's frozen parameters (pos_embed, performer w) are its only buffers here
    assert sorted(n for n, _ in model.named_buffers()) == sorted(expected["frozen_parameters"])


@pytest.mark.parametrize("name", ["t2t_vit_7", "t2t_vit_t_14", "t2t_vit_14_wide"])
def test_reference_macs_match_official(name):
    from torch.utils.flop_counter import FlopCounterMode

    model = t2t_fast.reference.create_model(name).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    assert counter.get_total_flops() // 2 == OFFICIAL[name]["macs_224"]


@pytest.mark.parametrize("name", ["t2t_vit_14", "t2t_vit_t_14"])
def test_384_model_parameter_count(name):
    # the 384 px checkpoint holds pos_embed [1, 577, 384]: 21,691,470 params for t2t_vit_14
    model = t2t_fast.reference.create_model(name, img_size=384)
    assert model.pos_embed.shape == (1, 577, 384)
    expected = OFFICIAL[name]["params"] + (577 - 197) * 384
    assert sum(p.numel() for p in model.parameters()) + frozen_buffer_count(model) == expected
