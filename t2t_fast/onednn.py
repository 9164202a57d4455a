"""The linear layers of CPU inference: oneDNN's linear primitive (``torch.ops.mkldnn._linear_pointwise``, the op
inductor's CPU freezing passes emit, called directly) and, for bf16 on AMX CPUs at a few hundred rows, the
extension's AMX kernel (:mod:`t2t_fast.ops.amx_linear`). On this library's shapes oneDNN's primitive runs the same
GEMM as ``F.linear`` with less overhead around it (no bias copy into the output first), and can fuse the exact GELU
into its epilogue; the AMX kernel does less again around its tiles at the backbone's 197 rows a batch-1 image.

:func:`linear` takes the AMX kernel where :func:`tiles_take` allows (bf16, at most :data:`AMX_LINEAR_MAX_ROWS`
rows, features multiples of 32, the CPU kernels' ISA ``'amx'``), else oneDNN's primitive where it applies (CPU
tensors in float32, or bfloat16 on CPUs with bf16 matmul instructions; a frozen weight, as in an
:func:`t2t_fast.optimize_for_inference` model, and no gradient to compute; neither an export nor
``torch.compile`` in progress), and ``F.linear`` otherwise. :class:`OneDnnLinear` is an ``nn.Linear`` that calls
it (:func:`t2t_fast.optimize_for_inference` converts a model's linears to it).
"""
import torch
import torch.nn.functional as F
from torch import nn

from t2t_fast import backend
from t2t_fast.ops._common import PerWeightCache
from t2t_fast.ops.amx_linear import MULTIPLE as _AMX_MULTIPLE
from t2t_fast.ops.amx_linear import cpp_unsupported as _amx_unsupported
from t2t_fast.ops.amx_linear import packed_weight as _amx_packed_weight
from t2t_fast.ops.amx_linear import run_cpp as _amx_run

# bf16 linears of at most this many rows run on the AMX kernel where it takes them: measured faster than oneDNN's
# primitive on the backbone's shapes up to ~800 rows and even at ~1200, not at 1576 (bench/RESULTS.md)
AMX_LINEAR_MAX_ROWS = 1024

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


def tiles_fit(x, weight):
    """Whether the AMX kernel is the faster choice for this call's sizes: at most :data:`AMX_LINEAR_MAX_ROWS` rows,
    features multiples of 32 (the rest of :func:`tiles_take` depends on the model, not the call)."""
    out_features, in_features = weight.shape
    return (x.numel() <= AMX_LINEAR_MAX_ROWS * in_features and out_features % _AMX_MULTIPLE == 0
            and in_features % _AMX_MULTIPLE == 0)


def tiles_take(x, weight, bias=None):
    """Whether :func:`linear` runs the AMX kernel for this input (:func:`tiles_fit`, and
    :func:`t2t_fast.ops.amx_linear.cpp_unsupported` has no objection; not while ``torch.compile`` traces)."""
    if backend.is_exporting() or torch.compiler.is_compiling():  # before any size is compared: they may be symbols
        return False
    return _amx_unsupported(x, weight, bias) is None and tiles_fit(x, weight)


def linear(x, weight, bias=None, gelu=False):
    """``F.linear(x, weight, bias)``, followed by the exact GELU when ``gelu`` is set; on the AMX kernel where
    :func:`tiles_take` allows, else through oneDNN's primitive where :func:`takes` allows, with the weight packed or
    reordered for them once and cached (not a weight created under ``torch.inference_mode``: it has no version
    counter that would tell an in-place change)."""
    if tiles_take(x, weight, bias):
        return run_tiles(x, weight, bias, gelu)
    if takes(x, weight):
        return run(x, weight, bias, gelu)
    y = F.linear(x, weight, bias)
    return F.gelu(y) if gelu else y


def run(x, weight, bias=None, gelu=False):
    """:func:`linear` through oneDNN's primitive without asking :func:`takes` (the caller has: it costs as much as
    the GEMM of a small batch)."""
    packed = weight if weight.is_inference() else _packed(weight)
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "gelu" if gelu else "none", [], "none" if gelu else "")


def run_tiles(x, weight, bias=None, gelu=False):
    """:func:`linear` on the AMX kernel without asking :func:`tiles_take` (the caller has)."""
    return _amx_run(x, _amx_packed_weight(weight), bias, weight.shape[0], gelu)


class OneDnnLinear(nn.Linear):
    """An ``nn.Linear`` (the same parameters and state_dict) computed by :func:`linear`, with the exact GELU fused
    when ``gelu`` is set."""

    gelu = False

    def forward(self, x):
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
    return model
