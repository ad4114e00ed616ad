"""One run: its state, resume, checkpoints, the step in parts, and how it ends.

The loop that drives it is minilm/train/loop.py (`fit`, for one run or the members of a batched
ensemble); this file is what a run is between its steps and within one.

One optimizer step = `grad_accum` micro-batches of forward + scaled backward, then unscale,
global-norm clip (the pre-clip norm is logged), and an update that is skipped on device when
any gradient is non-finite (see precision.py). The host fetches metrics only every
`log_interval` steps (minilm/train/metrics.py); each step's loss is also read one step late
(lifecycle.StepScalars), so divergence is caught at the step it is confirmed without stalling
the device.

How a run ends (summary.json `outcome`, the process exit code in minilm/errors.py):
    completed    max_steps reached, the last loss below the divergence line and at most half of
                 the updates skipped; val loss and a sample at the end
    diverged     divergence confirmed (minilm/train/divergence.py): the run stops at that step, its
                 metrics are flushed and checkpoints/diverged.pt holds the state after that step;
                 also a run that reached max_steps above the line or with most updates skipped
    interrupted  SIGINT / SIGTERM / SIGUSR1: the step finishes, metrics are flushed, a checkpoint
                 is written; the same command resumes (data parallel: at the next flush boundary,
                 every `log_interval` steps, where the ranks agree on it)
    failed       an exception: the summary records it and W&B is finished
Whatever happens, `close()` finishes W&B and closes the metrics file, and one closing line says
how the run ended and where it lives. A checkpoint is never ahead of the metrics it implies:
pending rows are flushed before every checkpoint.

Distributed data parallel: launched with torchrun, each rank trains on its own disjoint slice of
every global batch; rank 0 alone logs and writes checkpoints.
"""

import json
import logging
import math
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from minilm import checkpoint
from minilm.config import check_runnable, resolve_device, validate
from minilm.data import TokenWindowSampler, eval_batches, prepare_data
from minilm.environment import environment_record
from minilm.errors import EXIT_CODES, CheckpointError, DataError, MinilmError, RunDirError
from minilm.model import generate, lm_loss
from minilm.optim import build_optimizer, lr_at, set_schedule
from minilm.optim.qk_clip import QKClip
from minilm.optim.skip_step import SpikeSkip
from minilm.precision.bf16_pure import bytes_per_param
from minilm.precision.policy import Precision
from minilm.rundir import CHECKPOINTS_DIR, CONFIG_FILE, ENVIRONMENT_FILE, WANDB_CONFIG_FILE, WANDB_ENVIRONMENT_FILE
from minilm.seeding import rng_state, seed_everything, set_deterministic, set_rng_state, torch_rng_state, torch_seed
from minilm.train.build import build_model, init_distributed, rank0s, wrap_model
from minilm.train.diagnostics import Diagnostics, block_skip_dloss, peak_memory_mb
from minilm.train.divergence import DivergenceMonitor, LastHealthy
from minilm.train.forensics import Forensics
from minilm.train.lifecycle import RunDir, StepScalars, check_architecture, check_resume, plain
from minilm.train.metrics import MetricsWindow
from minilm.train.numerics import NumericsCollector
from minilm.train.tracking import Tracker

log = logging.getLogger("minilm")


def checkpoint_bytes(model: torch.nn.Module) -> int:
    """About how large one checkpoint is: the parameters plus AdamW's two moments, in fp32."""
    return sum(3 * p.numel() * 4 for p in model.parameters()) + (1 << 20)


class Run:
    """One run. `data`: token data already prepared for this config's data section (an ensemble's members
    share one); `environment`: extra entries for environment.json (e.g. the ensemble a member trained in);
    `name`: how its log lines name it (an ensemble's member); `own_rng`: keep its RNG streams apart from the
    process's, for a run that shares the process with others (an ensemble's member, see `acting`)."""

    def __init__(self, cfg, run_dir: Path, overrides: list[str] = (), choices: dict | None = None,
                 data=None, environment: dict | None = None, name: str = "", own_rng: bool = False):
        validate(cfg)  # every config error surfaces before any work
        self.cfg, self.overrides, self.choices = cfg, list(overrides), choices or {}
        # plain copies for what every step reads: an OmegaConf attribute read costs microseconds
        self.train_cfg, self.optim_cfg = OmegaConf.to_object(cfg.train), OmegaConf.to_object(cfg.optim)
        self.device = resolve_device(cfg.device)
        check_runnable(cfg, self.device)
        set_deterministic(cfg.deterministic)  # before CUDA initializes
        self.rank, self.world_size, self.device = init_distributed(self.device)
        self.is_main = self.rank == 0
        run_dir = rank0s(run_dir, self.world_size)  # ranks may disagree on a timestamped dir: rank 0's is the run's
        self.run = RunDir(run_dir) if self.is_main else None
        self.run_dir = Path(run_dir)
        if self.is_main and str(cfg.train.resume) == "none":
            archived = self.run.archive()
            if archived:
                log.info(f"train.resume=none: the earlier run's files in {self.run_dir} moved to {archived}")

        seed_everything(cfg.seed)  # identical model init on every rank
        self.data = data if data is not None else self._prepare_data()
        self.precision = Precision(OmegaConf.to_object(cfg.precision), self.device)
        self.model = build_model(cfg, self.data.vocab_size, self.precision)
        self.optimizer = build_optimizer(self.model, cfg.optim, self.precision, cfg.seed)
        self.spike_skip = (SpikeSkip(cfg.optim.skip_spikes_window, cfg.optim.skip_spikes_sigma, self.device)
                           if cfg.optim.skip_spikes else None)
        self.qk_clip = QKClip(self.model, cfg.optim.qk_clip_tau) if cfg.optim.qk_clip_tau else None
        self.sampler = TokenWindowSampler(self.data.train, cfg.model.block_size, cfg.train.batch_size, cfg.seed,
                                          self.rank, self.world_size)
        self.val_batches = eval_batches(self.data.val, cfg.model.block_size, cfg.train.batch_size,
                                        cfg.train.eval_batches)
        self.train_model = wrap_model(self.model, cfg, self.device, self.world_size)
        self.diagnostics = Diagnostics(self.model, self.precision, cfg.diagnostics, enabled=self.is_main)
        self.numerics = (NumericsCollector(self.model, self.precision.name)
                         if cfg.diagnostics.numerics and self.diagnostics.interval else None)
        self.forensics = Forensics(self.model, self.optimizer, self.precision, cfg, self.run_dir, self.device,
                                   self.rank, self.world_size, log=log.error)
        # a uniform prediction's loss, plus a margin for the loss at init; see minilm/train/divergence.py
        self.divergence = DivergenceMonitor(math.log(self.data.vocab_size) + cfg.train.divergence_margin,
                                            cfg.train.divergence_window)
        self.scalars = StepScalars()
        self.step = self.skipped_updates = 0  # updates skipped for a non-finite gradient, as of the last flush
        self._skipped_so_far = torch.zeros((), device=self.device)  # the same count on the device, every step
        self.last_healthy = LastHealthy(self.divergence, cfg.train.divergence_window + cfg.train.log_interval + 1)
        self.val_loss = self.best_val_loss = None
        self.logged_loss: float | None = None  # the last train/loss logged
        self.tracker: Tracker | None = None
        self.summary: dict | None = None
        self.name = name
        self._in_flight: dict | None = None  # the step between begin_step and finish_step
        seed_everything(cfg.seed + self.rank)  # per-rank stream for dropout and sampling

        resumed = self._resume()
        if self.is_main:
            self._check_free_space()
            self._start_tracking(resumed, environment or {})
        # a run sharing the process: its every RNG's state as its seeding (or resume) left it, for `acting`
        self.own_rng: dict | None = rng_state() if own_rng else None

    # ------------------------------------------------------------ setup
    def _prepare_data(self):
        # Rank 0 builds the token cache; the others wait, then read it.
        if self.is_main:
            data = prepare_data(self.cfg.data, self.cfg.paths.cache_dir, log=log.info)
        if self.world_size > 1:
            dist.barrier()
        return data if self.is_main else prepare_data(self.cfg.data, self.cfg.paths.cache_dir, log=log.info)

    def _resume(self) -> dict | None:
        """Load the checkpoint to continue from, after checking it fits this run; returns what was resumed."""
        resume, train_cfg = str(self.cfg.train.resume), self.cfg.train
        in_place = resume == "auto"
        if resume == "none":
            return None
        loaded = checkpoint.load_latest(self.run_dir if in_place else Path(resume), log=log.warning)
        if loaded is None:
            if not in_place:
                raise CheckpointError(f"train.resume={resume}: no checkpoint there; pass a .pt file or a run dir with "
                                      f"checkpoints/{checkpoint.LAST}")
            logged = self.run.logged_config() if self.is_main else None
            if logged:  # an earlier attempt stopped before its first checkpoint: it starts over here
                changes = check_resume(logged, self.cfg, 0, train_cfg.allow_config_change)
                if changes:
                    self.run.record_revision(0, changes)
            return None
        state, path = loaded
        if state["data_fingerprint"] != self.data.fingerprint:
            raise DataError(f"the checkpoint {path} was trained on other data (its fingerprint differs); resume "
                            f"with the run's data config, or start a new run dir")
        check_architecture(state["model"], self.model, path)
        changes = check_resume(state["config"], self.cfg, state["step"], train_cfg.allow_config_change)
        if changes and self.is_main and in_place:
            self.run.record_revision(state["step"], changes)
        self._load_state(state)
        log.info(f"resumed from {path} at step {self.step}")
        return {"path": str(path), "step": self.step, "in_place": in_place, "wandb_id": state.get("wandb_id")}

    def _check_free_space(self) -> None:
        needed = 3 * checkpoint_bytes(self.model)  # last.pt, previous.pt and the one being written
        free = checkpoint.free_bytes(self.run_dir)
        if free < needed:
            raise RunDirError(f"the run dir {self.run_dir} has {free} bytes free and checkpoints need about {needed}; "
                              f"free some space or pass another hydra.run.dir")

    def _start_tracking(self, resumed: dict | None, extra: dict) -> None:
        config = plain(self.cfg)
        if not (self.run_dir / CONFIG_FILE).exists():
            (self.run_dir / CONFIG_FILE).write_text(OmegaConf.to_yaml(OmegaConf.create(config)))
        in_place = resumed is None or resumed["in_place"]
        wandb_id = (resumed or {}).get("wandb_id") if resumed else self.run.wandb_id()
        self.tracker = Tracker(self.run_dir, self.cfg.logger, config, self.overrides,
                               start_step=self.step, resume_id=wandb_id if in_place else None, choices=self.choices)
        record = environment_record(self.device)
        record.update(data_fingerprint=self.data.fingerprint, token_cache=str(self.data.cache_dir),
                      wandb_run_id=self.tracker.wandb_id, n_params=self.model.num_params(),
                      world_size=self.world_size, precision=self.precision.describe(), **extra)
        if resumed and not resumed["in_place"]:
            record["resumed_from"] = {"checkpoint": resumed["path"], "step": resumed["step"]}
        (self.run_dir / ENVIRONMENT_FILE).write_text(json.dumps(record, indent=1))
        self.tracker.save_file(self.run_dir / CONFIG_FILE, WANDB_CONFIG_FILE)
        self.tracker.save_file(self.run_dir / ENVIRONMENT_FILE, WANDB_ENVIRONMENT_FILE)

    # ------------------------------------------------------------ RNG streams
    def rng_snapshot(self) -> dict:
        """Every RNG's state, as checkpoints record it: the process's, or this run's own (`own_rng`)."""
        return rng_state() if self.own_rng is None else {**self.own_rng, **torch_rng_state()}

    @contextmanager
    def acting(self):
        """This run's torch RNG streams in place while acting for it (a run with `own_rng`; otherwise the
        process's are its own). A step never draws from python's or numpy's, which its checkpoints take from
        `own_rng`. Microseconds."""
        if self.own_rng is None:
            yield
            return
        set_rng_state({k: v for k, v in self.own_rng.items() if k in ("torch", "cuda")})
        try:
            yield
        finally:
            self.own_rng = {**self.own_rng, **torch_rng_state()}

    # ------------------------------------------------------------ checkpoints
    def should_checkpoint(self) -> bool:
        """Whether the step just taken writes checkpoints/last.pt: every train.ckpt_interval steps and at the end."""
        interval = self.train_cfg.ckpt_interval
        return bool(interval and self.step % interval == 0) or self.step == self.train_cfg.max_steps

    def state_dict(self) -> dict:
        rngs = [self.rng_snapshot()]
        if self.world_size > 1:
            rngs = [None] * self.world_size
            dist.all_gather_object(rngs, self.rng_snapshot())
        return {
            "step": self.step, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scaler": self.precision.state_dict(), "sampler": self.sampler.state_dict(), "rng": rngs,
            "skipped_updates": self.skipped_updates, "wandb_id": self.tracker.wandb_id if self.tracker else None,
            "diagnostics": self.diagnostics.state_dict(), "divergence": self.divergence.state_dict(),
            "last_healthy": self.last_healthy.row, "val_loss": self.val_loss, "best_val_loss": self.best_val_loss,
            "spike_skip": self.spike_skip.state_dict() if self.spike_skip else None,
            "data_fingerprint": self.data.fingerprint, "config": plain(self.cfg),
        }

    def _load_state(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.precision.load_state_dict(state["scaler"])
        self.sampler.load_state_dict(state["sampler"])
        self.step = state["step"]
        self.skipped_updates = state.get("skipped_updates", state.get("skipped_steps", 0))  # older: fp16 only
        self._skipped_so_far = torch.tensor(float(self.skipped_updates), device=self.device)
        self.diagnostics.load_state_dict(state["diagnostics"])
        self.divergence.load_state_dict(state["divergence"])
        self.last_healthy.row, self.best_val_loss = state["last_healthy"], state["best_val_loss"]
        # the final checkpoint's val loss is logged already: a resume that only ends the run must not log it again
        self.val_loss = state.get("val_loss")
        if self.spike_skip:
            self.spike_skip.load_state_dict(state.get("spike_skip"))
        rngs = state["rng"]
        set_rng_state(rngs[self.rank] if self.rank < len(rngs) else rngs[0])

    def save_checkpoint(self, name: str = checkpoint.LAST) -> None:
        state = self.state_dict()  # every rank joins the RNG gather
        if self.is_main:
            checkpoint.save_atomic(state, self.run_dir / CHECKPOINTS_DIR / name, keep_previous=name == checkpoint.LAST)

    # ------------------------------------------------------------ steps
    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next training micro-batch (inputs, targets), on the device."""
        batch = self.sampler.next_batch()
        if self.device.type == "cuda":  # pinned memory lets the copy overlap compute
            return tuple(t.pin_memory().to(self.device, non_blocking=True) for t in batch)
        return batch

    def set_lr(self, step: int) -> None:
        set_schedule(self.optimizer, step, self.optim_cfg, self.train_cfg.max_steps)

    def train_step(self) -> tuple[torch.Tensor, ...] | None:
        """One optimizer step; returns (mean cross-entropy, pre-clip grad norm, updates skipped so far) as
        device tensors.

        Returns None, leaving the state as the previous step left it, when the previous step turned out to
        confirm a divergence and the run stops there (train.stop_on_divergence).
        """
        self.begin_step()
        accum = self.train_cfg.grad_accum
        ce_total = torch.zeros((), device=self.device)
        z_total = torch.zeros((), device=self.device)
        anomaly = torch.autograd.detect_anomaly() if self.cfg.detect_anomaly else nullcontext()
        for micro in range(accum):
            x, y = self.micro_batch(micro)
            last = micro == accum - 1
            no_sync = self.train_model.no_sync() if self.world_size > 1 and not last else nullcontext()
            with no_sync, anomaly:
                with self.precision.autocast():
                    logits = self.train_model(x)
                parts = lm_loss(logits, y, self.optim_cfg.z_loss)
                self.precision.backward(parts.loss / accum)
            ce_total += parts.ce.detach()
            z_total += parts.z_term.detach()
        return self.finish_step(ce_total, z_total)

    # A step in parts, so that an ensemble (minilm/train/ensemble.py) runs the forward and backward of all
    # its members at once and everything around it through the same code as a run made alone:
    #   begin_step, micro_batch (each micro-batch), [forward + backward], finish_step =
    #   settle the previous step, clip, update, after_update, record.
    def begin_step(self) -> None:
        """Start a step: its learning rate, what it takes to abandon or replay it, whether it is sampled."""
        step = self.step + 1  # as logged
        self.set_lr(self.step)
        snapshot = {"sampler": self.sampler.state_dict(), "rng": torch_rng_state()}
        self._in_flight = {"step": step, "snapshot": snapshot, "sampled": self.diagnostics.sampled(step)}
        self.forensics.begin_step(step, snapshot["rng"])

    def micro_batch(self, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's next micro-batch, seen by forensics and, on a sampled step, by diagnostics."""
        x, y = self.next_batch()
        self.forensics.add_batch(x, y)
        if self.qk_clip:
            self.qk_clip.observe(x, self.precision.autocast)
        step = self._in_flight["step"]
        if self._in_flight["sampled"] and micro == 0:
            self.diagnostics.observe_forward(step, x)
            if self.numerics:
                self.diagnostics.record(step, self.numerics.observe(x, y, self.precision.autocast,
                                                                    self.precision.scale_loss))
        return x, y

    def finish_step(self, ce_total: torch.Tensor, z_total: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
        """Once the step's gradients are in the parameters' .grad (summed losses over the micro-batches given):
        settle the previous step, then unscale, clip and update; as train_step returns."""
        cfg, in_flight = self.train_cfg, self._in_flight
        step, sampled, accum = in_flight["step"], in_flight["sampled"], cfg.grad_accum
        # This step's work is queued; settle the previous step while the weights are still untouched.
        if self._settle_previous_step():
            self._abandon_step(in_flight["snapshot"])
            return None
        self.precision.unscale_(self.optimizer)
        if sampled:
            self.diagnostics.observe_gradients(step)
        clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        grad_norm = self.precision.clip_grad_norm(list(self.model.parameters()), clip).detach()
        mean_ce = ce_total / accum
        if self.world_size > 1:  # every rank sees the mean loss (queued on the device: no host sync)
            dist.all_reduce(mean_ce)
            mean_ce /= self.world_size
        skip = None
        if self.spike_skip:  # ranks agree: the same mean loss and the same (all-reduced) gradients
            skip = self.spike_skip.decide(mean_ce, grad_norm)
            self.diagnostics.record(step, {"optim/skipped_spikes": self.spike_skip.skipped.clone()})
        self._skipped_so_far = self._skipped_so_far + self.precision.step(self.optimizer, grad_norm, skip)
        self.after_update(step, sampled, grad_norm, skip)
        self.step += 1
        self.forensics.end_step()
        self.scalars.record(step, mean_ce, grad_norm)
        if self.optim_cfg.z_loss:
            self.diagnostics.record(step, {"train/z_loss": z_total / accum})
        self._in_flight = None
        return mean_ce, grad_norm, self._skipped_so_far

    def after_update(self, step: int, sampled: bool, grad_norm: torch.Tensor, skip: torch.Tensor | None) -> None:
        """Right after the optimizer's update of `step` (applied or skipped on device; `grad_norm` and skip-step's
        `skip` say which): what looks at or adjusts the updated weights goes here, before the gradients are
        dropped."""
        if self.qk_clip:  # only where the update was applied, before anything looks at the updated weights
            self.diagnostics.record(step, self.qk_clip.clip(grad_norm, skip))
        if sampled:
            self.diagnostics.observe_update(step)
        self.optimizer.zero_grad(set_to_none=True)

    def _settle_previous_step(self) -> bool:
        """Read the last finished step's loss on the host: forensics and divergence look at it.
        True when it confirmed a divergence that stops the run."""
        settled = self.scalars.settle()
        if settled is None:
            return False
        step, loss, grad_norm = settled
        self.forensics.check(step, loss, grad_norm)
        if not self.divergence.update(step, loss, grad_norm):
            return False
        self.last_healthy.forget_from(self.divergence.diverged_at)
        log.error(f"diverged at step {self.divergence.diverged_at}, confirmed at step {step}: train/loss={loss:.4g} "
                  f"({self.divergence.reason}; the line is {self.divergence.threshold:.3f}, "
                  f"train.divergence_window={self.divergence.window})")
        return self.train_cfg.stop_on_divergence

    def _abandon_step(self, snapshot: dict) -> None:
        """Undo a step whose update was not applied: the run stops at the previous step, as that step left it."""
        self.optimizer.zero_grad(set_to_none=True)
        self.sampler.load_state_dict(snapshot["sampler"])
        set_rng_state(snapshot["rng"])
        self.forensics.drop_step()
        self.diagnostics.drop_after(self.step)

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module | None = None) -> float:
        """The mean val loss of `model` (default: the run's) over the held-out batches."""
        model = self.model if model is None else model
        model.eval()
        total = torch.zeros((), device=self.device)
        for batch in self.val_batches:
            x, y = (t.to(self.device) for t in batch)
            with self.precision.autocast():
                logits = model(x)
            total += lm_loss(logits, y).ce
        model.train()
        return (total / len(self.val_batches)).item()

    def should_evaluate(self) -> bool:
        """Whether the step just taken is evaluated: every train.eval_interval steps and at the end."""
        interval = self.train_cfg.eval_interval
        return bool(interval and self.step % interval == 0) or self.step == self.train_cfg.max_steps

    def evaluate_and_log(self, write=None) -> None:
        """Evaluate, log val/loss and say so through `write` (the progress bar's), or the log."""
        self.val_loss = self.evaluate()
        self.best_val_loss = min(self.val_loss, self.best_val_loss or math.inf)
        metrics = {"val/loss": self.val_loss}
        if self.cfg.diagnostics.block_skip:
            metrics.update(block_skip_dloss(self.model, self.evaluate, self.val_loss))
        if self.tracker:
            self.tracker.log(metrics, self.step)
        (write or log.info)(f"{self.name}step {self.step}: val/loss {self.val_loss:.4f}")

    # ------------------------------------------------------------ between steps (minilm/train/loop.py)
    def log_window(self, window: MetricsWindow) -> None:
        """Fetch the window's pending per-step metrics in one host sync, log them, and start the next window."""
        self._settle_previous_step()
        rows = window.fetch()
        diag_rows = self.diagnostics.collect()  # right after that sync: nothing left to wait for
        elapsed = window.elapsed()
        cfg = self.train_cfg
        tokens = len(rows) * cfg.batch_size * cfg.grad_accum * self.cfg.model.block_size
        clip = cfg.grad_clip
        for i, (loss, grad_norm, skipped) in enumerate(rows):
            step = window.first_step + i + 1
            metrics = {"train/loss": loss, "optim/grad_norm": grad_norm,
                       "optim/lr": lr_at(step - 1, self.optim_cfg, cfg.max_steps),
                       "optim/clipped": int(clip > 0 and math.isfinite(grad_norm) and grad_norm > clip),
                       **diag_rows.get(step, {})}
            self.diagnostics.on_logged(metrics)
            self.skipped_updates = metrics["optim/skipped_updates"] = int(skipped)
            if self.precision.uses_scaler:  # fp16: the same count, under its earlier name
                metrics["amp/skipped_steps"] = self.skipped_updates
            if step == 1:  # the optimizer's state exists from the first step on
                metrics["mem/bytes_per_param"] = bytes_per_param(self.optimizer)
            if i == len(rows) - 1:
                metrics["perf/tokens_per_s"] = tokens * self.world_size / elapsed
                metrics["perf/step_time_ms"] = 1000 * elapsed / len(rows)
                metrics["perf/peak_mem_mb"] = peak_memory_mb(self.device)
                metrics.update(self.diagnostics.running_metrics())
                if self.precision.uses_scaler:
                    metrics["amp/scale"] = self.precision.scale()
            if self.tracker:
                self.tracker.log(metrics, step)
            self.last_healthy.see({"step": step, **metrics})
            self.logged_loss = loss
        window.restart(self.step)

    def stop_agreed(self, requested: bool, boundary: bool) -> bool:
        """Whether a stop signal (`requested`) ends the run after this step. Ranks of a data-parallel run must
        stop at the same step: they agree at flush boundaries only (`boundary`), since agreeing takes a host
        sync, which every step would keep the device from running ahead."""
        if self.world_size > 1:
            if not boundary:
                return False
            t = torch.tensor(float(requested), device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            requested = bool(t.item())
        return requested

    def diverged_stop(self) -> bool:
        return self.divergence.diverged and self.train_cfg.stop_on_divergence

    # ------------------------------------------------------------ the end
    def final_outcome(self, planned: str) -> str:
        """How the run ends, after its last step; `planned`: "completed" (it reached max_steps), "paused" or
        "interrupted". At max_steps the end-of-run divergence rules apply (minilm/train/divergence.py
        judge_end), which a run that trained on past a divergence has met already."""
        monitor = self.divergence
        if planned == "completed" and monitor.judge_end(self.step, self.skipped_updates):
            self.last_healthy.forget_from(monitor.diverged_at)
            log.error(f"diverged at step {monitor.diverged_at}, judged at the end of the run: {monitor.reason} "
                      f"(the line is {monitor.threshold:.3f}); see the Divergence section of the README")
        return "diverged" if self.diverged_stop() or monitor.at_end else planned

    def samples_at_end(self, outcome: str) -> bool:
        return self.is_main and outcome == "completed" and self.cfg.train.sample_tokens > 0

    def end(self, outcome: str, stopped_by: str | None, sample: str | None = None) -> dict:
        """The final evaluation and the summary of a run that ended `outcome` (final_outcome's); `stopped_by`:
        the signal's name, for an interrupted run; `sample`: its end-of-run sample, drawn already (an ensemble
        draws its members' together), or None to draw it here."""
        if outcome == "completed" and self.val_loss is None:  # e.g. resumed from the final checkpoint
            self.evaluate_and_log()
        summary = {"outcome": outcome, "step": self.step, "max_steps": self.cfg.train.max_steps,
                   **self.divergence.summary(self.step), "val/loss": self.val_loss,
                   "val/best_loss": self.best_val_loss, "optim/skipped_updates": self.skipped_updates}
        if self.precision.uses_scaler:
            summary["amp/skipped_steps"] = self.skipped_updates
        if outcome == "diverged":
            self.save_checkpoint("diverged.pt")
        if outcome == "interrupted":
            summary["stopped_by"] = stopped_by
        summary.update({f"last_healthy/{k}": v for k, v in self.last_healthy.row.items()})
        summary.update({**self.diagnostics.running_metrics(), **self.forensics.summary()})
        if self.is_main:
            if self.samples_at_end(outcome):
                summary["sample"] = self.sample() if sample is None else sample
                log.info("sample:\n" + summary["sample"])
            self.tracker.summary(summary)
        self.summary = summary
        return summary

    def fail(self, error: BaseException) -> None:
        """Record in the summary how the run died, if the run dir still takes a write."""
        interrupted = isinstance(error, KeyboardInterrupt)
        message = str(error) if isinstance(error, MinilmError) else f"{type(error).__name__}: {error}"
        self.summary = {"outcome": "interrupted" if interrupted else "failed", "step": self.step,
                        "max_steps": self.cfg.train.max_steps, **self.divergence.summary(self.step),
                        "error": None if interrupted else message}
        if self.tracker:
            try:
                self.tracker.summary(self.summary)
            except OSError as write_error:
                log.error(f"could not write the summary ({write_error})")

    def closing_line(self) -> str:
        s, cfg = self.summary, self.cfg.train
        text = f"run {s['outcome']} at step {s['step']}/{cfg.max_steps}"
        if s.get("diverged_at_step") is not None:
            text += f" (diverged at step {s['diverged_at_step']}: {s.get('divergence_reason')})"
        if s.get("val/loss") is not None:
            text += f", val/loss {s['val/loss']:.4f} (best {s['val/best_loss']:.4f})"
        if s["outcome"] == "interrupted":
            text += ", checkpoint saved: run the same command to resume" if s.get("stopped_by") else ""
        text += f"; run dir {self.run_dir}"
        if self.tracker and self.tracker.wandb_location:
            text += f"; {self.tracker.wandb_location}"
        return text

    def close(self) -> None:
        """Finish W&B and close the metrics file; say how the run ended. Safe to call on every path."""
        if self.tracker:
            outcome = (self.summary or {}).get("outcome")
            self.tracker.finish(exit_code=EXIT_CODES.get(outcome, 1))
        if self.is_main and self.summary:
            log.info(self.closing_line())

    def sample(self) -> str:
        """The end-of-run sample: SAMPLE_PROMPT continued by train.sample_tokens tokens."""
        self.model.eval()
        with self.precision.autocast():
            text = samples([self], lambda idx: self.model(idx[0]).unsqueeze(0))[0]
        self.model.train()
        return text


SAMPLE_PROMPT = "def"


def samples(runs: list[Run], forward) -> list[str]:
    """Each run's end-of-run sample, drawn with a generator seeded by its seed; `forward` maps the
    runs' token ids (runs, 1, time) to logits (runs, 1, time, vocab). A text depends only on its
    own model and seed: a run alone and an ensemble member (minilm/train/ensemble.py) draw it alike."""
    first = runs[0]
    prompt = first.data.encode(SAMPLE_PROMPT)
    lengths = [len(prompt) + run.cfg.train.sample_tokens for run in runs]
    generators = [torch.Generator(device=first.device).manual_seed(torch_seed(run.cfg.seed)) for run in runs]
    idx = torch.tensor([[prompt]] * len(runs), device=first.device)
    idx = generate(forward, idx, max(lengths) - len(prompt), first.cfg.model.block_size, generators)
    # a shorter sample is the start of a longer one: each token depends only on the ones before it
    return [first.data.decode(row[0, :length].tolist()) for row, length in zip(idx, lengths)]
