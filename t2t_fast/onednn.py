"""oneDNN's linear primitive for CPU inference: ``torch.ops.mkldnn._linear_pointwise``, the op inductor's CPU
freezing passes emit, called directly. On this library's shapes it runs the same GEMM as ``F.linear`` with less
overhead around it (no bias copy into the output first), and can fuse the exact GELU into its epilogue.

:func:`linear` takes it where it applies (CPU tensors in float32, or bfloat16 on CPUs with bf16 matmul
instructions; a frozen weight, as in an :func:`t2t_fast.optimize_for_inference` model, and no gradient to
compute; neither an export nor ``torch.compile`` in progress) and runs ``F.linear`` otherwise.
:class:`OneDnnLinear` is an ``nn.Linear`` that calls it (:func:`t2t_fast.optimize_for_inference` converts a
model's linears to it).
"""
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from t2t_fast import backend

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


# frozen weight -> ((address, version) it was packed from, the weight in oneDNN's blocked layout)
_packed_weights = WeakIdKeyDictionary()


def _packed(weight):
    """``weight`` reordered once into oneDNN's blocked layout (the GEMM then skips that reorder on every call),
    rebuilt when the weight is changed in place; kept only as long as the weight lives."""
    key = (weight.data_ptr(), weight._version)
    entry = _packed_weights.get(weight)
    if entry is None or entry[0] != key:
        entry = (key, torch.ops.mkldnn._reorder_linear_weight(weight.detach()))
        _packed_weights[weight] = entry
    return entry[1]


def linear(x, weight, bias=None, gelu=False):
    """``F.linear(x, weight, bias)``, followed by the exact GELU when ``gelu`` is set; through oneDNN's primitive
    where :func:`takes` allows, with the weight reordered for it once and cached (not a weight created under
    ``torch.inference_mode``: it has no version counter that would tell an in-place change)."""
    if takes(x, weight):
        return run(x, weight, bias, gelu)
    y = F.linear(x, weight, bias)
    return F.gelu(y) if gelu else y


def run(x, weight, bias=None, gelu=False):
    """:func:`linear` through oneDNN's primitive without asking :func:`takes` (the caller has: it costs as much as
    the GEMM of a small batch)."""
    packed = weight if weight.is_inference() else _packed(weight)
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "gelu" if gelu else "none", [], "none" if gelu else "")


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
