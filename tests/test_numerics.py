"""Numerics telemetry: exact counts on planted tensors, and the per-layer collector."""

import math

import pytest
import torch
from torch import nn

from minilm.config import ModelConfig, NormConfig
from minilm.model import GPT, lm_loss
from minilm.precision.fp8 import convert_to_fp8
from minilm.train.numerics import FORMATS, TENSOR_CLASSES, NumericsCollector, format_stats, format_thresholds

K = 7  # planted elements of each kind
N_NORMAL, N_ZERO = 50, 5
FP32_MAX = torch.finfo(torch.float32).max


def planted(dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """K underflows, K subnormals, K finite values beyond the max, K infinities, normal numbers and
    zeros, with random signs, shuffled. The thresholds' own values are planted too: s/2 (a tie
    that rounds to 0) with the underflows, n - s/2 (a tie that rounds to n) with the normals, and
    with the normals the largest finite value m and values between m and m + u/2 (they round to m);
    m + u/2 itself with the values beyond."""
    generator = torch.Generator().manual_seed(seed)
    underflow_max, subnormal_max, overflow_min = format_thresholds(dtype)
    tiny, largest = torch.finfo(dtype).tiny, torch.finfo(dtype).max

    def uniform(low, high, n):
        return low + (high - low) * torch.rand(n, dtype=torch.float64, generator=generator)

    underflow = torch.cat([torch.tensor([underflow_max], dtype=torch.float64), uniform(0, underflow_max, K - 1)])
    subnormal = uniform(underflow_max * 1.01, subnormal_max * 0.99, K)
    normal = torch.cat([torch.tensor([subnormal_max, tiny, largest], dtype=torch.float64),
                        uniform(largest, overflow_min * (1 - 1e-6), 3),  # round to m
                        torch.exp(uniform(math.log(tiny), math.log(largest), N_NORMAL - 6))])
    beyond = torch.cat([torch.tensor([overflow_min], dtype=torch.float64), uniform(1.2, 2.0, K - 1) * overflow_min])
    values = torch.cat([underflow, subnormal, normal]).clamp(min=underflow_max * 1e-3).float()
    values = torch.cat([values, beyond.clamp(max=FP32_MAX).float(), torch.full((K,), math.inf)])
    signs = torch.randint(0, 2, values.shape, generator=generator) * 2 - 1
    values = torch.cat([values * signs, torch.zeros(N_ZERO)])
    return values[torch.randperm(len(values), generator=generator)]


@pytest.mark.parametrize("name", list(FORMATS))
def test_counts_match_a_planted_tensor(name):
    dtype = FORMATS[name]
    x = planted(dtype)
    nonzero = 4 * K + N_NORMAL
    stats = format_stats(x, dtype)
    counts = {stat: round(stats[stat].item() * nonzero) for stat in ("underflow", "subnormal", "overflow")}
    assert counts == {"underflow": K, "subnormal": K, "overflow": 2 * K}  # beyond the max, and inf
    assert stats["amax"].item() == math.inf
    # the thresholds are the cast's: what it rounds to zero and to subnormals
    cast = x.to(dtype).float()
    assert torch.count_nonzero((x != 0) & (cast == 0)) == K
    assert torch.count_nonzero((cast != 0) & (cast.abs() < torch.finfo(dtype).tiny)) == K
    if dtype in (torch.float16, torch.bfloat16):  # and what it rounds to inf (fp8 casts have no inf)
        assert torch.count_nonzero(cast.isinf() & ~x.isinf()) == K
    finite = x[x.abs() <= torch.finfo(dtype).max]
    assert format_stats(finite, dtype)["amax"] == finite.abs().max()


def test_scales_are_applied_before_the_thresholds():
    dtype = torch.float8_e4m3fn
    rows = torch.stack([planted(dtype, seed=1), planted(dtype, seed=2)])
    scale = torch.tensor([[8.0], [0.25]])  # per row, exact powers of two
    stats = format_stats(rows / scale, dtype, scale)
    nonzero = 2 * (4 * K + N_NORMAL)
    assert round(stats["underflow"].item() * nonzero) == 2 * K
    assert round(stats["subnormal"].item() * nonzero) == 2 * K
    assert stats["amax"] == (rows / scale).abs().amax()


def test_nan_counts_as_overflow_and_zeros_are_not_counted():
    stats = format_stats(torch.tensor([0.0, 0.0, math.nan, 1.0]), torch.bfloat16)
    assert stats["overflow"].item() == 0.5
    assert format_stats(torch.zeros(4), torch.float16)["underflow"].item() == 0.0


def tiny_gpt(dropout: float = 0.0) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(n_layer=2, n_head=2, d_model=32, block_size=16, dropout=dropout), NormConfig(), 64)


LAYERS = [f"L{i}.{name}" for i in range(2) for name in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")] + ["head"]
STATS = ("underflow", "subnormal", "overflow", "amax")


def batch(seed: int = 0):
    tokens = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(seed))
    return tokens[:, :-1], tokens[:, 1:]


def fp32_autocast():
    return torch.autocast("cpu", enabled=False)


def test_collector_names_every_linear_and_touches_nothing():
    model = tiny_gpt()
    rng = torch.get_rng_state()
    metrics = NumericsCollector(model, "fp32").observe(*batch(), fp32_autocast)
    assert set(metrics) == {f"numerics/{c}/{s}/{layer}" for c in TENSOR_CLASSES for s in STATS for layer in LAYERS}
    assert all(v.dim() == 0 and v.dtype == torch.float32 for v in metrics.values())
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)
    # fp32 runs are reported in bf16: the tied head's weight is the token embedding
    assert torch.equal(metrics["numerics/weight/amax/head"], model.tok_emb.weight.abs().amax())


def test_collector_scales_gradients_like_the_run():
    model = tiny_gpt()
    collector = NumericsCollector(model, "fp16")
    plain = collector.observe(*batch(), fp32_autocast)
    scaled = collector.observe(*batch(), fp32_autocast, scale_loss=lambda loss: loss * 1024)
    for name, value in plain.items():
        if name.startswith("numerics/grad/amax"):
            assert torch.equal(scaled[name], value * 1024), name  # a power of two: exact
        elif not name.startswith("numerics/grad/"):
            assert torch.equal(scaled[name], value), name
    # what loss scaling is for: fewer gradients underflow fp16
    underflow = [name for name in plain if name.startswith("numerics/grad/underflow")]
    assert all(scaled[name] <= plain[name] for name in underflow)
    assert sum(scaled[name] for name in underflow) < sum(plain[name] for name in underflow)


def test_collector_measures_fp8_layers_in_their_recipe_formats():
    model = tiny_gpt()
    convert_to_fp8(model, "tensorwise", torch.device("cpu"))
    captured = {}
    model.blocks[0].mlp.fc.register_forward_pre_hook(lambda _m, args: captured.setdefault("x", args[0]))

    def bf16_autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16)

    metrics = NumericsCollector(model, "fp8").observe(*batch(), bf16_autocast)
    assert {name.rsplit("/", 1)[1] for name in metrics if "/scale/" in name} == set(LAYERS) - {"head"}
    x = captured["x"].bfloat16().float()  # the recipe scales the autocast (bf16) input into e4m3
    scale = torch.finfo(torch.float8_e4m3fn).max / x.abs().amax().double()
    expected = format_stats(x, torch.float8_e4m3fn, scale.float())
    for stat, value in expected.items():
        assert torch.equal(metrics[f"numerics/act_in/{stat}/L0.mlp.fc"], value), stat
    assert metrics["numerics/act_in/scale/L0.mlp.fc"] == scale.float()
    weight = model.blocks[0].mlp.fc.weight
    weight_scale = torch.finfo(torch.float8_e4m3fn).max / weight.abs().amax().double()
    assert metrics["numerics/weight/scale/L0.mlp.fc"] == weight_scale.float()


def test_observing_does_not_change_training():
    def run(observe: bool) -> list[float]:
        model = tiny_gpt(dropout=0.1)
        collector = NumericsCollector(model, "fp32")
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        losses = []
        for step in range(3):
            x, y = batch(step)
            if observe:
                collector.observe(x, y, fp32_autocast)
            loss = lm_loss(model(x), y).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        return losses

    assert run(observe=True) == run(observe=False)


def test_layer_names_follow_the_diagnostics_groups():
    model = GPT(ModelConfig(n_layer=1, n_head=2, d_model=32, block_size=16, tie_embeddings=False), NormConfig(), 64)
    names = {layer for layer, module, _ in NumericsCollector(model, "bf16").linears}
    assert names == {"L0.attn.qkv", "L0.attn.proj", "L0.mlp.fc", "L0.mlp.proj", "head"}
    assert all(isinstance(module, nn.Linear) for _, module, _ in NumericsCollector(model, "bf16").linears)


@pytest.mark.parametrize("name, dtype, loss_scale", [("fp16", torch.float16, 2.0**-20),
                                                     ("bf16", torch.bfloat16, 2.0**-130)])
def test_under_autocast_gradients_are_seen_before_their_cast(name, dtype, loss_scale):
    """The logits' gradient (~1e-4 at init) scaled below the format's underflow threshold: the
    cast would make it zero, so a nonzero underflow fraction shows it was seen before the cast."""
    metrics = NumericsCollector(tiny_gpt(), name).observe(*batch(), lambda: torch.autocast("cpu", dtype=dtype),
                                                          scale_loss=lambda loss: loss * loss_scale)
    assert metrics["numerics/grad/underflow/head"] > 0.5
