"""Anomaly forensics: when a step goes non-finite, keep what it takes to replay that step exactly.

With `diagnostics.forensics=true` the trainer keeps, for each step in flight, the light part of
its pre-step state: host copies of the RNG states, the loss scale (a device scalar, fp16 only),
the learning rate and references to the step's batches. The model and optimizer need no copy:
a step whose gradients are non-finite is skipped in every precision (precision.Precision.step),
so right after it they still hold their pre-step values. The trainer reads each step's loss and
gradient norm on the host one step late (minilm/train/lifecycle.py, StepScalars) and hands them to
`check` during the *next* step, after its backward has been queued and before its update: the
weights are still the pre-step ones. Cost: microseconds of host work per step for the RNG
copies. `diagnostics.forensics=false` removes them.

A step triggers when its loss or gradient norm is non-finite; under fp16 only when its loss is,
because non-finite scaled gradients are the loss scaler's routine probing (amp/skipped_steps).
At the first trigger, the bundle `run_dir/forensics/step_XXXXXX.pt` (`_rankR` under DDP) holds
the batches, model / optimizer / scaler / RNG state from before the step, the config, and where
values first went non-finite: the step is replayed once in-process (`replay_step`) to name the
first non-finite module output and gradient, and with `diagnostics.activation_hooks=true` the
first non-finite module seen live during training is recorded as well. `minilm-replay BUNDLE`
(minilm/launch/replay.py) replays a bundle under torch.autograd.detect_anomaly.

One caveat: a non-finite loss with finite gradients (possible, e.g. a -inf target logit) is a
finite update and is applied; the bundle then says `pre_step_weights: False`.
"""

import math
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

from minilm import checkpoint
from minilm.config import Config
from minilm.model import GPT, lm_loss
from minilm.precision.policy import Precision
from minilm.seeding import rng_state, set_rng_state
from minilm.train.build import build_model


class ActivationWatch:
    """Forward hooks that record, in execution order, whether each module's output is finite.

    The flags stay on the device (no host sync per module); `first_nonfinite` resolves them in one.
    A module's hook runs when its forward returns, so the first flagged name is the innermost
    module that produced the first non-finite value.
    """

    def __init__(self, model: nn.Module):
        self.flags: list[tuple[str, torch.Tensor]] = []
        self.handles = [m.register_forward_hook(self._hook(name or type(m).__name__))
                        for name, m in model.named_modules()]

    def _hook(self, name: str):
        def hook(_module, _args, out):
            if torch.is_tensor(out) and out.is_floating_point():
                self.flags.append((name, torch.isfinite(out).all()))
        return hook

    def take(self) -> list[tuple[str, torch.Tensor]]:
        flags, self.flags = self.flags, []
        return flags

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def first_nonfinite(flags: list[tuple[str, torch.Tensor]]) -> str | None:
    """The first name whose flag says non-finite, with one host sync."""
    if not flags:
        return None
    finite = torch.stack([flag for _, flag in flags]).tolist()
    return next((name for (name, _), ok in zip(flags, finite) if not ok), None)


def nonfinite_tensors(tensors: dict[str, torch.Tensor]) -> list[str]:
    return [name for name, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]


def replay_step(bundle: dict, device: torch.device, anomaly: bool = False) -> dict:
    """Re-run a bundle's step (forward and backward, no update) from its pre-step state.

    Returns the loss, the gradient norm (unscaled), the non-finite parameters, the first
    non-finite module output and gradient, and with `anomaly` the error torch.autograd's
    anomaly mode raised for the first backward operation that returned NaN (with the forward
    call that created it). The caller's RNG streams are left as they were.
    """
    caller_rng = rng_state()
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(Config), bundle["config"])
        precision = Precision(OmegaConf.to_object(cfg.precision), device)
        model = build_model(cfg, bundle["vocab_size"], precision)  # its init draws from the RNG: restored below
        model.load_state_dict(bundle["model"])
        model.train()
        precision.load_state_dict(bundle["scaler"])
        set_rng_state(bundle["rng"])
        watch = ActivationWatch(model)
        grad_flags: list[tuple[str, torch.Tensor]] = []
        for name, p in model.named_parameters():
            p.register_post_accumulate_grad_hook(
                lambda p, name=name: grad_flags.append((name, torch.isfinite(p.grad).all())))
        losses, error, forward_trace = [], None, None
        with warnings.catch_warnings(record=True) as caught:  # anomaly mode reports the forward call as a warning
            warnings.simplefilter("always")
            context = torch.autograd.detect_anomaly(check_nan=True) if anomaly else nullcontext()
            try:
                for x, y in bundle["batches"]:
                    with context:
                        with precision.autocast():
                            logits = model(x.to(device))
                        parts = lm_loss(logits, y.to(device), cfg.optim.z_loss)
                        losses.append(parts.ce.detach())
                        precision.backward(parts.loss / len(bundle["batches"]))
            except RuntimeError as err:
                error = str(err)
                forward_trace = next((str(w.message) for w in caught if "Traceback of forward call" in str(w.message)),
                                     None)
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        grad_norm = (torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()
                     / precision.scale() if grads else math.nan)
        loss = torch.stack(losses).mean().item() if losses else math.nan
        result = {
            "loss": loss, "grad_norm": grad_norm,
            "nonfinite_params": nonfinite_tensors(dict(model.named_parameters())),
            "first_nonfinite_module": first_nonfinite(watch.take()),
            "first_nonfinite_grad": first_nonfinite(grad_flags),
            "anomaly": error, "anomaly_forward_trace": forward_trace,
        }
        result["reproduced"] = bool(not (math.isfinite(loss) and math.isfinite(grad_norm)) or error
                                    or result["first_nonfinite_module"] or result["first_nonfinite_grad"])
        return result
    finally:
        set_rng_state(caller_rng)


class Forensics:
    """The trainer's side: remember each step's pre-step state cheaply; bundle the first non-finite one."""

    def __init__(self, model: GPT, optimizer, precision: Precision, cfg, run_dir: Path, device: torch.device,
                 rank: int = 0, world_size: int = 1, log=print):
        self.model, self.optimizer, self.precision, self.cfg = model, optimizer, precision, cfg
        self.enabled = bool(cfg.diagnostics.forensics)
        self.run_dir, self.device, self.rank, self.world_size, self.log = run_dir, device, rank, world_size, log
        self.watch = ActivationWatch(model) if self.enabled and cfg.diagnostics.activation_hooks else None
        self.current: dict | None = None  # the step in flight
        self.completed: dict | None = None  # the last finished step, not yet checked
        self.captured: dict = {}  # forensics/* summary entries, once a bundle is written

    def begin_step(self, step: int, rng: dict) -> None:
        """Remember the step about to run: `rng` is every RNG's state before it (seeding.rng_state)."""
        if not self.enabled or self.captured:
            return
        if self.watch:
            self.watch.take()  # drop what evaluation or sampling ran through the hooks since the last step
        self.current = {"step": step, "rng": rng, "scale": self.precision.scale_tensor(self.device), "batches": [],
                        "lr": self.optimizer.param_groups[0]["lr"]}

    def add_batch(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.current is not None:
            self.current["batches"].append((x, y))

    def end_step(self) -> None:
        if self.current is None:
            return
        self.current["flags"] = self.watch.take() if self.watch else []
        self.completed, self.current = self.current, None

    def drop_step(self) -> None:
        """Forget the step in flight (the trainer abandoned it before its update)."""
        self.current = None

    def check(self, step: int, loss: float, grad_norm: float) -> None:
        """Look at a finished step's loss and grad norm. Call before the next update touches the weights."""
        record, self.completed = self.completed, None
        if record is None or record["step"] != step:
            return
        finite_grads = math.isfinite(grad_norm) or self.precision.uses_scaler
        if math.isfinite(loss) and finite_grads:
            return
        self._capture(record, loss, grad_norm)

    def _capture(self, record: dict, loss: float, grad_norm: float) -> None:
        step = record["step"]
        scaler = self.precision.state_dict()
        if record["scale"] is not None:
            scaler["scale"] = record["scale"].item()  # the scale this step used, not the one it backed off to
        bundle = {
            "step": step, "rank": self.rank, "loss": loss, "grad_norm": grad_norm, "lr": record["lr"],
            "pre_step_weights": not math.isfinite(grad_norm),  # a step with non-finite gradients was skipped
            "batches": [(x.cpu(), y.cpu()) for x, y in record["batches"]],
            "rng": record["rng"], "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scaler": scaler, "vocab_size": self.model.vocab_size,
            "config": OmegaConf.to_container(self.cfg, resolve=True, enum_to_str=True), "device": str(self.device),
            "live_first_nonfinite_module": first_nonfinite(record["flags"]),
        }
        bundle["nonfinite_params"] = nonfinite_tensors(bundle["model"])
        try:
            found = replay_step(bundle, self.device)
        except Exception as err:  # noqa: BLE001 - e.g. out of memory for the second model: keep the bundle
            self.log(f"step {step}: could not re-run the step to locate the non-finite values ({err!r})")
            found = {"first_nonfinite_module": None, "first_nonfinite_grad": None, "reproduced": None}
        bundle.update(first_nonfinite_module=found["first_nonfinite_module"],
                      first_nonfinite_grad=found["first_nonfinite_grad"], replay_reproduced=found["reproduced"])
        suffix = f"_rank{self.rank}" if self.world_size > 1 else ""
        path = self.run_dir / "forensics" / f"step_{step:06d}{suffix}.pt"
        checkpoint.save_atomic(bundle, path)
        self.captured = {"forensics/bundle": str(path), "forensics/step": step,
                         "forensics/first_nonfinite_module": bundle["live_first_nonfinite_module"]
                         or bundle["first_nonfinite_module"],
                         "forensics/first_nonfinite_param": (bundle["nonfinite_params"] or [None])[0],
                         "forensics/first_nonfinite_grad": bundle["first_nonfinite_grad"]}
        self.log(f"step {step}: non-finite values (loss={loss}, grad_norm={grad_norm}); first non-finite module "
                 f"output: {self.captured['forensics/first_nonfinite_module']}, parameter: "
                 f"{self.captured['forensics/first_nonfinite_param']}, gradient: "
                 f"{self.captured['forensics/first_nonfinite_grad']}. Replay bundle: {path} "
                 f"(minilm-replay {path})")
        self.current = None  # one bundle per run: the first non-finite step is the one that explains the rest
        if self.watch:
            self.watch.remove()

    def summary(self) -> dict:
        return self.captured
