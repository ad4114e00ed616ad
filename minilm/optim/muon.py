"""Muon for the hidden matrices and AdamW for the rest, stepped as one optimizer.

`Muon` is torch.optim.Muon (its constructor, defaults, checks, state and state_dict: Nesterov
momentum, Newton-Schulz orthogonalization of the update, decoupled weight decay, `adjust_lr_fn`)
with its own `step`, for two things torch's lacks:

- the dtype of the Newton-Schulz iteration (`ns_dtype`): torch's always runs it in bf16; minilm runs it
  in the run's compute dtype by default (bf16 under bf16 / fp8 autocast, fp32 otherwise, as nanochat
  does), so an fp32 run is fp32 throughout; in bf16 the step is torch's op for op (tested bitwise);
- the on-device `found_inf` flag that torch's fused AdamW honours (`_step_supports_amp_scaling`):
  a step with a non-finite gradient (or one skip-step refuses) leaves weights and momentum as they
  were, bitwise, without a host sync.

`MuonAdamW` holds the two optimizers and presents them as one: one `param_groups` list (the
groups' own dicts, so the trainer's schedule reaches both), one `found_inf` (the fp16 GradScaler
checks every gradient of both before either steps: an inf in an embedding gradient skips the
Muon update too, which two optimizers stepped through the scaler one by one would not), one
state_dict holding both parts.
"""

import math

import torch

from minilm.optim.skip_step import fold_skip

NS_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def newton_schulz(g: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float,
                  dtype: torch.dtype) -> torch.Tensor:
    """G's orthogonalization U S' V^T (S' ~ 1 rather than S) by torch.optim.Muon's quintic iteration, in `dtype`."""
    a, b, c = coefficients
    x = g.to(dtype)
    tall = g.size(0) > g.size(1)
    if tall:
        x = x.T
    x.div_(x.norm().clamp(min=eps))  # spectral norm <= Frobenius norm = 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def adjusted_lr(lr: float, adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """torch.optim.Muon's LR for one matrix: x sqrt(max(1, rows / cols)), or x 0.2 sqrt(max(rows, cols))."""
    rows, cols = shape[:2]
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    return lr * math.sqrt(max(1, rows / cols))


class Muon(torch.optim.Muon):
    # GradScaler and Precision.step hand such optimizers the on-device found_inf flag instead of syncing
    _step_supports_amp_scaling = True

    def __init__(self, params, *, ns_dtype: str = "bf16", **kwargs):
        super().__init__(params, **kwargs)
        self.ns_dtype = NS_DTYPES[ns_dtype]

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise RuntimeError("Muon.step takes no closure")
        if getattr(self, "grad_scale", None) is not None:
            raise RuntimeError("Muon takes unscaled gradients: unscale them (GradScaler.unscale_) before stepping")
        found_inf = getattr(self, "found_inf", None)
        skip = None if found_inf is None else found_inf.bool()
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                buffer = state["momentum_buffer"]
                new_buffer = buffer.lerp(p.grad, 1 - momentum)
                update = p.grad.lerp(new_buffer, momentum) if group["nesterov"] else new_buffer
                update = newton_schulz(update, group["ns_coefficients"], group["ns_steps"], group["eps"],
                                       self.ns_dtype)
                new_p = p.mul(1 - lr * group["weight_decay"]).add_(
                    update, alpha=-adjusted_lr(lr, group["adjust_lr_fn"], p.shape))
                if skip is not None:
                    new_p, new_buffer = torch.where(skip, p, new_p), torch.where(skip, buffer, new_buffer)
                p.copy_(new_p)
                buffer.copy_(new_buffer)


class MuonAdamW:
    """Muon (groups of hidden matrices) and AdamW (every other group) as one optimizer."""

    _step_supports_amp_scaling = True  # found_inf (and grad_scale) are passed on to both parts

    def __init__(self, muon: Muon, adamw: torch.optim.Optimizer):
        self.parts = {"muon": muon, "adamw": adamw}

    @property
    def param_groups(self) -> list[dict]:
        # read anew each time: a part's load_state_dict replaces its group dicts. Muon's first: its LR is
        # optim.lr's schedule, what param_groups[0]["lr"] is read as (forensics)
        return self.parts["muon"].param_groups + self.parts["adamw"].param_groups

    @property
    def state(self) -> dict:
        return {**self.parts["adamw"].state, **self.parts["muon"].state}

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise RuntimeError("MuonAdamW.step takes no closure")
        fold_skip(self)
        found_inf, grad_scale = getattr(self, "found_inf", None), getattr(self, "grad_scale", None)
        for part in self.parts.values():
            if found_inf is not None:
                part.found_inf = found_inf
            if grad_scale is not None:
                part.grad_scale = grad_scale
            try:
                part.step()
            finally:
                part.__dict__.pop("found_inf", None)
                part.__dict__.pop("grad_scale", None)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts.values():
            part.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {name: part.state_dict() for name, part in self.parts.items()}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != set(self.parts):
            raise ValueError(f"a MuonAdamW state holds the parts {sorted(self.parts)}, this one {sorted(state)}: it "
                             f"was saved by another optimizer (optim.name differs)")
        for name, part in self.parts.items():
            part.load_state_dict(state[name])
