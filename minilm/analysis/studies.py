"""Each canned study's expectations as code: one verdict per expectation, computed from the runs.

A study's config (configs/experiment/<name>.yaml) holds what is data: its expected outcome in words,
the source, the figures. What is judged lives here, registered under the study's name with
`@expect(study, claim)`: a function of the report's `Sweep` returning (what was measured, whether it
agrees, the numbers). When the runs lack what a verdict needs (a partial sweep), it says so
(`NotMeasured`) instead of guessing. Thresholds that turn a number into a yes or no are named in the
measured text, so a reader can judge them.
"""

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

from minilm.analysis.sweep import (
    LR_KEY,
    RunStats,
    Sweep,
    arm_label,
    difference_ci,
    lr_sensitivity,
    mean_by_group,
    mean_ci,
    probe_points,
)


class NotMeasured(Exception):
    """The runs do not hold what a verdict needs."""


@dataclass
class Verdict:
    claim: str                  # the expectation, in words
    measured: str               # what the runs show, with the numbers
    passed: bool | None         # agrees with the expectation; None: not measurable from these runs
    numbers: dict = field(default_factory=dict)


Check = Callable[[Sweep], tuple[str, bool, dict]]
EXPECTATIONS: dict[str, list[tuple[str, Check]]] = {}


def expect(study: str, claim: str):
    """Register a verdict of `study` on `claim`."""
    def register(check: Check) -> Check:
        EXPECTATIONS.setdefault(study, []).append((claim, check))
        return check
    return register


def verdicts(study: str | None, sweep: Sweep) -> list[Verdict]:
    """Every registered verdict of the study on these runs (none for a sweep that is not a study)."""
    found = []
    for claim, check in EXPECTATIONS.get(study, []):
        try:
            measured, passed, numbers = check(sweep)
        except NotMeasured as why:
            measured, passed, numbers = f"not measured ({why})", None, {}
        found.append(Verdict(claim, measured, None if passed is None else bool(passed), numbers))
    return found


# ---------------------------------------------------------------- what verdicts read


def pick(sweep: Sweep, **where) -> list[RunStats]:
    """The runs with these config values (dotted keys written with __ for dots); NotMeasured when there are none."""
    where = {key.replace("__", "."): value for key, value in where.items()}
    runs = sweep.runs(where)
    if not runs:
        raise NotMeasured(f"no run with {', '.join(f'{k}={v}' for k, v in where.items())}")
    return runs


def values_of(sweep: Sweep, key: str, at_least: int = 2) -> list:
    values = [v for v in sweep.values(key) if v is not None]
    if len(values) < at_least:
        raise NotMeasured(f"{key} takes {len(values)} value(s) here, {at_least} needed")
    return values


def finals(runs: list[RunStats]) -> list[float]:
    """min(final val loss, loss at init) per run: a run without a final loss counts its loss at init."""
    values = [r.final_or_init for r in runs if r.final_or_init is not None]
    if not values:
        raise NotMeasured("no run has a loss")
    return values


def mean(values) -> float:
    values = list(values)
    if not values:
        raise NotMeasured("nothing to average")
    return statistics.fmean(values)


def sensitivity(sweep: Sweep, **where) -> float:
    """LR sensitivity of the runs with these values of the other swept keys."""
    if LR_KEY not in sweep.keys:
        raise NotMeasured("the learning rate is not swept")
    where = {key.replace("__", "."): value for key, value in where.items()}
    others = [k for k in sweep.keys if k != LR_KEY]
    if set(where) != set(others):
        raise NotMeasured(f"the LR sweep is not split by {', '.join(where)} alone")
    label = arm_label(tuple(where[k] for k in others), others)
    found = lr_sensitivity(sweep.arms, sweep.keys)
    if label not in found:
        raise NotMeasured(f"no LR sweep at {label}")
    return found[label][2]


def run_max(run: RunStats, prefix: str) -> float:
    """The largest value of a per-layer metric over the run's layers and sampled steps."""
    values = [max(v) for v in run.per_layer(prefix).values()]
    if not values:
        raise NotMeasured(f"{prefix} was not logged")
    return max(values)


def rank_correlation(xs: list[float], ys: list[float]) -> float:
    """Spearman's rho (no ties expected)."""
    def ranks(values):
        order = sorted(range(len(values)), key=values.__getitem__)
        out = [0] * len(values)
        for rank, i in enumerate(order):
            out[i] = rank
        return out
    rx, ry = ranks(xs), ranks(ys)
    n = len(xs)
    return 1 - 6 * sum((a - b) ** 2 for a, b in zip(rx, ry)) / (n * (n * n - 1))


def events(runs: list[RunStats]) -> int:
    """Runs that spiked or diverged."""
    return sum(r.diverged or bool(r.spikes) for r in runs)


def listing(values, digits: int | None = None) -> str:
    """Values joined by ' / ': with `digits` decimals, or in their shortest form (learning rates, eps)."""
    return " / ".join(f"{v:g}" if digits is None else f"{v:.{digits}f}" for v in values)


# ---------------------------------------------------------------- precision_matrix


@expect("precision_matrix", "every arm reaches the same final val loss within its seeds' 95% CI")
def _precision_agree(sweep: Sweep):
    intervals = {}
    for arm, runs in sweep.arms.items():
        m, half = mean_ci([r.final_val for r in runs if r.final_val is not None])
        if half is not None:
            intervals[arm_label(arm, sweep.keys)] = (m - half, m + half)
    if len(intervals) < 2:
        raise NotMeasured("fewer than two arms with two seeds or more")
    low, high = max(lo for lo, _ in intervals.values()), min(hi for _, hi in intervals.values())
    means = [(lo + hi) / 2 for lo, hi in intervals.values()]
    return (f"arm means {min(means):.3f}–{max(means):.3f}; the {len(intervals)} intervals "
            f"{'share' if low <= high else 'do not share'} a common value", low <= high,
            {"mean_min": min(means), "mean_max": max(means), "common_low": low, "common_high": high})


@expect("precision_matrix", "fp16 skips a few steps at the start while its scaler backs off, then next to none")
def _fp16_skips(sweep: Sweep):
    runs = [r for r in pick(sweep, precision__name="fp16") if r.series("amp/skipped_steps")]
    if not runs:
        raise NotMeasured("no fp16 run logged amp/skipped_steps")
    early = mean(max((v for s, v in r.series("amp/skipped_steps").items() if s <= 100), default=0) for r in runs)
    total = mean(r.skipped for r in runs)
    later_steps = mean(max(r.curve, default=0) - 100 for r in runs)
    scale = mean(list(r.series("amp/scale").values())[-1] for r in runs if r.series("amp/scale"))
    later = total - early
    agrees = early > 0 and later <= 0.01 * max(later_steps, 1)
    return (f"{early:.1f} skipped in steps 1–100, {later:.1f} after (mean over {len(runs)} fp16 runs; 'next to "
            f"none' = at most 1% of the later steps); loss scale at the end {scale:g}", agrees,
            {"early": early, "later": later, "final_scale": scale})


@expect("precision_matrix", "LayerNorm and RMSNorm are indistinguishable")
def _norms_alike(sweep: Sweep):
    ln = finals(pick(sweep, norm__kind="layernorm"))
    rms = finals(pick(sweep, norm__kind="rmsnorm"))
    diff, half = difference_ci(ln, rms)
    if half is None:
        raise NotMeasured("fewer than two runs per norm kind")
    return (f"final val loss {mean(ln):.3f} (LayerNorm) vs {mean(rms):.3f} (RMSNorm), pooled over precisions: "
            f"difference {diff:+.3f} ± {half:.3f} (95% CI)", abs(diff) <= half, {"difference": diff, "ci95": half})


# ---------------------------------------------------------------- norm_placement


@expect("norm_placement", "post-norm ends at a higher final val loss than pre-norm")
def _post_higher(sweep: Sweep):
    pre, post = finals(pick(sweep, model__placement="pre")), finals(pick(sweep, model__placement="post"))
    diff, half = difference_ci(pre, post)
    if half is None:
        raise NotMeasured("fewer than two runs per placement")
    return (f"{mean(pre):.3f} (pre) vs {mean(post):.3f} (post), pooled over norm kinds: post − pre = {diff:+.3f} ± "
            f"{half:.3f} (95% CI; higher = the interval above 0)", diff - half > 0, {"difference": diff, "ci95": half})


@expect("norm_placement", "post-norm's final loss spreads wider over seeds")
def _post_spread(sweep: Sweep):
    spread = {}
    for placement in ("pre", "post"):
        stds = [statistics.stdev(finals(pick(sweep, model__placement=placement, norm__kind=kind)))
                for kind in values_of(sweep, "norm.kind", 1)
                if len(sweep.runs({"model.placement": placement, "norm.kind": kind})) > 1]
        if not stds:
            raise NotMeasured("fewer than two seeds per arm")
        spread[placement] = mean(stds)
    return (f"seed std {spread['pre']:.3f} (pre) vs {spread['post']:.3f} (post), mean over norm kinds",
            spread["post"] > spread["pre"], spread)


@expect("norm_placement", "post-norm spikes or diverges more often")
def _post_events(sweep: Sweep):
    pre, post = pick(sweep, model__placement="pre"), pick(sweep, model__placement="post")
    return (f"runs that spiked or diverged: {events(pre)}/{len(pre)} (pre) vs {events(post)}/{len(post)} (post)",
            events(post) > events(pre), {"pre": events(pre), "post": events(post)})


@expect("norm_placement", "the placement matters more than the kind of norm")
def _placement_over_kind(sweep: Sweep):
    placement = abs(mean(finals(pick(sweep, model__placement="post")))
                    - mean(finals(pick(sweep, model__placement="pre"))))
    kind = abs(mean(finals(pick(sweep, norm__kind="rmsnorm"))) - mean(finals(pick(sweep, norm__kind="layernorm"))))
    return (f"|post − pre| = {placement:.3f} vs |RMSNorm − LayerNorm| = {kind:.3f} (final val loss)",
            placement > kind, {"placement": placement, "kind": kind})


# ---------------------------------------------------------------- learning-rate studies


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


def _sensitivity_by(sweep: Sweep, key: str) -> dict:
    return {value: sensitivity(sweep, **{key.replace(".", "__"): value}) for value in values_of(sweep, key)}


@expect("warmup_lr", "a longer warmup lowers the LR sensitivity")
def _warmup_sensitivity(sweep: Sweep):
    by_warmup = _sensitivity_by(sweep, "optim.warmup_steps")
    warmups = sorted(by_warmup)
    scores = [by_warmup[w] for w in warmups]
    return (f"LR sensitivity {listing(scores, 3)} for {listing(warmups)} warmup steps (lower = less sensitive)",
            scores[-1] < scores[0], {str(w): s for w, s in by_warmup.items()})


@expect("warmup_lr", "near the best learning rate the warmup length matters little")
def _warmup_best(sweep: Sweep):
    best = {}
    for warmup in values_of(sweep, "optim.warmup_steps"):
        best[warmup] = min(mean(finals(pick(sweep, optim__warmup_steps=warmup, optim__lr=lr)))
                           for lr in values_of(sweep, LR_KEY))
    spread = max(best.values()) - min(best.values())
    return (f"best final val loss over the LR grid {listing([best[w] for w in sorted(best)], 3)} for "
            f"{listing(sorted(best))} warmup steps: spread {spread:.3f} ('little' = under 0.1)", spread < 0.1,
            {"spread": spread})


@expect("independent_wd", "weight decay independent of the learning rate lowers the LR sensitivity")
def _independent_sensitivity(sweep: Sweep):
    by_mode = _sensitivity_by(sweep, "optim.independent_weight_decay")
    if set(by_mode) != {False, True}:
        raise NotMeasured("needs both coupled and independent decay")
    return (f"{by_mode[False]:.2f} (coupled) → {by_mode[True]:.2f} (independent)", by_mode[True] < by_mode[False],
            {"coupled": by_mode[False], "independent": by_mode[True]})


# ---------------------------------------------------------------- postnorm_warmup, deep_postnorm


@expect("postnorm_warmup", "the longer the warmup, the lower the final loss")
def _warmup_order(sweep: Sweep):
    warmups = values_of(sweep, "optim.warmup_steps")
    losses = [mean(finals(pick(sweep, optim__warmup_steps=w))) for w in warmups]
    return (f"final val loss {listing(losses, 3)} for {listing(warmups)} warmup steps (seed means; a diverged run "
            f"counts its loss at init)", all(a > b for a, b in zip(losses, losses[1:])), dict(zip(map(str, warmups),
                                                                                                   losses)))


@expect("postnorm_warmup", "without warmup post-norm stalls well above the warmed-up arms, or diverges")
def _no_warmup_fails(sweep: Sweep):
    warmups = values_of(sweep, "optim.warmup_steps")
    if warmups[0] != 0:
        raise NotMeasured("no run without warmup")
    cold = pick(sweep, optim__warmup_steps=0)
    best = min(mean(finals(pick(sweep, optim__warmup_steps=w))) for w in warmups[1:])
    gap = mean(finals(cold)) - best
    diverged = sum(r.diverged for r in cold)
    return (f"{diverged}/{len(cold)} runs without warmup diverged; their final loss sits {gap:.2f} above the best "
            f"warmed-up arm ('well above' = 0.5 or more)", diverged > 0 or gap >= 0.5, {"gap": gap,
                                                                                       "diverged": diverged})


def _gap_to_rescued(sweep: Sweep, depth: int) -> tuple[float, dict]:
    loss = {p: mean(finals(pick(sweep, model__n_layer=depth, model__placement=p))) for p in ("post", "pre", "sandwich")}
    return loss["post"] - min(loss["pre"], loss["sandwich"]), loss


@expect("deep_postnorm", "at the largest depth post-norm stalls or diverges while pre-norm and sandwich train")
def _deep_post_fails(sweep: Sweep):
    depth = values_of(sweep, "model.n_layer", 1)[-1]
    gap, loss = _gap_to_rescued(sweep, depth)
    post = pick(sweep, model__n_layer=depth, model__placement="post")
    init = mean(r.init_loss for r in post if r.init_loss is not None)
    trained = all(loss[p] < init - 1 for p in ("pre", "sandwich"))
    fails = any(r.diverged for r in post) or gap >= 0.5
    return (f"{depth} layers: final val loss {loss['post']:.3f} (post), {loss['pre']:.3f} (pre), "
            f"{loss['sandwich']:.3f} (sandwich), {init:.2f} at init; post-norm fails = diverged or 0.5 above the "
            f"better rescue; trains = 1 below the loss at init", fails and trained, loss)


@expect("deep_postnorm", "post-norm's gap to the rescued placements grows with depth")
def _gap_grows(sweep: Sweep):
    depths = values_of(sweep, "model.n_layer")
    gaps = [_gap_to_rescued(sweep, d)[0] for d in depths]
    return (f"post − best rescue {listing(gaps, 3)} at {listing(depths)} layers", gaps[-1] > gaps[0],
            dict(zip(map(str, depths), gaps)))


@expect("deep_postnorm", "sandwich trains at least as well as pre-norm")
def _sandwich_vs_pre(sweep: Sweep):
    depths = values_of(sweep, "model.n_layer", 1)
    losses = [_gap_to_rescued(sweep, d)[1] for d in depths]
    deltas = [loss["sandwich"] - loss["pre"] for loss in losses]
    return (f"sandwich − pre {listing(deltas, 3)} at {listing(depths)} layers ('at least as well' = under 0.05)",
            all(d < 0.05 for d in deltas), dict(zip(map(str, depths), deltas)))


# ---------------------------------------------------------------- grad_norm_init


def _last_over_first(sweep: Sweep, placement: str, init: str) -> dict[int, float]:
    """{depth: last / first layer MLP gradient RMS at init}, seed means."""
    ratios = {}
    for depth in values_of(sweep, "model.n_layer", 1):
        runs = [r for r in pick(sweep, model__placement=placement, model__init=init, model__n_layer=depth)
                if "mlp" in r.init_grads]
        if not runs:
            raise NotMeasured(f"no gradients at init for {placement}-norm, {init} init, {depth} layers")
        ratios[depth] = mean(r.init_grads["mlp"][-1] for r in runs) / mean(r.init_grads["mlp"][0] for r in runs)
    return ratios


def _ratio_verdict(sweep: Sweep, placement: str, init: str, agrees: Callable[[float], bool], rule: str):
    ratios = _last_over_first(sweep, placement, init)
    return (f"last / first layer MLP gradient RMS {listing(list(ratios.values()), 2)} at {listing(list(ratios))} "
            f"layers ({rule})", all(agrees(r) for r in ratios.values()), {str(d): r for d, r in ratios.items()})


@expect("grad_norm_init", "Xavier init: post-norm's gradient grows with the layer index")
def _xavier_post(sweep: Sweep):
    return _ratio_verdict(sweep, "post", "xavier", lambda r: r > 1, "grows = above 1 at every depth")


@expect("grad_norm_init", "Xavier init: pre-norm's gradient does not grow with the layer index")
def _xavier_pre(sweep: Sweep):
    return _ratio_verdict(sweep, "pre", "xavier", lambda r: r <= 1, "does not grow = at most 1 at every depth")


@expect("grad_norm_init", "GPT-2 init: post-norm's gradient is flat across layers")
def _gpt2_post(sweep: Sweep):
    return _ratio_verdict(sweep, "post", "gpt2", lambda r: 0.8 <= r <= 1.25, "flat = within 0.8–1.25")


@expect("grad_norm_init", "GPT-2 init: pre-norm's gradient is largest at the first layer and decays")
def _gpt2_pre(sweep: Sweep):
    return _ratio_verdict(sweep, "pre", "gpt2", lambda r: r < 1, "decays = below 1 at every depth")


@expect("grad_norm_init", "a one-step study reports no divergence")
def _one_step_no_divergence(sweep: Sweep):
    diverged = sum(r.diverged for r in sweep.stats)
    return f"{diverged}/{len(sweep.stats)} runs diverged", diverged == 0, {"diverged": diverged}


# ---------------------------------------------------------------- zloss


def _logz(run: RunStats) -> tuple[float, float]:
    series = run.series("diag/logz_mean")
    if not series:
        raise NotMeasured("diag/logz_mean was not logged")
    return series[min(series)], series[max(series)]


@expect("zloss", "without z-loss log Z drifts up from its value at init")
def _logz_drifts(sweep: Sweep):
    runs = pick(sweep, optim__z_loss=0.0)
    start, end = mean(_logz(r)[0] for r in runs), mean(_logz(r)[1] for r in runs)
    return f"log Z {start:.2f} at step 1 → {end:.2f} at the end (seed means)", end > start, {"start": start,
                                                                                          "end": end}


@expect("zloss", "z-loss pulls log Z toward 0")
def _logz_pulled(sweep: Sweep):
    strongest = values_of(sweep, "optim.z_loss")[-1]
    off = mean(abs(_logz(r)[1]) for r in pick(sweep, optim__z_loss=0.0))
    on = mean(abs(_logz(r)[1]) for r in pick(sweep, optim__z_loss=strongest))
    return (f"|log Z| at the end {off:.2f} without z-loss vs {on:.2f} with z-loss {strongest:g}", on < off,
            {"without": off, "with": on})


@expect("zloss", "z-loss costs nothing in loss")
def _zloss_free(sweep: Sweep):
    strongest = values_of(sweep, "optim.z_loss")[-1]
    off, on = finals(pick(sweep, optim__z_loss=0.0)), finals(pick(sweep, optim__z_loss=strongest))
    diff, half = difference_ci(off, on)
    shown = f"{diff:+.3f} ± {half:.3f} (95% CI)" if half is not None else f"{diff:+.3f} (one seed each: no CI)"
    return (f"final val loss with z-loss {strongest:g} minus without: {shown}; no cost = not significantly above 0",
            diff <= (half if half is not None else 0.0), {"difference": diff, "ci95": half})


# ---------------------------------------------------------------- adamw_eps


def _over_groups(run: RunStats, prefix: str, average=statistics.fmean) -> float:
    """`average` over parameter groups of each group's mean over the sampled steps after step 1."""
    by_group = mean_by_group(run, prefix)
    if not by_group:
        raise NotMeasured(f"{prefix}* was not logged")
    return average(by_group.values())


def _gradient_rms(sweep: Sweep) -> float:
    """The typical gradient RMS: the median over runs of the median over parameter groups."""
    return statistics.median(_over_groups(r, "diag/grad_rms/", statistics.median) for r in sweep.stats)


@expect("adamw_eps", "once eps reaches the gradient RMS the update RMS falls")
def _eps_update(sweep: Sweep):
    eps = values_of(sweep, "optim.eps")
    update = [mean(_over_groups(r, "diag/update_rms/") for r in pick(sweep, optim__eps=e)) for e in eps]
    grad = _gradient_rms(sweep)
    shown = " / ".join(f"{u:.2e}" for u in update)
    return (f"update RMS {shown} for eps {listing(eps)}; gradient RMS ≈ {grad:.1e} (median; falls = the largest "
            f"eps's below half the smallest's)", update[-1] < update[0] / 2,
            {"update": dict(zip(map(str, eps), update)), "grad_rms": grad})


@expect("adamw_eps", "a large eps slows learning")
def _eps_slows(sweep: Sweep):
    eps = values_of(sweep, "optim.eps")
    losses = [mean(finals(pick(sweep, optim__eps=e))) for e in eps]
    return (f"final val loss {listing(losses, 3)} for eps {listing(eps)}", losses[-1] > losses[0],
            dict(zip(map(str, eps), losses)))


@expect("adamw_eps", "an eps far below the gradient RMS changes nothing")
def _eps_small_harmless(sweep: Sweep):
    grad = _gradient_rms(sweep)
    small = [e for e in values_of(sweep, "optim.eps") if e < grad / 100]
    if len(small) < 2:
        raise NotMeasured(f"fewer than two eps below 1% of the gradient RMS {grad:.1e}")
    losses = [mean(finals(pick(sweep, optim__eps=e))) for e in small]
    spread = max(losses) - min(losses)
    return (f"final val loss {listing(losses, 3)} for eps {listing(small)} (below 1% of the gradient RMS {grad:.1e}): "
            f"spread {spread:.3f} (nothing = under 0.05)", spread < 0.05, {"spread": spread})


# ---------------------------------------------------------------- attn_entropy


def _min_entropy(run: RunStats) -> float:
    """The lowest attention entropy of any layer at any sampled step after step 1."""
    values = [min(v) for step, v in run.per_layer("diag/attn_entropy").items() if step > 1]
    if not values:
        raise NotMeasured("diag/attn_entropy was not logged after step 1")
    return min(values)


def _entropy_by_lr(sweep: Sweep, qk_norm: bool) -> dict[float, float]:
    return {lr: mean(_min_entropy(r) for r in pick(sweep, optim__lr=lr, model__qk_norm=qk_norm))
            for lr in values_of(sweep, LR_KEY)}


@expect("attn_entropy", "at a high learning rate without qk-norm the attention entropy collapses")
def _entropy_collapses(sweep: Sweep):
    by_lr = _entropy_by_lr(sweep, False)
    lrs = sorted(by_lr)
    low, high = by_lr[lrs[0]], by_lr[lrs[-1]]
    return (f"lowest layer entropy {listing([by_lr[lr] for lr in lrs], 2)} nats at lr {listing(lrs)} without qk-norm "
            f"(collapse = at the highest LR below half its value at the lowest)", high < low / 2,
            {str(lr): v for lr, v in by_lr.items()})


@expect("attn_entropy", "with qk-norm the entropy stays up at every learning rate")
def _entropy_kept(sweep: Sweep):
    by_lr = _entropy_by_lr(sweep, True)
    lrs = sorted(by_lr)
    return (f"lowest layer entropy {listing([by_lr[lr] for lr in lrs], 2)} nats at lr {listing(lrs)} with qk-norm "
            f"(stays up = at least half its value at the lowest LR)", min(by_lr.values()) >= by_lr[lrs[0]] / 2,
            {str(lr): v for lr, v in by_lr.items()})


@expect("attn_entropy", "the entropy falls before the loss spikes or diverges")
def _entropy_first(sweep: Sweep):
    found = []
    for run in pick(sweep, model__qk_norm=False):
        event = run.diverged_at if run.diverged else min((s["step"] for s in run.spikes), default=None)
        if event is None:
            continue
        entropy = run.per_layer("diag/attn_entropy")
        start = min(entropy[min(entropy)]) if entropy else None
        fell = next((step for step, v in entropy.items() if start and min(v) < start / 2), None)
        found.append((run.flat[LR_KEY], event, fell))
    if not found:
        raise NotMeasured("no run without qk-norm spiked or diverged")
    shown = "; ".join(f"lr {lr:g}: event at step {event}, entropy below half its step-1 value "
                      f"{'at step ' + str(fell) if fell else 'never'}" for lr, event, fell in found)
    return shown, all(fell is not None and fell < event for _, event, fell in found), {"runs": found}


# ---------------------------------------------------------------- layernorm_eps


def _probe(sweep: Sweep, precision: str, eps: float, metric: str, family: str, std: float) -> float:
    points = [probe_points(r, metric, family) for r in pick(sweep, precision__name=precision, norm__eps=eps)]
    if not all(std in p for p in points):
        raise NotMeasured(f"the norm probe was not logged at std {std:g}")
    return mean(p[std] for p in points)


@expect("layernorm_eps", "eps shrinks rows whose variance is below it by 1 - std/sqrt(std² + eps), as computed")
def _eps_bias(sweep: Sweep):
    worst, where = 0.0, None
    for eps in values_of(sweep, "norm.eps", 1):
        for std in (1e-1, 1e-2, 1e-3, 1e-4, 1e-5):  # above fp32's trouble: its centred rows are exact to 1e-7
            predicted = 1 - std / math.sqrt(std**2 + eps)
            deviation = abs(_probe(sweep, "fp32", eps, "norm_error", "centred", std) - predicted)
            if deviation >= worst:
                worst, where = deviation, (eps, std)
    return (f"fp32, centred rows: the measured error departs from the formula by at most {worst:.1e} (at eps "
            f"{where[0]:g}, std {where[1]:g}; as computed = under 1e-3)", worst < 1e-3, {"max_deviation": worst})


@expect("layernorm_eps", "eps acts alike in every precision (the statistics run in fp32)")
def _eps_alike(sweep: Sweep):
    eps = 1e-5 if 1e-5 in values_of(sweep, "norm.eps", 1) else values_of(sweep, "norm.eps", 1)[-1]
    errors = {p: _probe(sweep, p, eps, "norm_error", "centred", 1e-3) for p in values_of(sweep, "precision.name")}
    spread = max(errors.values()) - min(errors.values())
    return (f"error at std 1e-3, eps {eps:g}: {', '.join(f'{p} {e:.4f}' for p, e in errors.items())} (alike = "
            f"within 0.01)", spread < 0.01, errors)


def _rounding(sweep: Sweep, family: str, std: float) -> dict[str, float]:
    eps = values_of(sweep, "norm.eps", 1)[0]
    return {p: _probe(sweep, p, eps, "norm_rounding_error", family, std) for p in ("fp32", "fp16", "bf16")}


@expect("layernorm_eps", "offset rows lose their variation to the 16-bit spacing near 1, bf16 first")
def _offset_rows(sweep: Sweep):
    errors = _rounding(sweep, "offset", 1e-2)
    return (f"rounding error of rows 1 + 0.01·z: bf16 {errors['bf16']:.3g}, fp16 {errors['fp16']:.3g}, fp32 "
            f"{errors['fp32']:.2g}", errors["bf16"] > errors["fp16"] > errors["fp32"], errors)


@expect("layernorm_eps", "centred rows: fp16 is the more precise in its normal range and loses them below it")
def _centred_rows(sweep: Sweep):
    normal, tiny = _rounding(sweep, "centred", 1e-2), _rounding(sweep, "centred", 1e-6)
    return (f"rounding error at std 1e-2: fp16 {normal['fp16']:.2g} vs bf16 {normal['bf16']:.2g}; at std 1e-6: "
            f"fp16 {tiny['fp16']:.2g} vs bf16 {tiny['bf16']:.2g}",
            normal["fp16"] < normal["bf16"] and tiny["fp16"] > tiny["bf16"], {"normal": normal, "tiny": tiny})


# ---------------------------------------------------------------- bf16_pure

SAME_LOSS = 0.05  # nats: two arms whose mean final losses differ by less count as the same loss here


def _pure_gap(sweep: Sweep, rounding: str) -> tuple[float, float, float]:
    """(mean final loss of pure bf16 with `rounding`, of the fp32-master arm, their difference)."""
    pure = mean(finals(pick(sweep, precision__rounding=rounding)))
    master = mean(finals(pick(sweep, precision__name="bf16")))
    return pure, master, pure - master


@expect("bf16_pure", "round-to-nearest stalls: it ends above the fp32-master loss")
def _nearest_stalls(sweep: Sweep):
    pure, master, gap = _pure_gap(sweep, "nearest")
    return (f"final val loss {pure:.3f} (nearest) vs {master:.3f} (fp32 master weights): {gap:+.3f} (stalls = more "
            f"than {SAME_LOSS} above)", gap > SAME_LOSS, {"nearest": pure, "master": master, "gap": gap})


def _recovers(rounding: str):
    def check(sweep: Sweep):
        pure, master, gap = _pure_gap(sweep, rounding)
        return (f"final val loss {pure:.3f} ({rounding}) vs {master:.3f} (fp32 master weights): {gap:+.3f} "
                f"(recovered = less than {SAME_LOSS} above)", gap < SAME_LOSS, {rounding: pure, "master": master})
    return check


expect("bf16_pure", "stochastic rounding recovers the fp32-master loss")(_recovers("stochastic"))
expect("bf16_pure", "Kahan summation recovers the fp32-master loss")(_recovers("kahan"))


@expect("bf16_pure", "memory per parameter falls from 16 bytes to 8 (10 with the Kahan buffer)")
def _bytes_per_param(sweep: Sweep):
    def measured(**where):
        values = {r.series("mem/bytes_per_param").get(1) for r in pick(sweep, **where)} - {None}
        if not values:
            raise NotMeasured("mem/bytes_per_param was not logged")
        return max(values)

    found = {"fp32 master": measured(precision__name="bf16"), "nearest": measured(precision__rounding="nearest"),
             "stochastic": measured(precision__rounding="stochastic"), "kahan": measured(precision__rounding="kahan")}
    expected = {"fp32 master": 16, "nearest": 8, "stochastic": 8, "kahan": 10}
    return (", ".join(f"{arm} {value:g}" for arm, value in found.items()) + " bytes per parameter", found == expected,
            found)


# ---------------------------------------------------------------- fp8


def _fp8_arms(sweep: Sweep) -> dict[str, dict]:
    """{arm: {"precision__name": ..., "precision__fp8_recipe": ...}} of bf16 and the two fp8 recipes."""
    return {"bf16": {"precision__name": "bf16"},
            "tensorwise": {"precision__name": "fp8", "precision__fp8_recipe": "tensorwise"},
            "rowwise": {"precision__name": "fp8", "precision__fp8_recipe": "rowwise"}}


@expect("fp8", "at the default learning rate fp8 tracks bf16 within the seeds' spread")
def _fp8_tracks(sweep: Sweep):
    lr = 3e-3 if 3e-3 in values_of(sweep, LR_KEY, 1) else values_of(sweep, LR_KEY, 1)[0]
    base = finals(pick(sweep, **_fp8_arms(sweep)["bf16"], optim__lr=lr))
    parts, agrees, numbers = [], True, {}
    for recipe in ("tensorwise", "rowwise"):
        diff, half = difference_ci(base, finals(pick(sweep, **_fp8_arms(sweep)[recipe], optim__lr=lr)))
        within = abs(diff) <= max(half or 0.0, SAME_LOSS)
        agrees &= within
        parts.append(f"{recipe} − bf16 = {diff:+.3f}" + (f" ± {half:.3f}" if half else ""))
        numbers[recipe] = diff
    return (f"at lr {lr:g}: {'; '.join(parts)} (tracks = within the 95% CI of the difference or {SAME_LOSS} nats)",
            agrees, numbers)


def _fp8_gap_by_lr(sweep: Sweep) -> dict[float, float]:
    """{lr: mean final loss of the two fp8 recipes minus bf16's}."""
    gaps = {}
    for lr in values_of(sweep, LR_KEY):
        base = mean(finals(pick(sweep, **_fp8_arms(sweep)["bf16"], optim__lr=lr)))
        fp8 = mean(finals(pick(sweep, precision__name="fp8", optim__lr=lr)))
        gaps[lr] = fp8 - base
    return gaps


@expect("fp8", "the fp8 loss gap grows with the learning rate")
def _fp8_gap_grows(sweep: Sweep):
    gaps = _fp8_gap_by_lr(sweep)
    lrs = sorted(gaps)
    return (f"fp8 − bf16 final val loss at lr {listing(lrs)}: {listing([gaps[lr] for lr in lrs], 3)} (grows = larger "
            f"at the highest LR than at the lowest)", gaps[lrs[-1]] > gaps[lrs[0]], {"gaps": gaps})


@expect("fp8", "fp8 is at least as sensitive to the learning rate as bf16")
def _fp8_sensitivity(sweep: Sweep):
    found = {arm: sensitivity(sweep, **{**{"precision__fp8_recipe": None}, **where})
             for arm, where in _fp8_arms(sweep).items()}
    return (f"LR sensitivity {', '.join(f'{arm} {value:.3f}' for arm, value in found.items())} (at least = each fp8 "
            f"recipe within 0.02 below bf16's or above)",
            all(found[recipe] >= found["bf16"] - 0.02 for recipe in ("tensorwise", "rowwise")), found)


def _fp8_underflow(run: RunStats) -> float:
    """The run's mean over sampled steps of the worst fp8 layer's underflow fraction (inputs and gradients)."""
    per_step = []
    for row in run.record.rows or ():
        values = [float(v) for k, v in row.items() if k.startswith(("numerics/act_in/underflow/",
                                                                    "numerics/grad/underflow/"))
                  and not k.endswith("/head") and v is not None]
        if values:
            per_step.append(max(values))
    if not per_step:
        raise NotMeasured("numerics/*/underflow was not logged")
    return statistics.fmean(per_step)


@expect("fp8", "tensorwise scaling loses more small values to underflow than rowwise")
def _fp8_granularity(sweep: Sweep):
    found = {recipe: mean(_fp8_underflow(r) for r in pick(sweep, **_fp8_arms(sweep)[recipe]))
             for recipe in ("tensorwise", "rowwise")}
    return (f"worst fp8 layer's underflow fraction, mean over steps and runs: tensorwise {found['tensorwise']:.2e}, "
            f"rowwise {found['rowwise']:.2e}", found["tensorwise"] > found["rowwise"], found)


@expect("fp8", "the fraction of fp8 values lost to underflow grows with the learning rate")
def _fp8_underflow_grows(sweep: Sweep):
    lrs = values_of(sweep, LR_KEY)
    by_lr = [mean(_fp8_underflow(r) for r in pick(sweep, precision__name="fp8", optim__lr=lr)) for lr in lrs]
    rho = rank_correlation(lrs, by_lr)
    return (f"worst fp8 layer's underflow fraction at lr {listing(lrs)}: {', '.join(f'{v:.2e}' for v in by_lr)} "
            f"(grows = Spearman rho > 0; rho {rho:+.2f})", rho > 0, {"by_lr": dict(zip(lrs, by_lr)), "rho": rho})
