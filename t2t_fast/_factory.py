"""Model factories shared by ``t2t_fast`` and ``t2t_fast.reference``: name -> configured model."""
from t2t_fast import _config


def build_model(classes, name, pretrained=False, checkpoint_path=None, **kwargs):
    """Build variant ``name`` with ``classes[family]``; load weights from ``checkpoint_path`` (a file or a
    state_dict) or, with ``pretrained=True``, the official release (downloaded via torch.hub)."""
    if name not in _config.VARIANTS:
        raise _config.unknown_model_error(name)
    family, defaults, _ = _config.VARIANTS[name]
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
    def factory(pretrained=False, **kwargs):
        return build_model(classes, name, pretrained=pretrained, **kwargs)

    factory.__name__ = factory.__qualname__ = name
    factory.__module__ = module_name
    family, defaults, _ = _config.VARIANTS[name]
    summary = ", ".join(f"{k}={v}" for k, v in defaults.items())
    factory.__doc__ = (f"T2T-ViT variant ``{name}`` ({summary}).\n\n"
                       f"``pretrained=True`` loads the official ImageNet weights where they were released; "
                       f"``checkpoint_path=`` loads a local file; other kwargs go to the model constructor.")
    return factory


def list_models(pattern="*"):
    """Names of the registered variants matching a shell-style ``pattern``."""
    import fnmatch

    return [name for name in _config.VARIANTS if fnmatch.fnmatch(name, pattern)]
