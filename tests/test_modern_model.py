"""The model knobs of today's small LMs (RoPE, GQA, soft-caps, gated attention, ReLU^2 / SwiGLU, reordered
placement, depth-scaled norms, zero-init projections, nanochat's tricks) and the model=modern preset: each
against a float64 reference or its defining property."""

import json
import math

import pytest
import torch
from omegaconf import OmegaConf

from minilm.config import ModelConfig, NormConfig
from minilm.launch import reproduce
from minilm.launch.cli import compose
from minilm.model import GPT, lm_loss, mlp_hidden, rotate, softcap, softcapped_attention
from minilm.norms import NORM_KINDS, norm_unavailable_reason
from minilm.precision.policy import Precision
from minilm.train.diagnostics import Diagnostics
from minilm.train.ensemble import unbatchable_reason
from tests.helpers import fit_alone, losses, make_run, run_training

VOCAB = 97


def gpt(norm: str = "layernorm", depth_scaling: bool = False, **kwargs) -> GPT:
    torch.manual_seed(0)
    shape = dict(n_layer=2, n_head=4, d_model=32, block_size=16)
    return GPT(ModelConfig(**{**shape, **kwargs}), NormConfig(kind=norm, depth_scaling=depth_scaling), VOCAB)


def causal_attention_float64(q, k, v):
    """softmax(q k^T / sqrt(d) + causal mask) v, in float64."""
    q, k, v = q.double(), k.double(), v.double()
    T = q.shape[-2]
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    logits = logits.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(logits, dim=-1) @ v


# ---------------------------------------------------------------- RoPE


def test_rope_matches_a_float64_complex_rotation():
    x = torch.randn(2, 3, 10, 8)
    theta, d = 500.0, 8
    # channel i and i + d/2 are the real and imaginary part of one complex number, turned by t * theta^(-2i/d)
    z = torch.complex(x[..., :4].double(), x[..., 4:].double())
    angle = torch.arange(10, dtype=torch.float64)[:, None] * theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    turned = z * torch.polar(torch.ones_like(angle), angle)
    expected = torch.cat([turned.real, turned.imag], dim=-1)
    torch.testing.assert_close(rotate(x, theta).double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rotate(x.double(), theta), expected, rtol=1e-12, atol=1e-12)  # float64 stays float64
    assert rotate(x.bfloat16(), theta).dtype == torch.bfloat16


def test_rope_dot_products_depend_only_on_the_position_difference():
    T = 12
    q, k = torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    rq, rk = rotate(q.expand(T, 16), 10000.0), rotate(k.expand(T, 16), 10000.0)
    dots = rq @ rk.T  # dots[m, n] = q at position m . k at position n
    for shift in (1, 3, 7):
        torch.testing.assert_close(dots[shift:, shift:], dots[:-shift, :-shift], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(dots[0, 0], dots[0, 5])  # ... and it does depend on the difference


def test_rope_model_has_no_position_table_and_is_position_aware():
    m = gpt(position="rope")
    assert m.pos_emb is None and not any("pos_emb" in name for name, _ in m.named_parameters())
    attn = m.blocks[0].attn
    x = torch.randn(1, 16, 32)
    q, k, _ = attn.project_qkv(x)
    q0, k0, _ = gpt(position="none").blocks[0].attn.project_qkv(x)  # the same weights, unrotated
    torch.testing.assert_close(q, rotate(q0, 10000.0))
    torch.testing.assert_close(k, rotate(k0, 10000.0))


# ---------------------------------------------------------------- grouped-query attention


def test_gqa_with_as_many_kv_heads_as_heads_is_full_attention():
    full, gqa = gpt(), gpt(n_kv_head=4)
    x = torch.randn(2, 16, 32)
    torch.testing.assert_close(gqa.blocks[0].attn(x), full.blocks[0].attn(x), rtol=0, atol=0)
    attn = full.blocks[0].attn
    q, k, v = attn.project_qkv(x)
    y = causal_attention_float64(q, k, v).transpose(1, 2).reshape(2, 16, 32)
    expected = y @ attn.proj.weight.double().T + attn.proj.bias.double()
    torch.testing.assert_close(attn(x).double(), expected, rtol=1e-5, atol=1e-6)


def test_each_kv_head_is_shared_by_its_group_of_query_heads():
    m = gpt(n_kv_head=2)
    attn = m.blocks[0].attn
    assert attn.qkv.weight.shape == (32 + 2 * 2 * 8, 32)
    x = torch.randn(2, 16, 32)
    q, k, v = attn.project_qkv(x)
    _, k_own, v_own = attn.qkv(x).split([32, 16, 16], dim=2)
    k_own, v_own = (t.view(2, 16, 2, 8).transpose(1, 2) for t in (k_own, v_own))
    for head in range(4):  # query heads 0, 1 read kv head 0; heads 2, 3 read kv head 1
        torch.testing.assert_close(k[:, head], k_own[:, head // 2], rtol=0, atol=0)
        torch.testing.assert_close(v[:, head], v_own[:, head // 2], rtol=0, atol=0)
    y = causal_attention_float64(q, k, v).transpose(1, 2).reshape(2, 16, 32)
    expected = y @ attn.proj.weight.double().T + attn.proj.bias.double()
    torch.testing.assert_close(attn(x).double(), expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- soft-caps


def test_softcap_bounds_and_is_the_identity_to_first_order_near_zero():
    x = torch.tensor([-1e6, -100.0, 0.0, 100.0, 1e6], dtype=torch.bfloat16)
    capped = softcap(x, 15.0)
    assert capped.dtype == torch.float32 and capped.abs().max() <= 15.0 and capped[2] == 0
    small = torch.linspace(-1e-3, 1e-3, 11, dtype=torch.float64, requires_grad=True)
    y = softcap(small.float(), 30.0).double()
    torch.testing.assert_close(y, small.detach(), rtol=1e-6, atol=1e-9)  # x - x^3 / (3 c^2): below 1e-9 here
    slope, = torch.autograd.grad(softcap(small, 30.0).sum(), small)
    torch.testing.assert_close(slope, torch.ones_like(slope), rtol=1e-8, atol=0)


def test_logit_softcap_bounds_the_model_logits():
    m = gpt(logit_softcap=2.0, tie_embeddings=False)
    torch.nn.init.normal_(m.lm_head.weight, std=10.0)
    logits = m(torch.randint(0, VOCAB, (2, 16)))
    assert logits.dtype == torch.float32 and logits.abs().max() <= 2.0 and logits.abs().max() > 1.9


def test_attention_softcap_matches_a_float64_reference():
    q, k, v = (3 * torch.randn(2, 4, 16, 8) for _ in range(3))
    cap = 5.0
    qd, kd, vd = q.double(), k.double(), v.double()
    logits = cap * torch.tanh(qd @ kd.transpose(-1, -2) / math.sqrt(8) / cap)
    logits = logits.masked_fill(torch.ones(16, 16, dtype=torch.bool).triu(1), float("-inf"))
    expected = torch.softmax(logits, dim=-1) @ vd
    torch.testing.assert_close(softcapped_attention(q, k, v, cap, 0.0).double(), expected, rtol=1e-5, atol=1e-5)
    # a cap far above every logit is plain attention
    torch.testing.assert_close(softcapped_attention(q, k, v, 1e6, 0.0).double(), causal_attention_float64(q, k, v),
                               rtol=1e-5, atol=1e-5)


def test_diagnostics_log_the_attention_logits_before_the_cap(tmp_path):
    cfg = compose(["size=test", "model.attn_softcap=0.5", "model.position=rope"])
    m = GPT(OmegaConf.to_object(cfg.model), OmegaConf.to_object(cfg.norm), 64)
    for block in m.blocks:
        torch.nn.init.normal_(block.attn.qkv.weight, std=1.0)  # logits well above the cap
    diagnostics = Diagnostics(m, Precision(OmegaConf.to_object(cfg.precision), torch.device("cpu")), cfg.diagnostics)
    x = torch.randint(0, 64, (2, 32))
    diagnostics.observe_forward(1, x)
    row = diagnostics.collect()[1]
    attn = m.blocks[0].attn
    inputs = {}
    handle = attn.register_forward_pre_hook(lambda _m, args: inputs.setdefault("h", args[0]))
    with torch.no_grad():
        m(x)
        handle.remove()
        q, k, _ = attn.project_qkv(inputs["h"])
    future = torch.ones(32, 32, dtype=torch.bool).triu(1)
    expected = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(future, float("-inf")).amax()
    assert row["diag/attn_logit_max/L0"] == pytest.approx(expected.item(), rel=1e-5) and expected > 0.5


# ---------------------------------------------------------------- gated attention


def test_attention_gate_at_one_is_the_identity():
    gated, plain = gpt(attn_gate=True), gpt()
    attn = gated.blocks[0].attn
    assert attn.gate.weight.shape == (4, 32)  # one gate per head
    plain.blocks[0].attn.load_state_dict({k: v for k, v in attn.state_dict().items() if not k.startswith("gate")})
    with torch.no_grad():
        attn.gate.weight.zero_()
        attn.gate.bias.fill_(100.0)  # sigmoid(100) = 1 in fp32
    x = torch.randn(2, 16, 32)
    torch.testing.assert_close(attn(x), plain.blocks[0].attn(x), rtol=0, atol=0)
    with torch.no_grad():
        attn.gate.bias[1] = 0.0  # head 1 at half: the heads' outputs before proj tell
    q, k, v = attn.project_qkv(x)
    y = causal_attention_float64(q, k, v)
    y[:, 1] *= 0.5
    expected = y.transpose(1, 2).reshape(2, 16, 32) @ attn.proj.weight.double().T + attn.proj.bias.double()
    torch.testing.assert_close(attn(x).double(), expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- MLPs


@pytest.mark.parametrize("d_model, ratio", [(32, 4), (128, 4), (768, 4), (64, 3)])
def test_swiglu_matches_the_gelu_mlp_parameter_count(d_model, ratio):
    cfg = dict(n_layer=1, n_head=4, d_model=d_model, block_size=8, mlp_ratio=ratio, bias=False)
    swiglu, gelu = gpt(mlp="swiglu", **cfg).blocks[0].mlp, gpt(**cfg).blocks[0].mlp
    hidden = mlp_hidden(ModelConfig(**cfg, mlp="swiglu"))
    assert hidden % 16 == 0 and hidden == 16 * math.ceil(2 * ratio * d_model / 3 / 16)  # the rule
    count = sum(p.numel() for p in swiglu.parameters())
    assert count == 3 * hidden * d_model
    assert 0 <= count - sum(p.numel() for p in gelu.parameters()) < 3 * 16 * d_model


@pytest.mark.parametrize("kind", ["relu2", "swiglu"])
def test_mlp_kinds_compute_their_formula(kind):
    mlp = gpt(mlp=kind).blocks[0].mlp.double()
    x = torch.randn(3, 32, dtype=torch.float64)
    h = x @ mlp.fc.weight.T + mlp.fc.bias
    if kind == "relu2":
        h = h.clamp(min=0) ** 2
    else:
        gate, up = h.chunk(2, dim=-1)
        h = gate / (1 + torch.exp(-gate)) * up
    torch.testing.assert_close(mlp(x), h @ mlp.proj.weight.T + mlp.proj.bias)


# ---------------------------------------------------------------- placement, norms, init


def test_reordered_placement_norms_the_sublayer_output_only():
    block = gpt(placement="reordered").blocks[0].double()
    x = torch.randn(2, 16, 32, dtype=torch.float64)
    h = x + block.norm_attn(block.attn(x))
    torch.testing.assert_close(block(x), h + block.norm_mlp(block.mlp(h)))


def test_depth_scaling_scales_each_block_input_norm_by_one_over_sqrt_layer():
    m = gpt(depth_scaling=True, n_layer=3)
    x = torch.randn(2, 16, 32)
    for layer, block in enumerate(m.blocks, start=1):
        h = x + block.attn(block.norm_attn(x) / math.sqrt(layer))
        torch.testing.assert_close(block(x), h + block.mlp(block.norm_mlp(h) / math.sqrt(layer)))


def test_zero_proj_blocks_start_as_the_identity():
    m = gpt(init="zero_proj", embed_norm=True)
    for name, p in m.named_parameters():
        if name.endswith("proj.weight"):
            assert p.abs().max() == 0, name
    assert m.blocks[0].mlp.fc.weight.std().item() == pytest.approx(0.02, rel=0.1)
    idx = torch.randint(0, VOCAB, (2, 16))
    x = m.embed_norm(m.tok_emb(idx) + m.pos_emb(torch.arange(16)))
    torch.testing.assert_close(m(idx), m.lm_head(m.norm_f(x)))


# ---------------------------------------------------------------- nanochat's tricks


def neutral(m: GPT, knob: str) -> None:
    """Set the trick's learned scalar or table to where it changes nothing."""
    with torch.no_grad():
        if knob == "value_embeds":
            for table in m.value_embeds.values():
                table.weight.zero_()
        elif knob == "x0_blend":
            m.resid_lambdas.fill_(1.0)
            m.x0_lambdas.zero_()
        elif knob == "smear":
            m.smear_lambda.zero_()
        else:
            m.backout_lambda.zero_()


@pytest.mark.parametrize("knob", ["value_embeds", "x0_blend", "smear", "backout"])
def test_each_trick_is_the_identity_when_neutral_and_acts_otherwise(knob):
    base = gpt(n_layer=3)
    trick = gpt(n_layer=3, **{knob: True})
    trick.load_state_dict(base.state_dict(), strict=False)  # the shared weights equal
    idx = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        if knob == "smear":
            trick.smear_lambda.fill_(0.5)  # smear starts neutral; the others start active
        active = trick(idx)
    assert not torch.allclose(active, base(idx), atol=1e-4)
    neutral(trick, knob)
    torch.testing.assert_close(trick(idx), base(idx), rtol=1e-6, atol=1e-6)


def test_value_embeds_sit_on_every_other_layer_ending_with_the_last():
    assert sorted(gpt(n_layer=4, value_embeds=True).value_embeds) == ["1", "3"]
    assert sorted(gpt(n_layer=3, value_embeds=True, n_kv_head=2).value_embeds) == ["0", "2"]
    m = gpt(n_layer=3, value_embeds=True, n_kv_head=2)
    assert m.value_embeds["0"].weight.shape == (VOCAB, 16) and m.blocks[1].attn.ve_gate is None


def test_smear_mixes_in_the_previous_token_only():
    m = gpt(smear=True, position="none")
    with torch.no_grad():
        m.smear_lambda.fill_(1.0)
    idx = torch.randint(0, VOCAB, (1, 16))
    changed = idx.clone()
    changed[0, 9] = (idx[0, 9] + 1) % VOCAB
    emb = m.tok_emb(idx)
    gate = torch.sigmoid(emb[:, 1:, :24] @ m.smear_gate.weight.T)
    smeared = torch.cat([emb[:, :1], emb[:, 1:] + gate * emb[:, :-1]], dim=1)
    x0 = {}
    handle = m.blocks[0].register_forward_pre_hook(lambda _m, args: x0.setdefault("x", args[0]))
    m(idx)
    handle.remove()
    torch.testing.assert_close(x0["x"], smeared)
    diff = (m(changed) - m(idx)).abs().amax(-1)[0]
    assert diff[:9].max() == 0 and diff[9:].min() > 0  # causal: nothing before the changed token moves


# ---------------------------------------------------------------- torch.compile, the preset, the loop


def all_knobs() -> GPT:
    return gpt(norm="rmsnorm", position="rope", mlp="swiglu", n_kv_head=2, logit_softcap=15.0, attn_softcap=20.0,
               attn_gate=True, embed_norm=True, init="zero_proj", qk_norm=True, value_embeds=True, x0_blend=True,
               smear=True, backout=True, depth_scaling=True)


@pytest.mark.slow
def test_every_knob_compiles_without_graph_breaks():
    m = all_knobs()
    idx = torch.randint(0, VOCAB, (2, 16))
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")  # fullgraph: a graph break is an error
    loss = lm_loss(compiled(idx), idx).loss
    loss.backward()
    torch.testing.assert_close(compiled(idx), m(idx))


def test_modern_preset_composes_to_the_recipe():
    cfg = compose(["model=modern"])
    m = cfg.model
    assert (m.position, m.mlp, m.qk_norm, m.bias, m.tie_embeddings, m.embed_norm, m.init, m.logit_softcap) == \
        ("rope", "relu2", True, False, False, True, "zero_proj", 15.0)
    assert (cfg.norm.kind, cfg.norm.affine) == ("rmsnorm", False)
    assert (m.n_layer, m.d_model) == (4, 128)  # the default shape
    assert compose(["model=modern", "norm=layernorm"]).norm.kind == "layernorm"  # the command line wins


@pytest.mark.slow
def test_modern_preset_trains_and_its_loss_falls(tmp_path):
    rows = run_training(["model=modern", "train.max_steps=40", "optim.warmup_steps=5"], tmp_path)
    curve = losses(rows)
    assert len(curve) == 40 and all(math.isfinite(v) for v in curve)
    assert sum(curve[-5:]) / 5 < curve[0] - 0.5
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["outcome"] == "completed" and summary["val/loss"] < curve[0]


# ---------------------------------------------------------------- everything around the model

EVERY_KNOB = ["model=modern", "model.mlp=swiglu", "model.n_kv_head=1", "model.attn_softcap=30", "model.attn_gate=true",
              "model.x0_blend=true", "model.smear=true", "model.backout=true", "norm.depth_scaling=true"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", NORM_KINDS)
def test_every_knob_runs_with_every_norm_kind(kind):
    reason = norm_unavailable_reason(kind, "cpu")
    if reason:
        pytest.skip(reason)
    cfg = compose(["size=test", *EVERY_KNOB, f"norm={kind}"])
    m = GPT(OmegaConf.to_object(cfg.model), OmegaConf.to_object(cfg.norm), 64)
    idx = torch.randint(0, 64, (2, 32))
    lm_loss(m(idx), idx).loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16", "bf16_pure", "fp8"])
def test_every_knob_resumes_bitwise_in_every_precision(precision, tmp_path):
    common = ["deterministic=true", "optim.warmup_steps=0", f"precision={precision}", "train.max_steps=6",
              *EVERY_KNOB]
    full = run_training(common, tmp_path / "full")
    assert any(name.startswith("numerics/") for row in full for name in row)  # the numerics telemetry ran
    trainer = make_run(common, tmp_path / "split")
    fit_alone(trainer, until_step=3)
    trainer.save_checkpoint()
    trainer.close()
    assert losses(run_training(common + ["train.ckpt_interval=0"], tmp_path / "split")) == losses(full)


@pytest.mark.slow
def test_every_knob_trains_in_an_ensemble_as_alone(tmp_path):
    from tests.test_ensemble import assert_same_run, run_alone, run_ensemble

    arms = [[*EVERY_KNOB, "optim.lr=1e-3", "train.max_steps=4"], [*EVERY_KNOB, "optim.lr=1e-2", "train.max_steps=4"]]
    assert unbatchable_reason(compose(["size=test", *EVERY_KNOB])) is None
    run_ensemble(arms, tmp_path)
    for i, arm in enumerate(arms):
        run_alone(arm, tmp_path / f"alone{i}")
        assert_same_run(tmp_path / f"member{i}", tmp_path / f"alone{i}")


@pytest.mark.slow
def test_reproduce_verifies_a_modern_run_bitwise(tmp_path, capsys):
    run_training(["deterministic=true", "train.max_steps=3", *EVERY_KNOB], tmp_path / "run")
    code = reproduce.main([str(tmp_path / "run"), "--verify", "3", "--out", str(tmp_path / "again"),
                           "logger.backend=none"])
    assert code == 0 and "PASS" in capsys.readouterr().out
