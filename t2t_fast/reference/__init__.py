"""Pure-PyTorch eager T2T-ViT: the oracle for every fused path (it imports nothing of the fast model or the
kernels, and its forwards are its own)."""
from t2t_fast import registry
from t2t_fast.reference.layers import Block, T2TModule, TokenPerformer, TokenTransformer
from t2t_fast.reference.model import T2TViT
from t2t_fast.reference.variants import T2TViTDense, T2TViTGhost, T2TViTSE

MODEL_CLASSES = {"base": T2TViT, "se": T2TViTSE, "dense": T2TViTDense, "ghost": T2TViTGhost}


def create_model(name, pretrained=False, checkpoint_path=None, **kwargs):
    """Build reference variant ``name`` (see :func:`list_models`)."""
    return registry.build_model(MODEL_CLASSES, name, pretrained=pretrained, checkpoint_path=checkpoint_path,
                                **kwargs)


list_models = registry.list_models

__all__ = ["T2TViT", "T2TViTSE", "T2TViTDense", "T2TViTGhost", "T2TModule", "TokenPerformer",
           "TokenTransformer", "Block", "create_model", "list_models",
           *registry.register_factories(globals(), MODEL_CLASSES, __name__)]
