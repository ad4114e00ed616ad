"""The model's structure: placements, init schemes, norm registry."""

import math

import pytest
import torch

from minilm.config import ModelConfig, NormConfig, NormKind
from minilm.model import GPT, lm_loss
from minilm.norms import NORM_KINDS, NORMS, build_norm, norm_unavailable_reason


def model(norm_kind="layernorm", **kwargs):
    torch.manual_seed(0)
    return GPT(ModelConfig(n_layer=4, n_head=4, d_model=64, block_size=16, **kwargs), NormConfig(kind=norm_kind), 300)


def test_gpt2_init_scales_residual_projections_by_depth():
    m = model()
    assert m.blocks[0].mlp.fc.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert m.blocks[0].mlp.proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(8), rel=0.05)
    assert m.lm_head.weight is m.tok_emb.weight


def test_xavier_init_follows_fan_in_and_out():
    m = model(init="xavier")
    fc = m.blocks[0].mlp.fc.weight  # (256, 64)
    assert fc.std().item() == pytest.approx(math.sqrt(2 / (256 + 64)), rel=0.05)
    assert m.blocks[0].mlp.proj.weight.std().item() == pytest.approx(math.sqrt(2 / (256 + 64)), rel=0.05)
    assert m.tok_emb.weight.std().item() == pytest.approx(64**-0.5, rel=0.05)


@pytest.mark.parametrize("placement, norms_per_block, final_norm", [("pre", 2, True), ("post", 2, False),
                                                                      ("sandwich", 4, True)])
def test_placements_put_norms_where_they_say(placement, norms_per_block, final_norm):
    m = model(placement=placement, norm_kind="rmsnorm")
    assert sum(isinstance(x, torch.nn.RMSNorm) for x in m.blocks[0].modules()) == norms_per_block
    assert isinstance(m.norm_f, torch.nn.RMSNorm) == final_norm
    logits = m(torch.randint(0, 300, (2, 16)))
    assert logits.shape == (2, 16, 300) and torch.isfinite(logits).all()


def test_post_norm_block_output_is_normalized():
    m = model(placement="post", norm_kind="layernorm")
    x = torch.randn(2, 16, 64) * 5 + 3
    y = m.blocks[0](x)
    assert y.mean(-1).abs().max().item() < 1e-5
    assert y.std(-1, unbiased=False).mean().item() == pytest.approx(1, abs=1e-3)


@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm", "dyt"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_registry_norms_keep_the_input_dtype(kind, dtype):
    norm = build_norm(kind, 32)
    assert norm(torch.randn(3, 32, dtype=dtype)).dtype == dtype


def test_the_registry_has_one_row_per_norm_choice_and_torch_twins():
    assert set(NORMS) == {kind.value for kind in NormKind}  # a new kind: a row of NORMS and a NormKind value
    for kind, spec in NORMS.items():
        assert not NORMS[spec.twin].triton and (spec.twin == kind) is (not spec.triton)


def test_the_model_keeps_its_norm_spec():
    assert str(model(norm_kind="rmsnorm").norm_cfg.kind) == "rmsnorm"


def test_unknown_norm_kind_names_the_choices():
    with pytest.raises(ValueError, match="layernorm, rmsnorm, dyt, triton_layernorm, triton_rmsnorm, triton_dyt"):
        build_norm("batchnorm", 8)


def test_z_loss_is_logz_squared_and_in_the_gradient():
    generator = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(2, 5, 11, generator=generator, dtype=torch.float64)).requires_grad_()
    targets = torch.randint(0, 11, (2, 5), generator=generator)
    coefficient = 0.01
    loss, ce, z_term = lm_loss(logits, targets, coefficient)
    loss_value, ce, z_term = loss.detach(), ce.detach(), z_term.detach()
    top = logits.detach().max(dim=-1, keepdim=True).values
    log_z = (top + (logits.detach() - top).exp().sum(dim=-1, keepdim=True).log()).squeeze(-1)
    assert float(z_term) == pytest.approx(float(coefficient * log_z.pow(2).mean()), rel=1e-5)
    assert float(loss_value) == pytest.approx(float(ce + z_term), rel=1e-6)
    with_z, = torch.autograd.grad(loss, logits)
    without_z, = torch.autograd.grad(lm_loss(logits, targets).loss, logits)
    softmax = (logits.detach() - log_z.unsqueeze(-1)).exp()
    analytic = coefficient * 2 * log_z.unsqueeze(-1) * softmax / log_z.numel()  # d(c * mean(logZ^2)) / dz
    torch.testing.assert_close(with_z - without_z, analytic, rtol=1e-4, atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("kind", NORM_KINDS)
def test_qk_norm_and_sandwich_work_with_every_norm_kind(kind):
    reason = norm_unavailable_reason(kind, "cpu")
    if reason:
        pytest.skip(reason)
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=1, n_head=2, d_model=32, block_size=16, placement="sandwich", qk_norm=True)
    model = GPT(cfg, NormConfig(kind=kind), 64)
    idx = torch.randint(0, 64, (2, 16))
    q, k, _ = model.blocks[0].attn.project_qkv(10 * torch.randn(2, 16, 32))  # variance >> eps
    for t in (q, k):  # each head's query / key vector normalized (gains are 1 at init)
        if "dyt" in kind:  # squashed instead: tanh(alpha * x) with gains 1 and biases 0 at init
            assert 0.9 < t.abs().max() < 1
            continue
        rms = t.pow(2).mean(dim=-1).sqrt()
        torch.testing.assert_close(rms, torch.ones_like(rms), rtol=1e-3, atol=1e-3)
        if "layernorm" in kind:
            torch.testing.assert_close(t.mean(dim=-1), torch.zeros_like(rms), rtol=0, atol=1e-5)
    loss = lm_loss(model(idx), torch.randint(0, 64, (2, 16)), 1e-3).loss
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    block = model.blocks[0].double()  # sandwich: x + norm_out(f(norm_in(x))), for both sublayers
    x = torch.randn(2, 16, 32, dtype=torch.float64)
    h = x + block.norm_attn_out(block.attn(block.norm_attn(x)))
    torch.testing.assert_close(block(x), h + block.norm_mlp_out(block.mlp(block.norm_mlp(h))))


def test_default_model_is_nanogpts_gpt2():
    """The default knobs are nanoGPT's model.py: learned positions, pre-LayerNorm with biases, fused qkv, exact
    GELU MLP, final LayerNorm, LM head tied to the token embedding; written out here in float64."""
    m = model().double()
    assert sorted(name for name, _ in m.named_parameters()) == sorted(
        ["tok_emb.weight", "pos_emb.weight", "norm_f.weight", "norm_f.bias"]
        + [f"blocks.{i}.{part}" for i in range(4) for part in (
            "norm_attn.weight", "norm_attn.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
            "attn.proj.bias", "norm_mlp.weight", "norm_mlp.bias", "mlp.fc.weight", "mlp.fc.bias", "mlp.proj.weight",
            "mlp.proj.bias")])
    p = dict(m.named_parameters())
    idx = torch.randint(0, 300, (2, 16))

    def ln(x, name):
        mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
        return (x - mu) / torch.sqrt(var + 1e-5) * p[f"{name}.weight"] + p[f"{name}.bias"]

    def linear(x, name):
        return x @ p[f"{name}.weight"].T + p[f"{name}.bias"]

    x = p["tok_emb.weight"][idx] + p["pos_emb.weight"][:16]
    for i in range(4):
        q, k, v = linear(ln(x, f"blocks.{i}.norm_attn"), f"blocks.{i}.attn.qkv").split(64, dim=-1)
        q, k, v = (t.view(2, 16, 4, 16).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-1, -2) / 4.0).masked_fill(torch.ones(16, 16, dtype=torch.bool).triu(1), float("-inf"))
        y = (torch.softmax(att, dim=-1) @ v).transpose(1, 2).reshape(2, 16, 64)
        x = x + linear(y, f"blocks.{i}.attn.proj")
        h = linear(ln(x, f"blocks.{i}.norm_mlp"), f"blocks.{i}.mlp.fc")
        x = x + linear(0.5 * h * (1 + torch.erf(h / math.sqrt(2))), f"blocks.{i}.mlp.proj")
    expected = ln(x, "norm_f") @ p["tok_emb.weight"].T
    torch.testing.assert_close(m(idx), expected, rtol=1e-10, atol=1e-10)


def test_dyt_is_gamma_tanh_alpha_x_plus_beta_with_its_configured_alpha():
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=1, n_head=2, d_model=32, block_size=16), NormConfig(kind="dyt", dyt_alpha=0.3), 64)
    norm = model.blocks[0].norm_attn
    assert torch.equal(norm.alpha.detach(), torch.tensor([0.3]))  # the model's init leaves it alone
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(2, 16, 32, dtype=torch.float64)
    expected = norm.weight.double() * torch.tanh(norm.alpha.double() * x) + norm.bias.double()
    torch.testing.assert_close(norm(x), expected, rtol=1e-12, atol=1e-12)
    assert model.blocks[0].norm_attn.bias is not None and GPT(
        ModelConfig(n_layer=1, n_head=2, d_model=32, block_size=16, bias=False), NormConfig(kind="dyt"), 64
    ).norm_f.bias is None  # DyT's beta follows model.bias, as LayerNorm's


# the Triton modules also compile fullgraph in tests/test_triton_norms.py, quickly
@pytest.mark.parametrize("kind", ["dyt", pytest.param("triton_dyt", marks=pytest.mark.slow)])
def test_dyt_model_compiles_without_graph_breaks(kind):
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=1, n_head=2, d_model=32, block_size=16, qk_norm=True), NormConfig(kind=kind), 64)
    idx = torch.randint(0, 64, (2, 16))
    eager = model(idx)
    eager_grads = torch.autograd.grad(eager.square().sum(), list(model.parameters()))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(idx)  # fails on any graph break
    grads = torch.autograd.grad(compiled.square().sum(), list(model.parameters()))
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    for a, e in zip(grads, eager_grads):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
