"""Training behind ``t2t-fast train`` / ``finetune`` / ``eval`` / ``predict`` (needs the ``train`` extra: timm,
torchvision, tqdm, scikit-learn; ``import t2t_fast`` never imports this package).

* :mod:`~t2t_fast.training.recipes`: the hyper-parameter tables and the builders of transforms, datasets,
  model, optimizer and loss;
* :mod:`~t2t_fast.training.data`: the digits demo, ImageFolder and CIFAR datasets;
* :mod:`~t2t_fast.training.run`: one run, setup and epochs (:func:`~t2t_fast.training.run.train`);
* :mod:`~t2t_fast.training.loop`: the training step and epoch, validation, callbacks;
* :mod:`~t2t_fast.training.state`: seeds and RNG states, atomic checkpoints, summary, resume;
* :mod:`~t2t_fast.training.distributed`: torchrun / DDP setup; :mod:`~t2t_fast.training.logs`: logging.
"""


def expected_torchvision(torch_version):
    """The torchvision release series built for ``torch_version`` ('2.13.0+cpu' -> '0.28'), or None when unknown.
    torchvision 0.N pairs with torch 2.(N-15) since torch 2.0 / torchvision 0.15."""
    try:
        major, minor = (int(part) for part in torch_version.split("+")[0].split(".")[:2])
    except ValueError:  # a version this rule does not know how to read
        return None
    return f"0.{minor + 15}" if major == 2 else None


def requirements_problem():
    """None when the ``train`` extra can run beside this torch, else one line saying what is wrong and what to
    install. pip resolves timm's torchvision to the newest release, which pins the newest torch; a torchvision
    that does not match torch fails inside timm with errors such as 'operator torchvision::nms does not exist'."""
    import torch

    expected = expected_torchvision(torch.__version__)
    pair = f"torchvision=={expected}.*" if expected else "the torchvision released with your torch"
    fix = (f"install the torchvision built for torch {torch.__version__} from the index torch came from, e.g. "
           f"pip install \"{pair}\"" + (" --index-url https://download.pytorch.org/whl/cpu"
                                        if torch.__version__.endswith("+cpu") else ""))
    try:
        import torchvision
    except ImportError:
        return f"torchvision is not installed (the train extra needs it): {fix}"
    except Exception as exc:  # a torchvision built for another torch fails while registering its operators
        return (f"torchvision does not load beside torch {torch.__version__} "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}): {fix}")
    if expected and not torchvision.__version__.startswith(expected + "."):
        return f"torchvision {torchvision.__version__} was built for another torch than {torch.__version__}: {fix}"
    for module, package in (("timm", "timm"), ("sklearn", "scikit-learn"), ("tqdm", "tqdm")):
        try:
            __import__(module)
        except ImportError:
            return f"{package} is not installed: pip install \"t2t_fast[train]\" (after torch and torchvision)"
    return None
