"""Fused ops of t2t_fast. Each op is a ``torch.library`` custom op (fake + autograd registered) with a
pure-torch ``<op>_ref`` twin that defines the numbers it must reproduce."""
from t2t_fast.ops.soft_split_layernorm import soft_split_layernorm, soft_split_layernorm_ref  # noqa: F401
from t2t_fast.ops.favor_attention import favor_attention, favor_attention_ref  # noqa: F401
from t2t_fast.ops.restructurize_unfold import restructurize_unfold, restructurize_unfold_ref  # noqa: F401
from t2t_fast.ops.multihead_attention import multihead_attention, multihead_attention_ref  # noqa: F401
from t2t_fast.ops.multihead_attention import cpp_unsupported as multihead_attention_cpp_unsupported  # noqa: F401
from t2t_fast.ops.add_layernorm import add_layernorm, add_layernorm_ref  # noqa: F401
from t2t_fast.ops.packed_linear import packed_linear, packed_linear_ref  # noqa: F401
from t2t_fast.ops.packed_linear import cpp_unsupported as packed_linear_cpp_unsupported  # noqa: F401
