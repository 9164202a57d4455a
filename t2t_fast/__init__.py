"""t2t_fast: the fastest correct implementation of T2T-ViT."""
__version__ = "0.1.0"
