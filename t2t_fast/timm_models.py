"""Register every T2T-ViT variant with timm (explicitly: ``import t2t_fast.timm_models``; needs timm).

    import timm, t2t_fast.timm_models
    model = timm.create_model("t2t_vit_14", pretrained=True)                     # official weights (download)
    model = timm.create_model("t2t_vit_14", pretrained=True,
                              pretrained_cfg_overlay=dict(file="81.5_T2T_ViT_14.pth.tar"), num_classes=10)
    timm.list_models("t2t*"), timm.list_pretrained("t2t*")

The models are t2t_fast's fast models. Weights load through :func:`t2t_fast.load_checkpoint` (EMA weights
preferred, ``module.`` prefixes stripped, the head dropped when ``num_classes`` differs, ``pos_embed``
regenerated for another ``img_size``), from the pretrained config's ``state_dict``, ``file`` or ``url``
(in that order, as timm resolves them). Also usable from timm's ``train.py`` via
``--device-modules t2t_fast.timm_models``.
"""
import argparse

import torch
from timm.models import generate_default_cfgs, register_model, resolve_pretrained_cfg

from t2t_fast import registry

__all__ = []

# timm passes these to every entrypoint; they are about weights, not the model constructor.
_TIMM_ONLY_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "pretrained_strict",
                     "pretrained_model_args")


def _cfg(name):
    cfg = dict(registry.DEFAULT_CFG)
    cfg.pop("first_conv")  # the first op is a weightless unfold: timm's in_chans adaptation cannot apply
    cfg["url"] = registry.checkpoint_url(name)
    cfg["paper_ids"] = "arXiv:2101.11986"
    cfg["origin_url"] = "https://github.com/yitu-opensource/T2T-ViT"
    return cfg


default_cfgs = generate_default_cfgs({
    (f"{name}.in1k" if registry.checkpoint_url(name) else name): _cfg(name) for name in registry.VARIANTS})


def _load_weights(model, name, cfg, cache_dir):
    from t2t_fast.checkpoint import load_checkpoint

    if cfg.get("state_dict") is not None:
        source = cfg["state_dict"]
    elif cfg.get("file"):
        source = cfg["file"]
    elif cfg.get("url"):
        with torch.serialization.safe_globals([argparse.Namespace]):  # official files pickle their args
            source = torch.hub.load_state_dict_from_url(cfg["url"], model_dir=cache_dir, map_location="cpu",
                                                        weights_only=True)
    else:
        raise RuntimeError(f"No pretrained weights exist for {name}. Use `pretrained=False` for random init, or "
                           f"pass pretrained_cfg_overlay=dict(file=PATH) for a local checkpoint.")
    load_checkpoint(model, source)


def _create(name, pretrained=False, **kwargs):
    import t2t_fast

    cfg = resolve_pretrained_cfg(name, pretrained_cfg=kwargs.pop("pretrained_cfg", None),
                                 pretrained_cfg_overlay=kwargs.pop("pretrained_cfg_overlay", None)).to_dict()
    cache_dir = kwargs.pop("cache_dir", None)
    for key in _TIMM_ONLY_KWARGS:
        kwargs.pop(key, None)
    if kwargs.pop("features_only", False):
        raise ValueError(f"{name}: features_only=True is not supported by the T2T-ViT timm entrypoints; use "
                         f"model.forward_features(x) for the (B, 1 + N, C) tokens")
    device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
    model = t2t_fast.create_model(name, **kwargs)
    if pretrained:
        _load_weights(model, name, cfg, cache_dir)
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model


def _make_entrypoint(name):
    def entrypoint(pretrained=False, **kwargs):
        return _create(name, pretrained=pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"T2T-ViT ``{name}`` (t2t_fast's fast model) for ``timm.create_model``."
    return entrypoint


for _name in registry.VARIANTS:
    globals()[_name] = register_model(_make_entrypoint(_name))
