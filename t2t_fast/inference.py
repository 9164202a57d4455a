"""Inference form of a model: :func:`optimize_for_inference`.

    model = t2t_fast.create_model("t2t_vit_14", checkpoint_path="81.5_T2T_ViT_14.pth.tar")
    fast = t2t_fast.optimize_for_inference(model)                  # bf16 weights, eval, no autograd
    logits = fast(images)                                          # fp32 images in, fp32 logits out
    fast = t2t_fast.optimize_for_inference(model, compile=True)    # + torch.compile with inductor freezing

Low-precision weights instead of ``torch.autocast``, which re-casts every weight on every call. What stays fp32:
the LayerNorm affine parameters (the statistics are fp32 in every LayerNorm kernel anyway; fp32 parameters keep
the affine at that precision too, which lowers the logits' error) and the FAVOR+ feature maths of the performer
layers (the op computes them in fp32 whatever its inputs). Everything else, the fixed sinusoid ``pos_embed``
included, is cast. On a CPU the linear layers run through oneDNN's linear primitive with their weights packed
once and the MLPs' GELU fused (:mod:`t2t_fast.onednn`), and the backbone's attention kernel follows
:func:`t2t_fast.backend.cpu_attention` (per CPU class, dtype and grad mode).
"""
import copy
import warnings

import torch
from torch import nn

from t2t_fast import backend, onednn

# names the command-line tools and this module accept for the inference dtypes
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# modules whose parameters stay fp32 in a low-precision model
_FP32_MODULES = (nn.LayerNorm,)


def inference_dtype(dtype):
    """``dtype`` as a torch dtype: a torch.float32/bfloat16/float16, or one of the names of :data:`DTYPES`."""
    resolved = DTYPES.get(dtype) if isinstance(dtype, str) else dtype
    if resolved not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"inference dtype must be float32, bfloat16 or float16, got {dtype!r}")
    return resolved


class InferenceModel(nn.Module):
    """A model prepared by :func:`optimize_for_inference`: its call casts a floating-point image to the model's
    dtype, runs without autograd (``torch.inference_mode``) and returns the logits in the image's dtype.

    ``model`` is the converted module (eval mode, no ``requires_grad``); other attributes of it (``num_classes``,
    ``pretrained_cfg``, ...) are readable here too. There is no training mode: ``train()`` raises."""

    def __init__(self, model, dtype, compiled=None):
        super().__init__()
        self.model = model
        self.dtype = dtype
        # not a submodule: the compiled wrapper holds the same parameters, which must not appear twice
        object.__setattr__(self, "_call", compiled if compiled is not None else model)
        self.compiled = compiled is not None

    def forward(self, x):
        """Logits of the image batch ``x`` (B, C, H, W), in ``x``'s dtype."""
        image = x.to(self.dtype) if x.is_floating_point() else x  # anything else: the model's own error
        with torch.inference_mode():
            logits = self._call(image)
        return logits.to(x.dtype) if x.is_floating_point() else logits

    def train(self, mode=True):
        """Only ``eval()`` / ``train(False)``: the weights are converted for inference."""
        if mode:
            raise RuntimeError("an optimize_for_inference model cannot train: train the original model and "
                               "optimise it again")
        return super().train(False)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("model"), name)


def optimize_for_inference(model, dtype=torch.bfloat16, compile=False):
    """The fastest inference form of ``model`` (a T2T-ViT, fused or reference; any classifier works) on the
    machine it runs on. ``model`` itself is left unchanged: a converted copy is returned.

    Args:
        model: the trained model, on the device it will run on.
        dtype: ``torch.bfloat16`` (default), ``torch.float16`` or ``torch.float32`` (or their names): the dtype
            of the weights and the matmuls. LayerNorm parameters stay float32; see the module docstring. On a
            CPU without matmul instructions for it (fp16 on most CPUs, bf16 on those without AVX512-BF16 or
            AMX) a warning says that it will be slow.
        compile: also ``torch.compile`` the converted model with inductor's freezing (weights folded into the
            compiled graph as constants). The first calls compile (minutes on a CPU), and again at each new
            input shape.

    Returns:
        An :class:`InferenceModel`: call it with float32 images as the original model; it returns logits in the
        images' dtype, computed in ``dtype`` without autograd. On a CPU its linears are
        :class:`t2t_fast.onednn.OneDnnLinear` (same state_dict)."""
    if isinstance(model, InferenceModel):
        raise TypeError("the model is already an optimize_for_inference model: pass the original model")
    dtype = inference_dtype(dtype)
    on_cpu = any(p.device.type == "cpu" for p in model.parameters())
    if on_cpu and not backend.cpu_has_fast_matmul(dtype):
        warnings.warn(f"this CPU has no {dtype} matmul instructions: a {dtype} model runs many times slower here "
                      f"than a float32 one (see bench/RESULTS.md)", stacklevel=2)
    converted = copy.deepcopy(model).eval().requires_grad_(False)
    if dtype != torch.float32:
        kept = [(module, {k: v.clone() for k, v in module.state_dict().items()})
                for module in converted.modules() if isinstance(module, _FP32_MODULES)]
        converted.to(dtype)
        for module, state in kept:  # the fp32 values as they were, not their low-precision rounding
            module.float().load_state_dict(state)
    if on_cpu:
        onednn.use_onednn_linears(converted)
    compiled = torch.compile(converted, options={"freezing": True}) if compile else None
    return InferenceModel(converted, dtype, compiled).eval()
