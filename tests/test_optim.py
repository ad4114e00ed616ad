"""minilm/optim: parameter groups, Muon against torch.optim.Muon, and optim=muon through the trainer."""

import copy
import math

import pytest
import torch
from omegaconf import OmegaConf

from minilm.errors import ConfigError
from minilm.launch.cli import compose
from minilm.model import GPT
from minilm.optim import build_optimizer, lr_ratio, muon_momentum_at, parameter_kinds, set_schedule
from minilm.optim.muon import Muon, MuonAdamW, newton_schulz
from minilm.optim.skip_step import SpikeSkip
from minilm.precision.policy import Precision
from tests.helpers import make_run


def flat_tensors(state) -> list[torch.Tensor]:
    """Every tensor of a (nested) state dict, in a fixed order."""
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for key in sorted(state, key=str) for t in flat_tensors(state[key])]
    if isinstance(state, (list, tuple)):
        return [t for item in state for t in flat_tensors(item)]
    return []


def gpt(overrides: list[str]) -> tuple[GPT, object]:
    cfg = compose(["size=test", *overrides])
    return GPT(OmegaConf.to_object(cfg.model), OmegaConf.to_object(cfg.norm), 64), cfg


def cpu_precision(cfg) -> Precision:
    return Precision(OmegaConf.to_object(cfg.precision), torch.device("cpu"))


@pytest.mark.parametrize("optim", ["adamw", "muon"])
@pytest.mark.parametrize("tied", [True, False])
def test_parameter_groups_cover_every_parameter_exactly_once(optim, tied):
    model, cfg = gpt([f"optim={optim}", f"model.tie_embeddings={tied}", "model.qk_norm=true"])
    optimizer = build_optimizer(model, cfg.optim, cpu_precision(cfg), 0)
    grouped = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters()) and len(set(grouped)) == len(grouped)
    kinds = parameter_kinds(model)
    assert (kinds["head"] == []) == tied and all(p.dim() == 2 for p in kinds["matrix"])
    assert all(p.dim() < 2 for p in kinds["scalar"]) and model.tok_emb.weight in kinds["embed"]
    if optim == "muon":
        assert isinstance(optimizer, MuonAdamW)
        assert [id(p) for p in optimizer.parts["muon"].param_groups[0]["params"]] == [id(p) for p in kinds["matrix"]]


def muon_pair(shapes, seed=0, **kwargs):
    torch.manual_seed(seed)
    ours = [torch.nn.Parameter(torch.randn(*shape)) for shape in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    return ours, theirs, Muon(ours, ns_dtype="bf16", **kwargs), torch.optim.Muon(theirs, **kwargs)


@pytest.mark.parametrize("kwargs", [{}, {"nesterov": False, "weight_decay": 0.0},
                                    {"adjust_lr_fn": "match_rms_adamw", "momentum": 0.8, "lr": 0.05}])
def test_muon_in_bf16_is_torch_muon_bitwise(kwargs):
    shapes = [(48, 16), (16, 48), (32, 32)]  # tall, wide, square
    ours, theirs, mine, torchs = muon_pair(shapes, **kwargs)
    for step in range(4):
        grads = [torch.randn(*shape) for shape in shapes]
        for a, b, g in zip(ours, theirs, grads):
            a.grad, b.grad = g.clone(), g.clone()
        mine.step()
        torchs.step()
        for a, b in zip(ours, theirs):
            assert torch.equal(a, b), (step, a.shape)
    assert all(torch.equal(mine.state[a]["momentum_buffer"], torchs.state[b]["momentum_buffer"])
               for a, b in zip(ours, theirs))


def with_spectrum(shape, singular_values: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A float64 matrix of `shape` with these singular values and random singular vectors."""
    generator = torch.Generator().manual_seed(seed)
    k = min(shape)
    u, _ = torch.linalg.qr(torch.randn(shape[0], k, generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(shape[1], k, generator=generator, dtype=torch.float64))
    return u @ torch.diag(singular_values) @ v.T


@pytest.mark.parametrize("shape", [(96, 32), (32, 96), (64, 64)])
def test_muon_update_is_near_orthogonal(shape):
    """torch's quintic Newton-Schulz coefficients, 5 steps, map every singular value that is at least 1/100
    of the largest into the band (0.5, 1.5) around 1 (Keller Jordan: S' ~ U(0.5, 1.5)), in fp32 and bf16;
    a singular value far smaller than that (a near-singular gradient) is not yet reached in 5 steps."""
    s_in = torch.logspace(-2, 0, min(shape), dtype=torch.float64)
    g = with_spectrum(shape, s_in)
    coefficients = (3.4445, -4.775, 2.0315)
    for dtype in (torch.float32, torch.bfloat16):
        s = torch.linalg.svdvals(newton_schulz(g.float(), coefficients, 5, 1e-7, dtype).double())
        assert s.min() > 0.5 and s.max() < 1.5, (dtype, s.min(), s.max())
    # one Muon step from zero momentum, no weight decay: the weight moves by lr x the orthogonalized gradient
    p = torch.nn.Parameter(torch.zeros(*shape))
    p.grad = g.float()
    Muon([p], lr=0.1, weight_decay=0.0, ns_dtype="fp32").step()
    scale = 0.1 * math.sqrt(max(1, shape[0] / shape[1]))
    s = torch.linalg.svdvals(p.detach().double() / -scale)
    assert s.min() > 0.5 and s.max() < 1.5
    # below the band's reach: 1e-5 of the largest stays far below 0.5
    tiny = torch.linalg.svdvals(newton_schulz(with_spectrum(shape, torch.cat([s_in[1:], s_in[:1] * 1e-3])).float(),
                                              coefficients, 5, 1e-7, torch.float32))
    assert tiny.min() < 0.5


def test_muon_skips_on_the_found_inf_flag_bitwise():
    ours, _, mine, _ = muon_pair([(24, 8), (8, 8)])
    for p in ours:
        p.grad = torch.randn_like(p)
    mine.step()  # momentum exists now
    before = [(p.detach().clone(), mine.state[p]["momentum_buffer"].clone()) for p in ours]
    for p in ours:
        p.grad = torch.randn_like(p)
    mine.found_inf = torch.ones(())
    mine.step()
    for p, (weight, momentum) in zip(ours, before):
        assert torch.equal(p, weight) and torch.equal(mine.state[p]["momentum_buffer"], momentum)
    mine.found_inf = torch.zeros(())
    mine.step()
    assert not torch.equal(ours[0], before[0][0])


def test_schedule_sets_each_group_its_ratio_of_the_lr_and_warms_muon_momentum_up():
    model, cfg = gpt(["optim=muon", "model.tie_embeddings=false", "optim.embed_lr_ratio=10",
                      "optim.head_lr_ratio=0.5", "optim.scalar_lr_ratio=0.25", "optim.warmup_steps=0",
                      "optim.muon_momentum_warmup=10"])
    optimizer = build_optimizer(model, cfg.optim, cpu_precision(cfg), 0)
    set_schedule(optimizer, 0, cfg.optim, 100)
    lrs = {group["name"]: group["lr"] for group in optimizer.param_groups}
    lr = cfg.optim.lr  # the preset's Muon LR
    assert lrs == pytest.approx({"matrix": lr, "embed": 10 * lr, "head": 0.5 * lr, "scalar": 0.25 * lr})
    assert optimizer.parts["muon"].param_groups[0]["momentum"] == pytest.approx(0.85)
    set_schedule(optimizer, 5, cfg.optim, 100)
    assert optimizer.parts["muon"].param_groups[0]["momentum"] == pytest.approx(0.90)
    assert muon_momentum_at(10, cfg.optim) == muon_momentum_at(500, cfg.optim) == pytest.approx(0.95)


def test_config_refuses_what_cannot_work():
    from minilm.config import validate

    with pytest.raises(ConfigError, match="optim=muon cannot run with precision=bf16_pure"):
        validate(compose(["optim=muon", "precision=bf16_pure"]))
    with pytest.raises(ConfigError, match="optim.embed_lr_ratio=3.0 applies to optim=muon only"):
        validate(compose(["optim.embed_lr_ratio=3"]))


# the quick tier: each way a step is skipped (Precision.step's, the fp16 scaler's)
@pytest.mark.parametrize("precision", ["fp32", pytest.param("bf16", marks=pytest.mark.slow), "fp16",
                                       pytest.param("fp8", marks=pytest.mark.slow)])
def test_muon_trains_under_each_precision_and_skips_a_nonfinite_step_whole(precision, tmp_path):
    """One step moves every parameter; a step with an inf in an embedding gradient moves none (fp16: the
    scaler's found_inf reaches Muon too; elsewhere Precision.step's), with no host sync added."""
    trainer = make_run([f"precision={precision}", "optim=muon"], tmp_path)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    loss, grad_norm, _ = trainer.train_step()
    assert math.isfinite(loss.item()) and math.isfinite(grad_norm.item())
    assert all(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())
    handle = trainer.model.tok_emb.weight.register_hook(lambda g: g * float("inf"))
    snapshot = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train_step()
    handle.remove()
    assert all(torch.equal(p, snapshot[n]) for n, p in trainer.model.named_parameters())
    trainer.train_step()
    assert not torch.equal(trainer.model.blocks[0].mlp.fc.weight, snapshot["blocks.0.mlp.fc.weight"])


def test_a_muon_state_does_not_load_into_adamw_silently(tmp_path):
    model, cfg = gpt(["optim=muon"])
    state = build_optimizer(model, cfg.optim, cpu_precision(cfg), 0).state_dict()
    assert set(state) == {"muon", "adamw"}
    other, adamw_cfg = gpt([])
    with pytest.raises(ValueError, match="optim.name differs"):
        build_optimizer(model, cfg.optim, cpu_precision(cfg), 0).load_state_dict(
            build_optimizer(other, adamw_cfg.optim, cpu_precision(adamw_cfg), 0).state_dict())


def test_the_schedule_reaches_both_parts_after_a_state_is_loaded():
    model, cfg = gpt(["optim=muon"])
    optimizer = build_optimizer(model, cfg.optim, cpu_precision(cfg), 0)
    optimizer.load_state_dict(optimizer.state_dict())  # torch replaces each part's group dicts
    set_schedule(optimizer, 10**6, cfg.optim, 100)
    assert all(group["lr"] == pytest.approx(cfg.optim.lr * cfg.optim.min_lr_ratio * lr_ratio(group["name"], cfg.optim))
               for part in optimizer.parts.values() for group in part.param_groups)


def olmo_skips(history: list[tuple[float, float]], window: int, sigma: float) -> list[bool]:
    """OLMo-core's SkipStepOptimizer.get_step_factor, written out in float64: per step, skipped or not."""
    decisions = []
    for i, current in enumerate(history):
        before = torch.tensor(history[max(0, i - window):i], dtype=torch.float64)
        if i + 1 < max(20, window // 2):
            decisions.append(False)
            continue
        std, mean = torch.std_mean(before, dim=0)
        z = (torch.tensor(current, dtype=torch.float64) - mean).abs() / std
        decisions.append(bool((z > sigma).any()))
    return decisions


def test_skip_step_follows_olmo_cores_rule():
    generator = torch.Generator().manual_seed(0)
    loss = 3 + 0.1 * torch.randn(200, generator=generator, dtype=torch.float64)
    grad_norm = 1 + 0.05 * torch.randn(200, generator=generator, dtype=torch.float64)
    loss[[15, 60, 61, 150]] += 5  # before the history is long enough, and spikes after it
    grad_norm[[100, 170]] *= 10
    loss[120] -= 5  # OLMo-core's test is two-sided
    history = list(zip(loss.tolist(), grad_norm.tolist()))
    skipper = SpikeSkip(window=40, sigma=6.0, device=torch.device("cpu"))
    ours = [bool(skipper.decide(torch.tensor(a), torch.tensor(b))) for a, b in history]
    assert ours == olmo_skips(history, 40, 6.0)
    assert [i for i, skipped in enumerate(ours) if skipped] == [60, 61, 100, 120, 150, 170]
    assert int(skipper.skipped) == 6


@pytest.mark.slow
@pytest.mark.parametrize("precision,optim", [("fp32", "adamw"), ("fp16", "adamw"), ("fp32", "muon"),
                                             ("fp16", "muon"), ("bf16_pure", "adamw")])
def test_skip_step_skips_an_injected_spike_bitwise_and_nothing_else(precision, optim, tmp_path):
    trainer = make_run([f"precision={precision}", f"optim={optim}", "optim.skip_spikes=true",
                            "optim.skip_spikes_window=20", "train.grad_clip=0"], tmp_path)
    spike_at, calls = 24, {"n": 0}

    def spike(grad):
        calls["n"] += 1
        return grad * 1e3 if calls["n"] == spike_at else grad

    trainer.model.blocks[0].mlp.fc.weight.register_hook(spike)
    for step in range(1, 28):
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        state = copy.deepcopy(list(trainer.optimizer.state.values()))  # (stochastic rounding draws its bits anyway)
        trainer.train_step()
        unchanged = all(torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())
        assert unchanged == (step == spike_at), step
        if step == spike_at:  # the optimizer's state too
            after = list(trainer.optimizer.state.values())
            assert all(torch.equal(a, b) for a, b in zip(flat_tensors(state), flat_tensors(after)))
    assert int(trainer.spike_skip.skipped) == 1
    if precision == "fp16":
        assert trainer.precision.scale() == trainer.cfg.precision.init_scale  # a spike is not an overflow
