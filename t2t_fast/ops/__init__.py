"""Fused ops of t2t_fast. Each op is a ``torch.library`` custom op (fake + autograd registered) with a
pure-torch ``<op>_ref`` twin that defines the numbers it must reproduce."""
