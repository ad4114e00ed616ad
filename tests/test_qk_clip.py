"""QK-clip (minilm/optim/qk_clip.py) and the per-head max attention logit, against float64 references."""

import copy

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from minilm.config import validate
from minilm.errors import ConfigError
from minilm.launch.cli import compose
from minilm.model import GPT, rotate
from minilm.optim.qk_clip import QKClip
from minilm.precision.policy import Precision
from tests.helpers import make_run, peek_batch, with_tiny

ARCHITECTURES = {"mha": [], "gqa_rope": ["model.n_head=4", "model.n_kv_head=2", "model.position=rope"],
                 "rope_softcap_nobias": ["model.position=rope", "model.attn_softcap=20", "model.bias=false"],
                 "mup_wide": ["model.parametrization=mup", "model.base_width=16"]}  # μP's 1/d_head logits


def model_and_batch(overrides: list[str], seed: int = 0) -> tuple[GPT, torch.Tensor]:
    """A test-size model with weights large enough that heads differ in their max logit, and a batch."""
    cfg = compose(with_tiny(overrides))
    torch.manual_seed(seed)
    model = GPT(OmegaConf.to_object(cfg.model), OmegaConf.to_object(cfg.norm), 512)  # as build_model does
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight.mul_(10 * torch.linspace(0.5, 1.5, block.attn.qkv.weight.shape[0])[:, None])
            if block.attn.qkv.bias is not None:  # biases are scaled with their rows: make them count
                block.attn.qkv.bias.normal_(0, 0.5)
    return model, torch.randint(0, 512, (4, cfg.model.block_size))


@torch.no_grad()
def attention_inputs_of(model: GPT, x: torch.Tensor) -> dict[int, torch.Tensor]:
    inputs = {}
    hooks = [b.attn.register_forward_pre_hook(lambda _m, a, i=i: inputs.__setitem__(i, a[0]))
             for i, b in enumerate(model.blocks)]
    model(x)
    for hook in hooks:
        hook.remove()
    return inputs


@torch.no_grad()
def float64_head_max(attn, h: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Each head's max over batch and causal (query, key) pairs of q.k times the layer's scale (1/sqrt(d_head),
    μP's 1/d_head x sqrt(base d_head): `scale`), in float64, written out."""
    B, T, C = h.shape
    H, G, d = attn.n_head, attn.n_kv_head, attn.d_head
    qkv = F.linear(h.double(), attn.qkv.weight.double(), None if attn.qkv.bias is None else attn.qkv.bias.double())
    q = qkv[..., :C].reshape(B, T, H, d).transpose(1, 2)
    k = qkv[..., C:C + G * d].reshape(B, T, G, d).transpose(1, 2)
    if attn.rope_theta is not None:
        q, k = rotate(q, attn.rope_theta), rotate(k, attn.rope_theta)
    k = k[:, [head // (H // G) for head in range(H)]]  # each query head's kv head
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k) * (scale or d ** -0.5)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    return scores[..., causal].amax(dim=(0, 2))


def float64_maxima(model: GPT, x: torch.Tensor) -> torch.Tensor:
    inputs, scale = attention_inputs_of(model, x), head_scale(model)
    return torch.stack([float64_head_max(block.attn, inputs[i], scale) for i, block in enumerate(model.blocks)])


def head_scale(model: GPT) -> float | None:
    """μP's attention scale, sqrt(base d_head) / d_head, written out from the config; None: SP's 1/sqrt(d_head)."""
    cfg = model.cfg
    return (cfg.base_width // cfg.n_head) ** 0.5 / (cfg.d_model // cfg.n_head) if cfg.parametrization == "mup" else None


def tau_between(maxima: torch.Tensor) -> float:
    """A tau halfway between the two middle heads' maxima: half the heads above it, none near it."""
    values = maxima.flatten().sort().values
    return float(values[len(values) // 2 - 1:len(values) // 2 + 1].mean())


def observed(model: GPT, x: torch.Tensor, tau: float) -> QKClip:
    clip = QKClip(model, tau)
    clip.observe(x, Precision(compose(["size=test"]).precision, torch.device("cpu")).autocast)
    return clip


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_per_head_max_logit_matches_a_float64_reference(arch):
    model, x = model_and_batch(ARCHITECTURES[arch])
    got = observed(model, x, 1.0).maxima
    expected = float64_maxima(model, x)
    assert got.shape == (len(model.blocks), model.cfg.n_head) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    assert (expected.amax(dim=1) - expected.amin(dim=1) > 0.05 * expected.amax(dim=1)).all()  # heads differ


def attn_rows(model: GPT) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if ".attn.qkv." in name}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_clip_brings_every_head_to_tau_and_leaves_heads_below_it_bitwise(arch):
    model, x = model_and_batch(ARCHITECTURES[arch])
    before = float64_maxima(model, x)
    tau = tau_between(before)
    inputs = attention_inputs_of(model, x)  # what the clipped logits are bounded on
    clip, rows = observed(model, x, tau), attn_rows(model)
    clipped = clip.clip(torch.tensor(1.0), None)["optim/qk_clipped_heads"]
    assert int(clipped) == int((before > tau).sum()) > 0
    scale = head_scale(model)
    after = torch.stack([float64_head_max(block.attn, inputs[i], scale) for i, block in enumerate(model.blocks)])
    above = before > tau
    torch.testing.assert_close(after[above], torch.full_like(after[above], tau), rtol=1e-5, atol=0)
    assert torch.equal(after[~above], before[~above])
    H, d = model.cfg.n_head, model.cfg.d_model // model.cfg.n_head
    shared = model.cfg.n_kv_head not in (None, H)
    for name, p in model.named_parameters():
        if ".attn.qkv." not in name:
            continue
        layer = int(name.split(".")[1])
        old, new = rows[name].view(p.shape[0], -1), p.detach().view(p.shape[0], -1)
        for head in range(H):
            q_rows = slice(head * d, (head + 1) * d)
            assert torch.equal(new[q_rows], old[q_rows]) == (not above[layer, head])
            if not shared:
                k_rows = slice(H * d + head * d, H * d + (head + 1) * d)
                assert torch.equal(new[k_rows], old[k_rows]) == (not above[layer, head])
        kv_end = H * d + 2 * (model.cfg.n_kv_head or H) * d
        keys_and_values = slice(H * d, kv_end) if shared else slice(2 * H * d, kv_end)
        assert torch.equal(new[keys_and_values], old[keys_and_values])  # shared keys and every value untouched


@pytest.mark.parametrize("grad_norm,skip", [(float("inf"), None), (float("nan"), None), (1.0, True)])
def test_a_step_whose_update_was_not_applied_is_not_clipped(grad_norm, skip):
    model, x = model_and_batch([])
    clip, rows = observed(model, x, 1e-3), attn_rows(model)
    clipped = clip.clip(torch.tensor(grad_norm), None if skip is None else torch.tensor(skip))
    assert int(clipped["optim/qk_clipped_heads"]) == 0
    assert all(torch.equal(p, rows[name]) for name, p in model.named_parameters() if name in rows)


@pytest.mark.parametrize("precision,optim", [("fp32", "adamw"), *(pytest.param(*arm, marks=pytest.mark.slow)
                                             for arm in [("fp32", "muon"), ("bf16", "muon"), ("fp16", "adamw")])])
def test_a_training_step_clips_the_update_of_the_heads_above_tau(precision, optim, tmp_path):
    """The same first step with and without QK-clip: the clipped run's weights are the unclipped run's, with the
    query and key rows of the heads above tau scaled by sqrt(tau / S), and every other parameter bitwise equal.
    S, as observed on the step's batch, is the float64 reference's (to the rounding of the run's autocast)."""
    common = [f"precision={precision}", f"optim={optim}", "model.position=rope"]
    plain = make_run(common, tmp_path / "plain")
    x, _ = peek_batch(plain)
    reference = float64_maxima(copy.deepcopy(plain.model), x).float()
    tau = tau_between(reference)
    clipped = make_run([*common, f"optim.qk_clip_tau={tau}"], tmp_path / "clipped")
    seen = []
    clip = clipped.qk_clip.clip
    clipped.qk_clip.clip = lambda *args: seen.append(clipped.qk_clip.maxima.clone()) or clip(*args)
    plain.train_step()
    clipped.train_step()
    maxima = seen[0]
    torch.testing.assert_close(maxima, reference, rtol=1e-5 if precision == "fp32" else 2e-2, atol=0)
    assert 0 < clipped.diagnostics.collect()[1]["optim/qk_clipped_heads"] == int((maxima > tau).sum()) < maxima.numel()
    H, d = plain.cfg.model.n_head, plain.cfg.model.d_model // plain.cfg.model.n_head
    for (name, p), (_, q) in zip(plain.model.named_parameters(), clipped.model.named_parameters()):
        if ".attn.qkv." not in name:
            assert torch.equal(q, p), name
            continue
        layer, expected = int(name.split(".")[1]), p.detach().clone()
        scale = torch.where(maxima[layer] > tau, tau / maxima[layer], 1.0).sqrt()
        rows = expected.view(p.shape[0], -1)
        for start in (0, H * d):  # queries, keys
            rows[start:start + H * d].view(H, d, -1).mul_(scale[:, None, None])
        assert torch.equal(q, expected), name


def test_config_refuses_qk_clip_where_it_cannot_act():
    with pytest.raises(ConfigError, match="optim.qk_clip_tau=10.0 cannot clip a model with model.qk_norm=true"):
        validate(compose(["optim.qk_clip_tau=10", "model.qk_norm=true"]))
    with pytest.raises(ConfigError, match="optim.qk_clip_tau=0.0 is not valid; it must be a finite number > 0"):
        validate(compose(["optim.qk_clip_tau=0"]))
    validate(compose(["optim=muon", "optim.qk_clip_tau=100", "model=modern", "model.qk_norm=false"]))
