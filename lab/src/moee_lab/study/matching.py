"""Methods compared at the same executed MACs: each method's knob solved for a target fraction
of the dense model's executed MACs, by measuring extractions (no library searches a
monotone knob through an expensive, cached black box, hence these few lines)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from moee.config import CarveConfig, ExtractConfig
from moee.util.atomic import write_json
from moee.util.cache_key import stage_key
from moee_lab.study.points import StudyPoint

Measure = Callable[[ExtractConfig], float]  # a config -> its executed MACs / dense


@dataclass(frozen=True)
class Knob:
    """One method's setting that moves its MACs up as it grows: continuous in [low, high],
    or one of `choices` (each a label and its config). `around`: search target ± around
    instead (a knob that is itself a MACs fraction, whose far ends may be unreachable)."""

    series: str
    configure: Callable[[ExtractConfig, float], ExtractConfig] | None = None
    low: float = 0.0
    high: float = 1.0
    choices: tuple[tuple[str, ExtractConfig], ...] = ()
    around: float | None = None


def knobs(base: ExtractConfig) -> list[Knob]:
    """MoEE (one p) with and without the stages that reproduce the dense layer, its MAC
    budget, static pruning (one expert, the same statistics and refit), the random baseline,
    CMoE-style and MoEfication."""
    r = replace
    p = lambda c, v: r(c, select=r(c.select, p=round(v, 4)))  # noqa: E731
    no_refit = lambda c, v: p(r(c, select=r(c.select, refit_down=False),  # noqa: E731
                                router=r(c.router, centres="input_mean")), v)
    moefication = tuple(  # at most 8 groups: C(8, 4) = 70 expert copies at most
        (f"top-{k} of {e}", r(base, carve=CarveConfig("moefication", experts=e, top_k=k))
         .with_method("moefication")) for e in range(2, 9) for k in range(1, e))
    return [
        Knob("moee, one p", p, 0.3, 0.99),
        Knob("moee without refit, one p", no_refit, 0.3, 0.99),
        Knob("static pruning, one p", lambda c, v: p(c, v).with_method("static"), 0.3, 0.99),
        Knob("moee, MAC budget", lambda c, v: r(c, budget=r(c.budget, target_macs=round(v, 4))),
             around=0.05),
        Knob("random, one p", lambda c, v: p(c, v).with_method("random"), 0.3, 0.99),
        Knob("cmoe (top-1)", lambda c, v: r(c, carve=CarveConfig(active=round(v, 4))).with_method(
            "cmoe"), 0.125, 1.0),
        Knob("moefication", choices=moefication),
    ]


def solve(knob: Knob, base: ExtractConfig, target: float, measure: Measure,
          tolerance: float = 0.005, steps: int = 8) -> tuple[str, ExtractConfig, float]:
    """The knob's setting whose measured MACs fraction is closest to `target` (a label, the
    config, the fraction): regula falsi on a continuous knob, stopping within `tolerance`;
    for choices, the nearest of a line fitted through the smallest and largest, then its
    neighbours until one lands within `tolerance`."""
    tried: list[tuple[float, str, ExtractConfig, float]] = []

    def probe(label: str, config: ExtractConfig) -> float:
        f = measure(config)
        tried.append((abs(f - target), label, config, f))
        return f

    def close_enough() -> bool:
        return min(t[0] for t in tried) <= tolerance

    if knob.choices:
        share = [c.carve.top_k / c.carve.experts for _, c in knob.choices]
        lo, hi = min(range(len(share)), key=share.__getitem__), max(range(len(share)),
                                                                    key=share.__getitem__)
        f_lo, f_hi = probe(*knob.choices[lo]), probe(*knob.choices[hi])
        slope = (f_hi - f_lo) / (share[hi] - share[lo])
        order = sorted(range(len(share)), key=lambda i: abs(f_lo + slope * (share[i] - share[lo])
                                                            - target))
        for i in order[:3]:
            if close_enough():
                break
            if i not in (lo, hi):
                probe(*knob.choices[i])
    else:
        a, b = ((target - knob.around, target + knob.around) if knob.around is not None
                else (knob.low, knob.high))
        fa, fb = probe(f"{a:.4g}", knob.configure(base, a)), probe(f"{b:.4g}",
                                                                   knob.configure(base, b))
        for _ in range(steps):
            if close_enough() or not fa < target < fb:
                break
            v = a + (target - fa) * (b - a) / (fb - fa)
            v = min(max(v, a + 0.02 * (b - a)), b - 0.02 * (b - a))  # never stall at an end
            fv = probe(f"{v:.4g}", knob.configure(base, v))
            if fv < target:
                a, fa = v, fv
            else:
                b, fb = v, fv
    _, label, config, f = min(tried, key=lambda t: t[0])
    return label, config, f


def matching_key(base: ExtractConfig, seed: int) -> str:
    """The key of the knobs solved around `base` (with every method's target and name) by
    extractions under the study's `seed`."""
    return stage_key("matching", {"seed": seed}, base)[:16]


def matched_points(base: ExtractConfig, targets: tuple[float, ...], measure: Measure,
                   cache: Path, only: tuple[str, ...] = (), seed: int = 0) -> list[StudyPoint]:
    """One point per method and target, the knob solved by `measure` (extractions under the
    study's `seed`); each solution is kept in `cache` (a JSON file keyed by method, target,
    the base settings and the seed) for reruns."""
    saved = json.loads(cache.read_text()) if cache.is_file() else {}
    base_key = matching_key(base, seed)
    points, group = [], "matched"
    for target in targets:
        for knob in knobs(base):
            name = f"{knob.series} at {target:.0%} exec MACs"
            if only and not any(o in group or o in name for o in only):
                continue
            key = f"{name}|{base_key}"
            if key not in saved:
                label, _, f = solve(knob, base, target, measure)
                saved[key] = {"label": label, "fraction": f}
                write_json(cache, saved)
            label = saved[key]["label"]
            config = (dict(knob.choices)[label] if knob.choices
                      else knob.configure(base, float(label)))
            points.append(StudyPoint(group, f"{name}: {label}", knob.series, config))
    return points
