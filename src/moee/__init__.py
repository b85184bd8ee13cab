"""moee: turn a trained dense transformer into a faster, smaller Mixture-of-Experts model.

    moe_model, report = moee.extract(model, calibration_batches, moee.ExtractConfig())
"""

__version__ = "0.1.0"

from moee.adapters import NoMLPBlocksError, find_mlp_sites, list_adapters, register_adapter
from moee.api import ExtractionReport, NoClustersError, extract
from moee.config import (
    ClusterConfig,
    DistillConfig,
    ExtractConfig,
    RecordConfig,
    RouterConfig,
    SelectConfig,
)
from moee.io import CheckpointError, load
from moee.moe import MoEMLP
from moee.moe_model import MoEModel

__all__ = [
    "CheckpointError", "ClusterConfig", "DistillConfig", "ExtractConfig", "ExtractionReport",
    "MoEMLP", "MoEModel", "NoClustersError", "NoMLPBlocksError", "RecordConfig", "RouterConfig",
    "SelectConfig", "extract", "find_mlp_sites", "list_adapters", "load", "register_adapter",
]
