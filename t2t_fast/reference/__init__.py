"""Pure-PyTorch eager T2T-ViT: the oracle for every fused path (shares no forward code with them)."""
from t2t_fast import _config, _factory
from t2t_fast.reference.model import Block, T2TModule, T2TViT, TokenPerformer, TokenTransformer
from t2t_fast.reference.variants import T2TViTDense, T2TViTGhost, T2TViTSE

MODEL_CLASSES = {"base": T2TViT, "se": T2TViTSE, "dense": T2TViTDense, "ghost": T2TViTGhost}


def create_model(name, pretrained=False, checkpoint_path=None, **kwargs):
    """Build reference variant ``name`` (see :func:`list_models`)."""
    return _factory.build_model(MODEL_CLASSES, name, pretrained=pretrained, checkpoint_path=checkpoint_path,
                                **kwargs)


list_models = _factory.list_models

for _name in _config.VARIANTS:
    globals()[_name] = _factory.make_factory(MODEL_CLASSES, _name, __name__)

__all__ = ["T2TViT", "T2TViTSE", "T2TViTDense", "T2TViTGhost", "T2TModule", "TokenPerformer",
           "TokenTransformer", "Block", "create_model", "list_models", *_config.VARIANTS]
