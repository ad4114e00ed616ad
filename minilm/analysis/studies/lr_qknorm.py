"""A learning-rate sweep with and without qk-norm: attention-logit growth (Wortsman et al. 2023)."""

from minilm.analysis.studies.common import (
    expect,
    finals,
    listing,
    mean,
    pick,
    rank_correlation,
    run_max,
    sensitivity,
    values_of,
)
from minilm.analysis.sweep import LR_KEY, Sweep


@expect("lr_qknorm", "qk-norm lowers the LR sensitivity")
def _qk_sensitivity(sweep: Sweep):
    without, with_qk = sensitivity(sweep, model__qk_norm=False), sensitivity(sweep, model__qk_norm=True)
    return f"{without:.2f} → {with_qk:.2f}", with_qk < without, {"without": without, "with": with_qk}


def _logit_max_by_lr(sweep: Sweep, qk_norm: bool) -> dict[float, float]:
    return {lr: mean(run_max(r, "diag/attn_logit_max") for r in pick(sweep, optim__lr=lr, model__qk_norm=qk_norm))
            for lr in values_of(sweep, LR_KEY, 3)}


@expect("lr_qknorm", "without qk-norm the max attention logit grows with the learning rate")
def _logits_grow(sweep: Sweep):
    by_lr = _logit_max_by_lr(sweep, False)
    lrs = sorted(by_lr)
    rho = rank_correlation(lrs, [by_lr[lr] for lr in lrs])
    return (f"max logit {listing([by_lr[lr] for lr in lrs], 1)} at lr {listing(lrs)} (rank correlation "
            f"{rho:.2f}; grows = above 0.5)", rho > 0.5, {"rho": rho, **{str(lr): by_lr[lr] for lr in lrs}})


@expect("lr_qknorm", "with qk-norm the attention logits stay bounded")
def _logits_bounded(sweep: Sweep):
    without, with_qk = max(_logit_max_by_lr(sweep, False).values()), max(_logit_max_by_lr(sweep, True).values())
    return (f"largest max logit over the LR grid {with_qk:.1f} with qk-norm vs {without:.1f} without",
            with_qk < without, {"with": with_qk, "without": without})


@expect("lr_qknorm", "the highest learning rate diverges or ends far above the best loss without qk-norm, and "
                     "trains with it")
def _qk_top_lr(sweep: Sweep):
    top = values_of(sweep, LR_KEY)[-1]
    found = {}
    for qk_norm in (False, True):
        best = min(mean(finals(pick(sweep, optim__lr=lr, model__qk_norm=qk_norm))) for lr in values_of(sweep, LR_KEY))
        runs = pick(sweep, optim__lr=top, model__qk_norm=qk_norm)
        found[qk_norm] = (sum(r.diverged for r in runs), len(runs), mean(finals(runs)) - best)
    fails = {qk: diverged > 0 or gap >= 0.5 for qk, (diverged, _, gap) in found.items()}
    shown = "; ".join(f"{'with' if qk else 'without'} qk-norm {d}/{n} diverged, {gap:.2f} above its best"
                      for qk, (d, n, gap) in found.items())
    return (f"at lr {top:g}: {shown} (far above = 0.5 or more)", fails[False] and not fails[True],
            {"without_gap": found[False][2], "with_gap": found[True][2]})
