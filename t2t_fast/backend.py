"""Backend choice, in one place.

Backends:
  ``auto``    CUDA tensors: Triton kernels + the CUDA extension; CPU tensors: the C++ extension + torch;
              while tracing/exporting (ONNX, torch.export, TorchScript): the reference-equivalent torch ops.
  ``triton``  the fused Triton kernels (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``)
  ``cuda``    the CUDA kernels of the native extension
  ``cpp``     the CPU kernels of the native extension
  ``torch``   plain torch ops (always available)

Precedence: a ``backend=`` argument of a call, then the model's ``backend`` setting, then the
``T2T_FAST_BACKEND`` environment variable, then ``auto``. A forced backend that cannot run raises
:class:`BackendUnavailableError` listing why; ``auto`` never fails where plain torch would work.
A forced backend that an op does not implement, or not for this input (e.g. ``cpp`` for FAVOR+ in float16, or
with a gradient to compute: its C++ kernel is forward-only) runs that op's ``torch`` implementation, once the
backend itself is known to be usable.

The vectorised C++ CPU kernels run with the best instruction set this CPU has (:func:`cpu_isa`;
``T2T_FAST_CPU_ISA`` or :func:`set_cpu_isa` choose another), and the backbone's CPU attention with
:func:`cpu_attention`.
"""
import os

import torch

from t2t_fast._native import native_cpu_isas, native_cuda_compiled, native_error, native_module

BACKENDS = ("auto", "triton", "cuda", "cpp", "torch")
ENV_VAR = "T2T_FAST_BACKEND"

# Preference order of ``auto`` per device type; each op keeps the ones it implements.
_AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpp", "torch")}


class BackendUnavailableError(RuntimeError):
    """A backend was requested explicitly but cannot run here; the message says why."""


class SettingError(ValueError):
    """A kernel setting (a ``T2T_FAST_*`` environment variable, a backend name, a ``set_*`` call) that names no
    choice there is, or one this machine cannot run; the message names the ones there are."""


def check_backend_name(name):
    """Validate a backend name (None is allowed and means "not set")."""
    if name is not None and name not in BACKENDS:
        raise SettingError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return name


def _triton_reason(device_type):
    """Why Triton cannot run on this device type, or None when it can."""
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton is not installed ({exc})"
    if device_type == "cuda":
        return None if torch.cuda.is_available() else "no CUDA device is available"
    if device_type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            return ("Triton runs CPU tensors only in its interpreter: set TRITON_INTERPRET=1 before importing "
                    "t2t_fast (slow; meant for tests)")
        return _interpreter_reason()
    return f"Triton does not support device type {device_type!r}"


def _interpreter_reason():
    """Why Triton's interpreter cannot run the kernels here, or None when it can."""
    import numpy
    import triton

    # Triton 3.6's interpreter turns every runtime loop bound into a Python int with int(array of shape
    # (1,)), which NumPy 2.4 made an error (triton-lang/triton#9171, fixed in Triton 3.7).
    if _version(triton.__version__) < (3, 7) and _version(numpy.__version__) >= (2, 4):
        return (f"Triton {triton.__version__}'s interpreter cannot run kernels with loops under NumPy "
                f"{numpy.__version__} (triton-lang/triton#9171): use Triton >= 3.7, or NumPy < 2.4")
    return None


def _version(text):
    """(major, minor) of a version string such as '3.6.0' or '2.4.0rc1'."""
    major, minor = (text.split(".") + ["0"])[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def _cuda_reason(device_type):
    if device_type != "cuda":
        return f"the CUDA extension runs CUDA tensors only, got a {device_type} tensor"
    if native_module() is None:
        return native_error()
    if not native_cuda_compiled():
        return "t2t_fast._C was built without CUDA kernels (nvcc not found or T2T_FAST_CUDA=0 at install time)"
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    return None


def _cpp_reason(device_type):
    if device_type != "cpu":
        return f"the C++ extension runs CPU tensors only, got a {device_type} tensor"
    if native_module() is None:
        return native_error()
    return None


_REASONS = {
    "triton": _triton_reason,
    "cuda": _cuda_reason,
    "cpp": _cpp_reason,
    "torch": lambda device_type: None,
}


def unavailable_reason(backend, device_type):
    """Why ``backend`` cannot run tensors of ``device_type`` (``'cpu'``/``'cuda'``) now, or None if it can."""
    check_backend_name(backend)
    if backend == "auto":
        return None
    reason = _REASONS[backend](device_type)
    if reason is None and backend != "torch" and transform_active():
        return "forward-mode AD and torch.func transforms (jvp, grad, vmap) need the 'torch' backend"
    return reason


def autocast_enabled(device_type):
    """True when autocast is on for ``device_type`` (False for device types autocast does not know, e.g. meta)."""
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def is_exporting():
    """True while TorchScript, torch.export, ONNX export or FX tracing records the model."""
    if torch.jit.is_scripting() or torch.jit.is_tracing():
        return True
    if torch.onnx.is_in_onnx_export():
        return True
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_exporting") and compiler.is_exporting():
        return True
    return False


def transform_active():
    """True under forward-mode AD (``torch.func.jvp``, ``torch.autograd.forward_ad``) or a ``torch.func`` transform
    (``grad``, ``vmap``, ...): the fused ops have no formulas for them, the torch ops do."""
    if torch.compiler.is_compiling():  # Dynamo handles the transforms of compiled code itself
        return False
    functorch = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(functorch is not None and functorch()) or torch.autograd.forward_ad._current_level >= 0


def requested_backend(backend=None):
    """The backend asked for: the argument, else ``T2T_FAST_BACKEND``, else ``'auto'``."""
    if backend is None:
        backend = os.environ.get(ENV_VAR) or "auto"
        if backend not in BACKENDS:
            raise SettingError(f"{ENV_VAR}={backend!r} is not a backend; expected one of {', '.join(BACKENDS)}")
    return check_backend_name(backend)


def select_backend(op, device, implemented, backend=None):
    """Pick the implementation of ``op`` for tensors on ``device``.

    ``implemented`` is the tuple of backends the op has (always including ``'torch'``). Returns one of
    them. Raises :class:`BackendUnavailableError` when a forced backend cannot run here.
    """
    requested = requested_backend(backend)
    device_type = torch.device(device).type
    if requested == "auto":
        if is_exporting():
            return "torch"
        for candidate in _AUTO_ORDER.get(device_type, ("torch",)):
            if candidate in implemented and unavailable_reason(candidate, device_type) is None:
                return candidate
        return "torch"
    reason = unavailable_reason(requested, device_type)
    if reason is not None:
        raise BackendUnavailableError(f"{op}: backend {requested!r} cannot run here: {reason}")
    return requested if requested in implemented else "torch"


def available_backends(device_type):
    """``{backend: reason or None}`` for every concrete backend on ``device_type``."""
    return {name: unavailable_reason(name, device_type) for name in BACKENDS if name != "auto"}


# ------------------------------------------------------------------------------- CPU attention kernel

CPU_ATTENTION_KERNELS = ("auto", "cpp", "sdpa", "matmul")
CPU_ATTENTION_ENV_VAR = "T2T_FAST_CPU_ATTENTION"
CPU_CLASSES = ("amx", "avx512_bf16", "none")

# The backbone's softmax attention on CPU tensors: ``'sdpa'`` (``F.scaled_dot_product_attention``, torch's
# flash kernel on CPU) or ``'matmul'`` (q @ k^T, softmax, @ v, as the reference), per (CPU class, maths dtype):
# (grad off, grad on). From the per-call times in bench/RESULTS.md ("CPU attention kernel"): the matmul
# form wins only where bf16 (fp16) matmuls run on bf16 (fp16) hardware and the flash kernel's per-block overhead
# does not pay off at the backbone's 197 tokens; fp16 matmuls without fp16 hardware, and bf16 ones without bf16
# hardware, are many times slower than the flash kernel, which does its maths in fp32. RESULTS.md says which
# CPU each row was measured on (the AMX CPUs so far have AVX512-FP16 as well).
# Where the C++ kernel (``'cpp'``: t2t_fast.ops.multihead_attention, fp32/bf16 inference on AVX512-BF16; bf16 on
# AMX tiles where the CPU has them) can take the input, it runs instead on the classes in
# _CPU_ATTENTION_CPP_CLASSES, where it was measured fastest; the table's choice is what runs where it cannot.
_CPU_ATTENTION_TABLE = {
    ("amx", torch.float32): ("sdpa", "sdpa"),
    ("amx", torch.bfloat16): ("sdpa", "matmul"),
    ("amx", torch.float16): ("sdpa", "matmul"),
    ("avx512_bf16", torch.float32): ("sdpa", "sdpa"),
    ("avx512_bf16", torch.bfloat16): ("matmul", "matmul"),
    ("avx512_bf16", torch.float16): ("sdpa", "sdpa"),
    ("none", torch.float32): ("sdpa", "sdpa"),
    ("none", torch.bfloat16): ("sdpa", "sdpa"),
    ("none", torch.float16): ("sdpa", "sdpa"),
}
_CPU_ATTENTION_CPP_CLASSES = ("avx512_bf16", "amx")
_cpu_attention_override = None


def cpu_class():
    """The CPU's class for kernel choices: ``'amx'`` (AMX-BF16 tiles), ``'avx512_bf16'`` (AVX-512 with bf16
    dot products) or ``'none'`` (no bf16 matmul instructions: bf16 is converted to fp32 for the maths)."""
    return _CPU_CLASS


def _cpu_features():
    """torch's CPU feature flags (empty for a torch without the query: assume nothing)."""
    try:
        return torch._C._cpu._get_cpu_capability()
    except (AttributeError, RuntimeError):
        return {}


def _detect_cpu_class(features):
    if features.get("amx_bf16") and features.get("amx_tile"):
        return "amx"
    if features.get("avx512_bf16"):
        return "avx512_bf16"
    return "none"


_CPU_FEATURES = _cpu_features()
_CPU_CLASS = _detect_cpu_class(_CPU_FEATURES)


def cpu_has_fast_matmul(dtype):
    """Whether this CPU has matmul instructions for ``dtype``: bf16 on AMX / AVX512-BF16 CPUs, fp16 with
    AMX-FP16 or AVX512-FP16; fp32 always. Without them torch's bf16/fp16 matmuls run many times slower than fp32."""
    if dtype == torch.bfloat16:
        return _CPU_CLASS != "none"
    if dtype == torch.float16:
        return bool(_CPU_FEATURES.get("amx_fp16") or _CPU_FEATURES.get("avx512_fp16"))
    return True


def set_cpu_attention(kernel):
    """Force the backbone's CPU attention kernel for this process: ``'cpp'``, ``'sdpa'``, ``'matmul'``, or
    ``'auto'``/None (the table per CPU class, dtype and grad mode). Wins over ``T2T_FAST_CPU_ATTENTION``.
    ``'cpp'`` applies where the C++ kernel can take the input (fp32/bf16 inference on AVX512-BF16 CPUs); elsewhere
    the table chooses."""
    global _cpu_attention_override
    if kernel is not None and kernel not in CPU_ATTENTION_KERNELS:
        raise SettingError(f"unknown CPU attention kernel {kernel!r}; expected one of "
                           f"{', '.join(CPU_ATTENTION_KERNELS)}")
    _cpu_attention_override = None if kernel == "auto" else kernel


def requested_cpu_attention():
    """The CPU attention kernel asked for: :func:`set_cpu_attention`'s, else ``T2T_FAST_CPU_ATTENTION``'s, else
    ``'auto'``."""
    requested = _cpu_attention_override
    if requested is None:
        requested = os.environ.get(CPU_ATTENTION_ENV_VAR) or "auto"
        if requested not in CPU_ATTENTION_KERNELS:
            raise SettingError(f"{CPU_ATTENTION_ENV_VAR}={requested!r} is not a CPU attention kernel; expected one "
                               f"of {', '.join(CPU_ATTENTION_KERNELS)}")
    return requested


def cpu_attention(dtype, grad_enabled, cpu=None, cpp_takes=False):
    """The backbone attention kernel for CPU tensors whose maths run in ``dtype``: ``'cpp'``, ``'sdpa'`` or
    ``'matmul'``. ``cpp_takes``: whether the C++ kernel can take this call's input
    (:func:`t2t_fast.ops.multihead_attention.cpp_unsupported` is None); ``'cpp'`` is only returned then.

    Precedence: :func:`set_cpu_attention`, then ``T2T_FAST_CPU_ATTENTION`` (``cpp``/``sdpa``/``matmul``/``auto``),
    then the measured table for ``cpu`` (default: this machine's :func:`cpu_class`) and the grad mode."""
    requested = requested_cpu_attention()
    cpu = cpu or _CPU_CLASS
    if cpp_takes and (requested == "cpp" or (requested == "auto" and cpu in _CPU_ATTENTION_CPP_CLASSES)):
        return "cpp"
    if requested in ("sdpa", "matmul"):
        return requested
    choices = _CPU_ATTENTION_TABLE.get((cpu, dtype), ("sdpa", "sdpa"))
    return choices[1] if grad_enabled else choices[0]


# --------------------------------------------------------------------- instruction set of the CPU kernels

CPU_ISA_ENV_VAR = "T2T_FAST_CPU_ISA"
_cpu_isa_override = None


def set_cpu_isa(isa):
    """Run the vectorised CPU kernels of the extension (fused soft split + LayerNorm, FAVOR+, residual add +
    LayerNorm, attention) with instruction set ``isa`` (``'amx'``, ``'avx512'``, ``'avx2'``, ``'baseline'``), or
    the best this CPU has (``'auto'``/None). ``'amx'`` is AVX-512 with AMX tiles, which the attention kernel's
    bfloat16 products take (the other kernels run their AVX-512 code); the attention kernel runs with ``'amx'`` or
    ``'avx512'`` only. Wins over ``T2T_FAST_CPU_ISA``; an ISA this CPU cannot run is a ValueError naming the
    ones it can."""
    global _cpu_isa_override
    _cpu_isa_override = None if isa in (None, "auto") else _check_cpu_isa(isa, "set_cpu_isa")


def _check_cpu_isa(isa, source):
    if isa not in native_cpu_isas():
        runnable = ", ".join(native_cpu_isas()) or "none: the extension is not loaded"
        raise SettingError(f"{source}: {isa!r} is not an instruction set this CPU runs the kernels with ({runnable})")
    return isa


def cpu_isa():
    """The instruction set the vectorised CPU kernels run with: :func:`set_cpu_isa`, then
    ``T2T_FAST_CPU_ISA`` (``amx``/``avx512``/``avx2``/``baseline``/``auto``), then the best this CPU has."""
    if _cpu_isa_override is not None:
        return _cpu_isa_override
    requested = os.environ.get(CPU_ISA_ENV_VAR) or "auto"
    if requested != "auto":
        return _check_cpu_isa(requested, CPU_ISA_ENV_VAR)
    isas = native_cpu_isas()
    return isas[0] if isas else "baseline"
