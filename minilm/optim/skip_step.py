"""Skip-step (optim.skip_spikes): refuse an update whose loss or gradient norm jumps far from its recent history.

OLMo-core's rule (SkipStepOptimizer.get_step_factor): keep the last `window` values of the step's loss and
pre-clip gradient norm; once max(20, window // 2) values (this step's included) are in, skip the update
when |x - mean| / std of the values before it exceeds `sigma` for either (std with Bessel's correction;
the test is two-sided, as OLMo-core's). Skipped steps' values stay in the history, as OLMo-core keeps
them. One difference: a non-finite value is never kept (it would make every later mean non-finite and skip
every step); the non-finite guard (minilm/precision/policy.py) skips such a step anyway.

Everything stays on the device: the decision is a device flag that joins the non-finite guard's
`found_inf` (Precision.step), so the optimizer leaves weights and state bitwise as they were, and the
running count of skipped steps is logged as optim/skipped_spikes at the next metrics flush.
"""

import torch


class SpikeSkip:
    def __init__(self, window: int, sigma: float, device: torch.device):
        self.window, self.sigma = window, sigma
        self.values = torch.zeros(2, window, device=device)  # rows: loss, grad norm
        self.kept = torch.zeros(2, window, dtype=torch.bool, device=device)
        self.position = 0  # the slot the next step writes (a host int: steps advance it, not values)
        self.skipped = torch.zeros((), dtype=torch.int64, device=device)
        self.min_values = max(20, window // 2)

    def decide(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
        """Whether this step's update is skipped (a device bool); then this step's values join the history."""
        x = torch.stack([loss.float(), grad_norm.float()])
        n = self.kept.sum(dim=1)
        mean = (self.values * self.kept).sum(dim=1) / n.clamp(min=1)
        var = (((self.values - mean[:, None]) * self.kept) ** 2).sum(dim=1) / (n - 1).clamp(min=1)
        z = (x - mean).abs() / var.sqrt()
        skip = ((n + 1 >= self.min_values) & (z > self.sigma)).any()
        finite = torch.isfinite(x)
        self.values[:, self.position] = torch.where(finite, x, 0.0)
        self.kept[:, self.position] = finite
        self.position = (self.position + 1) % self.window
        self.skipped += skip
        return skip

    def state_dict(self) -> dict:
        return {"values": self.values.cpu(), "kept": self.kept.cpu(), "position": self.position,
                "skipped": self.skipped.cpu()}

    def load_state_dict(self, state: dict | None) -> None:
        if state is None:
            return
        self.values.copy_(state["values"])
        self.kept.copy_(state["kept"])
        self.skipped.copy_(state["skipped"])
        self.position = state["position"]


def fold_skip(optimizer) -> None:
    """Join `optimizer.skip` (set by Precision.step under the fp16 scaler) into the found_inf the scaler set."""
    skip = optimizer.__dict__.pop("skip", None)
    if skip is not None:
        found_inf = optimizer.__dict__.get("found_inf")
        optimizer.found_inf = skip.float() if found_inf is None else torch.maximum(found_inf, skip.float())
