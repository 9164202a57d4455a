"""Test utilities: dtype-aware tolerances and error measures used by t2t_fast's own tests, and the check of a
model against the official state_dict record."""
import torch

from t2t_fast._native import native_avx512_bf16, native_cpu_isas
from t2t_fast.bench.timing import cpu_threads
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


def results_at_thread_counts(fn, counts=(1, 2)):
    """``fn()`` once at each of torch's thread ``counts`` (the count restored afterwards): the results in order,
    for tests that a kernel's output does not depend on how its work is split across threads."""
    results = []
    for count in counts:
        with cpu_threads(count):
            results.append(fn())
    return results


def packed_kernels_missing(dtype, isa="avx512"):
    """Why this CPU runs no packed-weight kernel (linear, encoder) in ``dtype`` with the CPU kernels' ``isa``
    (``'avx512'`` or ``'amx'``), or None: both need that instruction set, bfloat16 AVX512-BF16 too."""
    if isa not in native_cpu_isas():
        return f"needs a CPU with {'AMX tiles' if isa == 'amx' else 'AVX-512'}"
    if dtype == torch.bfloat16 and not native_avx512_bf16():
        return "needs a CPU with AVX512-BF16"
    return None


def needs_packed_kernels(dtype, isa="avx512"):
    """A pytest mark that skips a test on a CPU without the packed-weight kernels in ``dtype`` with ``isa``
    (:func:`packed_kernels_missing`)."""
    import pytest

    missing = packed_kernels_missing(dtype, isa)
    return pytest.mark.skipif(missing is not None, reason=str(missing))


def with_packed_kernels(*dtypes):
    """``dtypes`` as pytest parameters, each skipped on a CPU without the instructions of the packed-weight
    kernels in that dtype (:func:`needs_packed_kernels`)."""
    import pytest

    return [pytest.param(dtype, marks=needs_packed_kernels(dtype)) for dtype in dtypes]


def frozen_buffer_count(model):
    """Elements of the frozen tensors the official models keep as parameters: ``pos_embed`` and every
    performer ``w`` (persistent buffers here)."""
    return sum(b.numel() for name, b in model.named_buffers() if name == "pos_embed" or name.endswith(".w"))


def assert_official_layout(model, expected):
    """Assert ``model``'s state_dict (keys, order, shapes, dtypes) and parameter counts are those of ``expected``,
    a model's entry of tests/data/official_state_dicts.json: the official count includes the frozen pos_embed
    and w (buffers here), and every parameter here is trainable."""
    ours = [[key, list(value.shape), str(value.dtype).replace("torch.", "")]
            for key, value in model.state_dict().items()]
    assert ours == expected["state_dict"]
    parameters = sum(p.numel() for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())
    assert parameters == expected["trainable_params"]
    assert parameters + frozen_buffer_count(model) == expected["params"]


_CALL_LOOP = """
for line in sys.stdin:
    name, call = line.rstrip("\\n").split("\\t")
    try:
        eval(call)
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # a kernel's asynchronous error belongs to its call
        outcome = "returned\\t"
    except Exception as exc:
        outcome = type(exc).__name__ + "\\t" + " ".join(str(exc).split())
    print(name + "\\t" + outcome, flush=True)
"""


def run_calls_in_subprocess(setup, calls, cwd, timeout=600):
    """Evaluate ``calls`` (name -> Python expression) one after the other in one fresh Python process, after
    ``setup`` (code run once; ``sys`` and ``torch`` are imported). Returns ``(outcomes, completed process)`` with
    ``outcomes[name] = (exception type name, or 'returned', message)``: a name missing from it crashed the
    process, whose output is then in ``completed process.stderr``."""
    import subprocess
    import sys

    script = "import sys\nimport torch\n" + setup + _CALL_LOOP
    run = subprocess.run([sys.executable, "-c", script], input="".join(f"{n}\t{c}\n" for n, c in calls.items()),
                         capture_output=True, text=True, cwd=cwd, timeout=timeout)
    outcomes = {}
    for line in run.stdout.splitlines():
        name, kind, message = line.split("\t", 2)
        outcomes[name] = (kind, message)
    return outcomes, run


def assert_call_raised(outcomes, run, name, kind, match):
    """Assert call ``name`` of :func:`run_calls_in_subprocess` raised ``kind`` (a type name) with a message
    matching the regex ``match`` (and did not crash the process or return)."""
    import re

    assert name in outcomes, f"the process died (exit status {run.returncode}): {run.stderr[-3000:]}"
    assert outcomes[name][0] == kind, outcomes[name]
    assert re.search(match, outcomes[name][1]), outcomes[name]


GEOMETRY_CHANGES = ("shape", "dims", "grid", "window")


def change_split_geometry(draw, change, shape, grid, window, largest):
    """One hypothesis-drawn change (one of :data:`GEOMETRY_CHANGES`) of a soft-split input's ``shape``, token
    ``grid`` or ``window`` list, for fuzzing the registered ops; sizes up to ``largest``, windows and grid from
    -2 (invalid values included on purpose). Returns the new (shape, grid, window)."""
    from hypothesis import strategies as st

    small = st.integers(-2, largest)
    if change == "shape":
        shape[draw(st.integers(0, len(shape) - 1))] = draw(st.integers(0, 2 * largest))
    elif change == "dims":
        shape = draw(st.lists(st.integers(0, 6), min_size=1, max_size=5))
    elif change == "grid":
        grid[draw(st.integers(0, 1))] = draw(small)
    elif window:
        window[draw(st.integers(0, len(window) - 1))] = draw(small)
    return shape, grid, window
