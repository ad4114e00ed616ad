"""The training loop: step, clip, guard, evaluate, checkpoint, resume.

One optimizer step = `grad_accum` micro-batches of forward + scaled backward,
then unscale, global-norm clip (the pre-clip norm is logged), and an update
that is skipped on device when any gradient is non-finite (see precision.py).
The host fetches metrics only every `log_interval` steps, so the GPU never
waits on Python in between.

Distributed data parallel: launched with torchrun, each rank trains on its own
disjoint slice of every global batch; rank 0 alone logs and writes checkpoints.
"""

import gc
import json
import logging
import math
import os
import signal
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from minilm import checkpoint
from minilm.config import validate
from minilm.data import BatchSampler, eval_batches, prepare_data
from minilm.diagnostics import Diagnostics, peak_memory_mb
from minilm.forensics import Forensics
from minilm.model import GPT, ModelConfig, lm_loss
from minilm.precision import Precision
from minilm.repro import environment_record, rng_state, seed_everything, set_deterministic, set_rng_state
from minilm.tracking import WANDB_CONFIG_FILE, WANDB_ENVIRONMENT_FILE, Tracker

log = logging.getLogger("minilm")
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def model_config(cfg, vocab_size: int) -> ModelConfig:
    m = cfg.model
    return ModelConfig(
        vocab_size=vocab_size, n_layer=m.n_layer, n_head=m.n_head, d_model=m.d_model,
        block_size=m.block_size, mlp_ratio=m.mlp_ratio, dropout=m.dropout, bias=m.bias,
        tie_embeddings=m.tie_embeddings, placement=m.placement, init=m.init, qk_norm=m.qk_norm,
        norm_kind=cfg.norm.kind, norm_eps=cfg.norm.eps, norm_affine=cfg.norm.affine,
    )


def build_optimizer(model: torch.nn.Module, optim_cfg) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only: not on norm gains, biases or embeddings."""
    decay, no_decay = [], []
    embeddings = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    for p in model.parameters():  # tied weights appear once
        (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": optim_cfg.weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    # fused=True: one kernel for the whole update, and it honours the on-device
    # found_inf flag (precision.Precision.step), so skipping needs no host sync.
    return torch.optim.AdamW(groups, lr=optim_cfg.lr, betas=(optim_cfg.beta1, optim_cfg.beta2),
                             eps=optim_cfg.eps, fused=True)


def lr_at(step: int, optim_cfg, max_steps: int) -> float:
    """Linear warmup from 0 to lr, then cosine decay to lr * min_lr_ratio at max_steps."""
    peak, warmup = optim_cfg.lr, optim_cfg.warmup_steps
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    floor = peak * optim_cfg.min_lr_ratio
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))


class Trainer:
    def __init__(self, cfg, run_dir: Path, overrides: list[str] = ()):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.device = validate(cfg)  # every config error surfaces before any work
        set_deterministic(cfg.deterministic)  # before CUDA initializes
        self.rank, self.world_size = self._init_distributed()
        self.is_main = self.rank == 0
        if self.world_size > 1:  # ranks may disagree on a timestamped dir: rank 0's is the run's
            shared = [str(self.run_dir)]
            dist.broadcast_object_list(shared, src=0)
            self.run_dir = Path(shared[0])
        self.run_dir.mkdir(parents=True, exist_ok=True)

        seed_everything(cfg.seed)  # identical model init on every rank
        self.data = self._prepare_data()
        self.model = GPT(model_config(cfg, self.data.vocab_size)).to(self.device)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        p = cfg.precision
        self.precision = Precision(p.name, self.device, init_scale=p.get("init_scale", 65536.0),
                                   growth_interval=p.get("growth_interval", 2000), tf32=p.get("tf32", False))
        self.sampler = BatchSampler(self.data.train, cfg.model.block_size, cfg.train.batch_size, cfg.seed,
                                    self.rank, self.world_size)
        self.val_batches = eval_batches(self.data.val, cfg.model.block_size, cfg.train.batch_size,
                                        cfg.train.eval_batches)
        self.train_model = self._wrap_model()
        self.diagnostics = Diagnostics(self.model, self.precision, cfg.diagnostics, enabled=self.is_main)
        self.forensics = Forensics(self.model, self.optimizer, self.precision, cfg, self.run_dir, self.device,
                                   self.rank, self.world_size, log=log.error)
        self.step = 0
        self.skipped_steps = 0
        self.diverged_at = None
        self.last_healthy: dict = {}
        self.stop_signal = None
        # a uniform prediction's loss; a run above it (plus a margin for init noise) has diverged
        self.divergence_threshold = math.log(self.data.vocab_size) + cfg.train.get("divergence_margin", 0.5)
        seed_everything(cfg.seed + self.rank)  # per-rank stream for dropout and sampling

        resume_from = self._resume_source()
        state = checkpoint.load(resume_from) if resume_from else None
        if state:
            self._load_state(state)
            log.info(f"resumed from {resume_from} at step {self.step}")
        self.tracker = None
        if self.is_main:
            config = OmegaConf.to_container(cfg, resolve=True)
            (self.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
            self.tracker = Tracker(self.run_dir, cfg.logger, config, list(overrides),
                                   resume_id=state.get("wandb_id") if state else None, log=log.info,
                                   resume_step=self.step if state else None)
            self._write_environment()
            self.tracker.save_file(self.run_dir / "config.yaml", WANDB_CONFIG_FILE)

    # ------------------------------------------------------------ setup
    def _init_distributed(self) -> tuple[int, int]:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size == 1:
            return 0, 1
        if not dist.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            dist.init_process_group(backend)
        rank = dist.get_rank()
        if self.device.type == "cuda":
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
            torch.cuda.set_device(self.device)
        return rank, world_size

    def _prepare_data(self):
        # Rank 0 builds the token cache; the others wait, then read it.
        if self.is_main:
            data = prepare_data(self.cfg.data, log=log.info)
        if self.world_size > 1:
            dist.barrier()
        return data if self.is_main else prepare_data(self.cfg.data, log=log.info)

    def _wrap_model(self) -> torch.nn.Module:
        model = self.model
        if self.world_size > 1:
            model = DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if self.cfg.train.compile:
            model = torch.compile(model, backend=self.cfg.train.compile_backend)
        return model

    def _resume_source(self) -> Path | None:
        resume = self.cfg.train.resume
        if resume in (None, "none", False):
            return None
        if resume == "auto":
            return checkpoint.find_checkpoint(self.run_dir)
        found = checkpoint.find_checkpoint(Path(str(resume)))
        if found is None:
            raise FileNotFoundError(f"train.resume={resume!r}: no checkpoint there; pass a .pt file or a run dir "
                                    f"with checkpoints/{checkpoint.LAST}")
        return found

    def _write_environment(self) -> None:
        record = environment_record(self.device)
        record.update(data_fingerprint=self.data.fingerprint, token_cache=str(self.data.cache_dir),
                      wandb_run_id=self.tracker.wandb_id, n_params=self.model.num_params(),
                      world_size=self.world_size)
        (self.run_dir / "environment.json").write_text(json.dumps(record, indent=1))
        self.tracker.save_file(self.run_dir / "environment.json", WANDB_ENVIRONMENT_FILE)

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        rngs = [rng_state()]
        if self.world_size > 1:
            rngs = [None] * self.world_size
            dist.all_gather_object(rngs, rng_state())
        return {
            "step": self.step, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scaler": self.precision.state_dict(), "sampler": self.sampler.state_dict(), "rng": rngs,
            "skipped_steps": self.skipped_steps, "wandb_id": self.tracker.wandb_id if self.tracker else None,
            "diagnostics": self.diagnostics.state_dict(),
            "data_fingerprint": self.data.fingerprint, "config": OmegaConf.to_container(self.cfg, resolve=True),
        }

    def _load_state(self, state: dict) -> None:
        if state["data_fingerprint"] != self.data.fingerprint:
            raise RuntimeError("the checkpoint was trained on different data (fingerprint differs); "
                               "resume with the same data config or start a new run dir")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.precision.load_state_dict(state["scaler"])
        self.sampler.load_state_dict(state["sampler"])
        self.step, self.skipped_steps = state["step"], state["skipped_steps"]
        self.diagnostics.load_state_dict(state.get("diagnostics"))
        rngs = state["rng"]
        set_rng_state(rngs[self.rank] if self.rank < len(rngs) else rngs[0])

    def save_checkpoint(self, name: str = checkpoint.LAST) -> None:
        state = self.state_dict()  # every rank joins the RNG gather
        if self.is_main:
            checkpoint.save_atomic(state, self.run_dir / "checkpoints" / name)

    # ------------------------------------------------------------ steps
    def _to_device(self, batch):
        if self.device.type == "cuda":  # pinned memory lets the copy overlap compute
            return tuple(t.pin_memory().to(self.device, non_blocking=True) for t in batch)
        return batch

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step; returns (mean cross-entropy, pre-clip grad norm) as device tensors."""
        cfg = self.cfg
        lr = lr_at(self.step, cfg.optim, cfg.train.max_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        accum = cfg.train.grad_accum
        ce_total = torch.zeros((), device=self.device)
        z_total = torch.zeros((), device=self.device)
        step = self.step + 1  # as logged
        sampled = self.diagnostics.sampled(step)
        self.forensics.begin_step(step)
        anomaly = torch.autograd.detect_anomaly() if cfg.detect_anomaly else nullcontext()
        for micro in range(accum):
            x, y = self._to_device(self.sampler.next_batch())
            self.forensics.add_batch(x, y)
            if sampled and micro == 0:
                self.diagnostics.observe_forward(step, x)
            last = micro == accum - 1
            no_sync = self.train_model.no_sync() if self.world_size > 1 and not last else nullcontext()
            with no_sync, anomaly:
                with self.precision.autocast():
                    logits = self.train_model(x)
                loss, ce, z_term = lm_loss(logits, y, cfg.optim.z_loss)
                self.precision.backward(loss / accum)
            ce_total += ce.detach()
            z_total += z_term.detach()
        self.forensics.check()  # the previous step's, now that this one is queued and before the weights move
        self.precision.unscale_(self.optimizer)
        if sampled:
            self.diagnostics.observe_gradients(step)
        clip = cfg.train.grad_clip if cfg.train.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        self.precision.step(self.optimizer, grad_norm)
        if sampled:
            self.diagnostics.observe_update(step)
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        mean_ce, grad_norm = ce_total / accum, grad_norm.detach()
        self.forensics.end_step(mean_ce, grad_norm)
        if cfg.optim.z_loss:
            self.diagnostics.record(step, {"train/z_loss": z_total / accum})
        return mean_ce, grad_norm

    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        total = torch.zeros((), device=self.device)
        for batch in self.val_batches:
            x, y = self._to_device(batch)
            with self.precision.autocast():
                logits = self.model(x)
            total += lm_loss(logits, y)[1]
        self.model.train()
        return (total / len(self.val_batches)).item()

    # ------------------------------------------------------------ the loop
    def _on_signal(self, signum, _frame) -> None:
        self.stop_signal = signum
        log.warning(f"received {signal.Signals(signum).name}: checkpointing at the end of this step")

    def _flush(self, pending: list, first_step: int, window_start: float) -> None:
        """Fetch the pending per-step metrics in one host sync, log them, check for divergence."""
        self.forensics.check()
        values = torch.stack([torch.stack(pair) for pair in pending])
        if self.world_size > 1:  # losses are per-rank means: average them; grad norms already agree
            losses = values[:, 0].contiguous()
            dist.all_reduce(losses)
            values[:, 0] = losses / self.world_size
        rows = values.tolist()
        diag_rows = self.diagnostics.collect()  # right after that sync: nothing left to wait for
        elapsed = time.perf_counter() - window_start
        tokens = len(rows) * self.cfg.train.batch_size * self.cfg.train.grad_accum * self.cfg.model.block_size
        clip = self.cfg.train.grad_clip
        for i, (loss, grad_norm) in enumerate(rows):
            step = first_step + i + 1
            metrics = {"train/loss": loss, "optim/grad_norm": grad_norm,
                       "optim/lr": lr_at(step - 1, self.cfg.optim, self.cfg.train.max_steps),
                       "optim/clipped": int(clip > 0 and math.isfinite(grad_norm) and grad_norm > clip),
                       **diag_rows.get(step, {})}
            self.diagnostics.on_logged(metrics)
            if self.precision.uses_scaler:
                self.skipped_steps += int(not math.isfinite(grad_norm))
                metrics["amp/skipped_steps"] = self.skipped_steps
            if i == len(rows) - 1:
                metrics["perf/tokens_per_s"] = tokens * self.world_size / elapsed
                metrics["perf/step_time_ms"] = 1000 * elapsed / len(rows)
                metrics["perf/peak_mem_mb"] = peak_memory_mb(self.device)
                metrics.update(self.diagnostics.running_metrics())
                if self.precision.uses_scaler:
                    metrics["amp/scale"] = self.precision.scale()
            if self.tracker:
                self.tracker.log(metrics, step)
            if self.diverged_at is None and not (math.isfinite(loss) and loss <= self.divergence_threshold):
                self.diverged_at = step
                log.error(f"diverged at step {step}: train/loss={loss} (non-finite or above "
                          f"{self.divergence_threshold:.3f}); the non-finite update, if any, was not applied")
            elif self.diverged_at is None:
                self.last_healthy = {"step": step, **metrics}

    def fit(self) -> dict:
        cfg = self.cfg.train
        if self.step >= cfg.max_steps > 0:  # re-entered a finished run dir: keep its results
            log.info(f"this run already reached train.max_steps={cfg.max_steps}; nothing left to train")
            return self._finish("completed", self.evaluate())
        handlers = {}
        for sig in PREEMPTION_SIGNALS:
            try:
                handlers[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread: the caller handles signals
                pass
        self.model.train()
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not self.is_main, dynamic_ncols=True,
                   mininterval=1.0, desc="train")
        pending, first_step, window_start = [], self.step, time.perf_counter()
        val_loss = None
        outcome = "completed"
        try:
            while self.step < cfg.max_steps:
                pending.append(self.train_step())
                last = self.step == cfg.max_steps
                if self.step % cfg.log_interval == 0 or last or self.stop_signal:
                    self._flush(pending, first_step, window_start)
                    bar.update(len(pending))
                    bar.set_postfix(loss=f"{pending[-1][0].item():.3f}")
                    pending, first_step, window_start = [], self.step, time.perf_counter()
                    if self.diverged_at and cfg.stop_on_divergence:
                        outcome = "diverged"
                        break
                if (cfg.eval_interval and self.step % cfg.eval_interval == 0) or last:
                    val_loss = self.evaluate()
                    if self.tracker:
                        self.tracker.log({"val/loss": val_loss}, self.step)
                    bar.write(f"step {self.step}: val/loss {val_loss:.4f}")
                if (cfg.ckpt_interval and self.step % cfg.ckpt_interval == 0) or last:
                    self.save_checkpoint()
                if self._preempted():
                    outcome = "preempted"
                    break
        finally:
            bar.close()
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        return self._finish(outcome, val_loss)

    def _preempted(self) -> bool:
        flag = self.stop_signal is not None
        if self.world_size > 1:  # all ranks must agree to stop at the same step
            t = torch.tensor(float(flag), device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item())
        if flag:
            self.save_checkpoint()
            log.warning(f"stopped by signal at step {self.step}; checkpoint saved: run the same command "
                        f"(same run dir) again to resume")
        return flag

    def _finish(self, outcome: str, val_loss: float | None) -> dict:
        summary = {"outcome": outcome, "step": self.step, "diverged": self.diverged_at is not None,
                   "diverged_at_step": self.diverged_at, "val/loss": val_loss,
                   "amp/skipped_steps": self.skipped_steps}
        if outcome == "diverged":
            self.save_checkpoint("diverged.pt")
        summary.update({f"last_healthy/{k}": v for k, v in self.last_healthy.items()})
        summary.update({**self.diagnostics.running_metrics(), **self.forensics.summary()})
        if self.is_main:
            if outcome == "completed" and self.cfg.train.sample_tokens:
                summary["sample"] = self.sample()
                log.info("sample:\n" + summary["sample"])
            self.tracker.summary(summary)
            self.tracker.finish(exit_code=1 if outcome == "diverged" else 0)
        return summary

    @torch.no_grad()
    def sample(self, prompt: str = "def") -> str:
        generator = torch.Generator(device=self.device).manual_seed(self.cfg.seed)
        idx = torch.tensor([self.data.encode(prompt)], device=self.device)
        self.model.eval()
        with self.precision.autocast():
            out = self.model.generate(idx, self.cfg.train.sample_tokens, generator=generator)
        self.model.train()
        return self.data.decode(out[0].tolist())


def train(cfg, run_dir: Path, overrides: list[str] = ()) -> dict:
    """Train one run in `run_dir`; returns its summary."""
    trainer = Trainer(cfg, run_dir, overrides)
    distributed = trainer.world_size > 1
    try:
        return trainer.fit()
    finally:
        # DDP's reducer holds the process group: destroying the group while the reducer is
        # alive makes its later destructor wait forever on gloo's threads.
        del trainer
        gc.collect()
        if distributed and dist.is_initialized():
            dist.destroy_process_group()
