"""Precision policy: the one object the trainer asks how to build the model (minilm/optim/ builds
the optimizer for it), and how to run forward, backward and step.

    fp32       no autocast; optional TF32 matmuls on CUDA.
    bf16       autocast to bfloat16; no loss scaling (bf16 has fp32's exponent range).
    fp16       autocast to float16 with dynamic loss scaling (torch.amp.GradScaler):
               scale the loss, unscale before clipping, skip the step on inf/nan, update.
    bf16_pure  the model, its gradients and AdamW's state in bf16, no fp32 master copy; each
               update is rounded into the bf16 weights by precision.rounding (minilm/precision/bf16_pure.py).
    fp8        bf16 autocast, with the linears (not the LM head) in fp8 through torchao's float8
               training, precision.fp8_recipe scaling (minilm/precision/fp8.py); emulated off fp8 GPUs.

Except under bf16_pure, parameters and optimizer state stay fp32 (autocast only casts op inputs).
A non-finite gradient never reaches the weights in any precision: fp16's scaler skips the step,
and otherwise the optimizer gets the same on-device `found_inf` flag the scaler would, so the
check costs no host synchronization.
"""

import time
import warnings
from contextlib import nullcontext

import torch

from minilm.config import PrecisionConfig

_AUTOCAST_DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16, "bf16_pure": None,
                    "fp8": torch.bfloat16}
_warned_slow_paths: set[tuple[str, str]] = set()


def matmul_slowdown(dtype: torch.dtype, device: torch.device, n: int = 128, reps: int = 3) -> float:
    """How many times slower an n x n matmul is in `dtype` than in fp32 on `device` (best of `reps`)."""
    def best(dt):
        a = torch.full((n, n), 0.5, device=device, dtype=dt)  # not random: the run's RNG stream stays untouched
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            a @ a
            times.append(time.perf_counter() - start)
        return min(times)

    return best(dtype) / best(torch.float32)


SLOW_PATH_FACTOR = 4.0  # a 16-bit matmul this many times slower than fp32 runs on a reference path


def warn_if_slow_path(name: str, device: torch.device) -> None:
    """Warn once per process when the precision's matmuls run on a slow reference path on this CPU (fp16 on
    CPUs without native fp16 matmul kernels: often ~100x slower than fp32). Measured, not guessed: ~10 ms."""
    dtype = _AUTOCAST_DTYPES[name]
    if dtype is None or device.type != "cpu" or name in _warned_slow_paths:
        return
    _warned_slow_paths.add(name)
    factor = matmul_slowdown(dtype, device)
    if factor > SLOW_PATH_FACTOR:
        warnings.warn(f"precision={name} on this CPU runs matmuls on a slow reference path (a 128x128 {name} "
                      f"matmul took {factor:.0f}x the fp32 time here); expect slow steps, or use precision=fp32"
                      f"{' or bf16' if name == 'fp16' else ''}", stacklevel=2)


class Precision:
    def __init__(self, cfg: PrecisionConfig, device: torch.device):
        self.name = str(cfg.name)
        self.device, self.device_type = device, device.type
        self.rounding, self.fp8_recipe = cfg.rounding and str(cfg.rounding), cfg.fp8_recipe and str(cfg.fp8_recipe)
        self.autocast_dtype = _AUTOCAST_DTYPES[self.name]
        self.scaler = torch.amp.GradScaler(
            self.device_type, init_scale=cfg.init_scale, growth_interval=cfg.growth_interval,
            enabled=self.name == "fp16",
        )
        if self.device_type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = bool(cfg.tf32)
            torch.backends.cudnn.allow_tf32 = bool(cfg.tf32)
        warn_if_slow_path(self.name, device)

    def describe(self) -> str:
        """What runs, for the log and the environment record."""
        if self.name == "bf16_pure":
            return f"pure bf16 weights, gradients and AdamW state, {self.rounding} rounding of the updates"
        if self.name == "fp8":
            from minilm.precision.fp8 import fp8_path

            return (f"fp8 linears ({self.fp8_recipe} scaling, {fp8_path(self.device, self.fp8_recipe)}), bf16 "
                    f"autocast elsewhere, fp32 weights and optimizer state")
        if self.autocast_dtype is None:
            tf32 = self.device_type == "cuda" and torch.backends.cuda.matmul.allow_tf32
            return "fp32" + (" (TF32 matmuls)" if tf32 else "")
        scaling = " with dynamic loss scaling (GradScaler)" if self.uses_scaler else ""
        return f"{self.name} autocast on {self.device_type}{scaling}, fp32 weights and optimizer state"

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model in this precision's number formats. Call after moving it to the device, before
        building the optimizer, DDP and torch.compile."""
        if self.name == "bf16_pure":
            return model.to(torch.bfloat16)
        if self.name == "fp8":
            from minilm.precision.fp8 import convert_to_fp8

            convert_to_fp8(model, self.fp8_recipe, self.device)
        return model

    def clip_grad_norm(self, params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
        """Clip the gradients to a global L2 norm of `max_norm`; return the norm before clipping. Under
        bf16_pure the norm is taken in fp32 (a bf16 norm keeps 8 significant bits)."""
        if self.name != "bf16_pure":
            return torch.nn.utils.clip_grad_norm_(params, max_norm)
        grads = [p.grad for p in params if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32)
                                                     for g in grads]))
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        return norm

    @property
    def uses_scaler(self) -> bool:
        return self.scaler.is_enabled()

    def autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device_type, dtype=self.autocast_dtype)

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss as backward sees it: times the fp16 loss scale, else unchanged."""
        return self.scaler.scale(loss)

    def backward(self, loss: torch.Tensor) -> None:
        self.scale_loss(loss).backward()

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Bring gradients back to their true scale (call before clipping)."""
        self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer, grad_norm: torch.Tensor | None = None,
             skip: torch.Tensor | None = None) -> torch.Tensor | None:
        """Apply the update unless some gradient is non-finite (`grad_norm` is their global norm;
        None: no check outside fp16, e.g. for a bare benchmark loop) or the device flag `skip` is set
        (skip-step, minilm/optim/skip_step.py; minilm's optimizers join it to the scaler's found_inf).
        Returns whether the update was skipped for a non-finite gradient, as a float device scalar (1.0:
        skipped; no host sync), or None without a `grad_norm` (skip-step counts its own refusals).
        fp16's scaler skips on a non-finite unscaled gradient, which makes the norm non-finite too."""
        skipped = None if grad_norm is None else (~torch.isfinite(grad_norm)).float()
        if self.uses_scaler:
            if skip is not None:
                optimizer.skip = skip
            self.scaler.step(optimizer)
            self.scaler.update()
        elif grad_norm is None:
            optimizer.step()
        elif getattr(optimizer, "_step_supports_amp_scaling", False):
            optimizer.found_inf = skipped if skip is None else torch.maximum(skipped, skip.float())
            optimizer.step()
            del optimizer.found_inf
        elif not skipped.item() and (skip is None or not skip):  # non-fused optimizers: one host sync
            optimizer.step()
        return skipped

    def scale(self) -> float:
        """The current loss scale as a float (a host sync under fp16)."""
        return self.scaler.get_scale() if self.uses_scaler else 1.0

    def scale_tensor(self, device: torch.device) -> torch.Tensor | None:
        """fp16: the current loss scale as a device scalar (no host sync); None without a scaler."""
        return self.scaler.scale(torch.ones((), device=device)) if self.uses_scaler else None

    def state_dict(self) -> dict:
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.scaler.load_state_dict(state)
