"""The linear layers of CPU inference: oneDNN's linear primitive (``torch.ops.mkldnn._linear_pointwise``, the op
inductor's CPU freezing passes emit, called directly) and, at a few hundred rows, the extension's kernels for a
packed weight (:mod:`t2t_fast.ops.packed_linear`: bf16 on AMX tiles or AVX512-BF16, fp32 on AVX-512). On this
library's shapes oneDNN's primitive runs the same GEMM as ``F.linear`` with less overhead around it (no bias copy
into the output first), and can fuse the exact GELU into its epilogue; the extension's kernels do less again around
their GEMMs at the backbone's 197 rows a batch-1 image.

:func:`linear` takes the extension's kernels where :func:`packed_takes` allows (at most
:data:`PACKED_LINEAR_MAX_ROWS` rows, per CPU class and dtype; bf16 with features multiples of 32; where the CPU
kernels' ISA is ``'avx512'`` or ``'amx'``), else oneDNN's primitive where it applies (CPU tensors in float32, or
bfloat16 on CPUs with bf16 matmul instructions; a frozen weight, as in an :func:`t2t_fast.optimize_for_inference`
model, and no gradient to compute; neither an export nor ``torch.compile`` in progress; no dispatch mode or
functorch transform, which would not know the calls), and ``F.linear`` otherwise. :class:`OneDnnLinear` is an
``nn.Linear`` that calls it (:func:`t2t_fast.optimize_for_inference` converts a model's linears to it).
"""
import torch
import torch.nn.functional as F
from torch import nn

from t2t_fast import backend
from t2t_fast.ops._common import PerWeightCache, direct_calls_allowed
from t2t_fast.ops.packed_linear import MULTIPLE as _BF16_MULTIPLE
from t2t_fast.ops.packed_linear import cpp_unsupported as _packed_unsupported
from t2t_fast.ops.packed_linear import packed_weight as _packed_weight
from t2t_fast.ops.packed_linear import run_cpp as _packed_run

# per CPU class (t2t_fast.backend.cpu_class) and dtype, linears of at most this many rows run on the extension's
# kernels where they take them: where the whole model was measured faster so (with its blocks in one encoder call)
# than on oneDNN's primitive (bench/RESULTS.md). amx: bf16 up to batch 4 (788 backbone rows), not at batch 5; fp32
# up to batch 8 (1576 rows), not at batch 16. avx512_bf16: bf16 up to batch 8; fp32 up to batch 6 (1182 rows), not
# at batch 8. Classes and dtypes not named here: oneDNN's primitive.
PACKED_LINEAR_MAX_ROWS = {"amx": {torch.bfloat16: 800, torch.float32: 1600},
                          "avx512_bf16": {torch.bfloat16: 1600, torch.float32: 1200}}

_AVAILABLE = (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
              and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def takes(x, weight):
    """Whether :func:`linear` runs oneDNN's primitive for this input and weight."""
    if not _AVAILABLE or x.device.type != "cpu" or x.dtype != weight.dtype or backend.is_exporting():
        return False
    if torch.compiler.is_compiling():  # inductor lowers the op only for frozen weights, and fuses linears itself
        return False
    if weight.requires_grad or (torch.is_grad_enabled() and x.requires_grad):  # trainable: torch's own numbers
        return False
    return x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and backend.cpu_has_fast_matmul(x.dtype))


# ``weight`` reordered once into oneDNN's blocked layout (the GEMM then skips that reorder on every call)
_packed = PerWeightCache(lambda weight: torch.ops.mkldnn._reorder_linear_weight(weight.detach()))


def packed_fits(x, weight):
    """Whether the extension's kernel is the faster choice for this call's sizes: at most
    :data:`PACKED_LINEAR_MAX_ROWS` rows of its dtype on this CPU class, and for bf16 features multiples of 32 (the
    rest of :func:`packed_takes` depends on the model, not the call)."""
    out_features, in_features = weight.shape
    if x.numel() > PACKED_LINEAR_MAX_ROWS.get(backend.cpu_class(), {}).get(x.dtype, 0) * in_features:
        return False
    return x.dtype != torch.bfloat16 or (out_features % _BF16_MULTIPLE == 0 and in_features % _BF16_MULTIPLE == 0)


def packed_takes(x, weight, bias=None):
    """Whether :func:`linear` runs the extension's kernel for this input (:func:`packed_fits`;
    :func:`t2t_fast.ops.packed_linear.cpp_unsupported` has no objection; not while ``torch.compile`` traces)."""
    if backend.is_exporting() or torch.compiler.is_compiling():  # before any size is compared: they may be symbols
        return False
    return packed_fits(x, weight) and _packed_unsupported(x, weight, bias) is None


def linear(x, weight, bias=None, gelu=False):
    """``F.linear(x, weight, bias)``, followed by the exact GELU when ``gelu`` is set; on the extension's kernel
    where :func:`packed_takes` allows, else through oneDNN's primitive where :func:`takes` allows, with the weight
    packed or reordered for them once and cached (not a weight created under ``torch.inference_mode``: it has no
    version counter that would tell an in-place change). Under a dispatch mode or a functorch transform (a FLOP
    counter, fake tensors, vmap) ``F.linear``, which they know."""
    if direct_calls_allowed(x):
        if packed_takes(x, weight, bias):
            return run_packed(x, weight, bias, gelu)
        if takes(x, weight):
            return run(x, weight, bias, gelu)
    y = F.linear(x, weight, bias)
    return F.gelu(y) if gelu else y


def run(x, weight, bias=None, gelu=False):
    """:func:`linear` through oneDNN's primitive without asking :func:`takes` (the caller has: it costs as much as
    the GEMM of a small batch)."""
    packed = weight if weight.is_inference() else _packed(weight)
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "gelu" if gelu else "none", [], "none" if gelu else "")


def run_packed(x, weight, bias=None, gelu=False):
    """:func:`linear` on the extension's kernel without asking :func:`packed_takes` (the caller has)."""
    return _packed_run(x, _packed_weight(weight), bias, weight.shape[0], gelu)


class OneDnnLinear(nn.Linear):
    """An ``nn.Linear`` (the same parameters and state_dict) computed by :func:`linear`, with the exact GELU fused
    when ``gelu`` is set."""

    gelu = False

    def forward(self, x):
        if torch.jit.is_scripting():
            y = F.linear(x, self.weight, self.bias)
            return F.gelu(y) if self.gelu else y
        return linear(x, self.weight, self.bias, self.gelu)


def _exact_gelu(module):
    return type(module) is nn.GELU and module.approximate == "none"


def _fuse_gelu(linear):
    linear.__class__ = OneDnnLinear
    linear.gelu = True
    return nn.Identity()


def use_onednn_linears(model):
    """Convert ``model`` in place: every ``nn.Linear`` becomes a :class:`OneDnnLinear`, and an exact GELU that
    directly follows a linear (a T2T-ViT ``Mlp``'s ``fc1`` -> ``act``, or consecutive members of an
    ``nn.Sequential``) moves into that linear (the GELU's place is taken by ``nn.Identity``, which has no state)."""
    from t2t_fast.reference import layers

    for module in model.modules():
        if type(module) is layers.Mlp and _exact_gelu(module.act) and type(module.fc1) is nn.Linear:
            module.act = _fuse_gelu(module.fc1)
        elif type(module) is nn.Sequential:
            for index in range(1, len(module)):
                if _exact_gelu(module[index]) and type(module[index - 1]) is nn.Linear:
                    module[index] = _fuse_gelu(module[index - 1])
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = OneDnnLinear
            module.gelu = False  # an instance attribute, as TorchScript reads only those
    return model
