"""Register every T2T-ViT variant with timm (explicitly: ``import t2t_fast.timm_models``; needs timm).

    import timm, t2t_fast.timm_models
    model = timm.create_model("t2t_vit_14", pretrained=True)                     # official weights (download)
    model = timm.create_model("t2t_vit_14", pretrained=True,
                              pretrained_cfg_overlay=dict(file="81.5_T2T_ViT_14.pth.tar"), num_classes=10)
    backbone = timm.create_model("t2t_vit_14", features_only=True, out_indices=(3, 7, 13))  # NCHW, 1/16 grid
    timm.list_models("t2t*"), timm.list_pretrained("t2t*")

The models are t2t_fast's fast models. Weights load through :func:`t2t_fast.load_checkpoint` (EMA weights
preferred, ``module.`` prefixes stripped, the head dropped when ``num_classes`` differs, ``pos_embed``
regenerated for another ``img_size``, the first T2T layer adapted to another ``in_chans``; strictly unless
``pretrained_strict=False``), from the pretrained config's ``state_dict``, ``file`` or ``url`` (in that order,
as timm resolves them). The model's ``pretrained_cfg`` is that of the model as built (its input size and
classes) with whatever ``pretrained_cfg`` / ``pretrained_cfg_overlay`` changed (mean, std, crop_pct, ...).
``device=`` builds the model there (``'meta'`` included), ``dtype=`` converts it. Also usable from timm's
``train.py`` via ``--device-modules t2t_fast.timm_models``.
"""
import contextlib

import torch
from timm.models import generate_default_cfgs, register_model, resolve_pretrained_cfg
from timm.models._builder import pretrained_cfg_for_features
from timm.models._features import FeatureGetterNet

from t2t_fast import registry

__all__ = []

# timm passes these to every entrypoint; they are about weights, not the model constructor.
_TIMM_ONLY_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "pretrained_strict",
                     "pretrained_model_args")
# features_only=True takes these (as timm's ViTs do); out_indices defaults to the last 3 blocks.
_FEATURE_KWARGS = ("out_indices", "feature_cls", "output_fmt", "norm")


def _cfg(name):
    cfg = registry.variant_cfg(name)
    cfg.pop("architecture")
    cfg["paper_ids"] = "arXiv:2101.11986"
    cfg["origin_url"] = "https://github.com/yitu-opensource/T2T-ViT"
    return cfg


default_cfgs = generate_default_cfgs({
    (f"{name}.in1k" if registry.checkpoint_url(name) else name): _cfg(name) for name in registry.VARIANTS})


def _load_weights(model, name, cfg, cache_dir, strict):
    from t2t_fast.checkpoint import download_official, load_checkpoint

    if cfg.get("state_dict") is not None:
        source = cfg["state_dict"]
    elif cfg.get("file"):
        source = cfg["file"]
    elif cfg.get("url"):
        source = download_official(cfg["url"], model_dir=cache_dir)
    else:
        raise RuntimeError(f"No pretrained weights exist for {name}. Use `pretrained=False` for random init, or "
                           f"pass pretrained_cfg_overlay=dict(file=PATH) for a local checkpoint.")
    load_checkpoint(model, source, strict=strict)


def _create(name, pretrained=False, **kwargs):
    import t2t_fast

    cfg = resolve_pretrained_cfg(name, pretrained_cfg=kwargs.pop("pretrained_cfg", None),
                                 pretrained_cfg_overlay=kwargs.pop("pretrained_cfg_overlay", None)).to_dict()
    registered = resolve_pretrained_cfg(name).to_dict()
    cache_dir, strict = kwargs.pop("cache_dir", None), kwargs.pop("pretrained_strict", True)
    for key in _TIMM_ONLY_KWARGS:
        kwargs.pop(key, None)
    features_only = kwargs.pop("features_only", False)
    feature_kwargs = {key: kwargs.pop(key) for key in _FEATURE_KWARGS if key in kwargs}
    device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = t2t_fast.create_model(name, **kwargs)
    # the config of the model as built (its input size, classes), with what the caller's config changed
    model.pretrained_cfg = {**model.pretrained_cfg,
                            **{key: value for key, value in cfg.items() if registered.get(key) != value}}
    if pretrained:
        _load_weights(model, name, cfg, cache_dir, strict)
    if dtype is not None:
        model.to(dtype=dtype)
    if features_only:
        return _feature_model(model, **feature_kwargs)
    if feature_kwargs:
        raise TypeError(f"{name}: {', '.join(feature_kwargs)} only apply with features_only=True")
    return model


def _feature_model(model, out_indices=3, feature_cls="getter", output_fmt="NCHW", norm=False):
    """timm's features_only model: a ``FeatureGetterNet`` over :meth:`forward_intermediates` (the backbone
    pruned after the last block taken), returning per-block maps on the 1/16 token grid."""
    if feature_cls != "getter":
        raise ValueError(f"T2T-ViT features come from forward_intermediates: feature_cls must be 'getter', "
                         f"got {feature_cls!r}")
    cfg = model.pretrained_cfg
    features = FeatureGetterNet(model, out_indices=out_indices, output_fmt=output_fmt, norm=norm)
    features.pretrained_cfg = features.default_cfg = pretrained_cfg_for_features(cfg)
    return features


def _make_entrypoint(name):
    def entrypoint(pretrained=False, **kwargs):
        return _create(name, pretrained=pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"T2T-ViT ``{name}`` (t2t_fast's fast model) for ``timm.create_model``."
    return entrypoint


for _name in registry.VARIANTS:
    globals()[_name] = register_model(_make_entrypoint(_name))
