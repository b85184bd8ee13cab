"""Run the study's points on the embedded default, each result cached under `out/points`."""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from moee.config import DistillConfig, ExtractConfig
from moee.evaluate import count_macs, evaluate
from moee.sweep import Sweep
from moee.training.distill import distill
from moee.util.atomic import write_json
from moee.util.cache_key import settings_dict, stage_key
from moee_lab.demo import TrainingBatches, image_batches, load_default_model, load_fashion_mnist
from moee_lab.demo.pipeline import calibration_batches, demo_extract_config
from moee_lab.study.matching import matched_points
from moee_lab.study.points import StudyPoint, study_points
from moee_lab.study.report import study_tables, write_plot

MATCHED_TARGETS = (0.6, 0.5)  # fractions of dense executed MACs the methods are matched at
MATCHED_TARGETS_FULL = (0.7, 0.6, 0.5)
FITS_KEPT = 4  # fitted extractions kept in memory: the points of a sweep come one after another


@dataclass
class StudyConfig:
    """`quick`: fewer points, no distillation unless `kd_epochs` says so, and 2,000 test
    images; the full study distils every point for `kd_epochs` (default 1) and tests on all
    10,000."""

    out: str = "runs/study"
    quick: bool = False
    kd_epochs: float | None = None  # None: 0 for the quick study, 1 for the full one
    test_images: int | None = None  # None: 2,000 for the quick study, all for the full one
    base: ExtractConfig | None = None  # None: the demo's extraction settings
    only: tuple[str, ...] = ()  # run only the points whose group or name contains one of these
    seed: int = 0
    data_dir: str | None = None
    download: bool = False


def point_key(point: StudyPoint, kd_epochs: float, test_images: int, seed: int) -> str:
    """A point's result is made from the point's extraction settings under the study's seed,
    distillation (none at 0 epochs) and number of test images."""
    distilled = settings_dict(DistillConfig(epochs=kd_epochs, seed=seed)) if kd_epochs else None
    return stage_key("study", {"seed": seed, "distill": distilled, "test_images": test_images},
                     point.config)[:16]


def _measure(model, test_x, test_y, limit: int) -> dict[str, float]:
    x = next(image_batches(test_x, None, 256))[0]
    x64 = x[:64]
    return {"top1": evaluate(model, image_batches(test_x, test_y, 500, limit)),
            "macs_per_image": count_macs(model, x) / len(x),
            "executed_macs_per_image": count_macs(model, x64, executed=True) / len(x64)}


class Extractor:
    """Extractions on the study's calibration images with the study's seed (every random draw
    of the extraction). Points of one calibration size share a work dir (one recording, one
    clustering per clustering setting and seed); points whose settings differ only in
    `select.p` or a budget's target plan from one fitted extraction in memory (`moee.Sweep`)."""

    def __init__(self, dense, train_x, seed: int, work: Path) -> None:
        self.dense, self.seed, self.work = dense, seed, work
        self.sweep = Sweep(dense, lambda: calibration_batches(train_x, seed), keep=FITS_KEPT)

    def __call__(self, config: ExtractConfig):
        """(the MoE model, its report), as `moee.extract` gives them."""
        ex = replace(config, work_dir=str(self.work / f"tokens{config.record.n_tokens}"),
                     progress=False, seed=self.seed)
        moe_model, report, _ = self.sweep.extract(ex)
        return moe_model, report


def _executed_fraction(config: ExtractConfig, extract: Extractor, x64: torch.Tensor,
                       dense_executed: float) -> float:
    """Executed MACs at a batch of 64 test images, as a fraction of dense: what matching
    solves each method's knob for."""
    moe_model, _ = extract(config)
    return count_macs(moe_model, x64, executed=True) / dense_executed


def _run_point(point: StudyPoint, extract: Extractor, data, config: StudyConfig,
               kd_epochs: float, limit: int) -> dict[str, Any]:
    train_x, test_x, test_y = data
    dense = extract.dense
    t0 = time.perf_counter()
    moe_model, report = extract(point.config)
    row: dict[str, Any] = {"group": point.group, "name": point.name, "series": point.series,
                           "extract_seconds": time.perf_counter() - t0,
                           "experts": [r["experts"] for r in report.layers],
                           "stability": [r["stability"] for r in report.layers],
                           "p_per_layer": [r.get("p") for r in report.layers],
                           "before_kd": _measure(moe_model, test_x, test_y, limit)}
    if kd_epochs > 0:
        t1 = time.perf_counter()
        distill(moe_model, dense, TrainingBatches(train_x, 128, True, config.seed),
                DistillConfig(epochs=kd_epochs, seed=config.seed))
        row["kd_seconds"] = time.perf_counter() - t1
        row["after_kd"] = _measure(moe_model, test_x, test_y, limit)
    return row


def run_study(config: StudyConfig | None = None, say=print) -> dict[str, Any]:
    """Run (or resume) every point; write `study.json`, `study.md` and, with matplotlib,
    `pareto.png` under `config.out`; returns the results."""
    config = config or StudyConfig()
    kd_epochs = config.kd_epochs if config.kd_epochs is not None else (0 if config.quick else 1)
    out, t0 = Path(config.out), time.perf_counter()
    (out / "points").mkdir(parents=True, exist_ok=True)
    train_x, _ = load_fashion_mnist("train", config.data_dir, config.download)
    test_x, test_y = load_fashion_mnist("test", config.data_dir, config.download)
    limit = config.test_images or (2000 if config.quick else len(test_x))
    dense = load_default_model()
    dense_row = _measure(dense, test_x, test_y, limit)
    base = config.base or demo_extract_config()
    points = study_points(base, config.quick)
    if config.only:
        points = [p for p in points if any(o in p.group or o in p.name for o in config.only)]
    x64 = next(image_batches(test_x, None, 64))[0]
    dense_executed = count_macs(dense, x64, executed=True)
    extract = Extractor(dense, train_x, config.seed, out / "work")
    points += matched_points(
        base, MATCHED_TARGETS if config.quick else MATCHED_TARGETS_FULL,
        lambda c: _executed_fraction(c, extract, x64, dense_executed),
        out / "matched.json", config.only, config.seed)
    rows, reused = [], 0
    for point in tqdm(points, desc="study points"):
        key = point_key(point, kd_epochs, limit, config.seed)
        path = out / "points" / f"{key}.json"
        names = {"group": point.group, "name": point.name, "series": point.series}
        if path.is_file():  # the same extraction may appear in two groups under two names
            rows.append({**json.loads(path.read_text()), **names})
            reused += 1
            continue
        row = _run_point(point, extract, (train_x, test_x, test_y), config, kd_epochs, limit)
        write_json(path, row)  # a finished point survives an interruption of the study
        rows.append(row)
    extract.sweep.close()
    results = {"dense": dense_row, "rows": rows, "kd_epochs": kd_epochs, "test_images": limit,
               "quick": config.quick, "threads": torch.get_num_threads(),
               "seconds": time.perf_counter() - t0, "points_reused": reused,
               "only": list(config.only)}
    stem = report_stem(config.only)
    write_json(out / f"{stem}.json", results)
    tables = study_tables(results)
    (out / f"{stem}.md").write_text(tables + "\n")
    plot = write_plot(results, out / f"{stem.replace('study', 'pareto', 1)}.png")
    say(tables)
    say(f"\n{len(rows)} points ({reused} reused from {out / 'points'}) in "
        f"{results['seconds'] / 60:.1f} min; results {out / f'{stem}.json'}, tables "
        f"{out / f'{stem}.md'}" + (f", plot {plot}" if plot else
                                   " (pip install matplotlib for the plot)"))
    return results


def report_stem(only: tuple[str, ...]) -> str:
    """'study', or for a selection 'study-<selection>': a partial run into the same folder
    leaves the full run's report in place."""
    if not only:
        return "study"
    return "study-" + (re.sub(r"[^A-Za-z0-9.%]+", "-", "-".join(only)).strip("-")[:60] or "only")
