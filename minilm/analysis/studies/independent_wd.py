"""Weight decay independent of the learning rate lowers the LR sensitivity (Wortsman et al. 2023)."""

from minilm.analysis.studies.common import NotMeasured, expect, sensitivity_by
from minilm.analysis.sweep import Sweep


@expect("independent_wd", "weight decay independent of the learning rate lowers the LR sensitivity")
def _independent_sensitivity(sweep: Sweep):
    by_mode = sensitivity_by(sweep, "optim.independent_weight_decay")
    if set(by_mode) != {False, True}:
        raise NotMeasured("needs both coupled and independent decay")
    return (f"{by_mode[False]:.2f} (coupled) → {by_mode[True]:.2f} (independent)", by_mode[True] < by_mode[False],
            {"coupled": by_mode[False], "independent": by_mode[True]})
