"""scripts/bench/bench_nanochat.py: the comparison machinery against a small fake nanochat package tree (the
interfaces the bench uses: GPT, GPTConfig, setup_optimizer, init_weights, num_scaling_params, and an optimizer
kernel behind torch.compile's __wrapped__), and against a real checkout when NANOCHAT_CHECKOUT names one."""

import math
import os
import sys
import textwrap
from pathlib import Path

import pytest

from minilm.data import TokenWindowSampler, eval_batches, prepare_data
from minilm.errors import exit_on_input_error
from minilm.launch.cli import compose
from tests.helpers import load_script

bench = load_script("bench_nanochat", "bench")

FAKE_GPT = '''
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nanochat.optim import MuonAdamW

INSTANCES = []


@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 6
    n_kv_head: int = 6
    n_embd: int = 768
    window_pattern: str = "SSSL"


class GPT(torch.nn.Module):
    """A bigram model with nanochat's interfaces; it records what it is fed and how it is set up."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = torch.nn.ModuleDict({
            "wte": torch.nn.Embedding(config.vocab_size, config.n_embd),
            "h": torch.nn.ModuleList([torch.nn.Linear(config.n_embd, config.n_embd, bias=False)
                                      for _ in range(config.n_layer)])})
        self.lm_head = torch.nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.train_inputs, self.eval_inputs, self.optimizer_args = [], [], None
        INSTANCES.append(self)

    @torch.no_grad()
    def init_weights(self):
        for p in self.parameters():
            torch.nn.init.normal_(p, std=0.02)

    def num_scaling_params(self):
        return {"transformer_matrices": sum(p.numel() for p in self.transformer.h.parameters()),
                "lm_head": self.lm_head.weight.numel()}

    def setup_optimizer(self, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, weight_decay=0.0,
                        scalar_lr=0.5):
        self.optimizer_args = dict(unembedding_lr=unembedding_lr, embedding_lr=embedding_lr, matrix_lr=matrix_lr,
                                   weight_decay=weight_decay, scalar_lr=scalar_lr)
        optimizer = MuonAdamW([
            dict(kind="adamw", params=[self.transformer.wte.weight], lr=embedding_lr),
            dict(kind="adamw", params=[self.lm_head.weight], lr=unembedding_lr),
            dict(kind="muon", params=list(self.transformer.h.parameters()), lr=matrix_lr, momentum=0.95,
                 weight_decay=weight_decay)])
        for group in optimizer.param_groups:
            group["initial_lr"] = group["lr"]
        return optimizer

    def forward(self, idx, targets=None):
        (self.train_inputs if self.training else self.eval_inputs).append(idx.clone())
        x = self.transformer.wte(idx)
        for layer in self.transformer.h:
            x = x + layer(x)
        return F.cross_entropy(self.lm_head(x).flatten(0, 1), targets.flatten())
'''

FAKE_OPTIM = '''
import functools

import torch


def compiled(fn):
    """Stands in for torch.compile: the bench must call the function it wraps."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        raise RuntimeError("the compiled kernel ran")
    return wrapper


@compiled
def adamw_step_fused(p, grad, lr):
    p.add_(grad.sign(), alpha=-lr)


class MuonAdamW(torch.optim.Optimizer):
    def __init__(self, param_groups):
        super().__init__(param_groups, defaults={})
        self.momenta = []

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            if group["kind"] == "muon":
                self.momenta.append(group["momentum"])
            for p in group["params"]:
                adamw_step_fused(p, p.grad, group["lr"])
'''


@pytest.fixture
def fresh_nanochat(monkeypatch):
    """Each test imports its own nanochat package: none left over from another test, none left behind."""
    def purge():
        for name in [m for m in sys.modules if m == "nanochat" or m.startswith("nanochat.")]:
            del sys.modules[name]
    purge()
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("NANOCHAT_DTYPE", "float32")  # restored after the bench sets it
    yield
    purge()


@pytest.fixture
def fake_checkout(tmp_path):
    package = tmp_path / "nanochat" / "nanochat"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "gpt.py").write_text(textwrap.dedent(FAKE_GPT))
    (package / "optim.py").write_text(textwrap.dedent(FAKE_OPTIM))
    return tmp_path / "nanochat"


OVERRIDES = ["size=test", "train.max_steps=3"]


@pytest.mark.slow  # three short trainings per row, five rows
def test_rows_train_on_minilm_batches_and_val_windows(fresh_nanochat, fake_checkout, tmp_path):
    result = bench.compare(fake_checkout, OVERRIDES, [0.5, 2.0], tmp_path / "work")
    gpt = sys.modules["nanochat.gpt"]
    models = [m for m in gpt.INSTANCES if m.config.n_layer != 12]  # not base_train's d12 reference
    cfg = compose(["logger=none", *OVERRIDES])
    data = prepare_data(cfg.data, cfg.paths.cache_dir)
    sampler = TokenWindowSampler(data.train, cfg.model.block_size, cfg.train.batch_size, cfg.seed)
    expected = [sampler.next_batch()[0] for _ in range(cfg.train.max_steps)]
    val = eval_batches(data.val, cfg.model.block_size, cfg.train.batch_size, cfg.train.eval_batches)

    assert len(models) == 2
    for model, m in zip(models, [0.5, 2.0]):
        assert model.config.n_layer == cfg.model.n_layer and model.config.n_embd == cfg.model.d_model
        assert model.config.vocab_size == data.vocab_size and model.config.sequence_len == cfg.model.block_size
        assert [x.tolist() for x in model.train_inputs] == [x.tolist() for x in expected]
        assert [x.tolist() for x in model.eval_inputs] == [x.tolist() for x, _ in val]
        assert model.optimizer_args["matrix_lr"] == pytest.approx(0.02 * m)
        assert model.optimizer_args["embedding_lr"] == pytest.approx(0.3 * m)
        assert model.optimizer_args["unembedding_lr"] == pytest.approx(0.008 * m)
        assert model.optimizer_args["scalar_lr"] == pytest.approx(0.5 * m)
    assert result["nanochat_eager_kernels"] == ["adamw_step_fused"]  # the "compiled" one raises if called
    rows = result["rows"]
    assert set(rows) == {"nanochat x0.5", "nanochat x2", *bench.MINILM_ROWS}
    best = result["best_nanochat"]
    assert rows[best]["val_loss"] == min(rows["nanochat x0.5"]["val_loss"], rows["nanochat x2"]["val_loss"])
    for row in rows.values():
        assert math.isfinite(row["val_loss"]) and row["ms_per_step"] > 0
        assert row["ms_over_nanochat"] == pytest.approx(row["ms_per_step"] / rows[best]["ms_per_step"])
        assert row["val_minus_nanochat"] == pytest.approx(row["val_loss"] - rows[best]["val_loss"])
    assert "model=modern optim=muon val loss" in bench.report(result)


def test_schedules_follow_base_train():
    run = bench.NanochatRun.__new__(bench.NanochatRun)
    run.steps = 600  # warmdown: the last round(0.65 * 600) = 390 steps, from step 210
    assert [run.lr_multiplier(it) for it in (0, 39, 40, 210)] == [1 / 40, 1.0, 1.0, 1.0]
    assert run.lr_multiplier(599) == pytest.approx(1 / 390 + (1 - 1 / 390) * 0.05)
    assert run.muon_momentum(0) == 0.85 and run.muon_momentum(200) == pytest.approx(0.91)
    assert run.muon_momentum(400) == pytest.approx(0.97 * (1 - 190 / 390) + 0.90 * 190 / 390)


def test_bad_checkout_is_one_line_before_any_work(fresh_nanochat, tmp_path, capsys):
    assert exit_on_input_error(bench.main, ["--nanochat", str(tmp_path)]) == 2
    assert f"--nanochat {tmp_path}: no nanochat/gpt.py there" in capsys.readouterr().err
    assert exit_on_input_error(bench.main, ["--nanochat", str(tmp_path), "--lr-multipliers", "0.1,x"]) == 2


@pytest.mark.skipif(not os.environ.get("NANOCHAT_CHECKOUT"),
                    reason="set NANOCHAT_CHECKOUT to a checkout of karpathy/nanochat to run the bench against it")
def test_real_nanochat_trains_eagerly(fresh_nanochat, tmp_path):
    result = bench.compare(Path(os.environ["NANOCHAT_CHECKOUT"]), OVERRIDES, [1.0], tmp_path / "work")
    assert result["nanochat_eager_kernels"] == ["adamw_step_fused", "muon_step_fused"]
    # nanochat's head starts at std 0.001: a uniform prediction, log(vocab); 3 steps at its default LRs learn
    assert result["rows"]["nanochat x1"]["val_loss"] < math.log(result["shape"]["vocab_size"]) - 0.01
