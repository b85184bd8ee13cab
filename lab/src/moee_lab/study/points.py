"""What the study measures: one `StudyPoint` per extraction setting, in groups."""

from __future__ import annotations

from dataclasses import dataclass, replace

from moee.config import BudgetConfig, CarveConfig, ExtractConfig


@dataclass(frozen=True)
class StudyPoint:
    """One extraction the study runs. `group` names the table it belongs to, `series` the
    line it lies on in the accuracy-vs-MACs plot."""

    group: str
    name: str
    series: str
    config: ExtractConfig


def _ablation(base: ExtractConfig) -> list[StudyPoint]:
    """The paper's Table 2 order: random experts, then each part of MoEE added in turn."""
    r = replace
    random = base.with_method("random")
    hdbscan = r(random, cluster=base.cluster)
    variance = r(hdbscan, select=base.select)
    return [StudyPoint("ablation", name, "ablation", c) for name, c in (
        ("random clusters, neurons, routing", random), ("+ HDBSCAN clusters", hdbscan),
        ("+ variance selection", variance), ("+ input routing (MoEE)", base))]


def _remedies(base: ExtractConfig) -> list[StudyPoint]:
    """Remedies for layers whose clusters do not survive a split of the data, and for many
    small experts, each added alone to one setting."""
    r = replace
    c = r(base.cluster, stability=True)  # the remedies read the stability score
    return [StudyPoint("remedies", name, "remedies", config) for name, config in (
        (f"p={base.select.p}, no remedy", base),
        ("+ layers with stability < 0.5 stay dense",
         r(base, cluster=r(c, dense_below_stability=0.5))),
        ("+ layers with stability < 0.5 get one expert",
         r(base, cluster=r(c, merge_below_stability=0.5))),
        ("+ at most 2 experts a layer", r(base, cluster=r(c, max_clusters=2))))]


RACE_TARGETS = (0.3, 0.4, 0.5, 0.6, 0.8)  # fractions of dense MACs routed and static race at
DEMO_MACS = 0.55  # about the MAC fraction of the demo's routed model (p 0.8, up to 8 experts)


def race_points(base: ExtractConfig, targets: tuple[float, ...] = RACE_TARGETS
                ) -> list[StudyPoint]:
    """Routed experts against static pruning (one expert, the same statistics and refit) at
    the same MAC budgets, and the demo's routed model against static pruning at its MACs."""
    r = replace
    points = [StudyPoint("race", "routed, the demo (p 0.8)", "routed", base),
              StudyPoint("race", f"static, MAC budget {DEMO_MACS:.0%} (the demo's MACs)",
                         "static", r(base, budget=BudgetConfig(target_macs=DEMO_MACS))
                         .with_method("static"))]
    for t in targets:
        budget = BudgetConfig(target_macs=t)
        points.append(StudyPoint("race", f"routed, MAC budget {t:.0%}", "routed",
                                 r(base, budget=budget)))
        points.append(StudyPoint("race", f"static, MAC budget {t:.0%}", "static",
                                 r(base, budget=budget).with_method("static")))
    return points


def study_points(base: ExtractConfig, quick: bool = False) -> list[StudyPoint]:
    """The points of the quick or the full study, from the settings `base` (its `select.p` is
    the ablation's p)."""
    r = replace
    ps = (0.9, 0.8, 0.7) if quick else (0.95, 0.9, 0.8, 0.7, 0.6)
    targets = (0.6, 0.5) if quick else (0.7, 0.6, 0.55, 0.5)
    points = _ablation(base)
    for method in ("moee", "random"):
        for p in ps:
            config = r(base, select=r(base.select, p=p)).with_method(method)
            points.append(StudyPoint("methods", f"{method} p={p}", f"{method}, one p", config))
    for a in (0.5, 0.4, 0.3) if quick else (0.6, 0.5, 0.4, 0.3, 0.25):
        config = r(base, carve=CarveConfig(active=a)).with_method("cmoe")
        points.append(StudyPoint("methods", f"cmoe active={a}", "cmoe (top-1)", config))
    for k in (4, 3, 2):  # of 8 groups
        config = r(base, carve=CarveConfig(top_k=k)).with_method("moefication")
        points.append(StudyPoint("methods", f"moefication top-{k} of 8", "moefication", config))
    for t in targets:
        config = r(base, budget=BudgetConfig(target_macs=t))
        points.append(StudyPoint("budget", f"budget {t:.0%} of dense MACs", "moee, MAC budget",
                                 config))
    points += _remedies(r(base, select=r(base.select, p=0.7)))
    if quick:
        return points
    points += race_points(base)
    for algorithm in ("kmeans", "birch"):
        config = r(base, cluster=r(base.cluster, algorithm=algorithm))
        points.append(StudyPoint("variants", f"{algorithm} clusters", "variants", config))
    points.append(StudyPoint("variants", "magnitude selection", "variants",
                             r(base, select=r(base.select, criterion="magnitude"))))
    points.append(StudyPoint("variants", "euclidean routing", "variants",
                             r(base, router=r(base.router, metric="euclidean"))))
    points.append(StudyPoint("variants", "paper selection (cluster tokens, no compensation)",
                             "variants", r(base, select=type(base.select).paper(base.select.p))))
    for n in (5000, 10000):
        config = r(base, record=r(base.record, n_tokens=n))
        points.append(StudyPoint("calibration", f"{n} tokens", "calibration", config))
    return points
