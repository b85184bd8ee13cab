"""The execution engine: how a MoE layer runs its tokens at inference, one file per job.

settings (per-layer `ExecutionConfig`), routing, activation facts, the cost model and its
fitted constants, the scratch workspace, the per-layer inference state (`InferenceWeights`:
frozen, built once per weights, device, dtype and slicing; one expert-slicing function) and
its oneDNN-blocked expert copies, one module per execution, calibration and timing. Nothing
here imports the MoE module: executions are functions of (tokens, expert ids,
`InferenceWeights`).
"""

from moee.engine.cost_model import COSTS, CostModel, default_small_batch_tokens
from moee.engine.cuda_graph import GraphedForward, make_capturable
from moee.engine.experts import run_experts, run_one_expert
from moee.engine.grouped import run_grouped
from moee.engine.masked import run_masked
from moee.engine.routing import ROUTER_METRICS, route, router_weights, routing_dtype
from moee.engine.settings import EXECUTIONS, ExecutionConfig
from moee.engine.weights import (
    InferenceWeights,
    build_inference_weights,
    compiled_cache,
    derived_bytes,
    first_weights,
    slice_expert,
)
from moee.engine.workspace import clear_workspace, workspace_bytes

__all__ = [
    "COSTS", "EXECUTIONS", "ROUTER_METRICS", "CostModel", "ExecutionConfig", "GraphedForward",
    "InferenceWeights", "make_capturable",
    "build_inference_weights", "clear_workspace", "compiled_cache", "default_small_batch_tokens",
    "derived_bytes",
    "first_weights", "route", "router_weights", "routing_dtype", "run_experts", "run_grouped",
    "run_masked", "run_one_expert", "slice_expert", "workspace_bytes",
]
