"""Divergence as the literature means it, told apart from a loss spike.

The line is ln(vocab size) + train.divergence_margin: the loss of a uniform prediction, plus a
margin for the loss at init, which sits slightly above it. A run has **diverged** when its loss
is non-finite, or when it stays above the line for `train.divergence_window` consecutive steps;
the divergence step is the first step of that stretch (or the non-finite step). A loss that
crosses the line and comes back under it within the window is a **spike**: counted and kept
(first step, peak, steps above the line), never a reason to stop. A stretch still open when the
run ends is a spike that had not come back (`recovered: false`), not a divergence — so a
one-step run never diverges unless its loss is non-finite.
"""

import math


class DivergenceMonitor:
    def __init__(self, threshold: float, window: int):
        self.threshold, self.window = threshold, window
        self.diverged_at: int | None = None     # first step of the divergence
        self.confirmed_at: int | None = None    # the step it became certain (where a run stops)
        self.spikes: list[dict] = []
        self._above: dict | None = None         # the stretch above the line in progress

    def update(self, step: int, loss: float) -> bool:
        """Take one step's loss; True when divergence is confirmed at this step."""
        if self.diverged_at is not None:
            return False
        if not math.isfinite(loss):
            self.diverged_at = self.confirmed_at = step
            return True
        if loss > self.threshold:
            if self._above is None:
                self._above = {"step": step, "peak": loss}
            self._above["peak"] = max(self._above["peak"], loss)
            if step - self._above["step"] + 1 >= self.window:
                self.diverged_at, self.confirmed_at, self._above = self._above["step"], step, None
                return True
        elif self._above is not None:
            self.spikes.append({**self._above, "steps_above": step - self._above["step"], "recovered": True})
            self._above = None
        return False

    @property
    def diverged(self) -> bool:
        return self.diverged_at is not None

    def summary(self, last_step: int) -> dict:
        """What the run summary records: the divergence, and every spike (an open one as not recovered)."""
        spikes = list(self.spikes)
        if self._above is not None:
            spikes.append({**self._above, "steps_above": last_step - self._above["step"] + 1, "recovered": False})
        return {"diverged": self.diverged, "diverged_at_step": self.diverged_at,
                "divergence_confirmed_at_step": self.confirmed_at, "divergence_line": self.threshold,
                "spikes": spikes, "spike_count": len(spikes)}

    def state_dict(self) -> dict:
        return {"diverged_at": self.diverged_at, "confirmed_at": self.confirmed_at, "spikes": self.spikes,
                "above": self._above}

    def load_state_dict(self, state: dict) -> None:
        self.diverged_at, self.confirmed_at = state["diverged_at"], state["confirmed_at"]
        self.spikes, self._above = list(state["spikes"]), state["above"]
