"""`moee.extract`: fit (record -> cluster -> statistics) -> plan -> build, each stage's
results kept on disk; `moee.calibrate`."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from moee.config import ExtractConfig
from moee.engine.calibrate import calibrate_layers
from moee.export.runtimes import Runtime
from moee.extraction_report import ExtractionReport
from moee.fitted import FittedExtraction, fit
from moee.moe_model import MoEModel
from moee.plans import ExtractionPlans
from moee.util.batches import Batch
from moee.util.modes import cleanup_on_terminate

__all__ = ["ExtractionPlans", "ExtractionReport", "FittedExtraction", "calibrate", "extract",
           "fit"]


def extract(
    model: nn.Module, data: Iterable, config: ExtractConfig | None = None,
    adapter: str | None = None,
) -> tuple[MoEModel, ExtractionReport]:
    """Turn `model`'s MLPs into data-driven MoE layers (MoEE). `model` is left untouched.

    `data` yields model inputs: tensors, (x, label) pairs or kwargs dicts. Returns the MoE
    model (in eval mode) and a report of experts, noise, stability and calibration routing per
    layer. Without `config.work_dir` the activation store lives in a temporary directory that
    is removed before returning. The same as `moee.fit(...)`, then `plan()` and `build`: fit
    once to plan several `p` or budgets.
    """
    config = config or ExtractConfig()
    timer = (Runtime(config.budget.engine) if config.budget.target_latency is not None
             else None)
    with cleanup_on_terminate(), fit(model, data, config, adapter) as fitted:
        return fitted.build(fitted.plan(timer=timer))


def calibrate(moe_model: MoEModel, example: Batch, repeats: int = 20, margin: float = 0.02,
              routed: tuple[str, ...] | None = None,
              allow_approximate: bool = False) -> list[dict]:
    """Time each MoE layer's executions on `example` (one batch at the size you will serve)
    and keep the fastest on the layer; `save_pretrained` then writes the choice. The outputs
    stay the model's own; `allow_approximate` also lets a layer run its pruned union without
    routing where that is faster (it changes the outputs). Returns one row of timings per
    layer (see `moee.engine.calibrate.calibrate_layers`)."""
    return calibrate_layers(moe_model, moe_model.moe_layers(), example, repeats, margin, routed,
                            allow_approximate)
