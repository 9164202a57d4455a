"""Loads the compiled extension ``t2t_fast._C`` and says why when it cannot.

The import happens once, when this module is imported, and so does the question whether it has CUDA kernels:
the backend selector asks both inside ``torch.compile``d code, where Dynamo traces neither an import nor a
call into the pybind11 module (``torch.compile(model, fullgraph=True)`` would fail)."""
import importlib
import os


def _load():
    """(module, None), or (None, why the extension could not be imported)."""
    try:
        return importlib.import_module("t2t_fast._C"), None
    except ImportError as exc:  # a source checkout without a build, or a broken build
        error = f"the native extension t2t_fast._C could not be imported ({exc}); reinstall with `pip install .`"
        package_dir = os.path.dirname(os.path.abspath(__file__))
        if os.path.exists(os.path.join(os.path.dirname(package_dir), "setup.py")):
            error += (f" (t2t_fast was imported from the source folder {package_dir}, which shadows the "
                      f"installed package: run from another directory, or use `pip install -e .`)")
        return None, error


_module, _error = _load()
# Read once here too: the selector asks inside compiled code, where Dynamo cannot call into pybind11.
_cuda_compiled = bool(_module is not None and _module.compiled_with_cuda())
_cpu_isas = tuple(_module.cpu_isas()) if _module is not None else ()
_avx512_bf16 = bool(_module is not None and _module.avx512_bf16_supported())
_attention_max_token_stride = _module.attention_max_token_stride if _module is not None else 0


def native_module():
    """The compiled extension, or None when it could not be imported (see :func:`native_error`)."""
    return _module


def native_error():
    """Why :func:`native_module` returned None, or None."""
    return _error


def native_cuda_compiled():
    """True when the extension was built with its CUDA kernels (nvcc found at install time)."""
    return _cuda_compiled


def native_cpu_isas():
    """Instruction sets of the vectorised CPU kernels this CPU runs, best first (``'amx'``, ``'avx512'``,
    ``'avx2'``, ``'baseline'``); empty without the extension."""
    return _cpu_isas


def native_vector_isas():
    """:func:`native_cpu_isas` without ``'amx'``: the instruction sets the vectorised kernels have code of their
    own for (with ``'amx'`` they run their AVX-512 code; only the attention kernel has tile code)."""
    return tuple(isa for isa in _cpu_isas if isa != "amx")


def native_avx512_bf16():
    """True when this CPU has AVX-512 with BF16 dot products (the extension's attention kernel needs them, and its
    bfloat16 linear without AMX tiles)."""
    return _avx512_bf16


def native_attention_max_token_stride():
    """The largest token stride (elements) of qkv the attention kernel takes (0 without the extension)."""
    return _attention_max_token_stride
