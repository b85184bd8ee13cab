"""`moee study`: its points, a small run on a fake Fashion-MNIST, and resuming."""

from __future__ import annotations

import json

import pytest
from conftest import fake_dataset

import moee
from moee_lab.study import StudyConfig, run_study, study_points
from moee_lab.study import runner as study_runner


def _base() -> moee.ExtractConfig:
    return moee.ExtractConfig(
        record=moee.RecordConfig(n_tokens=1000),
        cluster=moee.ClusterConfig(min_cluster_fraction=0.05, min_samples=5, reduce_dims=8,
                                   stability=False, max_clusters=4),
        budget=moee.BudgetConfig(p_grid=(0.95, 0.8, 0.6, 0.4, 0.2), probe_batches=1))


def test_the_ablation_adds_one_part_of_moee_at_a_time():
    points = study_points(_base(), quick=True)
    ablation = [p.config for p in points if p.group == "ablation"]
    steps = [(c.cluster.algorithm, c.select.criterion, c.router.centres) for c in ablation]
    assert steps == [("random", "random", "random"), ("hdbscan", "random", "random"),
                     ("hdbscan", "variance", "random"), ("hdbscan", "variance", "input_mean")]
    budgets = [p.config.budget.target_macs for p in points if p.group == "budget"]
    assert budgets and all(0 < t < 1 for t in budgets)
    assert len(study_points(_base())) > len(points)  # the full study has more


@pytest.mark.slow
def test_a_small_study_runs_writes_its_report_and_resumes(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    fake_dataset(data, 64)
    chosen = [p for p in study_points(_base(), quick=True)
              if p.group == "ablation" or p.name.startswith("budget 60%")]
    config = StudyConfig(out=str(tmp_path / "study"), quick=True, test_images=64,
                         base=_base(), data_dir=str(data), only=("ablation", "budget 60%"))
    results = run_study(config, say=lambda *_: None)
    assert [r["name"] for r in results["rows"]] == [p.name for p in chosen]
    dense = results["dense"]["macs_per_image"]
    budget = results["rows"][-1]
    assert budget["before_kd"]["macs_per_image"] / dense == pytest.approx(0.6, abs=0.02)
    assert all(r["before_kd"]["macs_per_image"] < dense for r in results["rows"])
    stem = "study-ablation-budget-60%"  # a selection's report: a full run's stays in place
    table = (tmp_path / "study" / f"{stem}.md").read_text()
    assert "**ablation**" in table and "+ input routing (MoEE)" in table
    assert json.loads((tmp_path / "study" / f"{stem}.json").read_text())["points_reused"] == 0
    assert not (tmp_path / "study" / "study.json").exists()
    pytest.importorskip("matplotlib")
    assert (tmp_path / "study" / "pareto-ablation-budget-60%.png").stat().st_size > 1000

    def fail(*args, **kwargs):
        raise AssertionError("a finished point was run again")

    monkeypatch.setattr(study_runner, "_run_point", fail)
    again = run_study(config, say=lambda *_: None)
    assert again["points_reused"] == len(chosen)
    assert again["rows"] == results["rows"]


def test_matching_solves_a_continuous_knob_and_picks_the_nearest_choice():
    from moee_lab.study.matching import knobs, solve

    base = _base()
    by_series = {k.series: k for k in knobs(base)}
    calls = []

    def measure(config):  # a monotone stand-in for extract + count: 0.3 + 0.6 p^2
        calls.append(config)
        return 0.3 + 0.6 * config.select.p ** 2

    label, config, f = solve(by_series["moee, one p"], base, 0.5, measure)
    assert abs(f - 0.5) <= 0.005 and config.select.p == pytest.approx(float(label), abs=1e-4)
    assert len(calls) <= 10
    static = by_series["static pruning, one p"].configure(base, 0.7)
    assert (static.cluster.algorithm, static.cluster.n_clusters, static.select.p) == (
        "random", 1, 0.7)
    old = by_series["moee without refit, one p"].configure(base, 0.7)
    assert not old.select.refit_down and old.router.centres == "input_mean"
    assert base.select.refit_down and old.select.p == 0.7
    budget = by_series["moee, MAC budget"]  # searched around the target: its ends may fail
    label, config, f = solve(budget, base, 0.5, lambda c: c.budget.target_macs + 0.012)
    assert abs(f - 0.5) <= 0.005 and config.budget.p_grid == base.budget.p_grid
    moefication = by_series["moefication"]
    share = lambda c: c.carve.top_k / c.carve.experts  # noqa: E731
    label, config, f = solve(moefication, base, 0.55, lambda c: 0.4 + 0.5 * share(c))
    best = min(moefication.choices, key=lambda lc: abs(0.4 + 0.5 * share(lc[1]) - 0.55))
    assert f == pytest.approx(0.4 + 0.5 * share(best[1]))
    assert config.carve.style == "moefication"


@pytest.mark.slow
def test_matched_points_meet_the_target_and_are_reused(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    fake_dataset(data, 64)
    config = StudyConfig(out=str(tmp_path / "study"), quick=True, test_images=64,
                         base=_base(), data_dir=str(data), only=("moee, one p at 60%",))
    results = run_study(config, say=lambda *_: None)
    (row,) = results["rows"]
    assert row["group"] == "matched" and row["name"].startswith("moee, one p at 60%")
    ratio = (row["before_kd"]["executed_macs_per_image"]
             / results["dense"]["executed_macs_per_image"])
    assert ratio == pytest.approx(0.6, abs=0.02)

    def fail(*args, **kwargs):
        raise AssertionError("a solved knob was searched again")

    monkeypatch.setattr("moee_lab.study.matching.solve", fail)
    assert run_study(config, say=lambda *_: None)["rows"] == results["rows"]
