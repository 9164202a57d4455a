"""Test utilities: dtype-aware tolerances and error measures used by t2t_fast's own tests, and the check of a
model against the official state_dict record."""
import torch

from t2t_fast.ops._common import poison_outputs  # noqa: F401  (re-exported for tests)

# max-abs error over max-abs of the expected value, for kernels that only reorder fp32 arithmetic.
RELATIVE_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def relative_error(actual, expected):
    """max|actual - expected| / max|expected| in float64 (0 when both are all zero)."""
    actual = actual.detach().to(torch.float64)
    expected = expected.detach().to(torch.float64)
    scale = expected.abs().max().item()
    diff = (actual - expected).abs().max().item()
    if scale == 0.0:
        return diff
    return diff / scale


def assert_relative_close(actual, expected, rtol, what="output"):
    """Assert shapes match, nothing is NaN/inf where expected is finite, and the relative error is <= rtol."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    finite = torch.isfinite(expected)
    bad = ~torch.isfinite(actual) & finite
    assert not bad.any(), f"{what}: {int(bad.sum())} non-finite values where the expected value is finite"
    err = relative_error(actual, expected)
    assert err <= rtol, f"{what}: relative error {err:.3e} > {rtol:.1e}"


def assert_within_reference_error(actual, reference_lowp, exact, factor=2.0, floor=1e-6, what="output"):
    """Low-precision check: ``actual``'s error against the float64 ``exact`` answer must be at most
    ``factor`` times the error of the reference computed at the same low precision (plus a tiny floor
    for the case where the reference happens to be almost exact)."""
    ours = relative_error(actual, exact)
    theirs = relative_error(reference_lowp, exact)
    assert torch.isfinite(actual.detach().float()).all(), f"{what}: non-finite values"
    assert ours <= factor * theirs + floor, (
        f"{what}: error vs float64 {ours:.3e} > {factor} x reference error {theirs:.3e} (+{floor:g})")


def assert_official_layout(model, expected):
    """Assert ``model``'s state_dict (keys, order, shapes, dtypes) and parameter counts (all, trainable) are those
    of ``expected``, a model's entry of tests/data/official_state_dicts.json."""
    ours = [[key, list(value.shape), str(value.dtype).replace("torch.", "")]
            for key, value in model.state_dict().items()]
    assert ours == expected["state_dict"]
    assert sum(p.numel() for p in model.parameters()) == expected["params"]
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected["trainable_params"]
