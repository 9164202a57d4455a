"""What the benchmarks time: the providers (eager reference, torch.compile of it, the fused model) of a
T2T-ViT or timm model, their MACs, fresh random inputs, and the inference / training steps."""
import contextlib

import torch
import torch.nn.functional as F

from t2t_fast.bench.timing import is_cuda

# MACs (multiply-accumulates of every matmul/bmm/addmm) of one 224x224 forward, counted with
# torch.utils.flop_counter on the official models (tests/data/official_state_dicts.json, macs_224).
MACS_224 = {
    "t2t_vit_14": 4_783_468_544,
    "t2t_vit_t_14": 6_088_721_920,
    "t2t_vit_24": 13_661_874_688,
}
# the same count for the tokens_to_token module alone (macs_breakdown of the same file)
T2T_MODULE_MACS_224 = {
    "t2t_vit_14": 298_973_696,
    "t2t_vit_t_14": 1_604_227_072,
    "t2t_vit_24": 313_424_384,
}
PROVIDERS = ("reference", "compiled", "fused")
TIMM_MODELS = ("deit_small_patch16_224", "resnet50")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "float32": torch.float32,
          "bfloat16": torch.bfloat16, "float16": torch.float16}
MODES = ("infer", "train")
NUM_INPUT_SETS = 3


def is_t2t(name):
    import t2t_fast

    return name in t2t_fast.list_models()


def count_macs(model, example):
    """MACs of one forward of ``model`` on ``example`` per sample (torch.utils.flop_counter FLOPs / 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    training = model.training
    model.eval()
    try:
        with torch.no_grad(), counter:
            model(example)
    finally:
        model.train(training)
    return counter.get_total_flops() // 2 // example.shape[0]


def model_macs(name, model, img_size, device, part="model"):
    """MACs per image of the model (or of its ``tokens_to_token`` module): the recorded figure for a 224 px
    T2T-ViT, else counted on one image now."""
    recorded = MACS_224 if part == "model" else T2T_MODULE_MACS_224
    if img_size == 224 and name in recorded:
        return recorded[name]
    module = model if part == "model" else model.tokens_to_token
    return count_macs(module, torch.randn(1, 3, img_size, img_size, device=device))


def build_reference(name, img_size, device):
    """The eager reference for ``name`` (a T2T-ViT variant or a timm model), in eval mode, seeded."""
    torch.manual_seed(0)
    if is_t2t(name):
        import t2t_fast.reference

        model = t2t_fast.reference.create_model(name, img_size=img_size)
    else:
        try:
            import timm
        except Exception as exc:  # a broken timm install (torch/torchvision mismatch) is as good as none
            raise RuntimeError(f"{name} needs timm, which cannot be imported here ({exc})") from None
        # ViTs take img_size; convnets (resnet50) take any size and reject the argument
        model = timm.create_model(name, pretrained=False, **({} if img_size == 224 else {"img_size": img_size}))
    return model.to(device).eval()


def build_fused(name, reference, img_size, device, backend=None):
    """The fast model for ``name`` with the reference's weights (strict state_dict load)."""
    if not is_t2t(name):
        raise ValueError(f"the fused provider exists for T2T-ViT models only, not {name}")
    import t2t_fast

    model = t2t_fast.create_model(name, img_size=img_size, backend=backend)
    model.load_state_dict(reference.state_dict())
    return model.to(device).eval()


def build_provider(provider, name, reference, img_size, device, backend=None, part="model"):
    """The module ``provider`` times: the whole model, or with ``part='tokens_to_token'`` its T2T module
    (for ``compiled``, the reference's T2T module compiled on its own)."""
    if part == "tokens_to_token":
        if provider == "compiled":
            return torch.compile(reference.tokens_to_token)
        return build_provider(provider, name, reference, img_size, device, backend).tokens_to_token
    if part != "model":
        raise ValueError(f"part must be 'model' or 'tokens_to_token', got {part!r}")
    if provider == "reference":
        return reference
    if provider == "compiled":
        return torch.compile(reference)
    if provider == "fused":
        return build_fused(name, reference, img_size, device, backend)
    raise ValueError(f"unknown provider {provider!r}; expected one of {', '.join(PROVIDERS)}")


def autocast(device, dtype):
    """``torch.autocast`` at ``dtype`` for bf16/fp16 runs; a no-op for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def inference_step(model, device, dtype):
    """A callable ``step(images)``: one eval-mode forward under ``torch.inference_mode`` (and autocast)."""
    def step(images):
        model.eval()
        with torch.inference_mode(), autocast(device, dtype):
            return model(images)
    return step


def optimized_inference_step(model, dtype):
    """A callable ``step(images)``: ``model`` as :func:`t2t_fast.optimize_for_inference` converts it to ``dtype``
    (low-precision weights, no autocast) on fp32 images."""
    from t2t_fast.inference import optimize_for_inference

    return optimize_for_inference(model, dtype)


def training_step(model, device, dtype, optimizer=None):
    """A callable ``step(images, labels)``: train-mode forward, loss (cross-entropy on logits; the mean square
    of any other output, e.g. the T2T module's tokens), backward, and an optimizer step when ``optimizer`` is
    given (gradients are dropped, not zeroed, so every step allocates them afresh)."""
    def step(images, labels):
        model.train()
        with autocast(device, dtype):
            out = model(images).float()
            loss = F.cross_entropy(out, labels) if out.ndim == 2 else out.square().mean()
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            model.zero_grad(set_to_none=True)
        return loss
    return step


def make_inputs(mode, batch, img_size, device, num_classes=1000, count=NUM_INPUT_SETS):
    """``count`` argument tuples of fresh random data: (images,) or (images, labels)."""
    sets = []
    for _ in range(count):
        images = torch.randn(batch, 3, img_size, img_size, device=device)
        if mode == "train":
            sets.append((images, torch.randint(0, num_classes, (batch,), device=device)))
        else:
            sets.append((images,))
    return sets


def step_memory(step, args, device):
    """Bytes a step needs on top of what is allocated before it (CUDA peak), or None off CUDA."""
    if not is_cuda(device):
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step(*args)
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before
