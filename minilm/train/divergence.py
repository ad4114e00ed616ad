"""Divergence as the literature means it, told apart from a loss spike.

The line is ln(vocab size) + train.divergence_margin: the loss of a uniform prediction, plus a
margin for the loss at init, which sits slightly above it. A run has **diverged** when its loss
is non-finite, or when it stays above the line for `train.divergence_window` consecutive steps;
the divergence step is the first step of that stretch (or the non-finite step). A loss that
crosses the line and comes back under it within the window is a **spike**: counted and kept
(first step, peak, steps above the line), never a reason to stop.

A run that reaches train.max_steps is judged once more (`judge_end`). It has diverged when its last
loss is above the line, however short that stretch (its weights predict worse than a uniform guess:
it never learned, or unlearned), or when more than MOSTLY_SKIPPED of its updates were skipped for a
non-finite gradient: its weights then moved on fewer than half of its steps, and its loss says
nothing about the config it was given (fp16's loss scaler skips a few steps while it calibrates,
about one per halving of its initial scale: far from half of a run). So a one-step run diverges
only on a non-finite loss or gradient, or a loss at init above the line.
"""

import math
from collections import deque

MOSTLY_SKIPPED = 0.5  # a finished run that skipped more than this fraction of its updates has diverged


class DivergenceMonitor:
    def __init__(self, threshold: float, window: int):
        self.threshold, self.window = threshold, window
        self.diverged_at: int | None = None     # first step of the divergence
        self.confirmed_at: int | None = None    # the step it became certain (where a run stops)
        self.reason: str | None = None          # why, in words
        self.at_end = False                     # found by judge_end, at the end of the run
        self.spikes: list[dict] = []
        self._above: dict | None = None         # the stretch above the line in progress
        self._first_skipped: int | None = None  # the first step whose gradient norm was non-finite

    def healthy(self, loss: float, grad_norm: float) -> bool:
        """A step whose loss and gradient norm are finite and whose loss is below the line."""
        return math.isfinite(grad_norm) and math.isfinite(loss) and loss <= self.threshold

    def update(self, step: int, loss: float, grad_norm: float = 0.0) -> bool:
        """Take one step's loss and gradient norm; True when divergence is confirmed at this step."""
        if self._first_skipped is None and not math.isfinite(grad_norm):
            self._first_skipped = step
        if self.diverged_at is not None:
            return False
        if not math.isfinite(loss):
            self._diverge(step, step, "a non-finite loss")
            return True
        if loss > self.threshold:
            if self._above is None:
                self._above = {"step": step, "peak": loss}
            self._above["peak"] = max(self._above["peak"], loss)
            if step - self._above["step"] + 1 >= self.window:
                self._diverge(self._above["step"], step, f"above the line for {self.window} steps")
                return True
        elif self._above is not None:
            self.spikes.append({**self._above, "steps_above": step - self._above["step"], "recovered": True})
            self._above = None
        return False

    def judge_end(self, last_step: int, skipped_updates: int) -> bool:
        """At the end of a run that reached max_steps: True when it has diverged by the end-of-run rules
        (and had not diverged before)."""
        if self.diverged or last_step == 0:
            return False
        if self._above is not None:
            self._diverge(self._above["step"], last_step, "its loss ended above the line")
        elif skipped_updates > MOSTLY_SKIPPED * last_step:
            self._diverge(self._first_skipped or 1, last_step,
                          f"{skipped_updates} of its {last_step} updates were skipped (non-finite gradients)")
        else:
            return False
        self.at_end = True
        return True

    def _diverge(self, first_step: int, confirmed_at: int, reason: str) -> None:
        self.diverged_at, self.confirmed_at, self.reason, self._above = first_step, confirmed_at, reason, None

    @property
    def diverged(self) -> bool:
        return self.diverged_at is not None

    def summary(self, last_step: int) -> dict:
        """What the run summary records: the divergence, and every spike (an open one as not recovered)."""
        spikes = list(self.spikes)
        if self._above is not None:
            spikes.append({**self._above, "steps_above": last_step - self._above["step"] + 1, "recovered": False})
        return {"diverged": self.diverged, "diverged_at_step": self.diverged_at,
                "divergence_confirmed_at_step": self.confirmed_at, "divergence_reason": self.reason,
                "divergence_line": self.threshold, "spikes": spikes, "spike_count": len(spikes)}

    def state_dict(self) -> dict:
        return {"diverged_at": self.diverged_at, "confirmed_at": self.confirmed_at, "spikes": self.spikes,
                "above": self._above, "reason": self.reason, "at_end": self.at_end,
                "first_skipped": self._first_skipped}

    def load_state_dict(self, state: dict) -> None:
        self.diverged_at, self.confirmed_at = state["diverged_at"], state["confirmed_at"]
        self.spikes, self._above = list(state["spikes"]), state["above"]
        # checkpoints written before the end-of-run rules lack these
        self.reason, self.at_end = state.get("reason"), state.get("at_end", False)
        self._first_skipped = state.get("first_skipped")


class LastHealthy:
    """The last healthy logged row before a divergence begins (summary.json's last_healthy/*). Rows are seen
    as they are logged; a divergence confirmed later, beginning at a step logged already, takes it back to
    the last healthy row before that step (`forget_from`), among the `keep` most recent."""

    def __init__(self, monitor: DivergenceMonitor, keep: int):
        self.monitor = monitor
        self.row: dict = {}
        self.recent: deque = deque(maxlen=keep)

    def healthy(self, row: dict) -> bool:
        return self.monitor.healthy(row["train/loss"], row["optim/grad_norm"])

    def see(self, row: dict) -> None:
        self.recent.append(row)
        diverged_at = self.monitor.diverged_at
        if (diverged_at is None or row["step"] < diverged_at) and self.healthy(row):
            self.row = row

    def forget_from(self, step: int) -> None:
        """The last healthy row before `step`, where a divergence begins."""
        before = [row for row in self.recent if row["step"] < step and self.healthy(row)]
        if before:
            self.row = before[-1]
        elif self.row.get("step", 0) >= step:  # none kept before `step`: an older one stays
            self.row = {}
