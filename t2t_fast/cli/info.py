"""``t2t-fast info`` (also ``python -m t2t_fast.info``): versions, and which backends and kernels can run here."""
import os
import platform
import sys


def collect():
    """A dict describing the installation (versions, compiled kernels, usable backends per device)."""
    import torch

    import t2t_fast
    from t2t_fast import backend
    from t2t_fast._native import native_cpu_isas, native_cuda_compiled, native_error, native_module

    info = {
        "t2t_fast": f"{t2t_fast.__version__} ({os.path.dirname(t2t_fast.__file__)})",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = "not installed"
    try:
        import timm

        info["timm"] = timm.__version__
    except Exception as exc:  # timm import can fail on a torch/torchvision mismatch, say why
        info["timm"] = f"not usable ({type(exc).__name__}: {exc})".splitlines()[0]
    module = native_module()
    info["native extension (t2t_fast._C)"] = "not loaded: " + native_error() if module is None else "loaded"
    info["native CPU kernels"] = "compiled" if module is not None else "missing"
    info["native kernels"] = ", ".join(module.compiled_kernels()) if module is not None else "none"
    info["native CUDA kernels"] = "compiled" if native_cuda_compiled() else "not compiled"
    info["CPU class (kernel choices)"] = backend.cpu_class()
    info["CPU packed linears"] = packed_linears_line(backend.cpu_class(), backend.cpu_isa())
    isas = native_cpu_isas()
    info["CPU kernel ISA"] = (f"{backend.cpu_isa()} (this CPU runs: {', '.join(isas)})" if isas
                              else "none: the extension is not loaded")
    info["TRITON_INTERPRET"] = os.environ.get("TRITON_INTERPRET", "")
    info[backend.ENV_VAR] = os.environ.get(backend.ENV_VAR, "") or "(unset: auto)"
    from t2t_fast.training import requirements_problem

    info["torchvision"] = _version("torchvision")
    info["train extra (timm, torchvision, ...)"] = requirements_problem() or "usable"
    for device_type in ("cpu", "cuda"):
        for name, reason in backend.available_backends(device_type).items():
            if reason is None and device_type == "cuda" and not torch.cuda.is_available():
                reason = "no CUDA device is available"  # plain torch ops would run, but there is nothing to run on
            info[f"backend {name} on {device_type}"] = "available" if reason is None else f"unavailable: {reason}"
    return info


def packed_linears_line(cpu_class, isa):
    """Which inference linears run on the extension's packed-weight kernels on this CPU class with the CPU kernels'
    ``isa`` (:data:`t2t_fast.onednn.PACKED_LINEAR_MAX_ROWS`), the rest on oneDNN's primitive."""
    from t2t_fast import onednn
    from t2t_fast.ops.packed_linear import KERNEL_ISAS

    limits = onednn.PACKED_LINEAR_MAX_ROWS.get(cpu_class, {})
    if not limits:
        return "none on this CPU class (oneDNN's primitive)"
    if isa not in KERNEL_ISAS:
        return f"none with the CPU kernel ISA {isa} (oneDNN's primitive)"
    rows = ", ".join(f"{str(dtype).replace('torch.', '')} up to {count} rows" for dtype, count in limits.items())
    return f"{rows} (more rows: oneDNN's primitive)"


def _version(module):
    try:
        return __import__(module).__version__
    except ImportError:
        return "not installed"
    except Exception as exc:  # a torchvision built for another torch fails at import: say why
        return f"not usable ({type(exc).__name__}: {exc})".splitlines()[0]


def main(argv=None):
    """Entry point of ``t2t-fast info``; returns the process exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv in (["-h"], ["--help"]):
        print("usage: t2t-fast info   (no options): versions, and which backends and kernels run here")
        return 0
    if argv:
        print(f"t2t-fast info: error: it takes no options, got {' '.join(argv)}", file=sys.stderr)
        return 2
    info = collect()
    width = max(len(k) for k in info)
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
