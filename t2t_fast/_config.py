"""Construction-time facts shared by the reference and the fast model: the variant table, the
soft-split geometry, the sinusoid position table and input validation. No forward code lives here."""
import math

import numpy as np
import torch

# (kernel, stride, padding) of the three soft splits of the T2T module.
SOFT_SPLITS = ((7, 4, 2), (3, 2, 1), (3, 2, 1))

DEFAULT_CFG = {
    "input_size": (3, 224, 224),
    "pool_size": None,
    "crop_pct": 0.9,
    "crop_mode": "center",
    "interpolation": "bicubic",
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
    "first_conv": "tokens_to_token.attention1",
    "classifier": "head",
    "num_classes": 1000,
    "fixed_input_size": True,
    "license": "apache-2.0 (code); official weights: Clear BSD",
}

_RELEASES = "https://github.com/yitu-opensource/T2T-ViT/releases/download/main/"

# name -> (model family, constructor kwargs, released checkpoint file or None)
VARIANTS = {
    "t2t_vit_7": ("base", dict(tokens_type="performer", embed_dim=256, depth=7, num_heads=4, mlp_ratio=2.0),
                  "71.7_T2T_ViT_7.pth.tar"),
    "t2t_vit_10": ("base", dict(tokens_type="performer", embed_dim=256, depth=10, num_heads=4, mlp_ratio=2.0),
                   "75.2_T2T_ViT_10.pth.tar"),
    "t2t_vit_12": ("base", dict(tokens_type="performer", embed_dim=256, depth=12, num_heads=4, mlp_ratio=2.0),
                   "76.5_T2T_ViT_12.pth.tar"),
    "t2t_vit_14": ("base", dict(tokens_type="performer", embed_dim=384, depth=14, num_heads=6, mlp_ratio=3.0),
                   "81.5_T2T_ViT_14.pth.tar"),
    "t2t_vit_19": ("base", dict(tokens_type="performer", embed_dim=448, depth=19, num_heads=7, mlp_ratio=3.0),
                   "81.9_T2T_ViT_19.pth.tar"),
    "t2t_vit_24": ("base", dict(tokens_type="performer", embed_dim=512, depth=24, num_heads=8, mlp_ratio=3.0),
                   "82.3_T2T_ViT_24.pth.tar"),
    "t2t_vit_t_14": ("base", dict(tokens_type="transformer", embed_dim=384, depth=14, num_heads=6, mlp_ratio=3.0),
                     "81.7_T2T_ViTt_14.pth.tar"),
    "t2t_vit_t_19": ("base", dict(tokens_type="transformer", embed_dim=448, depth=19, num_heads=7, mlp_ratio=3.0),
                     "82.4_T2T_ViTt_19.pth.tar"),
    "t2t_vit_t_24": ("base", dict(tokens_type="transformer", embed_dim=512, depth=24, num_heads=8, mlp_ratio=3.0),
                     "82.6_T2T_ViTt_24.pth.tar"),
    "t2t_vit_14_resnext": ("base", dict(tokens_type="performer", embed_dim=384, depth=14, num_heads=32,
                                        mlp_ratio=3.0), None),
    "t2t_vit_14_wide": ("base", dict(tokens_type="performer", embed_dim=768, depth=4, num_heads=12, mlp_ratio=3.0),
                        None),
    "t2t_vit_14_se": ("se", dict(tokens_type="performer", embed_dim=384, depth=14, num_heads=6, mlp_ratio=3.0),
                      None),
    "t2t_vit_dense": ("dense", dict(tokens_type="performer", embed_dim=128, depth=(3, 6, 6, 4), num_heads=8,
                                    mlp_ratio=2.0), None),
    "t2t_vit_16_ghost": ("ghost", dict(tokens_type="performer", embed_dim=384, depth=16, num_heads=6,
                                       mlp_ratio=3.0), None),
}


def checkpoint_url(name):
    """Download address of the official ImageNet checkpoint of ``name`` ('' when none was released)."""
    file = VARIANTS[name][2]
    return _RELEASES + file if file else ""


def unknown_model_error(name):
    import difflib

    close = difflib.get_close_matches(str(name), VARIANTS, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return ValueError(f"unknown model {name!r}.{hint} Available: {', '.join(VARIANTS)}")


def to_2tuple(value, what):
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if (isinstance(value, (tuple, list)) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        return tuple(value)
    raise TypeError(f"{what} must be an int or a pair of ints, got {value!r}")


def split_output_size(size, kernel, stride, padding):
    """Output length of one unfold along one axis (0 or less when undefined)."""
    return (size + 2 * padding - kernel) // stride + 1


def token_grids(img_size):
    """Token grids (H, W) after each of the three soft splits for an input of ``img_size`` (H, W).

    Raises ValueError when a soft split is undefined (the image is too small)."""
    grids = []
    h, w = img_size
    for kernel, stride, padding in SOFT_SPLITS:
        h, w = split_output_size(h, kernel, stride, padding), split_output_size(w, kernel, stride, padding)
        if h < 1 or w < 1:
            raise ValueError(f"image size {tuple(img_size)} is too small for the T2T soft splits "
                             f"(kernel {kernel}, stride {stride}, padding {padding} gives an empty grid)")
        grids.append((h, w))
    return grids


def sinusoid_table(num_positions, dim):
    """The fixed sinusoid position table (1, num_positions, dim): angle pos / 10000^(2*floor(j/2)/dim),
    sin on even j, cos on odd j, computed in float64 and returned in float32."""
    pos = np.arange(num_positions, dtype=np.float64)[:, None]
    j = np.arange(dim)
    angles = pos / np.power(10000.0, 2 * (j // 2) / dim)[None, :]
    table = np.where(j % 2 == 0, np.sin(angles), np.cos(angles))
    return torch.from_numpy(table).to(torch.float32).unsqueeze(0)


def check_image(x, in_chans, img_size, dynamic_img_size):
    """Validate a model input: a float tensor (B, in_chans, H, W) with B > 0 and, unless
    ``dynamic_img_size``, (H, W) == img_size. Returns (H, W)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected an image tensor, got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"expected a 4-D image batch (B, C, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"expected a floating-point image, got dtype {x.dtype} (convert and normalise it first)")
    if x.shape[0] == 0:
        raise ValueError("empty batch: the input has batch size 0")
    if x.shape[1] != in_chans:
        raise ValueError(f"the model takes {in_chans} input channels, got {x.shape[1]} (shape {tuple(x.shape)})")
    size = (x.shape[2], x.shape[3])
    if not dynamic_img_size and size != tuple(img_size):
        raise ValueError(f"the model was built for {img_size[0]}x{img_size[1]} images but got {size[0]}x{size[1]}; "
                         f"build it with img_size={size} or dynamic_img_size=True")
    token_grids(size)
    return size


def check_model_args(embed_dim, depth, num_heads, tokens_type, mlp_ratio, token_dim):
    if tokens_type not in ("performer", "transformer"):
        raise ValueError(f"tokens_type must be 'performer' or 'transformer', got {tokens_type!r}"
                         + (" (the official 'convolution' option never worked upstream)"
                            if tokens_type == "convolution" else ""))
    if embed_dim % num_heads:
        raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
    if token_dim < 1 or mlp_ratio <= 0:
        raise ValueError(f"token_dim must be >= 1 and mlp_ratio > 0, got {token_dim} and {mlp_ratio}")
    del depth


def performer_features(token_dim, kernel_ratio=0.5):
    """Number of random features m of the performer layers."""
    return int(token_dim * kernel_ratio)


def performer_projection(m, emb):
    """The frozen random matrix w (m, emb): orthogonal rows scaled to norm sqrt(m) (consumes RNG)."""
    w = torch.randn(m, emb)
    return torch.nn.init.orthogonal_(w) * math.sqrt(m)


# --- experimental families (upstream models/t2t_vit_{se,dense,ghost}.py) --------------------------------
SE_REDUCTION = 16          # squeeze-excite bottleneck: width // 16
DENSE_RATE_TABLE_LEN = 12  # upstream spreads dense drop-path rates over its (otherwise unused) default depth 12


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


def dense_drop_path_rates(drop_path_rate, num_stages):
    """Drop-path rate of each dense stage: entry ``stage`` of ``linspace(0, rate, 12)`` (upstream indexes its
    per-depth table by the stage, so every block of a stage shares one small rate)."""
    return torch.linspace(0, drop_path_rate, DENSE_RATE_TABLE_LEN).tolist()[:num_stages]


def check_ghost_args(embed_dim, mlp_ratio):
    """The ghost family halves q/k/v (embed_dim must be even) and its MLP concatenates exactly three
    embed_dim-wide maps (the hidden width must be 3 * embed_dim)."""
    if embed_dim % 2:
        raise ValueError(f"the ghost family needs an even embed_dim, got {embed_dim}")
    if int(embed_dim * mlp_ratio) != 3 * embed_dim:
        raise ValueError(f"the ghost MLP only supports mlp_ratio=3 (hidden width 3 * embed_dim), "
                         f"got mlp_ratio={mlp_ratio}")
