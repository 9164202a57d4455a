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
:func:`t2t_fast.backend.cpu_attention` (per CPU class, dtype and grad mode). There the logits of a plain T2T-ViT
come from :func:`_cls_logits`, which does less work than the model's forward for the same numbers, and the fused
T2T module (:class:`InferenceT2TModule`) calls its kernels directly.
"""
import copy
import functools
import warnings

import torch
from torch import nn
from torch.nn.modules import module as _torch_modules

from t2t_fast import backend, model as fast_model, onednn, ops
from t2t_fast.geometry import image_token_grids
from t2t_fast.ops._common import CPU_KERNEL_DTYPES, direct_calls_allowed
from t2t_fast.ops.add_layernorm import cpp_unsupported as add_layernorm_cpp_unsupported
from t2t_fast.ops.add_layernorm import run_cpp as add_layernorm_cpp
from t2t_fast.ops.encoder_blocks import cpp_arguments as encoder_blocks_arguments
from t2t_fast.ops.encoder_blocks import run_cpp as encoder_blocks_cpp
from t2t_fast.ops.favor_attention import run_cpp as favor_attention_cpp
from t2t_fast.ops.multihead_attention import run_cpp as multihead_attention_cpp
from t2t_fast.ops.restructurize_unfold import restructurize_unfold_fwd, square_window
from t2t_fast.ops.soft_split_layernorm import soft_split_layernorm_native_fwd
from t2t_fast.reference import layers, model as reference_model

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


_ATTENTIONS = (layers.Attention, fast_model.Attention)


def _plain_backbone(model):
    """Whether ``model`` computes its logits as a plain T2T-ViT in eval mode: its class's forward is the T2T-ViT
    one (not a variant's), its blocks are pre-norm blocks of softmax attention and an MLP with LayerNorms, then a
    LayerNorm and a linear head on the cls token. For such a model :func:`_cls_logits` computes the same logits.
    Checked on every call (a few microseconds): the model may have been changed since it was converted (pruned,
    its classifier reset, a module replaced)."""
    if not isinstance(model, reference_model.T2TViT) or model.training:
        return False
    cls = type(model)
    if (cls.forward, cls.forward_features, cls.forward_head) != (
            reference_model.T2TViT.forward, reference_model.T2TViT.forward_features,
            reference_model.T2TViT.forward_head):
        return False
    modules = model._modules
    if type(modules["norm"]) is not nn.LayerNorm or not isinstance(modules["head"], (nn.Linear, nn.Identity)):
        return False
    blocks = modules["blocks"]._modules.values()
    if not blocks:
        return False
    norms = [modules["norm"]]
    for block in blocks:
        parts = block._modules
        if type(block) is not layers.Block or type(parts["attn"]) not in _ATTENTIONS \
                or type(parts["mlp"]) is not layers.Mlp or not isinstance(parts["mlp"]._modules["fc1"], nn.Linear):
            return False
        norms += (parts["norm1"], parts["norm2"])
    return all(type(norm) is nn.LayerNorm and norm._parameters["weight"] is not None for norm in norms)


def _observed(module):
    """Whether a forward hook or pre-hook (of ``module`` or a module in it, or a global one) or a ``forward``
    assigned to one of those module instances would see or change a call: the direct paths, which call no module,
    then leave the call to the modules' own forwards. Runs on every call, so it reads the module dicts itself
    (``modules()`` keeps a set of the modules seen, which costs more than the checks)."""
    if _torch_modules._global_forward_hooks or _torch_modules._global_forward_pre_hooks:
        return True
    stack = [module]
    while stack:
        current = stack.pop()
        if current is None:  # a submodule slot registered empty
            continue
        attributes = current.__dict__
        if attributes["_forward_hooks"] or attributes["_forward_pre_hooks"] or "forward" in attributes:
            return True
        stack += attributes["_modules"].values()
    return False


class _DirectKernels:
    """The kernels of one forward of the direct inference paths (:func:`_cls_logits`, :class:`InferenceT2TModule`):
    where a C++ kernel or oneDNN takes the input it is called directly, else the ops that choose per call run. What
    does not depend on a call's sizes (dtypes, instruction set, grad and export state: alike for every call of a
    forward) is checked at the first call that needs it; per linear only the sizes of
    :func:`t2t_fast.onednn.packed_fits`. ``direct``: :func:`t2t_fast.ops._common.direct_calls_allowed` for the
    forward's input."""

    def __init__(self, direct):
        self.direct = direct
        self.packed = self.onednn = self.cpp_add_layernorm = self.cpp_attention = None  # decided at first use

    def encoder(self, x, blocks, final_norm):
        """The prepared arguments of one :func:`t2t_fast.ops.encoder_blocks` call for the blocks where they run so
        (the packed-weight linear takes the blocks' rows, the attention table chooses the C++ kernel and the
        encoder's kernels take them), else None."""
        qkv, fc1, norm = blocks[0].attn.qkv, blocks[0].mlp.fc1, blocks[0].norm2
        if not self.direct or not onednn.packed_fits(x, qkv.weight) or not onednn.packed_fits(x, fc1.weight) \
                or not self._packed(x, qkv) or not self._cpp_add_layernorm(x, norm):
            return None
        qkv_shape = (*x.shape[:-1], qkv.weight.shape[0])
        if not fast_model.cpp_attention_chosen(x.new_empty(qkv_shape), blocks[0].attn.num_heads, 0.0):
            return None
        arguments = encoder_blocks_arguments(x, blocks, final_norm)
        return None if isinstance(arguments, str) else arguments

    def linear(self, module, x):
        gelu = getattr(module, "gelu", False)
        if self.direct and onednn.packed_fits(x, module.weight) and self._packed(x, module):
            return onednn.run_packed(x, module.weight, module.bias, gelu)
        if self.onednn is None:
            self.onednn = self.direct and onednn.takes(x, module.weight)
        if self.onednn:
            return onednn.run(x, module.weight, module.bias, gelu)
        return onednn.linear(x, module.weight, module.bias, gelu)

    def attention(self, qkv, attn):
        if self.cpp_attention is None:
            self.cpp_attention = self.direct and fast_model.cpp_attention_chosen(qkv, attn.num_heads, 0.0)
        if self.cpp_attention:
            return multihead_attention_cpp(qkv, attn.num_heads, attn.scale)
        return fast_model.attention(qkv, attn.num_heads, 0.0, attn.scale)

    def add_layernorm(self, x, residual, norm):
        if self.direct and self._cpp_add_layernorm(x, norm):
            return add_layernorm_cpp(x, residual, norm.weight, norm.bias, norm.eps)
        return ops.add_layernorm(x, residual, norm.weight, norm.bias, norm.eps)

    def _packed(self, x, linear):
        """Whether the packed-weight kernels take this forward's linears (asked of a call whose sizes fit)."""
        if self.packed is None:
            self.packed = onednn.packed_takes(x, linear.weight, linear.bias)
        return self.packed

    def _cpp_add_layernorm(self, x, norm):
        if self.cpp_add_layernorm is None:
            self.cpp_add_layernorm = add_layernorm_cpp_unsupported(x, x, norm.weight, norm.bias) is None
        return self.cpp_add_layernorm


def _cls_attention(qkv, num_heads, scale):
    """The attention output of the cls token alone, (B, 1, H*d), from a block's (B, T, 3*H*d) ``qkv``: the scores
    and the softmax in float32 whatever the dtype (as the C++ attention kernel computes them)."""
    batch, tokens, _ = qkv.shape
    q, k, v = (part.transpose(1, 2).float() for part in qkv.view(batch, tokens, 3, num_heads, -1).unbind(2))
    probabilities = ((q[:, :, :1] @ k.transpose(-2, -1)) * scale).softmax(dim=-1)
    return (probabilities @ v).transpose(1, 2).reshape(batch, 1, -1).to(qkv.dtype)


def _cls_logits(model, images):
    """The logits of a :func:`_plain_backbone` model in eval mode without autograd, with less work than its
    forward: each residual add and the LayerNorm after it as one :func:`t2t_fast.ops.add_layernorm`, in the last
    block only the cls token's row past the attention's k and v (the logits depend on nothing else there), and
    the kernels called directly where they take the input (see :class:`_DirectKernels`): all blocks in one
    :func:`t2t_fast.ops.encoder_blocks` call where its kernels take them."""
    x = model.forward_tokens(images)
    blocks = list(model.blocks)
    kernels = _DirectKernels(direct_calls_allowed(images))
    arguments = kernels.encoder(x, blocks, model.norm)
    if arguments is not None:
        return model.head(encoder_blocks_cpp(x, blocks, model.norm, True, arguments)[1][:, 0])
    h = blocks[0].norm1(x)
    for index, block in enumerate(blocks):
        attn, mlp = block.attn, block.mlp
        last = index + 1 == len(blocks)
        qkv = kernels.linear(attn.qkv, h)
        if last:
            mixed, x = _cls_attention(qkv, attn.num_heads, attn.scale), x[:, :1]
        else:
            mixed = kernels.attention(qkv, attn)
        x, h = kernels.add_layernorm(x, kernels.linear(attn.proj, mixed), block.norm2)
        hidden = mlp.act(kernels.linear(mlp.fc1, h))
        next_norm = model.norm if last else blocks[index + 1].norm1
        x, h = kernels.add_layernorm(x, kernels.linear(mlp.fc2, hidden), next_norm)
    return model.head(h[:, 0])


class InferenceT2TModule(fast_model.T2TModule):
    """The fused T2T module of a CPU model converted by :func:`optimize_for_inference` (the same parameters and
    state_dict). In eager CPU inference on float32 / bfloat16 images, with performer layers as built and the
    backend left to choose (``auto`` or ``cpp``), its kernels are called directly (:func:`_performer_layer`), the
    checks the ops make per call made once a forward. Otherwise (training, gradients, traces, exports, other
    layers or backends) it runs the fused module's forward."""

    def forward(self, x):
        if torch.jit.is_scripting():  # alone in its condition: TorchScript then compiles none of the rest
            return self.fused_forward(x)
        if not self._direct(x):
            return self.fused_forward(x)
        grids = image_token_grids(x, self.splits)
        kernels = _DirectKernels(True)
        x = _performer_layer(self.attention1, x, self.splits[0], None, kernels)
        x = _performer_layer(self.attention2, x, self.splits[1], grids[0], kernels)
        rows = restructurize_unfold_fwd(x, *grids[1], square_window(*self.splits[2]))
        return kernels.linear(self.project, rows)

    def _direct(self, x):
        """Whether :meth:`forward` calls the kernels directly for the image ``x``; an image the layers do not take
        (the wrong channel count) goes to the fused module's forward, whose checks say what is wrong."""
        if self.training or torch.is_grad_enabled() or x.dtype not in CPU_KERNEL_DTYPES or x.dim() != 4 \
                or not direct_calls_allowed(x) or backend.is_exporting() \
                or backend.unavailable_reason("cpp", "cpu") is not None or _observed(self):
            return False
        layers_ = (self.attention1, self.attention2)
        if not all(type(layer) is fast_model.TokenPerformer and not layer.training and _plain_token_mlp(layer.mlp)
                   for layer in layers_) or not isinstance(self.project, nn.Linear):
            return False
        if any(backend.requested_backend(module.backend) not in ("auto", "cpp") for module in (self, *layers_)):
            return False
        kernel_size = self.splits[0][0]
        return x.shape[1] * kernel_size * kernel_size == self.attention1.norm1.normalized_shape[0]


def _plain_token_mlp(mlp):
    """Whether a performer layer's MLP is as :func:`optimize_for_inference` leaves it: linear + GELU (fused into
    the linear), identity, linear, dropout."""
    parts = [type(module) for module in mlp._modules.values()]
    return parts == [onednn.OneDnnLinear, nn.Identity, onednn.OneDnnLinear, nn.Dropout] and mlp[0].gelu


def _performer_layer(layer, x, split, grid_size, kernels):
    """:meth:`t2t_fast.model.TokenPerformer.forward` in eval mode, its kernels called directly: the fused soft
    split + LayerNorm, the kqv linear, FAVOR+, proj, residual add + LayerNorm, the MLP and its residual add."""
    kernel_size, stride, padding = split
    grid_h, grid_w = grid_size if grid_size is not None else (0, 0)
    norm1 = layer.norm1
    rows = soft_split_layernorm_native_fwd(x, norm1.weight, norm1.bias, kernel_size, stride, padding, norm1.eps,
                                           grid_h, grid_w, x.dtype)[0]
    k, q, v = kernels.linear(layer.kqv, rows).split(layer.emb, dim=-1)
    mixed = favor_attention_cpp(k, q, v, layer.w, float(layer.eps))[0]
    y, normed = kernels.add_layernorm(v, kernels.linear(layer.proj, mixed), layer.norm2)
    return y + kernels.linear(layer.mlp[2], kernels.linear(layer.mlp[0], normed))


class InferenceModel(nn.Module):
    """A model prepared by :func:`optimize_for_inference`: its call casts a floating-point image to the model's
    dtype, runs without autograd (``torch.inference_mode``) and returns the logits in the image's dtype.

    ``model`` is the converted module (eval mode, no ``requires_grad``); other attributes of it (``num_classes``,
    ``pretrained_cfg``, ...) are readable here too. Its ``forward_features``, ``forward_head`` and
    ``forward_intermediates`` read here take and return tensors as the call does (cast to the model's dtype and
    back, without autograd); ``model``'s own take the model's dtype. There is no training mode: ``train()``
    raises."""

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
        if torch.jit.is_scripting():
            with torch.no_grad():
                logits = self.model(image)
            return logits.to(x.dtype) if x.is_floating_point() else logits
        with torch.inference_mode():
            if not self.compiled and image.device.type == "cpu" and not backend.is_exporting() \
                    and not torch.compiler.is_compiling() and _plain_backbone(self.model) \
                    and not _observed(self.model):
                logits = _cls_logits(self.model, image)
            elif backend.is_exporting() and self.dtype != torch.float32:
                with _LayerNormsInParameterDtype():
                    logits = self._call(image)
            else:
                logits = self._call(image)
        return logits.to(x.dtype) if x.is_floating_point() else logits

    def train(self, mode=True):
        """Only ``eval()`` / ``train(False)``: the weights are converted for inference."""
        if mode:
            raise RuntimeError("an optimize_for_inference model cannot train: train the original model and "
                               "optimise it again")
        return super().train(False)

    def _apply(self, fn, *args, **kwargs):
        """``.to()``, ``.float()``, ``.bfloat16()``, ...: the images are then cast to the weights' new dtype."""
        super()._apply(fn, *args, **kwargs)
        weights = [p for p in self.model.parameters() if p.is_floating_point() and p.dim() > 1]
        if weights:
            self.dtype = weights[0].dtype
        return self

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            found = getattr(super().__getattr__("model"), name)
            return functools.partial(self._cast_call, found) if name in _IMAGE_METHODS else found

    def _cast_call(self, method, x, *args, **kwargs):
        if not x.is_floating_point():
            return method(x, *args, **kwargs)  # the model's own error
        with torch.inference_mode():
            out = method(x.to(self.dtype), *args, **kwargs)
        return torch.utils._pytree.tree_map_only(
            torch.Tensor, lambda t: t.to(x.dtype) if t.is_floating_point() else t, out)


class _LayerNormsInParameterDtype(torch.overrides.TorchFunctionMode):
    """Every ``F.layer_norm`` of activations in another dtype than its parameters (the float32 LayerNorms of a
    bf16/fp16 model) as an explicit cast to the parameters' dtype and back: what torch's CPU kernel computes, in
    the form an exported graph can hold (ONNX's LayerNormalization takes one dtype)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.layer_norm:
            x, shape, weight, bias, eps = _layer_norm_arguments(*args, **kwargs)
            if weight is not None and x.dtype != weight.dtype:
                return func(x.to(weight.dtype), shape, weight, bias, eps).to(x.dtype)
        return func(*args, **kwargs)


def _layer_norm_arguments(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    return input, normalized_shape, weight, bias, eps


# The model's methods that take an image or features: called through an InferenceModel, cast like its forward.
_IMAGE_METHODS = frozenset({"forward_features", "forward_head", "forward_intermediates"})


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
        :class:`t2t_fast.onednn.OneDnnLinear` and its fused T2T module an :class:`InferenceT2TModule` (same
        state_dict)."""
    if isinstance(model, InferenceModel):
        raise TypeError("the model is already an optimize_for_inference model: pass the original model")
    dtype = inference_dtype(dtype)
    on_cpu = any(p.device.type == "cpu" for p in model.parameters())
    if on_cpu and not backend.cpu_has_fast_matmul(dtype):
        warnings.warn(f"this CPU has no {dtype} matmul instructions: a {dtype} model runs many times slower here "
                      f"than a float32 one (see bench/RESULTS.md)", stacklevel=2)
    converted = copy.deepcopy(model).eval().requires_grad_(False)
    kept = [(module, {k: v.clone() for k, v in module.state_dict().items()})
            for module in converted.modules() if isinstance(module, _FP32_MODULES)] if dtype != torch.float32 else []
    converted.to(dtype)  # also a model in another dtype to float32
    for module, state in kept:  # the fp32 values as they were, not their low-precision rounding
        module.float().load_state_dict(state)
    if on_cpu:
        onednn.use_onednn_linears(converted)
        for module in converted.modules():
            if type(module) is fast_model.T2TModule:
                module.__class__ = InferenceT2TModule
    compiled = torch.compile(converted, options={"freezing": True}) if compile else None
    return InferenceModel(converted, dtype, compiled).eval()
