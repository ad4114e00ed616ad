"""Pure-bf16 AdamW: rounding modes, the found_inf contract, determinism, resume, memory."""

import io
import math

import pytest
import torch

from minilm.config import ModelConfig, NormConfig
from minilm.model import GPT, lm_loss
from minilm.precision.bf16_pure import ROUNDINGS, BF16AdamW, bytes_per_param, stochastic_round_to_bf16

VOCAB = 64


def bf16_neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bf16 values just below and above each fp32 x (equal when x is a bf16 value), from float64."""
    nearest = x.to(torch.bfloat16)
    up = torch.nextafter(nearest, torch.tensor(math.inf, dtype=torch.bfloat16))
    down = torch.nextafter(nearest, torch.tensor(-math.inf, dtype=torch.bfloat16))
    below = torch.where(nearest.double() <= x.double(), nearest, down)
    above = torch.where(nearest.double() >= x.double(), nearest, up)
    return below, above


def test_stochastic_rounding_picks_a_neighbour_and_is_unbiased():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, generator=generator) * 10.0 ** torch.randint(-6, 6, (64,), generator=generator)
    draws = torch.stack([stochastic_round_to_bf16(x, generator) for _ in range(4000)])
    below, above = bf16_neighbours(x)
    assert ((draws == below) | (draws == above)).all()
    # P(above) = (x - below) / (above - below): the mean is x, within 5 standard errors
    p = ((x.double() - below.double()) / (above.double() - below.double())).nan_to_num(0.0)
    standard_error = (above.double() - below.double()) * (p * (1 - p) / len(draws)).sqrt()
    assert ((draws.double().mean(0) - x.double()).abs() <= 5 * standard_error + 1e-300).all()
    assert (p > 0.01).sum() > 50  # most x are not bf16 values: the test exercised rounding
    specials = torch.tensor([math.inf, -math.inf, 0.0, 1.0, -2.0])
    assert torch.equal(stochastic_round_to_bf16(specials, generator).float(), specials)


def planted_update(rounding: str, steps: int, n: int = 100_000) -> tuple[torch.Tensor, BF16AdamW]:
    """n weights at 1.0 and a gradient of -1: with betas 0 each AdamW step adds lr * g / (|g| + eps)
    = 1e-4 (to 1e-12), a 39th of the half-ulp of bf16 just above 1.0 (2^-8 = 0.0039)."""
    w = torch.nn.Parameter(torch.ones(n, dtype=torch.bfloat16))
    optimizer = BF16AdamW([w], lr=1e-4, betas=(0.0, 0.0), rounding=rounding, seed=0)
    for _ in range(steps):
        w.grad = -torch.ones_like(w)
        optimizer.step()
    return w.detach(), optimizer


def test_nearest_loses_a_small_update_that_stochastic_keeps_in_expectation():
    kept, _ = planted_update("nearest", steps=1)
    assert torch.equal(kept, torch.ones_like(kept))
    w, _ = planted_update("stochastic", steps=1)
    ulp = 2.0**-7  # above 1.0
    target = 1.0 + 1e-4
    p = (target - 1.0) / ulp
    standard_error = ulp * math.sqrt(p * (1 - p) / w.numel())
    assert abs(w.double().mean().item() - target) < 4 * standard_error  # standard_error ~ 3e-6
    assert set(w.unique().tolist()) == {1.0, 1.0 + ulp}


def test_kahan_accumulates_small_updates_that_nearest_loses():
    nearest, _ = planted_update("nearest", steps=100, n=1000)  # deterministic: few elements do
    assert torch.equal(nearest, torch.ones_like(nearest))
    w, optimizer = planted_update("kahan", steps=100, n=1000)
    exact = 1.0 + 100 * 1e-4
    assert torch.equal(w, torch.full_like(w, exact))  # the bf16 nearest to the exact sum (1.0078)
    # weight + buffer is the sum to within the buffer's own rounding: at most half its ulp
    # (2^-17 below 2^-8) per step
    compensation = optimizer.state[optimizer.param_groups[0]["params"][0]]["compensation"]
    total = w.double() + compensation.double()
    assert ((total - exact).abs() <= 100 * 2.0**-17).all()


@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_a_step_is_torch_adamw_in_float64_then_rounded(rounding):
    """From the same (bf16) weights, moments and step count, one step lands on the bf16 rounding
    of torch.optim.AdamW's step computed in float64."""
    generator = torch.Generator().manual_seed(0)
    weight, grad, exp_avg = (torch.randn(4096, generator=generator).bfloat16() for _ in range(3))
    exp_avg_sq = torch.rand(4096, generator=generator).bfloat16() * 1e-2
    settings = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)

    reference = torch.nn.Parameter(weight.double())
    adamw = torch.optim.AdamW([reference], foreach=False, **settings)
    adamw.state[reference] = {"step": torch.tensor(5.0), "exp_avg": exp_avg.double(), "exp_avg_sq": exp_avg_sq.double()}
    reference.grad = grad.double()
    adamw.step()

    w = torch.nn.Parameter(weight.clone())
    optimizer = BF16AdamW([w], rounding=rounding, **settings)
    optimizer.state[w].update(step=torch.tensor(5.0), exp_avg=exp_avg.clone(), exp_avg_sq=exp_avg_sq.clone())
    w.grad = grad
    optimizer.step()
    below, above = bf16_neighbours(reference.detach().float())
    if rounding == "kahan":  # the buffer holds what the rounding lost, to its own bf16 precision (2^-8)
        compensation = optimizer.state[w]["compensation"].double()
        fp32_arithmetic = 8 * 2.0**-24 * (weight.double().abs() + (reference.detach() - weight.double()).abs())
        assert ((w.double() + compensation - reference).abs() <= 2.0**-8 * compensation.abs() + fp32_arithmetic).all()
    assert ((w == below) | (w == above)).all()  # up to fp32 arithmetic: one of its bf16 neighbours
    if rounding != "stochastic":
        assert (w == reference.detach().to(torch.bfloat16)).float().mean() > 0.99  # nearest, bar fp32 ties
    for moment in ("exp_avg", "exp_avg_sq"):  # rounded to nearest in every mode
        torch.testing.assert_close(optimizer.state[w][moment].double(), adamw.state[reference][moment],
                                   rtol=2.0**-8, atol=0)


def test_a_non_finite_gradient_skips_the_update_on_device():
    w = torch.nn.Parameter(torch.randn(100).bfloat16())
    for rounding in ROUNDINGS:
        optimizer = BF16AdamW([w], lr=1e-2, weight_decay=0.1, rounding=rounding)
        w.grad = torch.randn_like(w)
        optimizer.step()
        before = [w.detach().clone()] + [t.clone() for t in optimizer.state[w].values()]
        w.grad[3] = math.nan
        optimizer.found_inf = torch.ones(())  # what Precision.step sets for a non-finite grad norm
        optimizer.step()
        after = [w.detach()] + list(optimizer.state[w].values())
        assert all(torch.equal(a, b) for a, b in zip(before, after)), rounding
        optimizer.found_inf = torch.zeros(())
        w.grad = torch.randn_like(w)
        optimizer.step()
        assert not torch.equal(w.detach(), before[0]) and optimizer.state[w]["step"].item() == 2


def tiny_gpt(seed: int = 0, device: str = "cpu") -> GPT:
    torch.manual_seed(seed)
    model = GPT(ModelConfig(n_layer=2, n_head=2, d_model=32, block_size=16), NormConfig(), VOCAB)
    return model.to(device, torch.bfloat16)


def build_optimizer(model: GPT, rounding: str, seed: int = 0, lr: float = 3e-3) -> BF16AdamW:
    matrices = [p for name, p in model.named_parameters() if p.dim() >= 2 and "emb" not in name]
    others = [p for name, p in model.named_parameters() if not (p.dim() >= 2 and "emb" not in name)]
    groups = [{"params": matrices, "weight_decay": 0.1}, {"params": others, "weight_decay": 0.0}]
    return BF16AdamW(groups, lr=lr, betas=(0.9, 0.95), rounding=rounding, seed=seed)


def batches(n: int, seed: int = 1, device: str = "cpu"):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (4, 17), generator=generator).to(device) for _ in range(n)]


def train(model: GPT, optimizer: BF16AdamW, data) -> list[float]:
    losses = []
    for tokens in data:
        loss = lm_loss(model(tokens[:, :-1]), tokens[:, 1:]).loss
        loss.backward()
        for group in optimizer.param_groups:  # as the trainer sets its schedule
            group["lr"] = group["lr"] * 0.99
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_tiny_gpt_trains_in_pure_bf16(rounding):
    model = tiny_gpt()
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    losses = train(model, build_optimizer(model, rounding), batches(1) * 25)  # fit one batch
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_same_seed_is_bitwise_equal_and_another_seed_is_not(device):
    runs = []
    for seed in (0, 0, 1):
        model = tiny_gpt(device=device)
        losses = train(model, build_optimizer(model, "stochastic", seed=seed), batches(6, device=device))
        runs.append((losses, [p.detach().clone() for p in model.parameters()]))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
    assert not all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[2][1]))


@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_resume_is_bitwise_equal_to_the_uninterrupted_run(rounding):
    data = batches(6)
    model = tiny_gpt()
    uninterrupted = train(model, build_optimizer(model, rounding), data)

    model = tiny_gpt()
    optimizer = build_optimizer(model, rounding)
    first = train(model, optimizer, data[:3])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer)
    model = tiny_gpt(seed=123)  # a different init and a fresh generator: the checkpoint must restore all
    optimizer = build_optimizer(model, rounding, seed=123)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    assert first + train(model, optimizer, data[3:]) == uninterrupted


def test_memory_per_parameter():
    model = tiny_gpt()
    assert bytes_per_param(build_optimizer(model, "nearest")) == 8  # weight, grad, two moments: 2 bytes each
    assert bytes_per_param(build_optimizer(model, "stochastic")) == 8
    assert bytes_per_param(build_optimizer(model, "kahan")) == 10  # + the compensation buffer
    fp32 = GPT(ModelConfig(n_layer=1, n_head=2, d_model=32, block_size=16), NormConfig(), VOCAB)
    adamw = torch.optim.AdamW(fp32.parameters(), lr=1e-3)
    for p in fp32.parameters():
        p.grad = torch.zeros_like(p)
    adamw.step()
    assert bytes_per_param(adamw) == 16


def test_rejects_what_it_cannot_do():
    with pytest.raises(ValueError, match="bf16 parameters"):
        BF16AdamW([torch.nn.Parameter(torch.zeros(3))], lr=1e-3)
    with pytest.raises(ValueError, match="rounding"):
        BF16AdamW([torch.nn.Parameter(torch.zeros(3).bfloat16())], lr=1e-3, rounding="up")
    model = tiny_gpt()
    saved = build_optimizer(model, "nearest").state_dict()
    with pytest.raises(ValueError, match="generator"):
        build_optimizer(model, "stochastic").load_state_dict(saved)
