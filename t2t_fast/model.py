"""The fast T2T-ViT: the reference's module tree, parameters and init, running fused forwards.

Every class here subclasses its :mod:`t2t_fast.reference` twin for the constructor and defines only the
forward it fuses; what has nothing to fuse (blocks, MLPs, drop-path, the backbone loop) is the reference's.
Per T2T stage the unfolded tokens never exist for long: the soft split + ``norm1`` LayerNorm is one fused op
reading the previous stage's tokens in place, FAVOR+ reads k/q/v as strided views of the ``kqv`` output,
and in training the split+LN+projection is recomputed in backward instead of keeping the (B, L, 147/576)
tensors alive. The backbone uses ``F.scaled_dot_product_attention``.
Backends: see :mod:`t2t_fast.backend` (``backend=`` here sets the model's default).

The fused steps are the module-level functions below: ``torch.fx`` keeps them as leaves (so a traced model
still runs the fused kernels), and under ``torch.jit.script`` they run the ops' pure-torch references.
"""
from typing import Optional, Tuple

import torch
import torch.fx
import torch.nn.functional as F
import torch.utils.checkpoint

from t2t_fast import onednn, ops, reference
from t2t_fast.backend import (autocast_enabled, check_backend_name, cpu_attention, requested_cpu_attention,
                              transform_active)
from t2t_fast.geometry import image_token_grids
from t2t_fast.ops.add_layernorm import add_layernorm_ref
from t2t_fast.ops.favor_attention import favor_attention_ref
from t2t_fast.ops.restructurize_unfold import restructurize_unfold_ref
from t2t_fast.ops.soft_split_layernorm import soft_split_layernorm_ref
from t2t_fast.reference import layers

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def autocast_dtype(x):
    """The dtype autocast gives the projection after a soft split of ``x`` (None outside autocast): the split
    writes its rows in it directly, instead of fp32 rows (the first split reads the fp32 image) and a cast."""
    device = x.device.type
    if autocast_enabled(device) and x.dtype == torch.float32:
        return torch.get_autocast_dtype(device)
    return None


def _split_norm_project(x, split, grid_size, norm_weight, norm_bias, eps, weight, bias, backend):
    kernel, stride, padding = split
    tokens = ops.soft_split_layernorm(x, kernel, stride, padding, norm_weight, norm_bias, eps, grid_size=grid_size,
                                      backend=backend, out_dtype=autocast_dtype(x))
    return onednn.linear(tokens, weight, bias)


def split_norm_project(x, split: Tuple[int, int, int], grid_size: Optional[Tuple[int, int]],
                       norm_weight: torch.Tensor, norm_bias: torch.Tensor, eps: float, weight: torch.Tensor,
                       bias: Optional[torch.Tensor], backend: Optional[str], recompute: bool) -> torch.Tensor:
    """Soft split of ``x`` (an image, or tokens on ``grid_size``) + LayerNorm + the input projection of a T2T
    layer. With ``recompute`` only ``x`` is kept for backward; the unfolded (B, L, C*k*k) rows are rebuilt."""
    if torch.jit.is_scripting():
        kernel, stride, padding = split
        tokens = soft_split_layernorm_ref(x, kernel, stride, padding, norm_weight, norm_bias, eps, grid_size)
        return F.linear(tokens, weight, bias)
    else:
        arguments = (x, split, grid_size, norm_weight, norm_bias, eps, weight, bias, backend)
        if recompute:
            return torch.utils.checkpoint.checkpoint(_split_norm_project, *arguments, use_reentrant=False)
        return _split_norm_project(*arguments)


def linear_attention(k, q, v, w, eps: float, backend: Optional[str]) -> torch.Tensor:
    """FAVOR+ of the performer T2T layers (:func:`t2t_fast.ops.favor_attention`)."""
    if torch.jit.is_scripting():
        return favor_attention_ref(k, q, v, w, eps)
    else:
        return ops.favor_attention(k, q, v, w, eps=eps, backend=backend)


def residual_norm(x, residual, norm_weight: torch.Tensor, norm_bias: torch.Tensor, eps: float,
                  backend: Optional[str]) -> Tuple[torch.Tensor, torch.Tensor]:
    """``x + residual`` and its LayerNorm, in one pass where :func:`t2t_fast.ops.add_layernorm` can."""
    if torch.jit.is_scripting():
        return add_layernorm_ref(x, residual, norm_weight, norm_bias, eps)
    else:
        return ops.add_layernorm(x, residual, norm_weight, norm_bias, eps, backend=backend)


def restructurize_split(x, grid_size: Tuple[int, int], split: Tuple[int, int, int],
                        backend: Optional[str]) -> torch.Tensor:
    """Tokens (B, H*W, C) on ``grid_size`` -> the unfolded rows of the last soft split."""
    kernel, stride, padding = split
    if torch.jit.is_scripting():
        return restructurize_unfold_ref(x, grid_size, kernel, stride, padding)
    else:
        return ops.restructurize_unfold(x, grid_size, kernel, stride, padding, backend=backend)


def cpu_maths_dtype(x):
    """The dtype of the matmuls on CPU tensor ``x``: CPU autocast's fp16/bf16 when it is on, else ``x``'s."""
    if torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") in _LOW_PRECISION:
        return torch.get_autocast_dtype("cpu")
    return x.dtype


def split_heads(qkv, num_heads: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, T, 3D) -> q, k, v as (B, H, T, D/H) views.

    Unbinding the (B, T, 3, H, Dh) view makes the stack of dq, dk, dv in backward the qkv layout already
    (permuting first would cost one more copy of the qkv gradient per block)."""
    batch, tokens, _ = qkv.shape
    q, k, v = qkv.view(batch, tokens, 3, num_heads, -1).unbind(2)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def attention(qkv, num_heads: int, dropout_p: float, scale: float) -> torch.Tensor:
    """Softmax attention of the (B, T, 3, H, d) view of a block's ``qkv`` projection -> (B, T, H*d): on CPU the
    kernel :func:`t2t_fast.backend.cpu_attention` picks (the C++ kernel of
    :func:`t2t_fast.ops.multihead_attention` for fp32/bf16 inference where it was measured fastest), else
    :func:`attend` on the split heads. ``dropout_p``: the attention dropout, 0 outside training."""
    if not torch.jit.is_scripting():
        if qkv.device.type == "cpu" and cpp_attention_chosen(qkv, num_heads, dropout_p):
            return ops.multihead_attention(qkv, num_heads, scale, backend="cpp")
    q, k, v = split_heads(qkv, num_heads)
    return attend(q, k, v, dropout_p, scale)


def cpp_attention_chosen(qkv, num_heads: int, dropout_p: float) -> bool:
    """Whether :func:`attention` runs the C++ kernel on the CPU tensor ``qkv``: it takes the input and
    :func:`t2t_fast.backend.cpu_attention` chooses it."""
    takes = dropout_p == 0.0 and ops.multihead_attention_cpp_unsupported(qkv, num_heads) is None
    return cpu_attention(cpu_maths_dtype(qkv), torch.is_grad_enabled(), cpp_takes=takes) == "cpp"


def attend(q, k, v, dropout_p: float, scale: float) -> torch.Tensor:
    """Softmax attention of (B, H, T, d) heads -> (B, T, H*d): ``F.scaled_dot_product_attention`` (flash /
    memory-efficient kernels), except on CPU where :func:`t2t_fast.backend.cpu_attention` picks a plain matmul
    + softmax (the attention matrix formed as in the reference) for this CPU class, maths dtype and grad mode:
    torch's CPU flash kernel can be slower at the backbone's 197 tokens (see bench/RESULTS.md).
    ``dropout_p``: the attention dropout, 0 outside training."""
    if torch.jit.is_scripting():
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
    elif q.device.type == "cpu" and cpu_attention(cpu_maths_dtype(q), torch.is_grad_enabled()) == "matmul":
        y = matmul_attention(q, k, v, dropout_p, scale)
    else:
        y = sdpa(q, k, v, dropout_p, scale)
    return y.transpose(1, 2).flatten(2)


def matmul_attention(q, k, v, dropout_p: float, scale: float) -> torch.Tensor:
    """Softmax attention with the attention matrix formed, as the reference computes it."""
    attn = ((q @ k.transpose(-2, -1)) * scale).softmax(dim=-1)
    return F.dropout(attn, dropout_p, training=dropout_p > 0) @ v


def sdpa(q, k, v, dropout_p: float, scale: float) -> torch.Tensor:
    """``F.scaled_dot_product_attention``, or :func:`matmul_attention` under forward-mode AD and ``torch.func``
    transforms, and on CPU where the matmul form is asked for by name (``T2T_FAST_CPU_ATTENTION=matmul``): torch's
    fused attention kernels have neither forward-mode formulas nor a double backward."""
    if torch.jit.is_scripting():
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
    elif transform_active() or (q.device.type == "cpu" and requested_cpu_attention() == "matmul"):
        return matmul_attention(q, k, v, dropout_p, scale)
    else:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)


# Leaves for torch.fx: their arguments' shapes and devices steer them, and they run the fused kernels.
for _leaf in ("image_token_grids", "split_norm_project", "linear_attention", "residual_norm", "restructurize_split",
              "attention", "attend", "sdpa"):
    torch.fx.wrap(_leaf)


class _FusedSoftSplit:
    """Mixin of the fused T2T layers: they start from the previous stage's output (an NCHW image or
    (B, H*W, C) tokens) and apply soft split + ``norm1`` + the input projection as one recomputable unit."""

    backend = None

    def recompute(self):
        """Recompute the unfolded rows in backward (training with grad) instead of keeping them; not under
        ``torch.func`` transforms, which do not take the saved-tensor hooks of recomputation."""
        if torch.jit.is_scripting():  # TorchScript runs the references, which need no recomputation
            return False
        else:
            return self.training and torch.is_grad_enabled() and not transform_active()


class TokenPerformer(_FusedSoftSplit, layers.TokenPerformer):
    """Performer T2T layer: fused soft split + LN -> kqv -> FAVOR+ on strided k/q/v -> proj + v-skip and LN -> MLP."""

    def forward(self, x, split: Tuple[int, int, int], grid_size: Optional[Tuple[int, int]] = None):
        """``x``: the stage input, ``split``: its (kernel, stride, padding), ``grid_size``: its token grid when
        ``x`` holds tokens (None for an image)."""
        kqv = split_norm_project(x, split, grid_size, self.norm1.weight, self.norm1.bias, self.norm1.eps,
                                 self.kqv.weight, self.kqv.bias, self.backend, self.recompute())
        k, q, v = kqv.split(self.emb, dim=-1)
        y = linear_attention(k, q, v, self.w, self.eps, self.backend)
        y, normed = residual_norm(v, self.dp(self.proj(y)), self.norm2.weight, self.norm2.bias, self.norm2.eps,
                                  self.backend)
        return y + self.mlp(normed)


class TokenTransformer(_FusedSoftSplit, layers.TokenTransformer):
    """Transformer T2T layer: fused soft split + LN -> qkv -> SDPA (one head) -> proj + v-skip and LN -> MLP."""

    def forward(self, x, split: Tuple[int, int, int], grid_size: Optional[Tuple[int, int]] = None):
        """Arguments as :meth:`TokenPerformer.forward`."""
        qkv = split_norm_project(x, split, grid_size, self.norm1.weight, self.norm1.bias, self.norm1.eps,
                                 self.attn.qkv.weight, self.attn.qkv.bias, self.backend, self.recompute())
        q, k, v = qkv.split(self.attn.in_dim, dim=-1)
        y = sdpa(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), self.attn.attn_drop.p if self.training else 0.0,
                 self.attn.scale).squeeze(1)
        y, normed = residual_norm(v, self.attn.proj_drop(self.attn.proj(y)), self.norm2.weight, self.norm2.bias,
                                  self.norm2.eps, self.backend)
        return y + self.mlp(normed)


class T2TModule(layers.T2TModule):
    """Tokens-to-Token: fused (soft split + LN) T2T layers on token layout, then re-structurize + unfold
    + ``project``."""

    token_layers = {"performer": TokenPerformer, "transformer": TokenTransformer}
    backend = None

    def forward(self, x):
        return self.fused_forward(x)

    def fused_forward(self, x):
        """The forward, by a name subclasses can call under TorchScript (which has no ``super()``)."""
        grids = image_token_grids(x, self.splits)
        x = self.attention1(x, self.splits[0])                      # image -> (B, H1*W1, token_dim)
        x = self.attention2(x, self.splits[1], grids[0])            # tokens -> (B, H2*W2, token_dim)
        return self.project(restructurize_split(x, grids[1], self.splits[2], self.backend))


class Attention(layers.Attention):
    """Multi-head self-attention through :func:`attention`."""

    def forward(self, x):
        dropout_p = self.attn_drop.p if self.training else 0.0
        return self.proj_drop(self.output(attention(self.qkv(x), self.num_heads, dropout_p, self.scale)))


class T2TViT(reference.T2TViT):
    """T2T-ViT with fused kernels. Arguments as the official ``T2T_ViT`` (see
    :class:`t2t_fast.reference.T2TViT`) plus:

    * ``img_size`` may be an int or (H, W); any size for which the three soft splits are defined.
    * ``dynamic_img_size=True`` accepts other input sizes too (the sinusoid table is built for the grid).
    * ``backend``: ``'auto'`` (default), ``'triton'``, ``'cuda'``, ``'cpp'`` or ``'torch'`` (see
      :mod:`t2t_fast.backend`); also settable later with :meth:`set_backend`.
    """

    t2t_module = T2TModule
    attn_layer = Attention

    def __init__(self, *args, backend=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.set_backend(backend)

    def set_backend(self, backend):
        """Select the kernels this model runs (None: ``T2T_FAST_BACKEND`` or auto)."""
        self.backend = check_backend_name(backend)
        for module in self.tokens_to_token.modules():
            if hasattr(module, "backend"):
                module.backend = self.backend
        return self
