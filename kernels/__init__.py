"""Triton kernels of t2t_fast, installed as ``t2t_fast.kernels``.

Every kernel module here defines ``compile_specs()`` returning :class:`CompileSpec` entries: each
(kernel, signature, constexprs, launch options) combination the package can launch. Tests compile each one
ahead of time for sm_80 and sm_90 (``triton.compile`` with an explicit ``GPUTarget``, no GPU needed) with the
specialisation Triton applies at launch (:meth:`CompileSpec.attrs`), and check shared memory, registers and
spills. Shared kernel helpers live in :mod:`t2t_fast.kernels._common`.
"""
import dataclasses
import importlib
import inspect
import pkgutil


@dataclasses.dataclass(frozen=True)
class CompileSpec:
    """One launchable configuration of a ``@triton.jit`` kernel.

    ``divisible`` names the integer arguments that are multiples of 16 whenever this configuration launches
    (Triton then compiles them with a divisibility hint, as it does for every 16-byte-aligned pointer)."""

    name: str
    kernel: object  # the @triton.jit function
    signature: dict  # argument name -> Triton type string ("*fp32", "i32", "constexpr", ...)
    constexprs: dict  # constexpr argument name -> value
    num_warps: int = 4
    num_stages: int = 2
    divisible: tuple = ()

    def attrs(self):
        """The launch specialisation as ``ASTSource(attrs=...)``: torch allocations are 16-byte aligned, so
        Triton marks every pointer argument divisible by 16 at launch; likewise the ints in ``divisible``."""
        hinted = [index for index, (name, kind) in enumerate(self.signature.items())
                  if kind.startswith("*") or name in self.divisible]
        return {(index,): [["tt.divisibility", 16]] for index in hinted}


def kernel_signature(kernel, pointers=None, default_pointer="*fp32", scalars=None):
    """The Triton signature of ``kernel``: pointer arguments (names ending in ``_ptr``) take their type from
    ``pointers`` (name -> type) or ``default_pointer``; arguments annotated ``tl.constexpr`` are constexpr;
    other scalars take their type from ``scalars`` (name -> type), else ``i32``."""
    pointers, scalars = pointers or {}, scalars or {}
    signature = {}
    for name, parameter in inspect.signature(kernel.fn).parameters.items():
        if name.endswith("_ptr"):
            signature[name] = pointers.get(name, default_pointer)
        elif "constexpr" in str(parameter.annotation):
            signature[name] = "constexpr"
        else:
            signature[name] = scalars.get(name, "i32")
    return signature


def kernel_modules():
    """The kernel modules of this package (every submodule that defines ``compile_specs``)."""
    modules = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "compile_specs"):
            modules.append(module)
    return modules


def compile_specs():
    """Every :class:`CompileSpec` the package can launch, across all kernel modules."""
    return [spec for module in kernel_modules() for spec in module.compile_specs()]
