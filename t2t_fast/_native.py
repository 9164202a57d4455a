"""Loads the compiled extension ``t2t_fast._C`` and says why when it cannot."""
import importlib
import os

_module = None
_error = None


def native_module():
    """The compiled extension, or None when it could not be imported (see :func:`native_error`)."""
    global _module, _error
    if _module is None and _error is None:
        try:
            _module = importlib.import_module("t2t_fast._C")
        except ImportError as exc:  # a source checkout without a build, or a broken build
            _error = f"the native extension t2t_fast._C could not be imported ({exc}); reinstall with `pip install .`"
            package_dir = os.path.dirname(os.path.abspath(__file__))
            if os.path.exists(os.path.join(os.path.dirname(package_dir), "setup.py")):
                _error += (f" (t2t_fast was imported from the source folder {package_dir}, which shadows the "
                           f"installed package: run from another directory, or use `pip install -e .`)")
    return _module


def native_error():
    """Why :func:`native_module` returned None, or None."""
    native_module()
    return _error


def native_cuda_compiled():
    """True when the extension was built with its CUDA kernels (nvcc found at install time)."""
    module = native_module()
    return bool(module is not None and module.compiled_with_cuda())
