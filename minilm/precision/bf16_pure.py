"""Pure-bf16 training: AdamW over bf16 weights, gradients and state, with no fp32 master copy.

bf16 keeps 8 significant bits: an update smaller than half an ulp of the weight w (2^-9 to
2^-8 of |w|) rounds back to w and is lost, so with round-to-nearest small learning rates
stall training. `rounding` chooses how each step's fp32 result goes back into the bf16 weight:

    nearest     round to nearest even (the naive baseline)
    stochastic  round up or down with probability proportional to proximity, so the weight is
                right in expectation; the random bits come from a torch.Generator the
                optimizer owns, seeded from `seed`, whose state is in `state_dict()`
    kahan       round to nearest and keep the rounding error in a bf16 compensation buffer
                that is added to the next step's update (Kahan summation)

Each step computes in fp32 what torch.optim.AdamW computes (decoupled weight decay, bias
corrections) and rounds the moments back to bf16 to nearest whatever `rounding` is: the knob
is about the weights. A non-finite gradient skips the update without a host sync: like torch's
fused AdamW the optimizer honours the on-device `found_inf` flag that minilm.precision.policy's
`Precision.step` sets (`_step_supports_amp_scaling`), keeping weights, moments, compensation
and step count as they were; stochastic rounding draws its bits either way, so its stream does
not depend on which steps were skipped.
"""

import torch

from minilm.seeding import torch_seed

ROUNDINGS = ("nearest", "stochastic", "kahan")


def stochastic_round_to_bf16(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """fp32 `x` rounded to one of its two bf16 neighbours, the farther one with probability
    |x - nearer| / ulp: E[result] = x. Infinities stay infinite."""
    bits = x.float().contiguous().view(torch.int32)
    # bf16 is the top 16 bits of fp32. Adding uniform noise below them carries into the kept half
    # with probability (dropped bits) / 2^16; the sign bit is untouched, so this rounds the magnitude.
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    return ((bits + noise) & -(1 << 16)).view(torch.float32).to(torch.bfloat16)


class BF16AdamW(torch.optim.Optimizer):
    # Precision.step hands such optimizers the on-device found_inf flag instead of syncing
    _step_supports_amp_scaling = True

    def __init__(self, params, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, rounding: str = "nearest", seed: int = 0):
        if rounding not in ROUNDINGS:
            raise ValueError(f"rounding={rounding!r} is not valid; choose one of {', '.join(ROUNDINGS)}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.rounding = rounding
        params = [p for group in self.param_groups for p in group["params"]]
        for p in params:
            if p.dtype != torch.bfloat16:
                raise ValueError(f"BF16AdamW updates bf16 parameters, got {p.dtype}; convert the model "
                                 f"with model.to(torch.bfloat16) before building the optimizer")
            self.state[p] = self._initial_state(p)  # now, so memory is counted before the first step
        self.generator = None
        if rounding == "stochastic":
            self.generator = torch.Generator(device=params[0].device).manual_seed(torch_seed(seed))

    def _initial_state(self, p: torch.Tensor) -> dict:
        state = {"step": torch.zeros((), dtype=torch.float32, device=p.device),
                 "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
        if self.rounding == "kahan":
            state["compensation"] = torch.zeros_like(p)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        if getattr(self, "grad_scale", None) is not None:
            raise RuntimeError("BF16AdamW does not unscale gradients: bf16_pure runs without a loss scaler")
        found_inf = getattr(self, "found_inf", None)
        skip = None if found_inf is None else found_inf.to(torch.bool)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, self.state[p], group, skip)

    def _update(self, p: torch.Tensor, state: dict, group: dict, skip: torch.Tensor | None) -> None:
        lr, (beta1, beta2), eps, decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        grad, weight = p.grad.float(), p.float()
        step = state["step"] + 1
        exp_avg = state["exp_avg"].float().lerp_(grad, 1 - beta1)
        exp_avg_sq = state["exp_avg_sq"].float().mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction1, bias_correction2 = 1 - beta1**step, 1 - beta2**step
        denom = (exp_avg_sq.sqrt() / bias_correction2.sqrt()).add_(eps)
        target = weight * (1 - lr * decay) - (lr / bias_correction1) * exp_avg / denom  # fp32 AdamW step

        new = {"step": step, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
        if self.rounding == "nearest":
            new_weight = target.to(torch.bfloat16)
        elif self.rounding == "stochastic":
            new_weight = stochastic_round_to_bf16(target, self.generator)
        else:  # kahan: apply the update plus what earlier roundings lost; keep what this one loses
            wanted = target - weight + state["compensation"].float()
            new_weight = (weight + wanted).to(torch.bfloat16)
            new["compensation"] = wanted - (new_weight.float() - weight)
        for tensor, value in [(p, new_weight), *((state[key], value) for key, value in new.items())]:
            tensor.copy_(value if skip is None else torch.where(skip, tensor, value))

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.generator is not None:
            state["generator"] = self.generator.get_state()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        generator_state = state_dict.pop("generator", None)
        super().load_state_dict(state_dict)
        if self.generator is not None:
            if generator_state is None:
                raise ValueError("this state dict has no stochastic-rounding generator state: it was saved "
                                 "with another rounding; resume with the rounding it was trained with")
            self.generator.set_state(generator_state)


def bytes_per_param(optimizer: torch.optim.Optimizer) -> float:
    """Memory per parameter: the weight, its gradient (the weight's dtype) and the optimizer's
    state tensors. fp32 AdamW: 16; BF16AdamW: 8, or 10 with the Kahan buffer. Torch's
    optimizers create their state at the first step: count after it."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    total = sum(2 * p.numel() * p.element_size() for p in params)
    # 0-dim tensors are step counters: bytes per tensor, not per parameter
    total += sum(t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values()
                 if torch.is_tensor(t) and t.dim() > 0)
    return total / sum(p.numel() for p in params)
