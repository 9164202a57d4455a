"""The registry of T2T-ViT variants: their names, constructor arguments, pretrained configs and official
checkpoint addresses, and the factories that build a variant by name (for the fast model and the
reference alike)."""
import difflib
import fnmatch
import inspect
import re

DEFAULT_CFG = {
    "input_size": (3, 224, 224),
    "pool_size": None,
    "crop_pct": 0.9,
    "crop_mode": "center",
    "interpolation": "bicubic",
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
    "classifier": "head",
    "num_classes": 1000,
    "fixed_input_size": True,
    "license": "apache-2.0 (code); official weights: Clear BSD",
}

# timm's "first_conv": the first layer whose weights depend on in_chans (the projection after the first soft
# split and its LayerNorm; see t2t_fast.checkpoint for how pretrained weights are adapted to other in_chans).
FIRST_LAYER = {"performer": "tokens_to_token.attention1.kqv", "transformer": "tokens_to_token.attention1.attn.qkv"}

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


def variant_cfg(name):
    """The timm-style pretrained config registered for variant ``name``."""
    return pretrained_cfg(name, 3, (224, 224), 1000, True, VARIANTS[name][1]["tokens_type"])


def pretrained_cfg(name, in_chans, img_size, num_classes, fixed_input_size, tokens_type):
    """The timm-style pretrained config of a model built as variant ``name`` (None: not built by name)."""
    cfg = dict(DEFAULT_CFG, input_size=(in_chans, *img_size), num_classes=num_classes,
               fixed_input_size=fixed_input_size, first_conv=FIRST_LAYER[tokens_type])
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
        raise _keyword_error(name, classes[family], kwargs, exc) from None
    model.variant = name
    model.pretrained_cfg = model.built_cfg(name)
    if checkpoint_path is not None:
        from t2t_fast.checkpoint import load_checkpoint

        load_checkpoint(model, checkpoint_path)
    elif pretrained:
        from t2t_fast.checkpoint import load_pretrained

        load_pretrained(model, name)
    return model


def _constructor_keywords(cls):
    """The keyword arguments ``cls(...)`` takes: its ``__init__`` and, through ``**kwargs``, its bases'."""
    names = []
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        names += [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"]
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return list(dict.fromkeys(names))


def _keyword_error(name, cls, kwargs, exc):
    """The TypeError for a constructor call that failed: an unknown keyword of ``kwargs`` is named with the
    closest valid names and the list of valid ones; any other TypeError keeps its text, prefixed by the variant."""
    match = re.search(r"unexpected keyword argument '(\w+)'", str(exc))
    if match is None or match.group(1) not in kwargs:
        return TypeError(f"{name}: {exc}")
    valid = _constructor_keywords(cls) + ["pretrained", "checkpoint_path"]
    close = difflib.get_close_matches(match.group(1), valid, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return TypeError(f"{name}: unknown keyword argument {match.group(1)!r}.{hint} Valid: {', '.join(valid)}")


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
