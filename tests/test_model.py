"""The model's structure: placements, init schemes, norm registry."""

import math

import pytest
import torch

from minilm.model import GPT, ModelConfig
from minilm.norms import build_norm


def model(**kwargs):
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=300, n_layer=4, n_head=4, d_model=64, block_size=16, **kwargs))


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
    assert y.mean(-1).abs().max().item() < 1e-5 and y.std(-1, unbiased=False).mean().item() == pytest.approx(1, abs=1e-3)


@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_registry_norms_keep_the_input_dtype(kind, dtype):
    norm = build_norm(kind, 32)
    assert norm(torch.randn(3, 32, dtype=dtype)).dtype == dtype


def test_unknown_norm_kind_names_the_choices():
    with pytest.raises(ValueError, match="layernorm, rmsnorm, triton_layernorm, triton_rmsnorm"):
        build_norm("batchnorm", 8)
