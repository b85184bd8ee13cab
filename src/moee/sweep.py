"""`moee.Sweep`: many extractions of one model, fitting once per fitting setting.

    with moee.Sweep(model, data) as sweep:
        for p in (0.6, 0.7, 0.8):
            moe_model, report, seconds = sweep.extract(replace(config, select=...(p=p)))

Each point gives what `moee.extract(model, data, config)` gives: points whose settings differ
only in what `moee.plans.fitting_settings` leaves out (`select.p`, a budget's targets) plan
from one `moee.fit` in memory, without recording or clustering again.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

from moee.config import ExtractConfig
from moee.extraction_report import ExtractionReport
from moee.fitted import FittedExtraction, fit
from moee.moe_model import MoEModel
from moee.plans import fitting_settings, plan_arguments


class Sweep:
    """`moee.extract(model, data, config)` for the points of a sweep, fitting once per fitting
    setting. `data` is what `moee.fit` takes, or a function returning it for each fit (a
    generator is used up by one). At most `keep` fits stay open (None: all), the least
    recently used closed first; `close` (or the end of a `with` block) closes them."""

    def __init__(self, model: nn.Module, data: Iterable | Callable[[], Iterable],
                 keep: int | None = None) -> None:
        self.model, self.data, self.keep = model, data, keep
        self.fits: dict[ExtractConfig, FittedExtraction] = {}

    def extract(self, config: ExtractConfig
                ) -> tuple[MoEModel, ExtractionReport, dict[str, Any]]:
        """(the MoE model and report `moee.extract` gives for `config`, the seconds:
        `extract_seconds` of planning and building this point, and `fit_seconds` of the fit
        when this point made it)."""
        key = fitting_settings(config)
        fitted, seconds = self.fits.pop(key, None), {}
        if fitted is None:
            t0 = time.perf_counter()
            fitted = fit(self.model, self.data() if callable(self.data) else self.data, config)
            seconds["fit_seconds"] = time.perf_counter() - t0
        self.fits[key] = fitted  # last in the dict: the most recently used
        while self.keep is not None and len(self.fits) > self.keep:
            self.fits.pop(next(iter(self.fits))).close()
        t0 = time.perf_counter()
        moe_model, report = fitted.build(fitted.plan(**plan_arguments(config)))
        return moe_model, report, {"extract_seconds": time.perf_counter() - t0, **seconds}

    def close(self) -> None:
        """Close every open fit (their temporary stores are removed)."""
        while self.fits:
            self.fits.popitem()[1].close()

    def __enter__(self) -> Sweep:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
