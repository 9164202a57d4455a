"""t2t_fast: the fastest correct implementation of T2T-ViT (Tokens-to-Token Vision Transformer).

    import t2t_fast
    model = t2t_fast.create_model("t2t_vit_14", checkpoint_path="81.5_T2T_ViT_14.pth.tar")
    model = t2t_fast.t2t_vit_14(num_classes=10, backend="auto")
    fast = t2t_fast.optimize_for_inference(model)    # bf16 weights for inference; fp32 images in, logits out

``t2t_fast.reference`` holds the pure-PyTorch oracle with the same names and weights.
"""
from t2t_fast import reference, registry  # noqa: F401  (reference: the oracle, as t2t_fast.reference)
from t2t_fast.backend import BackendUnavailableError, SettingError
from t2t_fast.checkpoint import CheckpointFileError, CheckpointMismatchError, load_checkpoint
from t2t_fast.inference import InferenceModel, optimize_for_inference
from t2t_fast.model import T2TViT
from t2t_fast.variants import T2TViTDense, T2TViTGhost, T2TViTSE

__version__ = "0.1.0"

MODEL_CLASSES = {"base": T2TViT, "se": T2TViTSE, "dense": T2TViTDense, "ghost": T2TViTGhost}


def create_model(name, pretrained=False, checkpoint_path=None, **kwargs):
    """Build the fast variant ``name`` (see :func:`list_models`).

    ``checkpoint_path`` loads a local checkpoint (any layout :func:`load_checkpoint` accepts);
    ``pretrained=True`` downloads the official weights; other kwargs go to the model constructor
    (``num_classes``, ``img_size``, ``drop_path_rate``, ``backend``, ...)."""
    return registry.build_model(MODEL_CLASSES, name, pretrained=pretrained, checkpoint_path=checkpoint_path,
                                **kwargs)


list_models = registry.list_models

__all__ = ["T2TViT", "T2TViTSE", "T2TViTDense", "T2TViTGhost", "create_model", "list_models", "load_checkpoint",
           "CheckpointMismatchError", "CheckpointFileError", "BackendUnavailableError", "SettingError",
           "optimize_for_inference",
           "InferenceModel",
           *registry.register_factories(globals(), MODEL_CLASSES, __name__)]
