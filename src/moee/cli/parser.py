"""The `moee` argument parser: one function per command, each adding its options (every
default from the config dataclasses)."""

from __future__ import annotations

import argparse

from moee.cli.commands import (
    cmd_analyze,
    cmd_calibrate,
    cmd_demo,
    cmd_evaluate,
    cmd_export,
    cmd_extract,
    cmd_finetune,
    cmd_study,
    cmd_train_base,
)
from moee.cli.options import (
    add_checkpoint_arg,
    add_data_args,
    add_extract_args,
    add_kd_args,
    count,
    positive,
)
from moee.config import DistillConfig, ExtractConfig
from moee.engine import EXECUTIONS

MODEL_HELP = ("'default' (the embedded ViT), a .gguf file, or a transformers model directory or "
              "hub id (e.g. a LLaMA-style LLM, BERT, ViT)")


def make_parser(description: str) -> argparse.ArgumentParser:
    """The parser of every command."""
    parser = argparse.ArgumentParser(prog="moee", description=description)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_demo, _study, _train_base, _extract, _finetune, _evaluate, _analyze,
                _calibrate, _export):
        add(sub)
    # Listed for --help; main() hands `moee bench ...` to moee.bench.suite directly.
    sub.add_parser("bench", help="dense vs MoE speed side by side (moee bench --help)")
    return parser


def _demo(sub: argparse._SubParsersAction) -> None:
    """`moee demo`: extract, fine-tune and compare the embedded default."""
    from moee.demo.pipeline import DemoConfig, demo_extract_config

    demo_defaults = DemoConfig()
    demo = sub.add_parser("demo", help="extract, fine-tune and compare the embedded default")
    add_extract_args(demo, demo_extract_config())
    add_kd_args(demo)
    demo.add_argument("--model", default="default",
                      help="'default' or a transformers image classifier taking 28x28 grey "
                      "images (dir or hub id)")
    demo.add_argument("--out", default=demo_defaults.out)
    demo.add_argument("--latency-batch", type=count(1), default=demo_defaults.latency_batch)
    add_data_args(demo)
    demo.set_defaults(func=cmd_demo, extract_base=demo_extract_config())


def _study(sub: argparse._SubParsersAction) -> None:
    """`moee study`: the paper's study on the embedded default."""
    st = sub.add_parser("study", help="the paper's study on the embedded default: ablation, "
                        "p sweeps per method, MAC-budget mode, variants; resumable")
    st.add_argument("--quick", action="store_true",
                    help="fewer points, no distillation, 2,000 test images (minutes)")
    st.add_argument("--kd-epochs", type=positive, default=None,
                    help="distillation epochs per point (default: 0 quick, 1 full)")
    st.add_argument("--test-images", type=count(1), default=None,
                    help="test images per evaluation (default: 2,000 quick, all full)")
    st.add_argument("--only", nargs="+", metavar="TEXT",
                    help="run only the points whose group or name contains one of these, "
                    "e.g. --only 'moee p=0.7' 'budget 50%%'")
    st.add_argument("--out", default="runs/study")
    st.add_argument("--seed", type=count(0), default=0)
    add_data_args(st)
    st.set_defaults(func=cmd_study)


def _train_base(sub: argparse._SubParsersAction) -> None:
    """`moee train-base`: train the embedded-default ViT."""
    from moee.demo.train_base import TrainBaseConfig

    tb = sub.add_parser("train-base", help="train the embedded-default ViT on Fashion-MNIST")
    tb_defaults = TrainBaseConfig()
    tb.add_argument("--epochs", type=count(1), default=tb_defaults.epochs)
    tb.add_argument("--batch-size", type=count(1), default=tb_defaults.batch_size)
    tb.add_argument("--lr", type=positive, default=tb_defaults.lr)
    tb.add_argument("--seed", type=count(0), default=tb_defaults.seed)
    tb.add_argument("--device", default="auto")
    tb.add_argument("--out", default="runs/base")
    add_data_args(tb)
    tb.set_defaults(func=cmd_train_base)


def _extract(sub: argparse._SubParsersAction) -> None:
    """`moee extract`: a dense model to a MoE checkpoint."""
    ex = sub.add_parser("extract", help="turn a dense model into a MoE checkpoint")
    ex.add_argument("--model", default="default", help=MODEL_HELP)
    ex.add_argument("--out", required=True)
    add_extract_args(ex, ExtractConfig())
    add_data_args(ex, text=True)
    ex.set_defaults(func=cmd_extract, extract_base=ExtractConfig())


def _finetune(sub: argparse._SubParsersAction) -> None:
    """`moee finetune`: distil a MoE checkpoint from its dense teacher."""
    ft = sub.add_parser("finetune", help="knowledge-distil a MoE checkpoint from its dense teacher")
    add_checkpoint_arg(ft)
    ft.add_argument("--teacher", default=None, help=MODEL_HELP + "; default: the model the "
                    "checkpoint was extracted from, as `moee extract` recorded it")
    ft.add_argument("--out", required=True)
    ft.add_argument("--seed", type=count(0), default=DistillConfig().seed)
    ft.add_argument("--save-every", type=count(1), default=50,
                    help="save the run's state every N steps; rerun to resume (default 50)")
    add_kd_args(ft)
    add_data_args(ft, text=True)
    ft.set_defaults(func=cmd_finetune)


def _evaluate(sub: argparse._SubParsersAction) -> None:
    """`moee evaluate`: dense vs MoE: top-1, MACs, params, latency."""
    from moee.demo.pipeline import DemoConfig

    demo_defaults = DemoConfig()
    ev = sub.add_parser("evaluate", help="dense vs MoE: top-1, MACs, params, latency")
    add_checkpoint_arg(ev)
    ev.add_argument("--dense", default=None, help=MODEL_HELP + "; default: the model the "
                    "checkpoint was extracted from, as `moee extract` recorded it")
    ev.add_argument("--latency-batch", type=count(1), default=demo_defaults.latency_batch)
    ev.add_argument("--json", help="also write the results here")
    ev.add_argument("--max-batches", type=count(1), default=16,
                    help="with --data: batches of it to evaluate on (default %(default)s)")
    add_data_args(ev, text=True)
    ev.set_defaults(func=cmd_evaluate)


def _analyze(sub: argparse._SubParsersAction) -> None:
    """`moee analyze`: figures and an HTML report of a checkpoint."""
    an = sub.add_parser("analyze", help="figures and an HTML report of a MoE checkpoint: "
                        "expert sizes, pruned neurons, centre similarity, overlap, routing")
    add_checkpoint_arg(an)
    an.add_argument("--dense", default=None, help="the dense model it came from (default: "
                    "as `moee extract` recorded it)")
    an.add_argument("--out", required=True, help="folder for report.html and the PNGs")
    an.add_argument("--images", type=count(1), default=2000,
                    help="Fashion-MNIST test images for routing per class")
    add_data_args(an)
    an.set_defaults(func=cmd_analyze)


def _calibrate(sub: argparse._SubParsersAction) -> None:
    """`moee calibrate`: time each layer's executions and keep the fastest."""
    from moee.demo.pipeline import DemoConfig

    demo_defaults = DemoConfig()
    cal = sub.add_parser("calibrate", help="time each MoE layer's executions at a batch size "
                                           "and keep the fastest (saved with the checkpoint)")
    add_checkpoint_arg(cal)
    cal.add_argument("--batch", type=count(1), default=demo_defaults.latency_batch,
                     help="images per batch you will serve")
    cal.add_argument("--force", choices=EXECUTIONS, help="set every layer to this instead")
    cal.add_argument("--out", required=True)
    add_data_args(cal, text=True)
    cal.set_defaults(func=cmd_calibrate)


def _export(sub: argparse._SubParsersAction) -> None:
    """`moee export`: a checkpoint in another engine's format."""
    xp = sub.add_parser("export", help="write a MoE checkpoint in another engine's format "
                        "(Mixtral: transformers, vLLM, llama.cpp's converter)")
    add_checkpoint_arg(xp)
    xp.add_argument("--to", default="mixtral", choices=["mixtral", "gguf"],
                    help="mixtral: a MixtralForCausalLM directory; gguf: a llama.cpp file")
    xp.add_argument("--out", required=True, help="the directory (mixtral) or file (gguf)")
    xp.add_argument("--tokenizer", default=None, help="the model whose tokenizer to ship "
                    "(default: the model the checkpoint was extracted from)")
    xp.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                    help="mixtral: the weights' dtype (default: the checkpoint's)")
    xp.add_argument("--gguf-type", choices=["f32", "f16", "q8_0"], default="f32",
                    help="gguf: the 2-D weights' type (norms and routers stay f32)")
    xp.add_argument("--gguf-metadata", default=None, metavar="FILE",
                    help="gguf: a GGUF of the source model to copy the vocabulary from "
                    "(default: the model the checkpoint came from, when it is a .gguf)")
    xp.set_defaults(func=cmd_export)
