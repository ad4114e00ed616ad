"""fp8 training: the emulated recipes against a float64 reference, conversion, preflight."""

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from minilm.config import ModelConfig, NormConfig
from minilm.model import GPT, lm_loss
from minilm.precision.fp8 import FP8_RECIPES, convert_to_fp8, fp8_casts, fp8_path, fp8_unavailable_reason

CPU = torch.device("cpu")


def quantize_reference(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float64 `v` saturated to `dtype`'s range and rounded to nearest even on its grid."""
    info = torch.finfo(dtype)
    mantissa_bits = round(-math.log2(info.eps))
    magnitude = v.abs().clamp(max=info.max)
    exponent = torch.floor(torch.log2(magnitude)).clamp(min=math.log2(info.tiny))  # subnormals: the lowest binade's ulp
    ulp = torch.exp2(exponent - mantissa_bits)
    return torch.sign(v) * torch.round(magnitude / ulp) * ulp  # torch.round is half-to-even


def recipe_scale_reference(x: torch.Tensor, recipe: str) -> torch.Tensor:
    """The recipe's scale for a float64 (rows, in) operand: fp8 max / amax as an fp32 value, per
    tensor, or per row rounded down to a power of two."""
    e4m3_max = torch.finfo(torch.float8_e4m3fn).max
    amax = x.abs().amax() if recipe == "tensorwise" else x.abs().amax(dim=-1, keepdim=True)
    scale = (e4m3_max / amax).float().double()
    return scale if recipe == "tensorwise" else torch.exp2(torch.floor(torch.log2(scale)))


def operand(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """Rows of magnitudes 1 to 100 (so per-row scales differ); |x| >= 5% of the row's magnitude, so
    every scaled value is an e4m3 normal number and the format's relative error bound holds."""
    magnitude = torch.logspace(0, 2, rows, dtype=torch.float64)[torch.randperm(rows, generator=generator)]
    signs = torch.randint(0, 2, (rows, cols), generator=generator) * 2 - 1
    spread = 0.05 + 0.95 * torch.rand(rows, cols, generator=generator, dtype=torch.float64)
    return (magnitude[:, None] * signs * spread).float()


def fp8_linear(in_features: int, out_features: int, recipe: str, weight: torch.Tensor) -> nn.Module:
    model = nn.Sequential(nn.Linear(in_features, out_features, bias=False))
    model[0].weight.data.copy_(weight)
    convert_to_fp8(model, recipe, CPU)
    return model


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_reference_quantizer_is_the_cast(dtype):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4096, generator=generator) * 10.0 ** torch.randint(-6, 4, (4096,), generator=generator)
    x = x.clamp(-torch.finfo(dtype).max, torch.finfo(dtype).max)
    assert torch.equal(quantize_reference(x.double(), dtype), x.to(dtype).double())


@pytest.mark.parametrize("recipe", FP8_RECIPES)
def test_emulated_matmul_matches_a_float64_quantize_matmul_dequantize(recipe):
    generator = torch.Generator().manual_seed(0)
    x, w = operand(64, 48, generator), operand(32, 48, generator)
    y = fp8_linear(48, 32, recipe, w)(x).detach()

    a, b = x.double(), w.double()
    sa, sb = recipe_scale_reference(a, recipe), recipe_scale_reference(b, recipe)
    qa, qb = quantize_reference(a * sa, torch.float8_e4m3fn) / sa, quantize_reference(b * sb, torch.float8_e4m3fn) / sb
    reference = qa @ qb.T
    magnitude = qa.abs() @ qb.abs().T
    # what is left is the fp32 matmul: dequantizing (one rounding) and summing 48 products
    assert ((y.double() - reference).abs() <= 2 * 48 * 2.0**-24 * magnitude).all()

    exact = a @ b.T
    unit_roundoff = 2.0**-4  # e4m3: 3 mantissa bits
    bound = (2 * unit_roundoff + unit_roundoff**2) * (a.abs() @ b.abs().T)
    assert ((reference - exact).abs() <= bound).all()  # the format's error, every product's operands normal
    assert (y.double() - exact).abs().max() > 1e-3 * bound.max()  # and quantization did happen


@pytest.mark.parametrize("recipe", FP8_RECIPES)
def test_under_autocast_the_emulation_follows_the_cuda_path(recipe):
    """On CUDA, Float8Linear casts its input to bf16 before scaling and _scaled_mm accumulates in
    fp32 to a bf16 output: the emulation does the same under CPU autocast."""
    generator = torch.Generator().manual_seed(1)
    x, w = operand(64, 48, generator), operand(32, 48, generator)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fp8_linear(48, 32, recipe, w)(x).detach()
    assert y.dtype == torch.bfloat16
    a, b = x.bfloat16().double(), w.double()
    sa, sb = recipe_scale_reference(a, recipe), recipe_scale_reference(b, recipe)
    qa, qb = quantize_reference(a * sa, torch.float8_e4m3fn) / sa, quantize_reference(b * sb, torch.float8_e4m3fn) / sb
    reference = qa @ qb.T
    # the bf16 output's rounding (half an ulp: at most 2^-8 relative) and the fp32 matmul's
    tolerance = 2.0**-8 * reference.abs() + 2 * 48 * 2.0**-24 * (qa.abs() @ qb.abs().T)
    assert ((y.double() - reference).abs() <= tolerance).all()


@pytest.mark.gpu
@pytest.mark.parametrize("recipe", FP8_RECIPES)
def test_fp8_kernels_match_the_float64_reference_on_gpu(recipe):
    """The real _scaled_mm path against the same reference as the emulation: only the bf16 output
    and the kernel's accumulation (fast accumulation in the forward) may differ."""
    cuda = torch.device("cuda")
    if fp8_path(cuda, recipe) != "torchao-float8 (cuda)":
        pytest.skip(f"{recipe} fp8 kernels need a newer GPU")
    generator = torch.Generator().manual_seed(1)
    x, w = operand(64, 48, generator), operand(32, 48, generator)
    model = nn.Sequential(nn.Linear(48, 32, bias=False)).to(cuda)
    model[0].weight.data.copy_(w)
    convert_to_fp8(model, recipe, cuda)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = model(x.to(cuda)).detach().cpu()
    a, b = x.bfloat16().double(), w.double()
    sa, sb = recipe_scale_reference(a, recipe), recipe_scale_reference(b, recipe)
    qa, qb = quantize_reference(a * sa, torch.float8_e4m3fn) / sa, quantize_reference(b * sb, torch.float8_e4m3fn) / sb
    reference = qa @ qb.T
    tolerance = 2.0**-8 * reference.abs() + 2.0**-12 * (qa.abs() @ qb.abs().T)
    assert ((y.double() - reference).abs() <= tolerance).all()


def tiny_config(**overrides) -> ModelConfig:
    return ModelConfig(**{"n_layer": 2, "n_head": 2, "d_model": 32, "block_size": 16, **overrides})


@pytest.mark.parametrize("recipe", FP8_RECIPES)
def test_converted_gpt_trains_on_cpu(recipe):
    torch.manual_seed(0)
    model = GPT(tiny_config(), NormConfig(), 64)
    keys = set(model.state_dict())
    converted = convert_to_fp8(model, recipe, CPU)
    assert converted == [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name != "lm_head"]
    assert all(type(model.get_submodule(name)).__name__ == "EmulatedFloat8Linear" for name in converted)
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.tok_emb.weight
    assert set(model.state_dict()) == keys  # checkpoints load across precisions
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    tokens = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(25):  # fit one batch
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(tokens[:, :-1])
        loss = lm_loss(logits, tokens[:, 1:]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.slow  # tracing a 2-layer fp8 GPT; tests/test_model.py traces the bf16/fp32 one quickly
def test_converted_gpt_compiles():
    model = GPT(tiny_config(), NormConfig(), 64)
    convert_to_fp8(model, "tensorwise", CPU)
    compiled = torch.compile(model, backend="aot_eager")  # traces what inductor would compile
    tokens = torch.randint(0, 64, (4, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager, traced = model(tokens), compiled(tokens)
    torch.testing.assert_close(traced, eager, rtol=0, atol=0)
    traced.float().sum().backward()
    assert model.blocks[0].attn.qkv.weight.grad is not None


def test_casts_follow_the_recipe():
    e4m3, e5m2 = torch.float8_e4m3fn, torch.float8_e5m2
    x = torch.randn(2, 8, 32) * torch.tensor([1.0, 100.0])[:, None, None]
    for recipe, grad_format in (("tensorwise", e5m2), ("rowwise", e4m3)):
        model = GPT(tiny_config(), NormConfig(), 64)
        convert_to_fp8(model, recipe, CPU)
        casts = fp8_casts(model.blocks[0].mlp.fc)
        assert {c: fmt for c, (fmt, _) in casts.items()} == {"act_in": e4m3, "weight": e4m3, "grad": grad_format}
        scale = casts["act_in"][1](x)
        if recipe == "tensorwise":
            assert scale.shape == () and scale == (torch.finfo(e4m3).max / x.abs().amax().double()).float()
        else:  # one power of two per token
            assert scale.shape == (2, 8, 1) and torch.equal(scale, torch.exp2(torch.floor(torch.log2(scale))))
            assert (scale[0] > scale[1]).all()
        assert fp8_casts(model.lm_head) is None and fp8_casts(model.blocks[0].norm_attn) is None


def test_path_and_preflight():
    assert fp8_path(CPU, "tensorwise") == "emulated (cpu)"
    assert fp8_unavailable_reason(tiny_config(), "rowwise", tokens_per_micro_batch=8 * 16) is None
    assert "d_model=40" in fp8_unavailable_reason(tiny_config(d_model=40), "tensorwise", 8 * 16)
    assert "batch_size x model.block_size = 90" in fp8_unavailable_reason(tiny_config(), "tensorwise", 90)
    assert "recipe" in fp8_unavailable_reason(tiny_config(), "blockwise", 8 * 16)
    assert fp8_unavailable_reason(SimpleNamespace(d_model=768, n_head=12, n_kv_head=None), "tensorwise",
                                  16 * 1024) is None
    assert fp8_unavailable_reason(tiny_config(n_kv_head=1), "tensorwise", 8 * 16) is None  # 16 kv features
    assert "= 8 key/value features" in fp8_unavailable_reason(tiny_config(n_head=4, n_kv_head=1), "tensorwise", 8 * 16)
