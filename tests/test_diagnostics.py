"""Stability diagnostics against independent float64 computations; divergence; the mitigation knobs."""

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from minilm.config import validate
from minilm.launch.cli import compose, preflight
from minilm.norms import build_norm
from minilm.rundir import read_metrics
from minilm.train.diagnostics import (
    PROBE_STDS,
    SpikeScore,
    attention_stats,
    beyond_fp16,
    block_skip_dloss,
    norm_probe_errors,
    param_group,
)
from tests.helpers import fit_alone, losses, make_run, peek_batch, run_training

N_LAYER = 2  # size=test's


def close(value, reference, rel=1e-4):
    return float(value) == pytest.approx(float(reference), rel=rel, abs=1e-6)


@torch.no_grad()
def reference_activation_stats(model, x) -> dict:
    """The activation diag/* metrics in float64: attention by hand with einsum, the rest from captured tensors."""
    ref = copy.deepcopy(model).double()
    attn_in, block_out, norm_in = {}, {}, {}
    hooks = [b.attn.register_forward_pre_hook(lambda _m, a, i=i: attn_in.__setitem__(i, a[0]))
             for i, b in enumerate(ref.blocks)]
    hooks += [b.register_forward_hook(lambda _m, _a, out, i=i: block_out.__setitem__(i, out))
              for i, b in enumerate(ref.blocks)]
    hooks += [m.register_forward_pre_hook(lambda _m, a, name=name: norm_in.__setitem__(name, a[0]))
              for name, m in ref.named_modules() if name.rsplit(".", 1)[-1].startswith("norm")]
    z = ref(x)
    for hook in hooks:
        hook.remove()
    stats = {}
    for i, block in enumerate(ref.blocks):
        h = attn_in[i]
        B, T, C = h.shape
        H = block.attn.n_head
        q, k, _ = F.linear(h, block.attn.qkv.weight, block.attn.qkv.bias).split(C, dim=2)
        q, k = q.reshape(B, T, H, C // H), k.reshape(B, T, H, C // H)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(C // H)
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        full = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
        p = full[..., causal]
        stats[f"diag/attn_logit_max/L{i}"] = scores[..., causal].max()
        stats.update({f"diag/attn_logit_max_head/L{i}/H{h}": m for h, m in enumerate(scores[..., causal].amax((0, 2)))})
        stats[f"diag/attn_sink/L{i}"] = full[:, :, 1:, 0].mean()  # query 0 sees position 0 alone: left out
        stats[f"diag/attn_entropy/L{i}"] = -(p * p.log()).sum() / (B * H * T)
        stats[f"diag/q_rms/L{i}"], stats[f"diag/k_rms/L{i}"] = q.pow(2).mean().sqrt(), k.pow(2).mean().sqrt()
        stats[f"diag/resid_rms/L{i}"] = block_out[i].pow(2).mean().sqrt()
        stats[f"diag/resid_var/L{i}"] = block_out[i].var(dim=-1, correction=0).mean()
    for name, t in norm_in.items():
        stats[f"diag/norm_in_absmax/{name}"] = t.abs().max()
    top = z.max(dim=-1, keepdim=True).values
    log_z = (top + (z - top).exp().sum(dim=-1, keepdim=True).log()).squeeze(-1)
    stats.update({"diag/logits_mean": z.mean(), "diag/logits_absmax": z.abs().max(),
                  "diag/logz_mean": log_z.mean(), "diag/logz_std": (log_z - log_z.mean()).pow(2).mean().sqrt()})
    return stats


@pytest.mark.slow
def test_activation_diagnostics_match_a_float64_reference(tmp_path):
    trainer = make_run([], tmp_path)
    x, _ = peek_batch(trainer)
    trainer.diagnostics.observe_forward(1, x)
    got = trainer.diagnostics.collect()[1]
    expected = reference_activation_stats(trainer.model, x)
    documented = {f"diag/{m}/L{i}" for m in ("attn_logit_max", "attn_entropy", "attn_sink", "q_rms", "k_rms",
                                             "resid_rms", "resid_var") for i in range(N_LAYER)}
    documented |= {f"diag/attn_logit_max_head/L{i}/H{h}" for i in range(N_LAYER) for h in range(2)}
    documented |= {f"diag/norm_in_absmax/blocks.{i}.{n}" for i in range(N_LAYER) for n in ("norm_attn", "norm_mlp")}
    documented |= {"diag/norm_in_absmax/norm_f", "diag/logits_mean", "diag/logits_absmax", "diag/logz_mean",
                   "diag/logz_std", "amp/overflow_activations"}
    assert set(got) == documented == set(expected) | {"amp/overflow_activations"}
    for name, reference in expected.items():
        assert close(got[name], reference), (name, got[name], float(reference))
    assert got["amp/overflow_activations"] == 0
    assert got["diag/q_rms/L0"] < 0.5  # no qk-norm: queries are small at init (compare the qk-norm test)


def test_attention_sink_and_entropy_match_a_hand_computation():
    """Two heads, d_head = 1, three positions. Head 0's keys (ln 3, 0, 0) give query 1 the weights (3/4, 1/4) and
    query 2 (3/5, 1/5, 1/5); head 1's zero keys give uniform weights. The sink leaves out query 0 (weight 1 on
    position 0 by the mask alone): head 0 (3/4 + 3/5) / 2, head 1 (1/2 + 1/3) / 2."""
    q = torch.ones(1, 2, 3, 1)
    k = torch.tensor([[math.log(3), 0.0, 0.0], [0.0, 0.0, 0.0]]).view(1, 2, 3, 1)
    stats = attention_stats(q, k)
    assert float(stats["sink"]) == pytest.approx(((3 / 4 + 3 / 5) / 2 + (1 / 2 + 1 / 3) / 2) / 2, rel=1e-6)
    assert stats["head_max"].tolist() == pytest.approx([math.log(3), 0.0])

    def h(*p):
        return -sum(x * math.log(x) for x in p)

    entropy = (h(3 / 4, 1 / 4) + h(3 / 5, 1 / 5, 1 / 5) + h(1 / 2, 1 / 2) + h(1 / 3, 1 / 3, 1 / 3)) / 6
    assert float(stats["entropy"]) == pytest.approx(entropy, rel=1e-6)
    # soft-capped at 1: head 0's first logit becomes tanh(ln 3) = 0.8 as the softmax sees it; the max stays ln 3
    capped = attention_stats(q, k, cap=1.0)
    w1, w2 = math.exp(0.8) / (math.exp(0.8) + 1), math.exp(0.8) / (math.exp(0.8) + 2)
    assert float(capped["sink"]) == pytest.approx(((w1 + w2) / 2 + (1 / 2 + 1 / 3) / 2) / 2, rel=1e-6)
    assert capped["head_max"].tolist() == pytest.approx([math.log(3), 0.0])


@pytest.mark.slow
def test_overflow_count_is_what_fp16_could_not_hold(tmp_path):
    assert beyond_fp16(torch.tensor([1.0, 65504.0, -65504.0, 65520.0, -7e4, float("inf"), float("nan")])) == 4
    trainer = make_run([], tmp_path)
    x, _ = peek_batch(trainer)
    trainer.model.pos_emb.weight.data[5, 0] = 1e5  # rides the residual stream through every block
    trainer.diagnostics.observe_forward(1, x)
    got = trainer.diagnostics.collect()[1]
    # the position embedding's output once, then every block's output at (b, 5, 0); the norms shrink it elsewhere
    assert got["amp/overflow_activations"] == 1 + x.shape[0] * N_LAYER
    assert got["diag/norm_in_absmax/blocks.0.norm_attn"] == pytest.approx(1e5, rel=1e-3)


def test_param_groups_mean_something():
    assert [param_group(n) for n in ("tok_emb.weight", "pos_emb.weight", "lm_head.weight", "norm_f.weight",
                                     "blocks.3.attn.qkv.weight", "blocks.3.attn.proj.bias", "blocks.3.mlp.fc.weight",
                                     "blocks.3.norm_mlp.bias", "blocks.3.norm_attn_out.weight",
                                     "blocks.3.attn.q_norm.weight")] == [
        "embed", "embed", "head", "final_norm", "L3.attn", "L3.attn", "L3.mlp", "L3.norm", "L3.norm", "L3.norm"]


def test_gradient_and_update_diagnostics_match_a_float64_reference(tmp_path):
    trainer = make_run(["diagnostics.interval=1"], tmp_path)
    params = dict(trainer.model.named_parameters())
    grads = {}
    for name, p in params.items():  # the full (pre-clip) gradient: one micro-batch, fp32
        p.register_hook(lambda g, name=name: grads.__setitem__(name, g.detach().double().clone()))
    before = {name: p.detach().double().clone() for name, p in params.items()}
    _, grad_norm, _ = trainer.train_step()
    assert grad_norm > 1.0  # clipped, so the pre-clip gradient is the one to log
    got = trainer.diagnostics.collect()[1]
    groups = {}
    for name in params:
        groups.setdefault(param_group(name), []).append(name)
    per_block = {f"L{i}.{k}" for i in range(N_LAYER) for k in ("attn", "mlp", "norm")}
    assert set(groups) == {"embed", "final_norm"} | per_block

    def norm(tensors):
        return math.sqrt(sum(float(t.pow(2).sum()) for t in tensors))

    for group, names in groups.items():
        root_n = math.sqrt(sum(before[n].numel() for n in names))
        delta = [params[n].detach().double() - before[n] for n in names]
        assert close(got[f"diag/grad_rms/{group}"], norm(grads[n] for n in names) / root_n), group
        assert close(got[f"diag/param_rms/{group}"], norm(before[n] for n in names) / root_n), group
        assert close(got[f"diag/update_ratio/{group}"], norm(delta) / norm(before[n] for n in names), 1e-3), group
        assert close(got[f"diag/update_rms/{group}"], norm(delta) / root_n, 1e-3), group


def reference_spike_score(values, window, sigma):
    finite = np.array([v for v in values if math.isfinite(v)], dtype=np.float64)
    flags = [abs(finite[i] - finite[i - window:i].mean()) >= sigma * finite[i - window:i].std()
             for i in range(window, len(finite))]
    return float(np.mean(flags))


def test_spike_score_counts_points_far_from_the_previous_window():
    values = list(np.random.default_rng(0).normal(size=40))
    values[30] += 50.0
    values[35] = float("nan")  # neither scored nor windowed
    score = SpikeScore(window=10, sigma=7)
    for v in values:
        score.update(v)
    assert score.score == pytest.approx(reference_spike_score(values, 10, 7)) == pytest.approx(1 / 29)


def test_healthy_run_logs_scores_and_does_not_diverge(tmp_path):
    trainer = make_run(["train.max_steps=11", "train.log_interval=4", "diagnostics.interval=5",
                            "diagnostics.spike_window=4", "diagnostics.spike_sigma=1.5"], tmp_path)
    summary = fit_alone(trainer)
    assert not summary["diverged"] and summary["diverged_at_step"] is None and summary["outcome"] == "completed"
    rows = [r for r in read_metrics(tmp_path) if "train/loss" in r]
    assert [r["step"] for r in rows if "diag/attn_logit_max/L0" in r] == [1, 5, 10]
    last = rows[-1]
    assert last["optim/clip_fraction"] == pytest.approx(np.mean([r["optim/clipped"] for r in rows]))
    assert last["diag/loss_spike_score"] == pytest.approx(reference_spike_score(losses(rows), 4, 1.5))
    assert last["diag/grad_norm_spike_score"] == pytest.approx(
        reference_spike_score([r["optim/grad_norm"] for r in rows], 4, 1.5))
    assert last["perf/peak_mem_mb"] > 0 and summary["optim/clip_fraction"] == last["optim/clip_fraction"]


@pytest.mark.slow
@pytest.mark.parametrize("stop", [True, False])
def test_divergence_fires_on_a_learning_rate_that_certainly_diverges(stop, tmp_path):
    trainer = make_run(["optim.lr=10", "train.max_steps=4", f"train.stop_on_divergence={stop}",
                            "train.divergence_window=1"], tmp_path)
    summary = fit_alone(trainer)
    assert summary["diverged"] and 1 < summary["diverged_at_step"] <= 3  # step 1 runs at the init loss
    assert summary["outcome"] == ("diverged" if stop else "completed")
    assert summary["step"] == (summary["diverged_at_step"] if stop else 4)
    assert summary["last_healthy/step"] == summary["diverged_at_step"] - 1
    assert summary["last_healthy/train/loss"] <= math.log(512) + 0.5
    assert json.loads((tmp_path / "summary.json").read_text())["diverged"]
    assert (tmp_path / "checkpoints" / "diverged.pt").exists() == stop


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_diagnostics_observe_without_perturbing(precision, tmp_path):
    common = ["deterministic=true", "model.dropout=0.1", f"precision={precision}", "train.max_steps=3",
              "train.grad_accum=2"]
    off = run_training(common + ["diagnostics=off"], tmp_path / "off")
    on = run_training(common + ["diagnostics.interval=1", "diagnostics.activation_hooks=true",
                                "diagnostics.norm_probe=true"], tmp_path / "on")
    assert losses(on) == losses(off) and len(losses(on)) == 3
    assert all("diag/norm_error/centred/1e-04" in r for r in on if "train/loss" in r)
    assert [r["optim/grad_norm"] for r in on if "train/loss" in r] == [r["optim/grad_norm"] for r in off
                                                                       if "train/loss" in r]
    assert all("diag/attn_entropy/L1" in r for r in on if "train/loss" in r)
    assert not any(k.startswith("diag/attn") for r in off for k in r)


@pytest.mark.slow
def test_z_loss_is_logged_apart_from_the_loss_and_pulls_logz_to_zero(tmp_path):
    runs = {}
    for coefficient in (0.0, 0.1):
        trainer = make_run(["train.max_steps=6", "diagnostics.interval=6", "optim.lr=3e-2",
                                f"optim.z_loss={coefficient}"], tmp_path / str(coefficient))
        x, y = peek_batch(trainer)
        with torch.no_grad():
            z = copy.deepcopy(trainer.model).double()(x)
        fit_alone(trainer)
        runs[coefficient] = rows = [r for r in read_metrics(tmp_path / str(coefficient)) if "train/loss" in r]
        log_z = torch.logsumexp(z, dim=-1)
        assert close(rows[0]["train/loss"], (log_z - z.gather(-1, y.unsqueeze(-1)).squeeze(-1)).mean())  # CE alone
        if coefficient:
            assert close(rows[0]["train/z_loss"], coefficient * log_z.pow(2).mean())
        else:
            assert "train/z_loss" not in rows[0]
    # ln(512) = 6.2 at init; the z-loss term drives log Z towards 0, plain cross-entropy does not
    assert runs[0.1][-1]["diag/logz_mean"] < runs[0.0][-1]["diag/logz_mean"] - 1.0


@pytest.mark.slow
def test_qk_norm_bounds_the_logged_attention_logits(tmp_path):
    trainer = make_run(["model.qk_norm=true", "diagnostics.interval=1"], tmp_path)
    trainer.train_step()
    got = trainer.diagnostics.collect()[1]
    d_head = trainer.cfg.model.d_model // trainer.cfg.model.n_head
    for i in range(N_LAYER):
        assert got[f"diag/q_rms/L{i}"] == pytest.approx(1.0, abs=1e-3)
        assert got[f"diag/k_rms/L{i}"] == pytest.approx(1.0, abs=1e-3)
        assert got[f"diag/attn_logit_max/L{i}"] <= math.sqrt(d_head)  # |q.k| / sqrt(d) <= |q||k| / sqrt(d)
    qk_norms = {f"diag/norm_in_absmax/blocks.{i}.attn.{n}" for i in range(N_LAYER) for n in ("q_norm", "k_norm")}
    assert qk_norms <= set(got)


@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
def test_norm_probe_measures_eps_bias_and_the_rounding_of_each_dtype(kind):
    norm = build_norm(kind, 64, eps=1e-5)
    with torch.no_grad():
        norm.weight.mul_(1.5)  # the truth applies the gain too
    errors = {dtype: norm_probe_errors(norm, kind, 64, dtype, torch.autocast("cpu", dtype, dtype != torch.float32),
                                       torch.device("cpu"))  # the run's autocast, as the trainer passes it
              for dtype in (torch.float32, torch.float16, torch.bfloat16)}
    for std in PROBE_STDS:  # eps shrinks every row by std / sqrt(std^2 + eps): its error, whatever the dtype
        bias = 1 - std / math.sqrt(std**2 + 1e-5)
        assert errors[torch.float32][f"norm_error/centred/{std:.0e}"] == pytest.approx(bias, abs=1e-5)
        assert errors[torch.float32][f"norm_rounding_error/centred/{std:.0e}"] < 1e-6
    fp16, bf16 = errors[torch.float16], errors[torch.bfloat16]
    # half an ulp over sqrt(3) (uniform rounding error): 2^-11 / sqrt(3) for fp16, 2^-8 / sqrt(3) for bf16
    assert fp16["norm_rounding_error/centred/1e-02"] == pytest.approx(2**-11 / math.sqrt(3), rel=0.3)
    assert bf16["norm_rounding_error/centred/1e-02"] == pytest.approx(2**-8 / math.sqrt(3), rel=0.3)
    # below 6.1e-5 fp16 is subnormal: its spacing 2^-24 is fixed, so the relative error grows as 1 / std
    assert fp16["norm_rounding_error/centred/1e-06"] > 5 * bf16["norm_rounding_error/centred/1e-06"]
    if kind == "layernorm":  # 1 + 0.01 z: the spacing at 1 (2^-7, 2^-10) against a spread of 0.01
        assert bf16["norm_rounding_error/offset/1e-02"] > 4 * fp16["norm_rounding_error/offset/1e-02"]


@pytest.mark.parametrize("kind", ["dyt", "triton_dyt"])
def test_norm_probe_of_dyt_measures_its_rounding_against_float64_dyt(kind):
    """DyT normalizes nothing: no norm_error, only its arithmetic against float64 DyT with its own alpha and gain."""
    norm = build_norm(kind, 64, dyt_alpha=0.7)
    with torch.no_grad():
        norm.weight.mul_(1.5)
    errors = {dtype: norm_probe_errors(norm, kind, 64, dtype, torch.autocast("cpu", dtype, dtype != torch.float32),
                                       torch.device("cpu"))
              for dtype in (torch.float32, torch.bfloat16)}
    assert not any(name.startswith("norm_error/") for name in errors[torch.float32])
    for std in PROBE_STDS:  # rows of mean 0 and 1, each rounded once to the dtype, then squashed
        for family in ("centred", "offset"):
            assert errors[torch.float32][f"norm_rounding_error/{family}/{std:.0e}"] < 1e-6
            assert errors[torch.bfloat16][f"norm_rounding_error/{family}/{std:.0e}"] < 2**-7


def test_diagnostics_config_group():
    off = compose(["diagnostics=off"])
    validate(off)
    assert off.diagnostics.interval == 0 and off.diagnostics.forensics is False
    assert "diagnostics.spike_window=0" in preflight(["diagnostics.spike_window=0"])
    cfg = compose([])
    assert cfg.diagnostics.interval > 0 and cfg.diagnostics.spike_sigma == 7 and cfg.diagnostics.forensics is True
    assert cfg.train.divergence_margin == 0.5


@torch.no_grad()
def val_loss_skipping(model, batches, skipped: int | None) -> float:
    """The mean val loss in float64 with block `skipped` left out of the forward by hand (None: the full model)."""
    ref = copy.deepcopy(model).double().eval()
    total = 0.0
    for x, y in batches:
        h = ref.tok_emb(x) + ref.pos_emb(torch.arange(x.shape[1]))
        for i, block in enumerate(ref.blocks):
            h = h if i == skipped else block(h)
        logits = ref.lm_head(ref.norm_f(h))
        total += float(F.cross_entropy(logits.flatten(0, 1), y.flatten()))
    return total / len(batches)


def test_block_skip_dloss_is_the_loss_with_the_block_left_out_by_hand(tmp_path):
    run = make_run(["diagnostics.block_skip=true"], tmp_path)
    for _ in range(3):  # trained a little, so every block does something
        run.train_step()
    blocks = list(run.model.blocks)
    full = run.evaluate()
    got = block_skip_dloss(run.model, run.evaluate, full)
    assert list(run.model.blocks) == blocks  # every block is back in place
    assert run.evaluate() == full
    reference = val_loss_skipping(run.model, run.val_batches, None)
    assert set(got) == {f"diag/block_skip_dloss/L{i}" for i in range(N_LAYER)}
    for i in range(N_LAYER):
        by_hand = val_loss_skipping(run.model, run.val_batches, i) - reference
        assert got[f"diag/block_skip_dloss/L{i}"] == pytest.approx(by_hand, rel=1e-4, abs=1e-5)
        assert abs(by_hand) > 1e-3  # skipping a block changes the loss: the comparison has something to match


@pytest.mark.slow
def test_block_skip_dloss_is_logged_at_every_evaluation(tmp_path):
    rows = run_training(["diagnostics.block_skip=true", "train.max_steps=4", "train.eval_interval=2"], tmp_path)
    logged = {row["step"]: row for row in rows if "val/loss" in row}
    assert sorted(logged) == [2, 4]
    assert all({f"diag/block_skip_dloss/L{i}" for i in range(N_LAYER)} <= set(row) for row in logged.values())
    assert not any("diag/block_skip_dloss/L0" in row for row in rows if "val/loss" not in row)
