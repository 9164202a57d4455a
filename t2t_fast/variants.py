"""Fast experimental T2T-ViT families: squeeze-excite, dense and ghost backbones.

Each subclasses its :mod:`t2t_fast.reference.variants` twin (constructor, module tree, state_dict) and the
fast :class:`~t2t_fast.model.T2TViT` (fused T2T module, backends); only the attention and the ghost MLP have
forwards of their own here. Attention runs through :func:`t2t_fast.model.attention`. Ghost layers fold their
per-channel "cheap operations" into the projections: q/k/v come from one GEMM with the weight
``[Wq; s_q*Wq; Wk; s_k*Wk; Wv; s_v*Wv]`` (rebuilt each call, so gradients reach both parameters), and the
ghost MLP scales its hidden map with one broadcast multiply instead of two depthwise convolutions.
"""
from typing import Optional

import torch
import torch.fx
import torch.nn.functional as F

from t2t_fast.model import Attention, T2TViT, attention
from t2t_fast.reference import variants as reference

torch.fx.wrap("attention")  # a leaf for torch.fx, as in t2t_fast.model


class SEAttention(Attention, reference.SEAttention):
    """Fused attention whose ``proj`` output is gated by ``se_layer`` (the reference's ``output``)."""


class T2TViTSE(T2TViT, reference.T2TViTSE):
    """Fast T2T-ViT-SE (``t2t_vit_14_se``); see :class:`t2t_fast.reference.T2TViTSE`."""

    attn_layer = SEAttention


class T2TViTDense(T2TViT, reference.T2TViTDense):
    """Fast T2T-ViT-Dense (``t2t_vit_dense``): the reference's dense blocks around the fused attention; see
    :class:`t2t_fast.reference.T2TViTDense`."""


class GhostAttention(reference.GhostAttention):
    """Ghost attention with q/k/v (each ``[p, s*p]`` of a half-width projection p) from one fused GEMM."""

    def fused_qkv_weight(self):
        """The (3D, D) weight of the q|k|v projection including the ghost halves."""
        return torch.cat([self.q.weight, self.q.weight * self.cheap_operation_q.weight.view(-1, 1),
                          self.k.weight, self.k.weight * self.cheap_operation_k.weight.view(-1, 1),
                          self.v.weight, self.v.weight * self.cheap_operation_v.weight.view(-1, 1)])

    def fused_qkv_bias(self) -> Optional[torch.Tensor]:
        """The (3D,) bias of that projection (None without ``qkv_bias``)."""
        q_bias, k_bias, v_bias = self.q.bias, self.k.bias, self.v.bias
        if q_bias is None or k_bias is None or v_bias is None:
            return None
        return torch.cat([q_bias, q_bias * self.cheap_operation_q.weight.view(-1),
                          k_bias, k_bias * self.cheap_operation_k.weight.view(-1),
                          v_bias, v_bias * self.cheap_operation_v.weight.view(-1)])

    def forward(self, x):
        qkv = F.linear(x, self.fused_qkv_weight(), self.fused_qkv_bias())
        dropout_p = self.attn_drop.p if self.training else 0.0
        return self.proj_drop(self.proj(attention(qkv, self.num_heads, dropout_p, self.scale)))


class GhostMlp(reference.GhostMlp):
    """Ghost MLP: ``h = GELU(fc1 x)``; hidden ``[h, GELU(s2*h), GELU(s3*h)]`` (one broadcast multiply)."""

    def forward(self, x):
        h = self.act(self.fc1(x))                                                        # (B, T, D)
        scales = torch.stack([self.cheap_operation2.weight.view(-1), self.cheap_operation3.weight.view(-1)])
        ghosts = self.act(h.unsqueeze(-2) * scales.to(h.dtype))                          # (B, T, 2, D)
        hidden = self.drop(torch.cat([h, ghosts.flatten(-2)], dim=-1))                  # (B, T, 3D)
        return self.drop(self.fc2(hidden))


class T2TViTGhost(T2TViT, reference.T2TViTGhost):
    """Fast T2T-ViT-Ghost (``t2t_vit_16_ghost``); see :class:`t2t_fast.reference.T2TViTGhost`."""

    attn_layer = GhostAttention
    mlp_layer = GhostMlp
