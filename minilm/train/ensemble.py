"""Batched ensembles: runs that share an architecture train as one batched model.

Runs that differ only in what is per run — seed, optimizer scalars (learning rate, weight decay, warmup,
betas, z-loss weight), gradient clipping, divergence rule, diagnostics, cadences, logging — train together:
their parameters are stacked along a leading member dimension and one forward and one backward
(`torch.func.vmap` over `torch.func.functional_call` of the same `GPT`, so the model code is the one in
model.py) serve all members. Everything else is each member's own `Run`, through the same code as a run made
alone (run.py: `begin_step` / `micro_batch` / `finish_step`; the one loop, loop.py `fit`, drives an `Ensemble`
as it drives a run `Alone`): its run dir, metrics.jsonl, checkpoints, W&B run, config and environment record,
data order (its own sampler and seed), learning-rate schedule, optimizer (its own AdamW, or Muon + AdamW, with
its own scalars), gradient clipping, fp16 loss scaler (its own found-inf), diagnostics, forensics, divergence
monitor and RNG streams (`Run.acting`). Each member's parameters are views into the stacked tensors, so its
model, optimizer and checkpoint are exactly those of a solo run (a solo Run resumes a member's checkpoint, and
`minilm-reproduce` repeats a member alone).

Members that complete together draw their end-of-run samples in one batched generation (a forward per
token for all of them), each as its model and seed draw it alone. A member that ends (completed, diverged,
interrupted) leaves the batch: the others are restacked without it, so a diverged member is never computed
again and cannot touch the others (their math is independent anyway: nothing in the batched step mixes
members).

Numerics. A member's init is the solo run's (the same seeding before the same model constructor). In the
batched step the linears, attention, embeddings and loss compute bitwise what they compute alone (CPU,
fp32); the norm layers' weight and bias gradients are reduced in another order by vmap's batching rule
(about 1e-7 relative), so a member's losses equal the solo run's to a relative tolerance, not bitwise
(tests/test_ensemble.py states and checks it); under bf16 autocast the batched matmuls round differently
already in the forward (about 1e-5 relative). Dropout would draw other masks under vmap: runs with
model.dropout > 0 are not batched (they run alone), and neither are the Triton norm kinds.
"""

import logging
import math
import os
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch.func import functional_call, vmap

from minilm.data import prepare_data
from minilm.model import lm_loss
from minilm.norms import norm_spec
from minilm.rundir import flatten
from minilm.train.build import compiled
from minilm.train.lifecycle import RunDir, plain, run_dirs_held
from minilm.train.loop import StepResult, fit
from minilm.train.run import Run, samples

log = logging.getLogger("minilm")

# What the batched forward and backward share: members must agree on these, and may differ in anything else.
SHARED_PREFIXES = ("model.", "norm.", "precision.", "data.")
SHARED_KEYS = ("train.batch_size", "train.grad_accum", "train.compile", "train.compile_backend",
               "train.compile_mode", "device", "deterministic", "detect_anomaly", "paths.cache_dir")
BATCHED_PRECISIONS = ("fp32", "fp16", "bf16")


def unbatchable_reason(cfg) -> str | None:
    """Why a run cannot train as an ensemble member (it then runs alone), or None."""
    if cfg.model.dropout > 0:
        return f"model.dropout={cfg.model.dropout} (vmap would draw other dropout masks than the run alone)"
    if norm_spec(str(cfg.norm.kind)).triton:
        return f"norm={cfg.norm.kind} (custom kernels have no batching rule)"
    if str(cfg.precision.name) not in BATCHED_PRECISIONS:
        return f"precision={cfg.precision.name}"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return "data-parallel (torchrun)"
    return None


def ensemble_key(cfg) -> tuple:
    """Runs with equal keys can train as one ensemble."""
    flat = flatten(plain(cfg), keep_lists=True)
    return tuple(sorted((k, repr(v)) for k, v in flat.items() if k.startswith(SHARED_PREFIXES) or k in SHARED_KEYS))


def member_bytes(cfg, vocab_size: int) -> int:
    """An estimate of one member's memory: fp32 weights, gradients and AdamW's two moments, plus the
    activations autograd keeps for one micro-batch (about 18 d_model values per token and layer, and
    4 vocab-sized rows per token for the logits, their log-softmax and gradient)."""
    m, t = cfg.model, cfg.train
    d, layers = m.d_model, m.n_layer
    params = layers * (4 + 2 * m.mlp_ratio) * d * d + vocab_size * d * (1 if m.tie_embeddings else 2) \
        + m.block_size * d
    tokens = t.batch_size * m.block_size
    return 16 * params + 4 * tokens * (18 * layers * d + 4 * vocab_size)


def available_bytes(device: torch.device) -> int:
    """Memory free for new tensors: the GPU's free memory, or the host's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def split(indices: list[int], most: int) -> list[list[int]]:
    """`indices` in consecutive chunks of at most `most`, as even as possible."""
    chunks = math.ceil(len(indices) / max(1, most))
    size, larger = divmod(len(indices), chunks)  # the first `larger` chunks take one more
    bounds = [k * size + min(k, larger) for k in range(chunks + 1)]
    return [indices[a:b] for a, b in zip(bounds, bounds[1:])]


@contextmanager
def no_batching_rule_warning():
    """The CPU flash-attention kernel has no batching rule: vmap runs it member by member (exactly), and
    warns about it at every call."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*batching rule.*")
        yield


@dataclass
class MemberJob:
    """One run of an ensemble: what `loop.train` takes for a run made alone."""

    cfg: object
    run_dir: Path
    overrides: list[str] = field(default_factory=list)
    choices: dict = field(default_factory=dict)


class Ensemble:
    """The stepper of member runs whose parameters are stacked (each made with `own_rng`): one batched forward
    and backward for all, everything else each member's own."""

    def __init__(self, runs: list[Run]):
        self.runs = list(runs)
        first = runs[0]
        self.precision, self.accum = first.precision, first.cfg.train.grad_accum
        self.detect_anomaly = first.cfg.detect_anomaly
        self.named: list[list] = []
        self.params: dict[str, torch.Tensor] = {}
        self._restack()
        self.forward = compiled(vmap(self._member_forward), first.cfg)

    def _member_forward(self, params: dict, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.runs[0].model, params, (x,))

    def _restack(self) -> None:
        """Stack the members' parameters, and make each member's parameters views into the stack."""
        self.named = [list(run.model.named_parameters()) for run in self.runs]  # tied weights once
        self.params = {name: torch.stack([dict(named)[name].detach() for named in self.named]).requires_grad_()
                       for name, _ in self.named[0]}
        for i, named in enumerate(self.named):
            for name, p in named:
                p.data = self.params[name].detach()[i]

    def step(self) -> list[StepResult]:
        """One optimizer step of every member; each member's result as its train_step returns it."""
        runs, device = self.runs, self.runs[0].device
        ce = [torch.zeros((), device=device) for _ in runs]
        z = [torch.zeros((), device=device) for _ in runs]
        for run in runs:
            with run.acting():
                run.begin_step()
        anomaly = torch.autograd.detect_anomaly() if self.detect_anomaly else nullcontext()
        for micro in range(self.accum):
            batches = []
            for run in runs:
                with run.acting():
                    batches.append(run.micro_batch(micro))
            x, y = (torch.stack(parts) for parts in zip(*batches))
            with anomaly:
                with self.precision.autocast(), no_batching_rule_warning():
                    logits = self.forward(self.params, x)
                scaled = []
                for i, (run, member_logits, targets) in enumerate(zip(runs, logits.unbind(0), y.unbind(0))):
                    parts = lm_loss(member_logits, targets, run.optim_cfg.z_loss)
                    scaled.append(run.precision.scale_loss(parts.loss / self.accum))  # as Precision.backward
                    ce[i] += parts.ce.detach()
                    z[i] += parts.z_term.detach()
                torch.stack(scaled).sum().backward()  # each member's loss gets gradient 1, as alone
        results = []
        for i, (run, named) in enumerate(zip(runs, self.named)):
            for name, p in named:
                p.grad = self.params[name].grad[i]
            with run.acting():
                results.append(run.finish_step(ce[i], z[i]))
        for stacked in self.params.values():
            stacked.grad = None
        return results

    def samples(self, runs: list[Run]) -> list[str]:
        """The end-of-run samples of these members, as each draws it alone (minilm.train.run.samples), one
        batched forward per token for all of them (a sample costs a forward per token: hundreds of tiny ones)."""
        rows = torch.tensor([self.runs.index(run) for run in runs], device=self.runs[0].device)
        params = {name: stacked.detach().index_select(0, rows) for name, stacked in self.params.items()}
        model = self.runs[0].model
        model.eval()
        with self.precision.autocast(), no_batching_rule_warning():
            texts = samples(runs, partial(vmap(self._member_forward), params))
        model.train()
        return texts

    def drop(self, runs: list[Run]) -> None:
        """These members ended: each is closed (W&B finished, its closing line), the others are restacked
        without them."""
        for run in runs:
            run.close()
        self.runs = [run for run in self.runs if run not in runs]
        if self.runs:
            self._restack()


def train_ensemble(jobs: list[MemberJob], label: str = "") -> list[dict]:
    """Train `jobs` (runs an ensemble can batch: equal `ensemble_key`) as one ensemble and return their
    summaries, in order. A run that already finished in its run dir is not trained again, as with
    loop.train; every member is closed (W&B finished, closing line) whatever happens."""
    with run_dirs_held(jobs):
        return _train_ensemble_locked(jobs, label)


def _train_ensemble_locked(jobs: list[MemberJob], label: str) -> list[dict]:
    summaries: list[dict | None] = [None] * len(jobs)
    todo = []
    for i, job in enumerate(jobs):
        finished = RunDir(job.run_dir).finished_summary(job.cfg)
        if finished is not None:
            summaries[i] = finished
        else:
            todo.append(i)
    if not todo:
        return summaries
    first = jobs[todo[0]].cfg
    data = prepare_data(first.data, first.paths.cache_dir, log=log.info)  # once for every member
    runs: list[Run] = []
    run_dirs = [str(jobs[i].run_dir) for i in todo]
    try:
        for k, i in enumerate(todo):
            job = jobs[i]
            record = {"ensemble": {"members": len(todo), "member": k, "run_dirs": run_dirs}}
            runs.append(Run(job.cfg, job.run_dir, job.overrides, job.choices, data=data, environment=record,
                            name=f"[{label}member {k}] ", own_rng=True))
        for i, summary in zip(todo, fit(Ensemble(runs))):
            summaries[i] = summary
    except BaseException as error:
        for run in runs:
            if run.summary is None:
                run.fail(error)
                run.close()
        raise
    return summaries
