"""Precision policy: the one object the trainer asks how to run forward, backward and step.

    fp32  no autocast; optional TF32 matmuls on CUDA.
    bf16  autocast to bfloat16; no loss scaling (bf16 has fp32's exponent range).
    fp16  autocast to float16 with dynamic loss scaling (torch.amp.GradScaler):
          scale the loss, unscale before clipping, skip the step on inf/nan, update.

Parameters and optimizer state always stay fp32 (autocast only casts op inputs).
A non-finite gradient never reaches the weights in any precision: fp16's scaler
skips the step, and for fp32/bf16 we hand the fused AdamW the same on-device
`found_inf` flag the scaler would, so the check costs no host synchronization.
"""

from contextlib import nullcontext

import torch

PRECISIONS = ("fp32", "fp16", "bf16")
_AUTOCAST_DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


class Precision:
    def __init__(self, name: str, device: torch.device, init_scale: float = 65536.0,
                 growth_interval: int = 2000, tf32: bool = False):
        if name not in PRECISIONS:
            raise ValueError(f"unknown precision {name!r}; choose one of {', '.join(PRECISIONS)}")
        self.name = name
        self.device_type = device.type
        self.autocast_dtype = _AUTOCAST_DTYPES[name]
        self.scaler = torch.amp.GradScaler(
            self.device_type, init_scale=init_scale, growth_interval=growth_interval,
            enabled=name == "fp16",
        )
        if self.device_type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = bool(tf32)
            torch.backends.cudnn.allow_tf32 = bool(tf32)

    @property
    def uses_scaler(self) -> bool:
        return self.scaler.is_enabled()

    def autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device_type, dtype=self.autocast_dtype)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Bring gradients back to their true scale (call before clipping)."""
        self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer, grad_norm: torch.Tensor) -> None:
        """Apply the update unless some gradient is non-finite (`grad_norm` is their global norm)."""
        if self.uses_scaler:
            self.scaler.step(optimizer)
            self.scaler.update()
            return
        if getattr(optimizer, "_step_supports_amp_scaling", False):
            optimizer.found_inf = (~torch.isfinite(grad_norm)).float()
            optimizer.step()
            del optimizer.found_inf
        elif torch.isfinite(grad_norm):  # non-fused optimizers: one host sync
            optimizer.step()

    def scale(self) -> float:
        return self.scaler.get_scale() if self.uses_scaler else 1.0

    def state_dict(self) -> dict:
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.scaler.load_state_dict(state)
