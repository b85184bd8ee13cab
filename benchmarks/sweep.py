"""Sweeps that fit once and plan many: the benchmarks' shared helper (not a script).

`Sweep.extract(config)` gives what `moee.extract(model, data, config)` gives, fitting once per
fitting setting (the config without `select.p` and the budget targets) and planning each
point from that fit in memory.
"""

from __future__ import annotations

import time
from typing import Any

import moee
from moee.plans import fitting_settings, plan_arguments


class Sweep:
    """`moee.extract(model, data, config)` for the points of a sweep, fitting once per fitting
    setting (`moee.plans.fitting_settings`): each point plans from its setting's `moee.fit` in
    memory (no recording or clustering again) and builds. At most `keep` fits stay open
    (None: all), the least recently used closed first; `close` (or the end of a `with` block)
    closes them."""

    def __init__(self, model, data, keep: int | None = None) -> None:
        self.model, self.data, self.keep = model, data, keep
        self.fits: dict[moee.ExtractConfig, moee.FittedExtraction] = {}

    def extract(self, config: moee.ExtractConfig) -> tuple[moee.MoEModel, moee.ExtractionReport,
                                                           dict[str, Any]]:
        """(the MoE model and report `moee.extract` gives for `config`, the seconds:
        `extract_seconds` of planning and building this point, and `fit_seconds` of the fit
        when this point made it)."""
        key = fitting_settings(config)
        fitted, seconds = self.fits.pop(key, None), {}
        if fitted is None:
            t0 = time.perf_counter()
            fitted = moee.fit(self.model, self.data, config)
            seconds["fit_seconds"] = time.perf_counter() - t0
        self.fits[key] = fitted
        while self.keep is not None and len(self.fits) > self.keep:
            self.fits.pop(next(iter(self.fits))).close()
        t0 = time.perf_counter()
        plans = fitted.plan(**plan_arguments(config))
        moe_model, report = fitted.build(plans)
        return moe_model, report, {"extract_seconds": time.perf_counter() - t0, **seconds}

    def close(self) -> None:
        while self.fits:
            self.fits.popitem()[1].close()

    def __enter__(self) -> Sweep:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
