"""model.parametrization=mup: its rules against the mup package (Yang et al. 2022's own code), SP at the base
width, the refused combinations, training, resume and ensembles under it, and the coordinate check."""

import json
import math

import mup
import pytest
import torch
from omegaconf import OmegaConf

from minilm.errors import ConfigError
from minilm.launch import coordcheck
from minilm.launch.cli import compose
from minilm.model import GPT
from minilm.optim import build_optimizer, set_schedule
from minilm.optim.muon import adjusted_lr
from minilm.precision.policy import Precision
from tests.helpers import fit_alone, losses, make_run, run_training

VOCAB = 64


def gpt(overrides: list[str], seed: int = 0) -> tuple[GPT, object]:
    cfg = compose(["size=test", "model.n_head=4", *overrides])
    torch.manual_seed(seed)
    return GPT(OmegaConf.to_object(cfg.model), OmegaConf.to_object(cfg.norm), VOCAB), cfg


def peak_lrs(model: GPT, cfg) -> dict[str, float]:
    """Each parameter's peak learning rate under minilm's optimizer, by name."""
    optimizer = build_optimizer(model, cfg.optim, Precision(OmegaConf.to_object(cfg.precision), torch.device("cpu")),
                                0)
    set_schedule(optimizer, 0, OmegaConf.merge(cfg.optim, {"warmup_steps": 0}), 100)
    names = {id(p): name for name, p in model.named_parameters()}
    return {names[id(p)]: group["lr"] for group in optimizer.param_groups for p in group["params"]}


MODELS = [[], ["model.tie_embeddings=false"], ["model=modern"],
          ["model=modern", "model.mlp=swiglu", "model.n_kv_head=2"],
          ["model=modern", "model.smear=true", "model.x0_blend=true"]]


# the quick tier: the GPT-2 preset and the modern one with SwiGLU and grouped KV heads
@pytest.mark.parametrize("arm", [arm if i in (0, 3) else pytest.param(arm, marks=pytest.mark.slow)
                                 for i, arm in enumerate(MODELS)])
def test_init_and_adam_lrs_are_the_mup_packages(arm):
    """minilm's μP at width 256 against mup's on minilm's SP model of the same width: set_base_shapes against the
    base model (width 128) finds the same hidden matrices with the same width multipliers; mup.init.normal_ with
    SP's std draws what minilm's μP init draws (same seed); MuAdamW gives every parameter minilm's peak LR (and
    the hidden matrices minilm's weight decay); the readout multiplier is MuReadout's 1 / width_mult, and the
    head is the only linear that reads the width into a fixed size (what mup asks a MuReadout for)."""
    ours, cfg = gpt(["model.parametrization=mup", "model.d_model=256", *arm], seed=1)
    sp, _ = gpt(["model.d_model=256", *arm], seed=1)
    base, _ = gpt(["model.d_model=128", *arm])
    mup.set_base_shapes(sp, base, rescale_params=False, do_assert=False)
    params = dict(sp.named_parameters())
    hidden = {name: p.infshape.width_mult() for name, p in params.items() if p.infshape.ninf() == 2}
    assert hidden and ours.width_mults == hidden
    readers = [name for name, m in sp.named_modules() if isinstance(m, torch.nn.Linear)
               and m.weight.infshape[1].isinf() and not m.weight.infshape[0].isinf()]
    assert readers == ["lm_head"] and ours.readout_mult == 1 / sp.lm_head.weight.infshape.width_mult() == 0.5

    # mup.init.normal_'s factor on SP's draws (the same seed) is what minilm's μP init applied to SP's draws
    for name, p in ours.named_parameters():
        if name in hidden:
            probe = torch.empty(p.shape)
            probe.infshape = params[name].infshape
            torch.manual_seed(7)
            theirs = mup.init.normal_(probe, std=1.0).clone()
            torch.manual_seed(7)
            factor = (theirs / torch.empty(p.shape).normal_(std=1.0)).mean().item()
            torch.testing.assert_close(p, params[name] * factor, rtol=1e-6, atol=0)
        else:
            assert torch.equal(p, params[name]), f"{name}: μP keeps SP's init"

    lr, wd = cfg.optim.lr, cfg.optim.weight_decay
    theirs = mup.MuAdamW(sp.parameters(), lr=lr, weight_decay=wd)
    mup_lr = {id(p): group["lr"] for group in theirs.param_groups for p in group["params"]}
    mup_wd = {id(p): group["weight_decay"] for group in theirs.param_groups for p in group["params"]}
    ours_lr = peak_lrs(ours, cfg)
    assert ours_lr == {name: pytest.approx(mup_lr[id(p)], rel=1e-12) for name, p in params.items()}
    optimizer = build_optimizer(ours, cfg.optim, Precision(OmegaConf.to_object(cfg.precision), torch.device("cpu")), 0)
    names = {id(p): name for name, p in ours.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if names[id(p)] in hidden:
                assert group["weight_decay"] == pytest.approx(mup_wd[id(params[names[id(p)]])])


def test_mup_is_sp_at_the_base_width_bitwise():
    ours, cfg = gpt(["model=modern", "model.parametrization=mup", "model.d_model=128"])
    sp, sp_cfg = gpt(["model=modern", "model.d_model=128"])
    assert ours.width_mults == {} and ours.readout_mult is None and ours.blocks[0].attn.sdpa_scale is None
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), sp.parameters()))
    x = torch.randint(0, VOCAB, (2, 16))
    assert torch.equal(ours(x), sp(x))
    assert peak_lrs(ours, cfg) == peak_lrs(sp, sp_cfg)


def test_attention_scale_is_one_over_d_head_and_sp_at_the_base_width():
    for width in (64, 128, 256, 512):
        sp, _ = gpt([f"model.d_model={width}"])
        ours, _ = gpt([f"model.d_model={width}", "model.parametrization=mup"])
        d_head = width // 4
        assert sp.blocks[0].attn.scale == d_head ** -0.5
        assert ours.blocks[0].attn.scale == pytest.approx(math.sqrt(128 / 4) / d_head, rel=1e-12)
    # the scale reaches the logits: q = k makes the logits of a row q.q x scale, which the SDPA path uses
    ours, _ = gpt(["model.d_model=256", "model.parametrization=mup", "model.attn_softcap=1e9"])
    attn = ours.blocks[0].attn
    q = torch.randn(1, 4, 8, 64)
    reference = torch.softmax((q @ q.transpose(-1, -2) * attn.scale).masked_fill(
        torch.ones(8, 8, dtype=torch.bool).triu(1), float("-inf")), dim=-1) @ q
    torch.testing.assert_close(torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True,
                                                                                scale=attn.sdpa_scale), reference)


@pytest.mark.parametrize("adjust", ["original", "match_rms_adamw"])
def test_muons_mup_lr_keeps_each_hidden_updates_spectral_norm_across_width(adjust):
    """Muon's update is orthogonal (spectral norm 1) times its adjusted LR: under μP that product must be the
    same at every width for every hidden matrix (the spectral condition), as it is not under SP for
    match_rms_adamw."""
    spectral = {}
    for width in (128, 512):
        model, cfg = gpt(["optim=muon", f"optim.muon_adjust_lr={adjust}", f"model.d_model={width}",
                          "model.parametrization=mup"])
        lrs, params = peak_lrs(model, cfg), dict(model.named_parameters())
        spectral[width] = {name: adjusted_lr(lrs[name], adjust, params[name].shape) for name in
                           ("blocks.0.attn.qkv.weight", "blocks.0.mlp.fc.weight", "blocks.0.mlp.proj.weight")}
    assert spectral[512] == pytest.approx(spectral[128], rel=1e-12)


@pytest.mark.parametrize("bad,match", [(["model.attn_gate=true"], "attn_gate"), (["model.init=xavier"], "xavier"),
                                       (["model.n_head=3", "model.d_model=96"], "base_width=128")])
def test_combinations_mup_does_not_cover_are_refused_in_one_line(bad, match, tmp_path):
    with pytest.raises(ConfigError, match=match) as error:
        make_run(["model.parametrization=mup", *bad], tmp_path)
    assert "\n" not in str(error.value)


@pytest.mark.slow
@pytest.mark.parametrize("arm", [["precision=fp16"], ["model=modern", "optim=muon", "precision=bf16"]])
def test_mup_resumes_bitwise(arm, tmp_path):
    common = ["model.parametrization=mup", "deterministic=true", "optim.warmup_steps=0", "train.max_steps=6", *arm]
    full = run_training(common, tmp_path / "full")
    trainer = make_run(common, tmp_path / "split")
    fit_alone(trainer, until_step=3)
    trainer.save_checkpoint()
    trainer.close()
    assert losses(run_training(common + ["train.ckpt_interval=0"], tmp_path / "split")) == losses(full)


def coordinate_slopes(overrides: list[str]) -> dict[str, float]:
    record = coordcheck.coord_check(["size=test", "model.n_head=4", *overrides], [64, 128, 256, 512], 6)
    return {name: slopes[-1] for name, slopes in record["slope"].items()}


# the log-log slope of each layer's activation RMS against width after 6 steps (widths 64 to 512, size=test):
# measured SP 1.36 to 1.88 (AdamW, lr 3e-3) and 0.48 to 0.75 (Muon, lr 0.02); μP within 0.14 and 0.04.
# Muon's AdamW groups at 0.15 x its LR, beta1 0.9, eps 1e-8, the settings those slopes were measured at (the
# preset's embedding LR, 6 x, leaves SP's hidden slopes below 0.3 at 6 steps, L0.residual 0.10, L0.attn 0.17)
SP_MIN_SLOPE = {"adamw": 0.8, "muon": 0.3}
MUP_MAX_SLOPE = 0.25
OPTIM = {"adamw": ["optim=adamw"],
         "muon": ["optim=muon", "optim.embed_lr_ratio=0.15", "optim.head_lr_ratio=0.15", "optim.scalar_lr_ratio=0.15",
                  "optim.beta1=0.9", "optim.eps=1e-8"]}


@pytest.mark.slow
@pytest.mark.parametrize("optim", ["adamw", "muon"])
def test_coordinate_check_activations_grow_with_width_under_sp_and_stay_flat_under_mup(optim):
    sp = coordinate_slopes(OPTIM[optim])
    ours = coordinate_slopes([*OPTIM[optim], "model.parametrization=mup"])
    hidden = [name for name in sp if name.startswith("L")]
    assert hidden and all(sp[name] > SP_MIN_SLOPE[optim] for name in hidden), sp
    assert all(abs(slope) < MUP_MAX_SLOPE for slope in ours.values()), ours


@pytest.mark.slow
def test_coordcheck_writes_its_json_and_png_and_refuses_bad_input_before_work(tmp_path, capsys):
    coordcheck.run(["size=test", "model.n_head=4", "model.parametrization=mup", "--widths", "32", "64", "--steps",
                    "2", "--out", str(tmp_path)])
    record = json.loads((tmp_path / "coordcheck.json").read_text())
    assert record["widths"] == [32, 64] and len(record["rms"]["L0.attn"]) == 2
    assert (tmp_path / "coordcheck.png").stat().st_size > 0
    assert set(record["rms"]) == {"embedding", "L0.attn", "L0.mlp", "L0.residual", "L1.attn", "L1.mlp", "L1.residual",
                                  "logits"}
    with pytest.raises(SystemExit) as exit_:
        coordcheck.main(["size=test", "model.parametrization=mup", "model.attn_gate=true", "--out",
                         str(tmp_path / "bad")])
    assert exit_.value.code == 2 and "attn_gate" in capsys.readouterr().err and not (tmp_path / "bad").exists()
