"""The `moee` argument parser: one function per command, each adding its options (every
default from the config dataclasses)."""

from __future__ import annotations

import argparse

from moee.cli.commands import (
    cmd_calibrate,
    cmd_evaluate,
    cmd_export,
    cmd_extract,
    cmd_finetune,
)
from moee.cli.options import (
    DEFAULT_BATCH,
    SEED,
    add_checkpoint_arg,
    add_data_args,
    add_extract_args,
    add_kd_args,
    count,
)
from moee.cli.outputs import add_out_args
from moee.cli.plugins import add_plugin_commands
from moee.cli.verify import add_verify
from moee.config import DistillConfig, ExtractConfig
from moee.engine import EXECUTIONS

MODEL_HELP = ("'default' (the embedded ViT), a .gguf file, or a transformers model directory or "
              "hub id (e.g. a LLaMA-style LLM, BERT, ViT)")


def make_parser(description: str) -> argparse.ArgumentParser:
    """The parser of every command."""
    parser = argparse.ArgumentParser(prog="moee", description=description)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_extract, _finetune, _evaluate, _calibrate, _export, add_verify):
        add(sub)
    add_plugin_commands(sub)  # moee-lab's demo, study, train-base, analyze, bench
    return parser


def _extract(sub: argparse._SubParsersAction) -> None:
    """`moee extract`: a dense model to a MoE checkpoint."""
    ex = sub.add_parser("extract", help="turn a dense model into a MoE checkpoint")
    ex.add_argument("--model", default="default", help=MODEL_HELP)
    add_out_args(ex, "checkpoint")
    add_extract_args(ex, ExtractConfig())
    add_data_args(ex)
    ex.set_defaults(func=cmd_extract, extract_base=ExtractConfig())


def _finetune(sub: argparse._SubParsersAction) -> None:
    """`moee finetune`: distil a MoE checkpoint from its dense teacher."""
    ft = sub.add_parser("finetune", help="knowledge-distil a MoE checkpoint from its dense teacher")
    add_checkpoint_arg(ft)
    ft.add_argument("--teacher", default=None, help=MODEL_HELP + "; default: the model the "
                    "checkpoint was extracted from, as `moee extract` recorded it")
    add_out_args(ft, "checkpoint", help="the fine-tuned checkpoint; the run's resume state "
                 "is kept in it until the checkpoint is saved")
    ft.add_argument("--seed", type=SEED, default=DistillConfig().seed)
    ft.add_argument("--save-every", type=count(1), default=50,
                    help="save the run's state every N steps; rerun to resume (default 50)")
    add_kd_args(ft)
    add_data_args(ft)
    ft.set_defaults(func=cmd_finetune)


def _evaluate(sub: argparse._SubParsersAction) -> None:
    """`moee evaluate`: dense vs MoE: top-1, MACs, params, latency."""
    ev = sub.add_parser("evaluate", help="dense vs MoE: top-1, MACs, params, latency")
    add_checkpoint_arg(ev)
    ev.add_argument("--dense", default=None, help=MODEL_HELP + "; default: the model the "
                    "checkpoint was extracted from, as `moee extract` recorded it")
    ev.add_argument("--latency-batch", type=count(1), default=DEFAULT_BATCH)
    ev.add_argument("--json", help="also write the results here")
    ev.add_argument("--max-batches", type=count(1), default=16,
                    help="with --data: batches of it to evaluate on (default %(default)s)")
    add_data_args(ev)
    ev.set_defaults(func=cmd_evaluate)


def _calibrate(sub: argparse._SubParsersAction) -> None:
    """`moee calibrate`: time each layer's executions and keep the fastest."""
    cal = sub.add_parser("calibrate", help="time each MoE layer's executions at a batch size "
                                           "and keep the fastest (saved with the checkpoint)")
    add_checkpoint_arg(cal)
    cal.add_argument("--batch", type=count(1), default=DEFAULT_BATCH,
                     help="images per batch you will serve")
    cal.add_argument("--force", choices=EXECUTIONS, help="set every layer to this instead")
    cal.add_argument("--allow-approximate", action="store_true",
                     help="also let a layer run its pruned union without routing where that is "
                     "faster: a different function (what it changes on the batch is printed)")
    add_out_args(cal, "checkpoint")
    add_data_args(cal)
    cal.set_defaults(func=cmd_calibrate)


def _export(sub: argparse._SubParsersAction) -> None:
    """`moee export`: a checkpoint in another engine's format."""
    xp = sub.add_parser("export", help="write a MoE checkpoint in another engine's format "
                        "(ONNX: ONNX Runtime, OpenVINO; Mixtral: transformers, vLLM, "
                        "llama.cpp's converter)")
    add_checkpoint_arg(xp)
    xp.add_argument("--to", default="mixtral", choices=["onnx", "mixtral", "gguf"],
                    help="onnx: one file with the routing inside the graph (ONNX Runtime, "
                    "OpenVINO); mixtral: a MixtralForCausalLM directory; gguf: a llama.cpp file")
    add_out_args(xp, "export", help="the file (onnx, gguf) or directory (mixtral)")
    xp.add_argument("--quantize", choices=["int8"], default=None,
                    help="onnx: int8 weights (ONNX Runtime dynamic quantization; routers stay "
                    "fp32)")
    xp.add_argument("--graph", choices=["gather", "masked"], default=None,
                    help="onnx: how MoE layers run in the graph: gather (each expert's tokens "
                    "through its own neurons) or masked (every kept neuron, others zeroed); "
                    "default: each layer's calibrated execution")
    xp.add_argument("--tokenizer", default=None, help="the model whose tokenizer to ship "
                    "(default: the model the checkpoint was extracted from)")
    xp.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                    help="mixtral: the weights' dtype (default: the checkpoint's)")
    xp.add_argument("--gguf-type", choices=["f32", "f16", "q8_0"], default=None,
                    help="gguf: the 2-D weights' type (norms and routers stay f32; default f32)")
    xp.add_argument("--gguf-metadata", default=None, metavar="FILE",
                    help="gguf: a GGUF of the source model to copy the vocabulary from "
                    "(default: the model the checkpoint came from, when it is a .gguf)")
    xp.set_defaults(func=cmd_export)
