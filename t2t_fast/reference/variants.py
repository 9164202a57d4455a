"""Reference (eager) experimental T2T-ViT families: squeeze-excite, dense and ghost backbones.

Each is the reference :class:`T2TViT` with another backbone: SE and ghost swap the block's attention / MLP
layers (``attn_layer``, ``mlp_layer``), dense overrides ``make_blocks``; the T2T module, cls token, sinusoid
table, final norm and head are unchanged. They behave like the upstream ablation models
(``models/t2t_vit_{se,dense,ghost}.py``), minus their prints and the dense ``reset_classifier`` bug (ours
builds the head at ``num_features``). Module names follow the official state_dicts.
"""
import torch
import torch.nn as nn

from t2t_fast.reference.layers import Attention, Block
from t2t_fast.reference.model import T2TViT, drop_path_rates

SE_REDUCTION = 16          # squeeze-excite bottleneck: width // 16
DENSE_RATE_TABLE_LEN = 12  # upstream spreads dense drop-path rates over its (otherwise unused) default depth 12


# ----------------------------------------------------------------------------------------------- SE
class SqueezeExcite(nn.Module):
    """Channel gate computed from the token mean: ``x * sigmoid(W2 relu(W1 mean_t(x)))`` (no biases,
    bottleneck ``dim // 16``). The mean runs over every token, the cls token included."""

    def __init__(self, dim, reduction=SE_REDUCTION):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(dim, dim // reduction, bias=False), nn.ReLU(),
                                nn.Linear(dim // reduction, dim, bias=False), nn.Sigmoid())

    def forward(self, x):                      # (B, T, C)
        gate = self.fc(x.mean(dim=1))          # (B, C)
        return x * gate.unsqueeze(1)


class SEAttention(Attention):
    """Backbone attention whose projected output passes a :class:`SqueezeExcite` gate before ``proj_drop``."""

    def __init__(self, dim, num_heads, qkv_bias=False, qk_scale=None, attn_drop=0.0, proj_drop=0.0):
        super().__init__(dim, num_heads, qkv_bias, qk_scale, attn_drop, proj_drop)
        self.se_layer = SqueezeExcite(dim)

    def output(self, mixed):
        return self.se_layer(self.proj(mixed))


class T2TViTSE(T2TViT):
    """T2T-ViT-SE (``t2t_vit_14_se``): every backbone block is the standard pre-norm block except that
    its attention output, after ``proj``, is rescaled per channel by a squeeze-excite gate
    (``attn.se_layer``: mean over all tokens -> Linear(D, D/16) -> ReLU -> Linear(D/16, D) -> sigmoid).
    Drop-path rates follow the usual ``linspace(0, drop_path_rate, depth)``."""

    attn_layer = SEAttention


# -------------------------------------------------------------------------------------------- dense
class DenseBlock(Block):
    """A pre-norm block at width w followed by ``dense_linear`` (w -> growth); its output is the input
    with those ``growth`` new channels appended: (B, T, w) -> (B, T, w + growth)."""

    def __init__(self, dim, growth_rate, num_heads, mlp_ratio, qkv_bias=False, qk_scale=None, drop=0.0,
                 attn_drop=0.0, drop_path=0.0, attn_layer=Attention):
        super().__init__(dim, num_heads, mlp_ratio, qkv_bias, qk_scale, drop, attn_drop, drop_path, attn_layer)
        self.dense_linear = nn.Linear(dim, growth_rate)

    def forward(self, x):
        return torch.cat([x, self.dense_linear(self.update(x))], dim=-1)


class Transition(nn.Module):
    """Between dense stages: ``GELU(linear(x))`` halving the width."""

    def __init__(self, in_features, out_features):
        super().__init__()
        self.act = nn.GELU()
        self.linear = nn.Linear(in_features, out_features)

    def forward(self, x):
        return self.act(self.linear(x))


def dense_layout(embed_dim, stages, growth_rate, num_heads):
    """Backbone plan of the dense family: a list of ``(kind, stage, in_width, out_width)`` with kind
    ``"block"`` (appends ``growth_rate`` channels) or ``"transition"`` (halves the width, floor, between
    stages), stage s holding ``stages[s]`` blocks; and the final width."""
    if (not isinstance(stages, (tuple, list)) or not stages
            or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in stages)):
        raise TypeError(f"the dense family takes depth as a tuple of per-stage block counts, e.g. (3, 6, 6, 4); "
                        f"got {stages!r}")
    if len(stages) > DENSE_RATE_TABLE_LEN:
        raise ValueError(f"the dense family supports at most {DENSE_RATE_TABLE_LEN} stages, got {len(stages)}")
    if growth_rate < 1:
        raise ValueError(f"growth_rate must be >= 1, got {growth_rate}")
    plan, width = [], embed_dim
    for stage, num_blocks in enumerate(stages):
        for _ in range(num_blocks):
            if width % num_heads:
                raise ValueError(f"dense block width {width} is not divisible by num_heads {num_heads}")
            plan.append(("block", stage, width, width + growth_rate))
            width += growth_rate
        if stage != len(stages) - 1:
            plan.append(("transition", stage, width, width // 2))
            width //= 2
    return plan, width


class T2TViTDense(T2TViT):
    """T2T-ViT-Dense (``t2t_vit_dense``): a DenseNet-style backbone. ``depth`` is a tuple of per-stage
    block counts, e.g. (3, 6, 6, 4). Each :class:`DenseBlock` appends ``growth_rate`` (64) channels to its
    input; between stages a :class:`Transition` halves the width. ``self.blocks`` holds blocks and
    transitions in order (19 + 3 for the default), and the width grows 128 -> 320 | 160 -> 544 | 272 -> 656
    | 328 -> 584 = ``num_features``. Every block keeps ``num_heads`` heads, so head width and attention scale
    (``head_dim^-0.5``) change from block to block.

    Drop-path, as upstream: all blocks of stage s share the rate ``linspace(0, drop_path_rate, 12)[s]``
    (a per-depth table indexed by the *stage*; 12 is upstream's unused default depth)."""

    def __init__(self, *args, growth_rate=64, **kwargs):
        self.growth_rate = growth_rate  # read by make_blocks during T2TViT.__init__
        super().__init__(*args, **kwargs)

    def make_blocks(self, embed_dim, depth, num_heads, mlp_ratio, qkv_bias, qk_scale, drop_rate, attn_drop_rate,
                    drop_path_rate):
        plan, width = dense_layout(embed_dim, depth, self.growth_rate, num_heads)
        rates = drop_path_rates(drop_path_rate, DENSE_RATE_TABLE_LEN)
        blocks = nn.ModuleList()
        for kind, stage, in_width, out_width in plan:
            if kind == "block":
                blocks.append(DenseBlock(in_width, out_width - in_width, num_heads, mlp_ratio, qkv_bias, qk_scale,
                                         drop_rate, attn_drop_rate, rates[stage], attn_layer=self.attn_layer))
            else:
                blocks.append(Transition(in_width, out_width))
        return blocks, width

    def block_output_widths(self):
        return [block.linear.out_features if isinstance(block, Transition)
                else block.dense_linear.in_features + block.dense_linear.out_features for block in self.blocks]


# -------------------------------------------------------------------------------------------- ghost
def _depthwise_1x1(channels):
    """A per-channel scale applied to every token, as a 1x1 depthwise Conv1d (the official parameter)."""
    return nn.Conv1d(channels, channels, kernel_size=1, groups=channels, bias=False)


class GhostAttention(nn.Module):
    """Softmax attention whose q, k and v are each built from a half-width projection p (``q``/``k``/``v``,
    D -> D/2) and its "ghost" ``s * p`` (``cheap_operation_*``: a learned per-channel scale applied to every
    token), concatenated as ``[p, s * p]`` (D wide) before the split into heads."""

    def __init__(self, dim, num_heads, qkv_bias=False, qk_scale=None, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        half = dim // 2
        self.q = nn.Linear(dim, half, bias=qkv_bias)
        self.k = nn.Linear(dim, half, bias=qkv_bias)
        self.v = nn.Linear(dim, half, bias=qkv_bias)
        self.cheap_operation_q = _depthwise_1x1(half)
        self.cheap_operation_k = _depthwise_1x1(half)
        self.cheap_operation_v = _depthwise_1x1(half)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _heads(self, primary, cheap):
        """(B, T, D/2) -> [primary, cheap(primary)] split into heads (B, H, T, D/H)."""
        batch, tokens, _ = primary.shape
        ghost = cheap(primary.transpose(1, 2)).transpose(1, 2)
        full = torch.cat([primary, ghost], dim=-1)
        return full.reshape(batch, tokens, self.num_heads, -1).transpose(1, 2)

    def forward(self, x):
        batch, tokens, dim = x.shape
        q = self._heads(self.q(x), self.cheap_operation_q)
        k = self._heads(self.k(x), self.cheap_operation_k)
        v = self._heads(self.v(x), self.cheap_operation_v)
        attn = self.attn_drop(((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1))
        mixed = (attn @ v).transpose(1, 2).reshape(batch, tokens, dim)
        return self.proj_drop(self.proj(mixed))


class GhostMlp(nn.Module):
    """MLP whose hidden layer is ``[h, GELU(s2 * h), GELU(s3 * h)]`` with ``h = GELU(fc1 x)`` (D wide) and
    s2, s3 learned per-channel scales (``cheap_operation2/3``, applied to every token); ``fc2`` maps the
    3D-wide concatenation back to D. Only a hidden width of exactly 3D is defined."""

    def __init__(self, dim, hidden_features, drop=0.0):
        super().__init__()
        if hidden_features != 3 * dim:
            raise ValueError(f"the ghost MLP needs hidden_features == 3 * dim (mlp_ratio=3), got {hidden_features} "
                             f"for dim {dim}")
        self.fc1 = nn.Linear(dim, dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, dim)
        self.drop = nn.Dropout(drop)
        self.cheap_operation2 = _depthwise_1x1(dim)
        self.cheap_operation3 = _depthwise_1x1(dim)

    def forward(self, x):
        primary = self.act(self.fc1(x))                                        # (B, T, D)
        channels_first = primary.transpose(1, 2)                               # (B, D, T)
        ghosts = [self.act(op(channels_first).transpose(1, 2)) for op in (self.cheap_operation2,
                                                                          self.cheap_operation3)]
        hidden = self.drop(torch.cat([primary, *ghosts], dim=-1))             # (B, T, 3D)
        return self.drop(self.fc2(hidden))


class T2TViTGhost(T2TViT):
    """T2T-ViT-Ghost (``t2t_vit_16_ghost``): pre-norm blocks with :class:`GhostAttention` (half-width q/k/v
    projections completed by per-channel-scaled copies) and :class:`GhostMlp` (D -> D projection completed
    by two scaled, GELU'd copies to the 3D hidden width). Requires ``mlp_ratio=3`` and an even
    ``embed_dim`` (ValueError otherwise). Drop-path rates: ``linspace(0, drop_path_rate, depth)``."""

    attn_layer = GhostAttention
    mlp_layer = GhostMlp

    def make_blocks(self, embed_dim, depth, num_heads, mlp_ratio, qkv_bias, qk_scale, drop_rate, attn_drop_rate,
                    drop_path_rate):
        # the ghost layers halve q/k/v and concatenate exactly three embed_dim-wide maps in the MLP
        if embed_dim % 2:
            raise ValueError(f"the ghost family needs an even embed_dim, got {embed_dim}")
        if int(embed_dim * mlp_ratio) != 3 * embed_dim:
            raise ValueError(f"the ghost MLP only supports mlp_ratio=3 (hidden width 3 * embed_dim), "
                             f"got mlp_ratio={mlp_ratio}")
        return super().make_blocks(embed_dim, depth, num_heads, mlp_ratio, qkv_bias, qk_scale, drop_rate,
                                   attn_drop_rate, drop_path_rate)
