"""The backbone's pre-norm blocks for CPU inference, a run of them in one native call.

``encoder_blocks(x, blocks, final_norm)`` runs ``blocks`` (T2T-ViT / ViT pre-norm blocks in eval mode: softmax
attention and an MLP with the exact GELU) on the residual stream ``x`` in order and returns the stream after the
last one with ``final_norm`` of it: what the model's blocks and the LayerNorm after them compute. With
``cls_only=True`` only the cls token's row (token 0) of both is returned, and the kernels compute the last block
past its qkv projection for that row alone (a classifier's logits depend on nothing else).
:func:`encoder_blocks_ref` is that computation in torch ops, with each residual add rounded to the dtype before the
LayerNorm that reads it, as the model's forward rounds it.

The ``cpp`` backend calls, per block and without returning to Python between them, the kernels that CPU inference
otherwise calls one at a time: the packed-weight linear (:mod:`t2t_fast.ops.packed_linear`, the fc1 GELU fused),
the attention kernel (:mod:`t2t_fast.ops.multihead_attention`) and the residual add + LayerNorm
(:mod:`t2t_fast.ops.add_layernorm`), so its numbers are theirs. Inference only: bfloat16 or float32 activations
and linear weights on a CPU with AVX512-BF16 (which the attention kernel needs) whose
:func:`t2t_fast.backend.cpu_isa` is ``'avx512'`` or ``'amx'`` (any float LayerNorm parameters); no gradient;
eager mode (it takes modules, so it is no ``torch.library`` op; ``torch.compile`` and exports take the torch path).
"""
import weakref
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from t2t_fast._native import native_avx512_bf16, native_module
from t2t_fast.backend import cpu_isa, is_exporting, requested_backend, select_backend, unavailable_reason
from t2t_fast.ops._common import (DTYPE_CODES, backend_cannot_take, check_float_tensor, float32_parameter,
                                  fingerprint_buffer, new_output, sample_fingerprint, storage_extent)
from t2t_fast.ops.add_layernorm import add_layernorm_ref
from t2t_fast.ops.packed_linear import MULTIPLE, isa_unsupported, packed_weight
from t2t_fast.ops.multihead_attention import multihead_attention_ref
from t2t_fast.reference import layers

_OP = "encoder_blocks"


def _linears(block):
    attn, mlp = block.attn, block.mlp
    return attn.qkv, attn.proj, mlp.fc1, mlp.fc2


def _fused_gelu(fc1):
    """Whether ``fc1`` applies the exact GELU itself (a :class:`t2t_fast.onednn.OneDnnLinear` with its GELU)."""
    return getattr(fc1, "gelu", False) is True


def _linear(x, module):
    return F.linear(x, module.weight, module.bias)


def _layernorm(x, norm):
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def encoder_blocks_ref(x: torch.Tensor, blocks: Sequence[nn.Module], final_norm: nn.LayerNorm,
                       cls_only: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """The blocks' eval-mode forward on ``x`` in torch ops, then ``final_norm``: ``(x after the blocks, final_norm
    of it)``, (B, T, C) each, or their token 0 alone, (B, 1, C), with ``cls_only``."""
    h = _layernorm(x, blocks[0].norm1)
    for index, block in enumerate(blocks):
        attn, mlp = block.attn, block.mlp
        mixed = multihead_attention_ref(_linear(h, attn.qkv), attn.num_heads, attn.scale)
        x, h = add_layernorm_ref(x, _linear(mixed, attn.proj), block.norm2.weight, block.norm2.bias, block.norm2.eps)
        hidden = _linear(h, mlp.fc1)
        hidden = mlp.act(F.gelu(hidden) if _fused_gelu(mlp.fc1) else hidden)
        norm = blocks[index + 1].norm1 if index + 1 < len(blocks) else final_norm
        x, h = add_layernorm_ref(x, _linear(hidden, mlp.fc2), norm.weight, norm.bias, norm.eps)
    return (x[:, :1], h[:, :1]) if cls_only else (x, h)


def _validate(x, blocks, final_norm):
    check_float_tensor("x", x, _OP)
    if x.dim() != 3:
        raise ValueError(f"{_OP}: x must be (B, T, C), got {x.dim()} dims")
    if isinstance(blocks, nn.Module) and not isinstance(blocks, (nn.Sequential, nn.ModuleList)):
        blocks = [blocks]
    if len(blocks) == 0:
        raise ValueError(f"{_OP}: no blocks")
    norms = [final_norm]
    for block in blocks:
        if not isinstance(block, layers.Block) or not isinstance(block.attn, layers.Attention) \
                or not isinstance(block.mlp, layers.Mlp):
            raise TypeError(f"{_OP}: blocks must be pre-norm blocks of softmax attention and an MLP "
                            f"(t2t_fast.reference.layers.Block), got {type(block).__name__}")
        if block.training:
            raise ValueError(f"{_OP}: the blocks compute inference: call .eval() on them first")
        if not all(isinstance(linear, nn.Linear) for linear in _linears(block)):
            raise TypeError(f"{_OP}: the blocks' qkv, proj, fc1 and fc2 must be nn.Linear layers")
        norms += (block.norm1, block.norm2)
    for norm in norms:
        if not isinstance(norm, nn.LayerNorm) or norm.weight is None or norm.bias is None \
                or tuple(norm.normalized_shape) != (x.shape[-1],):
            raise ValueError(f"{_OP}: every LayerNorm must be an affine nn.LayerNorm over the last dim of x "
                             f"({x.shape[-1]})")
    return list(blocks)


def cpp_unsupported(x: torch.Tensor, blocks: Sequence[nn.Module], final_norm: nn.LayerNorm) -> Optional[str]:
    """Why the C++ kernels cannot take these (validated) blocks and input, or None: they need the extension, a
    CPU with AVX512-BF16 whose :func:`t2t_fast.backend.cpu_isa` is ``'avx512'`` or ``'amx'``, ``x`` and linear
    weights of one dtype, bfloat16 (features multiples of 32) or float32, blocks of one shape with
    the model's own attention and the exact GELU after fc1, a head size that is a multiple of 16, no gradient, no
    export or ``torch.compile`` trace, and weights not created under ``torch.inference_mode`` (their packing is
    cached by version)."""
    arguments = cpp_arguments(x, blocks, final_norm)
    return arguments if isinstance(arguments, str) else None


def cpp_arguments(x: torch.Tensor, blocks: Sequence[nn.Module], final_norm: nn.LayerNorm):
    """:func:`cpp_unsupported`'s reason (a str) where the kernels cannot take these blocks and input, else their
    prepared arguments, which :func:`run_cpp` takes instead of preparing them again (valid only while nothing of the
    blocks changes: for a call right after this one)."""
    reason = unavailable_reason("cpp", x.device.type)
    if reason is not None:
        return reason
    if not native_avx512_bf16():
        return "this CPU has no AVX512-BF16 instructions (the attention kernel needs them)"
    if is_exporting() or torch.compiler.is_compiling():
        return "an export or torch.compile trace is in progress (they record the torch ops)"
    if x.dtype not in (torch.bfloat16, torch.float32):
        return f"x of dtype {x.dtype} (the kernels take bfloat16 or float32)"
    reason = isa_unsupported(x.dtype)
    if reason is not None:
        return reason
    prepared = _prepare(blocks, final_norm)
    if prepared.reason is not None:
        return prepared.reason
    if x.dtype != prepared.dtype:
        return f"x of dtype {x.dtype} for linears of {prepared.dtype} (the kernels take one dtype throughout)"
    if x.shape[-1] != prepared.dim:
        return f"x of {x.shape[-1]} features for blocks of {prepared.dim}"
    if torch.is_grad_enabled() and (x.requires_grad or any(
            p.requires_grad for module in (*blocks, final_norm) for p in module.parameters())):
        return "a gradient is needed (the kernels are forward-only)"
    return prepared


class _Prepared:
    """What the kernels need of a run of blocks, made once and kept while nothing of the blocks changes: why they
    cannot take them (or None), else the native call's per-block arguments and the tensors those point to."""

    def __init__(self, signature, blocks, final_norm):
        self.signature = signature
        self.reason = _blocks_unsupported(blocks)
        first = blocks[0]
        self.dim, self.hidden = first.attn.proj.weight.shape[0], first.mlp.fc1.weight.shape[0]
        self.heads = first.attn.num_heads
        self.dtype = first.attn.qkv.weight.dtype
        self.keep = []
        if self.reason is None:
            self.blocks = [(self._norm(block.norm1), sum((self._linear(l) for l in _linears(block)), ()),
                            self._norm(block.norm2), float(block.attn.scale)) for block in blocks]
            self.final_norm = self._norm(final_norm)

    def _buffer(self, tensor):
        self.keep.append(tensor)
        return tensor.data_ptr(), storage_extent(tensor)

    def _norm(self, norm):
        (weight, weight_buffer), (bias, bias_buffer) = float32_parameter(norm.weight), float32_parameter(norm.bias)
        self.keep += (weight, bias)
        return weight_buffer, bias_buffer, float(norm.eps)

    def _linear(self, linear):
        bias = (0, 0) if linear.bias is None else self._buffer(linear.bias.detach().contiguous())
        return self._buffer(packed_weight(linear.weight)), bias


def _blocks_unsupported(blocks):
    """:func:`cpp_unsupported`'s conditions on the blocks themselves."""
    from t2t_fast import model as fast_model  # the model's modules import the ops

    first = blocks[0]
    shapes = [linear.weight.shape for linear in _linears(first)]
    dim, hidden = shapes[1][0], shapes[2][0]
    dtype = first.attn.qkv.weight.dtype
    if shapes != [(3 * dim, dim), (dim, dim), (hidden, dim), (dim, hidden)]:
        return f"linear weights {[tuple(s) for s in shapes]} (not those of a pre-norm block)"
    if dtype == torch.bfloat16 and (dim % MULTIPLE or hidden % MULTIPLE):
        return f"{dim} and {hidden} features (the bfloat16 kernels take multiples of {MULTIPLE})"
    heads = first.attn.num_heads
    if dim % heads or dim // heads % 16:
        return f"{heads} heads of {dim} features (the attention kernel takes head sizes that are multiples of 16)"
    weights = []
    for block in blocks:
        if type(block.attn) not in (layers.Attention, fast_model.Attention) or block.attn.num_heads != heads:
            return "a block whose attention is not the model's own softmax attention of the first block's heads"
        fused, act = _fused_gelu(block.mlp.fc1), block.mlp.act
        if not (type(act) is nn.Identity if fused else type(act) is nn.GELU and act.approximate == "none"):
            return "an MLP activation other than the exact GELU"
        for linear, shape in zip(_linears(block), shapes):
            if linear.weight.shape != shape:
                return "blocks of different shapes"
            weights += [linear.weight] + ([linear.bias] if linear.bias is not None else [])
    if dtype not in (torch.bfloat16, torch.float32) or any(t.dtype != dtype for t in weights):
        return "linear layers not all in bfloat16 or all in float32 (the kernels take one of them throughout)"
    if any(t.is_inference() for t in weights):
        return "a weight created under torch.inference_mode (no version counter to tell an in-place change)"
    return None


# first block -> its run's _Prepared; an entry goes with its block
_prepared = weakref.WeakKeyDictionary()


def _signature(blocks, final_norm):
    """What the arguments of a run of blocks depend on: its modules, their scalars, and per tensor its address and
    version counter (a change in place moves the version counter; another tensor or a conversion to another dtype
    moves the address), and a sample of the tensors' bytes (a write through ``.data`` moves neither). Read straight
    from the modules' dicts: this runs on every call."""
    parts, buffers = [len(blocks)], []
    for block in blocks:
        modules = block._modules
        attn, mlp = modules["attn"], modules["mlp"]
        attn_modules, mlp_modules = attn._modules, mlp._modules
        parts += (id(block), id(attn), id(mlp), id(mlp_modules["act"]), attn.num_heads, attn.scale)
        _module_parts(parts, buffers, modules["norm1"], attn_modules["qkv"], attn_modules["proj"], modules["norm2"],
                      mlp_modules["fc1"], mlp_modules["fc2"])
    _module_parts(parts, buffers, final_norm)
    parts.append(sample_fingerprint(buffers))
    return parts


def _module_parts(parts, buffers, *modules):
    """Add the modules' parts of :func:`_signature` to ``parts`` and their CPU parameters' fingerprint buffers to
    ``buffers``."""
    for module in modules:
        attributes = module.__dict__  # a LayerNorm's eps, a fused linear's GELU flag
        parts += (id(module), type(module), attributes.get("eps"), attributes.get("gelu"))
        for tensor in module._parameters.values():
            if tensor is not None:
                # an inference tensor has no version counter: a part equal to nothing, so no cached use
                parts += (id(tensor), tensor.data_ptr(), object() if tensor.is_inference() else tensor._version)
                if tensor.is_cpu:
                    buffers.append(fingerprint_buffer(tensor))


def _prepare(blocks, final_norm):
    signature = _signature(blocks, final_norm)
    prepared = _prepared.get(blocks[0])
    if prepared is None or prepared.signature != signature:
        prepared = _prepared[blocks[0]] = _Prepared(signature, blocks, final_norm)
    return prepared


def encoder_blocks(x: torch.Tensor, blocks: Sequence[nn.Module], final_norm: nn.LayerNorm, cls_only: bool = False,
                   backend=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Run pre-norm ``blocks`` on ``x`` in eval mode, then ``final_norm``, in one native call where the C++
    kernels take them.

    Args:
        x: (B, T, C), the residual stream into the first block.
        blocks: a sequence (or ``nn.Sequential`` / ``nn.ModuleList``) of :class:`t2t_fast.reference.layers.Block`
            in eval mode.
        final_norm: the ``nn.LayerNorm`` after the last block (a model's next block's ``norm1``, or its ``norm``).
        cls_only: return token 0's rows alone (the kernels then compute the last block past its qkv projection
            for those rows alone).
        backend: None/'auto', 'cpp' or 'torch' (see :mod:`t2t_fast.backend`). 'cpp' runs the C++ kernels where
            :func:`cpp_unsupported` allows; otherwise (and for 'torch') :func:`encoder_blocks_ref` runs. A forced
            'cpp' that cannot take the input raises.

    Returns:
        ``(x, normed)``: the stream after the last block and ``final_norm`` of it, both (B, T, C) in ``x``'s dtype
        ((B, 1, C) with ``cls_only``).
    """
    blocks = _validate(x, blocks, final_norm)
    if not isinstance(cls_only, bool):
        raise TypeError(f"{_OP}: cls_only must be a bool, got {cls_only!r}")
    if select_backend(_OP, x.device, ("cpp", "torch"), backend) == "cpp":
        reason = cpp_unsupported(x, blocks, final_norm)
        if reason is None:
            return run_cpp(x, blocks, final_norm, cls_only)
        if requested_backend(backend) != "auto":
            backend_cannot_take(_OP, "cpp", reason)
    return encoder_blocks_ref(x, blocks, final_norm, cls_only)


def run_cpp(x: torch.Tensor, blocks: Sequence[nn.Module], final_norm: nn.LayerNorm, cls_only: bool = False,
            arguments=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The C++ kernels on blocks and an input that :func:`cpp_unsupported` took (the caller checked them),
    without further checks (the extension still checks every buffer it reads or writes); ``arguments``: what
    :func:`cpp_arguments` returned for them just before, or None to prepare them here."""
    prepared = arguments if arguments is not None else _prepare(blocks, final_norm)
    batch, tokens, dim = x.shape
    stream, normed = new_output(x.shape, x.dtype, x.device), new_output(x.shape, x.dtype, x.device)
    stream.copy_(x)  # the kernels update the stream in place
    if x.numel() > 0:
        native_module().encoder_forward_cpu(
            prepared.blocks, prepared.final_norm, DTYPE_CODES[x.dtype], batch, tokens, dim, prepared.hidden,
            prepared.heads, (stream.data_ptr(), storage_extent(stream)), (normed.data_ptr(), storage_extent(normed)),
            cls_only, cpu_isa(), torch.get_num_threads())
    if cls_only:  # the kernels leave the cls rows in the first rows
        return stream.view(-1, dim)[:batch].view(batch, 1, dim), normed.view(-1, dim)[:batch].view(batch, 1, dim)
    return stream, normed
