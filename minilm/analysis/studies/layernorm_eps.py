"""The norm's eps and the rounding of small-variance rows in each precision (IEEE 754)."""

import math

from minilm.analysis.studies.common import NotMeasured, expect, mean, pick, values_of
from minilm.analysis.sweep import Sweep, probe_points


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
