"""Root conftest of the adapted timm model suite: registers the T2T-ViT models with timm before the suite
lists them, and gives the two download tests local files.

timm's ``test_model_load_pretrained`` / ``test_model_features_pretrained`` download the official weights. Unless
``T2T_FAST_TIMM_DOWNLOAD=1``, each gets a stand-in checkpoint instead: a freshly initialised model saved in the
released files' layout under the released file name, in a temporary torch hub cache, which torch.hub then
reads as already downloaded. The tests still exercise the whole pretrained path (hub cache lookup, EMA
extraction, head and ``in_chans`` adaptation) without the network."""
import os
import pathlib
import urllib.parse

import pytest
import torch

import t2t_fast
import t2t_fast.timm_models  # noqa: F401  (registers the variants)
from t2t_fast import registry

DOWNLOAD_TESTS = ("test_model_load_pretrained", "test_model_features_pretrained")


@pytest.fixture(autouse=True)
def stand_in_weights(request, tmp_path, monkeypatch):
    callspec = getattr(request.node, "callspec", None)
    if (request.node.originalname not in DOWNLOAD_TESTS or callspec is None
            or os.environ.get("T2T_FAST_TIMM_DOWNLOAD") == "1"):
        return
    name = callspec.params["model_name"].split(".")[0]
    file = pathlib.PurePosixPath(urllib.parse.urlparse(registry.checkpoint_url(name)).path).name
    checkpoints = tmp_path / "torch_home" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save({"epoch": 0, "state_dict_ema": t2t_fast.create_model(name).state_dict()}, checkpoints / file)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
