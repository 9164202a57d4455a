"""The registry of T2T-ViT variants: their names, constructor arguments, pretrained configs and official
checkpoint addresses, and the factories that build a variant by name (for the fast model and the
reference alike)."""
import difflib
import fnmatch

DEFAULT_CFG = {
    "input_size": (3, 224, 224),
    "pool_size": None,
    "crop_pct": 0.9,
    "crop_mode": "center",
    "interpolation": "bicubic",
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
    "first_conv": "tokens_to_token.attention1",
    "classifier": "head",
    "num_classes": 1000,
    "fixed_input_size": True,
    "license": "apache-2.0 (code); official weights: Clear BSD",
}

_RELEASES = "https://github.com/yitu-opensource/T2T-ViT/releases/download/main/"


def _variant(family, embed_dim, depth, num_heads, mlp_ratio, checkpoint=None, tokens_type="performer"):
    return family, dict(tokens_type=tokens_type, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                        mlp_ratio=mlp_ratio), checkpoint


# name -> (model family, constructor kwargs, released checkpoint file or None)
VARIANTS = {
    "t2t_vit_7": _variant("base", 256, 7, 4, 2.0, "71.7_T2T_ViT_7.pth.tar"),
    "t2t_vit_10": _variant("base", 256, 10, 4, 2.0, "75.2_T2T_ViT_10.pth.tar"),
    "t2t_vit_12": _variant("base", 256, 12, 4, 2.0, "76.5_T2T_ViT_12.pth.tar"),
    "t2t_vit_14": _variant("base", 384, 14, 6, 3.0, "81.5_T2T_ViT_14.pth.tar"),
    "t2t_vit_19": _variant("base", 448, 19, 7, 3.0, "81.9_T2T_ViT_19.pth.tar"),
    "t2t_vit_24": _variant("base", 512, 24, 8, 3.0, "82.3_T2T_ViT_24.pth.tar"),
    "t2t_vit_t_14": _variant("base", 384, 14, 6, 3.0, "81.7_T2T_ViTt_14.pth.tar", tokens_type="transformer"),
    "t2t_vit_t_19": _variant("base", 448, 19, 7, 3.0, "82.4_T2T_ViTt_19.pth.tar", tokens_type="transformer"),
    "t2t_vit_t_24": _variant("base", 512, 24, 8, 3.0, "82.6_T2T_ViTt_24.pth.tar", tokens_type="transformer"),
    "t2t_vit_14_resnext": _variant("base", 384, 14, 32, 3.0),
    "t2t_vit_14_wide": _variant("base", 768, 4, 12, 3.0),
    "t2t_vit_14_se": _variant("se", 384, 14, 6, 3.0),
    "t2t_vit_dense": _variant("dense", 128, (3, 6, 6, 4), 8, 2.0),
    "t2t_vit_16_ghost": _variant("ghost", 384, 16, 6, 3.0),
}


def checkpoint_url(name):
    """Download address of the official ImageNet checkpoint of ``name`` ('' when none was released)."""
    file = VARIANTS[name][2]
    return _RELEASES + file if file else ""


def pretrained_cfg(name, in_chans, img_size, num_classes, fixed_input_size):
    """The timm-style pretrained config of a model built as variant ``name`` (None: not built by name)."""
    cfg = dict(DEFAULT_CFG, input_size=(in_chans, *img_size), num_classes=num_classes,
               fixed_input_size=fixed_input_size)
    if name:
        cfg.update(architecture=name, url=checkpoint_url(name))
    return cfg


def unknown_model_error(name):
    """The ValueError for an unregistered variant name, suggesting the closest registered ones."""
    close = difflib.get_close_matches(str(name), VARIANTS, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return ValueError(f"unknown model {name!r}.{hint} Available: {', '.join(VARIANTS)}")


def list_models(pattern="*"):
    """Names of the registered variants matching a shell-style ``pattern``."""
    return [name for name in VARIANTS if fnmatch.fnmatch(name, pattern)]


def build_model(classes, name, pretrained=False, checkpoint_path=None, **kwargs):
    """Build variant ``name`` with ``classes[family]``; load weights from ``checkpoint_path`` (a file or a
    state_dict) or, with ``pretrained=True``, the official release (downloaded via torch.hub)."""
    if name not in VARIANTS:
        raise unknown_model_error(name)
    family, defaults, _ = VARIANTS[name]
    try:
        model = classes[family](**{**defaults, **kwargs})
    except TypeError as exc:
        raise TypeError(f"{name}: {exc}") from None
    model.variant = name
    if checkpoint_path is not None:
        from t2t_fast.checkpoint import load_checkpoint

        load_checkpoint(model, checkpoint_path)
    elif pretrained:
        from t2t_fast.checkpoint import load_pretrained

        load_pretrained(model, name)
    return model


def make_factory(classes, name, module_name):
    """The function ``name(pretrained=False, **kwargs)`` that builds variant ``name`` with ``classes``."""
    def factory(pretrained=False, **kwargs):
        return build_model(classes, name, pretrained=pretrained, **kwargs)

    factory.__name__ = factory.__qualname__ = name
    factory.__module__ = module_name
    summary = ", ".join(f"{k}={v}" for k, v in VARIANTS[name][1].items())
    factory.__doc__ = (f"T2T-ViT variant ``{name}`` ({summary}).\n\n"
                       f"``pretrained=True`` loads the official ImageNet weights where they were released; "
                       f"``checkpoint_path=`` loads a local file; other kwargs go to the model constructor.")
    return factory


def register_factories(namespace, classes, module_name):
    """Put one factory per variant into ``namespace`` (a module's globals); returns the variant names."""
    for name in VARIANTS:
        namespace[name] = make_factory(classes, name, module_name)
    return list(VARIANTS)
