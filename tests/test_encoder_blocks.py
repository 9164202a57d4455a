"""The backbone's blocks in one native call (t2t_fast.ops.encoder_blocks), bf16 and fp32: against float64, within
twice the error of the torch reference in the dtype, at the real t2t_vit_14 shapes and small ones (with and without
a qkv bias, batch > 1, rows off the kernels' row blocks), all rows and the cls rows alone; bit for bit the kernels
it chains, called one by one; alike at 1 and 2 threads; the logits path takes it, within the same error; changes
to the blocks after a call are seen; which path runs when, and why not; the arguments checks of the wrapper and of
the extension. The kernels' tests need a CPU with AVX-512 (fp32) and AVX512-BF16 (bf16, and every encoder call:
the attention kernel's); the reasons given elsewhere are checked everywhere."""
import copy
import importlib

import pytest
import torch
from torch import nn

import t2t_fast
from t2t_fast import inference, onednn
from t2t_fast._native import native_module
from t2t_fast.backend import BackendUnavailableError, cpu_class, cpu_isa, set_cpu_isa
from t2t_fast.ops import add_layernorm, multihead_attention, packed_linear
from t2t_fast.reference import layers
from t2t_fast.testing import (assert_within_reference_error, needs_packed_kernels, packed_kernels_missing,
                              poison_outputs, results_at_thread_counts, with_packed_kernels)

encoder = importlib.import_module("t2t_fast.ops.encoder_blocks")
needs_bf16 = needs_packed_kernels(torch.bfloat16)


def _blocks(count, dim, heads, hidden, qkv_bias=False, dtype=torch.bfloat16):
    """Eval-mode blocks with weights of unit-scale outputs and LayerNorm parameters off 1 and 0 (fp32, as an
    optimize_for_inference model keeps them), and the LayerNorm after them."""
    blocks = [layers.Block(dim, heads, mlp_ratio=hidden / dim, qkv_bias=qkv_bias) for _ in range(count)]
    final = nn.LayerNorm(dim)
    with torch.no_grad():
        for module in [*blocks, final]:
            for name, parameter in module.named_parameters():
                if name.endswith("weight") and parameter.dim() == 2:
                    parameter.normal_(0.0, parameter.shape[1] ** -0.5)
                elif name.endswith("weight"):
                    parameter.uniform_(0.5, 1.5)
                else:
                    parameter.normal_(0.0, 0.2)
    for block in blocks:
        block.eval().requires_grad_(False)
        for module in block.modules():
            if isinstance(module, nn.Linear):
                module.to(dtype)
    return blocks, final.requires_grad_(False)


def _exact(x, blocks, final, cls_only=False):
    wide = [copy.deepcopy(block).double() for block in blocks]
    return encoder.encoder_blocks_ref(x.double(), wide, copy.deepcopy(final).double(), cls_only)


def _run(x, blocks, final, cls_only=False):
    with torch.inference_mode(), poison_outputs():
        return encoder.encoder_blocks(x, blocks, final, cls_only, backend="cpp")


# (count, batch, tokens, dim, heads, hidden, qkv bias): t2t_vit_14's 13 blocks before the last at batch 1 and 2;
# small blocks with a qkv bias and rows off the 32-row blocks; one block of one token
SHAPES = ((13, 1, 197, 384, 6, 1152, False), (2, 2, 197, 384, 6, 1152, False), (3, 3, 17, 64, 2, 96, True),
          (1, 1, 1, 32, 2, 64, True))


@pytest.mark.parametrize("cls_only", [False, True], ids=("all_rows", "cls_only"))
@pytest.mark.parametrize("dtype", with_packed_kernels(torch.bfloat16, torch.float32))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:6])) + ("-bias" if s[6] else ""))
def test_matches_float64_reference(shape, dtype, cls_only):
    count, batch, tokens, dim, heads, hidden, qkv_bias = shape
    blocks, final = _blocks(count, dim, heads, hidden, qkv_bias, dtype)
    x = torch.randn(batch, tokens, dim).to(dtype)
    out = _run(x, blocks, final, cls_only)
    reference = encoder.encoder_blocks_ref(x, blocks, final, cls_only)
    for ours, theirs, exact, what in zip(out, reference, _exact(x, blocks, final, cls_only), ("x", "normed")):
        assert ours.dtype == dtype and ours.shape == (batch, 1 if cls_only else tokens, dim)
        assert_within_reference_error(ours, theirs, exact, what=what)


# (dtype, the CPU kernels' instruction set): bf16 on AMX tiles and on AVX512-BF16, fp32 on AVX-512
KERNEL_CASES = [pytest.param(dtype, isa, id=f"{str(dtype)[6:]}-{isa}", marks=needs_packed_kernels(dtype, isa))
                for dtype, isa in ((torch.bfloat16, "amx"), (torch.bfloat16, "avx512"), (torch.float32, "avx512"))]


@pytest.mark.parametrize("dtype,isa", KERNEL_CASES)
def test_equals_the_kernels_called_one_by_one(dtype, isa):
    """The kernels it chains, called through their ops, give the same bits, with each instruction set."""
    blocks, final = _blocks(3, 64, 2, 128, qkv_bias=True, dtype=dtype)
    x = torch.randn(2, 33, 64).to(dtype)
    set_cpu_isa(isa)
    try:
        _check_equals_the_kernels(x, blocks, final)
    finally:
        set_cpu_isa(None)


def _check_equals_the_kernels(x, blocks, final):
    with torch.inference_mode():
        # the first LayerNorm: the kernel's rows as add_layernorm's LayerNorm of x + 0
        norm = blocks[0].norm1
        stream, h = add_layernorm(x, torch.zeros_like(x), norm.weight, norm.bias, norm.eps, backend="cpp")
        for index, block in enumerate(blocks):
            attn, mlp = block.attn, block.mlp
            qkv = packed_linear(h, attn.qkv.weight, attn.qkv.bias, backend="cpp")
            mixed = multihead_attention(qkv, attn.num_heads, attn.scale, backend="cpp")
            stream, h = add_layernorm(stream, packed_linear(mixed, attn.proj.weight, attn.proj.bias, backend="cpp"),
                                      block.norm2.weight, block.norm2.bias, block.norm2.eps, backend="cpp")
            hidden = packed_linear(h, mlp.fc1.weight, mlp.fc1.bias, gelu=True, backend="cpp")
            norm = blocks[index + 1].norm1 if index + 1 < len(blocks) else final
            stream, h = add_layernorm(stream, packed_linear(hidden, mlp.fc2.weight, mlp.fc2.bias, backend="cpp"),
                                      norm.weight, norm.bias, norm.eps, backend="cpp")
    out = _run(x, blocks, final)
    assert torch.equal(out[0], stream) and torch.equal(out[1], h)


@pytest.mark.parametrize("dtype", with_packed_kernels(torch.bfloat16, torch.float32))
def test_deterministic_across_thread_counts(dtype):
    blocks, final = _blocks(2, 384, 6, 1152, dtype=dtype)
    x = torch.randn(2, 197, 384).to(dtype)
    for cls_only in (False, True):
        one, two = results_at_thread_counts(lambda: _run(x, blocks, final, cls_only))
        assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


@needs_bf16
def test_sees_changes_to_the_blocks():
    """After a call: a weight changed in place, a linear replaced, a LayerNorm's eps and a GELU made approximate
    are all seen at the next call (the prepared arguments are rebuilt or the torch path runs)."""
    blocks, final = _blocks(2, 64, 2, 96)
    x = torch.randn(1, 40, 64).bfloat16()

    def check():
        with torch.inference_mode():
            out = encoder.encoder_blocks(x, blocks, final)
        expected = encoder.encoder_blocks_ref(x, blocks, final)
        assert_within_reference_error(out[1], expected[1], _exact(x, blocks, final)[1])

    check()
    with torch.no_grad():
        blocks[1].mlp.fc2.weight.mul_(-3)
    check()
    blocks[0].attn.proj = nn.Linear(64, 64).bfloat16().requires_grad_(False)
    check()
    blocks[1].norm2.eps = 0.5
    check()
    blocks[0].mlp.act = nn.GELU(approximate="tanh")
    assert "exact GELU" in encoder.cpp_unsupported(x, blocks, final)
    check()


@pytest.mark.parametrize("dtype", with_packed_kernels(torch.bfloat16, torch.float32))
def test_logits_path_takes_it(calls_of, dtype):
    """An optimize_for_inference model at batch 2 runs all its blocks in one call (the last for the cls rows
    alone); its logits are within twice the reference's error of float64 in the dtype, as those of the kernels
    called one by one."""
    if dtype not in onednn.PACKED_LINEAR_MAX_ROWS.get(cpu_class(), {}):
        pytest.skip(f"{dtype} linears run on oneDNN's primitive on this CPU class")
    runs = calls_of(inference, "encoder_blocks_cpp")
    model = t2t_fast.create_model("t2t_vit_7", img_size=64).eval()
    fast = t2t_fast.optimize_for_inference(model, dtype)
    images = torch.randn(2, 3, 64, 64)
    logits = fast(images)
    assert len(runs) == 1 and len(runs[0][1]) == len(model.blocks) and runs[0][3] is True
    original = inference._DirectKernels.encoder
    try:
        inference._DirectKernels.encoder = lambda self, x, blocks, final_norm: None
        one_by_one = fast(images)
    finally:
        inference._DirectKernels.encoder = original
    with torch.no_grad():
        reference = copy.deepcopy(model).to(dtype)(images.to(dtype)).float()
        exact = model.double()(images.double())
    assert_within_reference_error(logits, reference, exact, what="logits")
    assert_within_reference_error(one_by_one, reference, exact, what="logits, kernels one by one")


def test_reasons_and_the_torch_path():
    """Every CPU: what the kernels cannot take says why, a forced 'cpp' then raises, and 'auto' runs the
    reference (float16 here: every CPU's reason)."""
    blocks, final = _blocks(2, 64, 2, 96, dtype=torch.float16)
    x = torch.randn(1, 9, 64).half()
    assert encoder.cpp_unsupported(x, blocks, final) is not None
    with torch.no_grad():
        for cls_only in (False, True):
            out = encoder.encoder_blocks(x.float(), _blocks(2, 64, 2, 96, dtype=torch.float32)[0], final, cls_only,
                                         backend="torch")
            assert out[0].shape == (1, 1 if cls_only else 9, 64)
        out = encoder.encoder_blocks(x, blocks, final)
        expected = encoder.encoder_blocks_ref(x, blocks, final)
        assert torch.equal(out[0], expected[0]) and torch.equal(out[1], expected[1])
        with pytest.raises(BackendUnavailableError):
            encoder.encoder_blocks(x, blocks, final, backend="cpp")
    if packed_kernels_missing(torch.bfloat16) is not None:
        return
    bf16_blocks, final = _blocks(2, 64, 2, 96)
    fp32_blocks = _blocks(2, 64, 2, 96, dtype=torch.float32)[0]
    xb = torch.randn(1, 9, 64).bfloat16()
    assert encoder.cpp_unsupported(xb, bf16_blocks, final) is None
    assert encoder.cpp_unsupported(xb.float(), fp32_blocks, final) is None
    assert "one dtype throughout" in encoder.cpp_unsupported(xb.float(), bf16_blocks, final)
    assert "float16" in encoder.cpp_unsupported(x, bf16_blocks, final)
    assert "all in float32" in encoder.cpp_unsupported(xb, fp32_blocks[:1] + bf16_blocks[1:], final)
    assert "gradient" in encoder.cpp_unsupported(xb.clone().requires_grad_(), bf16_blocks, final)
    assert "multiples of 16" in encoder.cpp_unsupported(xb, _blocks(1, 64, 8, 96)[0], final)
    assert "multiples of 32" in encoder.cpp_unsupported(torch.randn(1, 9, 48).bfloat16(), *_blocks(1, 48, 1, 96))
    mixed = _blocks(1, 64, 2, 96)[0] + _blocks(1, 64, 2, 128)[0]
    assert "different shapes" in encoder.cpp_unsupported(xb, mixed, final)
    with torch.inference_mode():
        frozen = _blocks(1, 64, 2, 96)[0]
    assert "inference_mode" in encoder.cpp_unsupported(xb, frozen, final)
    set_cpu_isa("avx512")
    try:
        assert encoder.cpp_unsupported(xb, bf16_blocks, final) is None
        assert encoder.cpp_unsupported(xb.float(), fp32_blocks, final) is None
        set_cpu_isa("avx2")
        assert "kernels need avx512" in encoder.cpp_unsupported(xb.float(), fp32_blocks, final)
    finally:
        set_cpu_isa(None)


def test_invalid_arguments():
    blocks, final = _blocks(1, 64, 2, 96)
    x = torch.randn(1, 5, 64).bfloat16()
    for args, error, match in (
            ((x[0], blocks, final), ValueError, "must be \\(B, T, C\\)"),
            ((x.long(), blocks, final), TypeError, "x has dtype"),
            ((x, [], final), ValueError, "no blocks"),
            ((x, [nn.Linear(64, 64)], final), TypeError, "pre-norm blocks"),
            ((x, blocks, nn.LayerNorm(32)), ValueError, "affine nn.LayerNorm over the last dim")):
        with pytest.raises(error, match=match):
            encoder.encoder_blocks(*args)
    with pytest.raises(TypeError, match="cls_only must be a bool"):
        encoder.encoder_blocks(x, blocks, final, 1)
    blocks[0].train()
    with pytest.raises(ValueError, match="call .eval\\(\\)"):
        encoder.encoder_blocks(x, blocks, final)


@needs_bf16
def test_extension_checks_its_buffers():
    blocks, final = _blocks(1, 64, 2, 96)
    x = torch.randn(1, 5, 64).bfloat16()
    prepared = encoder._prepare(blocks, final)
    stream, normed = x.clone(), torch.empty_like(x)
    args = dict(blocks=prepared.blocks, final_norm=prepared.final_norm, dtype=2, batch=1, tokens=5, dim=64,
                hidden=96, heads=2, x=(stream.data_ptr(), stream.numel()), h=(normed.data_ptr(), normed.numel()),
                cls_only_last=False, isa=cpu_isa(), threads=1)
    native_module().encoder_forward_cpu(**args)
    norm1, linears, norm2, scale = prepared.blocks[0]
    short_fc2 = (*linears[:6], (linears[6][0], 100), linears[7])
    for changes, match in ((dict(tokens=6), "x holds 320"), (dict(h=(normed.data_ptr(), 10)), "h holds 10"),
                           (dict(h=(stream.data_ptr() + 64, 320)), "overlap"), (dict(blocks=[]), "no blocks"),
                           (dict(heads=3), "multiple of 16"), (dict(hidden=100), "multiples of 32"),
                           (dict(blocks=[(norm1, short_fc2, norm2, scale)]), "fc2 holds 100"),
                           (dict(blocks=[(norm1, linears, norm2, 0.0)]), "scale must be positive"),
                           (dict(final_norm=(*prepared.final_norm[:2], -1.0)), "eps must be"),
                           (dict(dtype=1), "float32 or bfloat16"), (dict(isa="avx3"), "avx3")):
        with pytest.raises(ValueError, match=match):
            native_module().encoder_forward_cpu(**{**args, **changes})
    with pytest.raises(ValueError, match="do not run with avx2"):
        native_module().encoder_forward_cpu(**{**args, "isa": "avx2"})
