"""moee: turn a trained dense transformer into a faster, smaller Mixture-of-Experts model.

    moe_model, report = moee.extract(model, calibration_batches, moee.ExtractConfig())
    fitted = moee.fit(model, calibration_batches)   # or: fit once, plan any p or budget
    moe_model, report = fitted.build(fitted.plan(p=0.8))
    with moee.Sweep(model, calibration_batches) as sweep: ...  # many points, one fit each
    moee.distill(moe_model, model, training_batches)
    moee.calibrate(moe_model, example_batch)
    moe_model.save_pretrained("my-moe"); moee.MoEModel.from_pretrained("my-moe")
"""

from moee._version import __version__
from moee.activation_threshold import sparsify_activations
from moee.adapters import MLPSite, MLPWeights, find_mlp_sites, list_adapters, register_adapter
from moee.api import (
    ExtractionPlans,
    ExtractionReport,
    FittedExtraction,
    calibrate,
    extract,
    fit,
)
from moee.config import (
    BudgetConfig,
    CarveConfig,
    ClusterConfig,
    DistillConfig,
    ExtractConfig,
    LocalDistillConfig,
    RecordConfig,
    RouterConfig,
    SelectConfig,
)
from moee.engine import ExecutionConfig
from moee.errors import (
    AdapterMismatchError,
    BadBatchError,
    CheckpointError,
    ConfigError,
    DataNotFoundError,
    EmptyDataError,
    MoeeError,
    NoClustersError,
    NoMLPBlocksError,
    NonFiniteError,
    ResourceError,
    TooFewTokensError,
    WriteError,
)
from moee.evaluate import count_macs, count_params, evaluate, top1_accuracy
from moee.fidelity import fidelity
from moee.moe import MoEMLP
from moee.moe_model import MoEModel, load
from moee.sweep import Sweep
from moee.training.distill import distill
from moee.util.image_folder import image_batches
from moee.util.text import read_texts, token_batches

__all__ = [
    "AdapterMismatchError", "BadBatchError", "BudgetConfig", "CarveConfig", "CheckpointError",
    "ClusterConfig", "ConfigError",
    "DataNotFoundError", "DistillConfig", "EmptyDataError", "ExecutionConfig", "ExtractConfig",
    "ExtractionPlans", "ExtractionReport", "FittedExtraction", "LocalDistillConfig", "MLPSite",
    "MLPWeights",
    "MoEMLP", "MoEModel", "MoeeError", "NoClustersError", "NoMLPBlocksError", "NonFiniteError",
    "RecordConfig",
    "ResourceError", "RouterConfig", "SelectConfig", "Sweep", "TooFewTokensError", "WriteError",
    "__version__",
    "calibrate", "count_macs", "count_params", "distill", "evaluate", "extract", "fidelity",
    "fit",
    "find_mlp_sites", "image_batches", "list_adapters", "load", "read_texts", "register_adapter",
    "sparsify_activations", "token_batches", "top1_accuracy",
]
