"""`moee` command line: demo, study, extract, finetune, evaluate, analyze, calibrate, bench.

Thin over the Python API; every default comes from the config dataclasses. moee's own errors
print as one line (exit code 2); anything else shows its traceback.
"""

from __future__ import annotations

import argparse
import errno
import sys

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
    extract_config,
    positive,
)
from moee.cli.sources import check_data, check_writable
from moee.config import DistillConfig, ExtractConfig
from moee.engine import EXECUTIONS
from moee.errors import MoeeError

__all__ = ["build_parser", "extract_config", "main"]
MODEL_HELP = ("'default' (the embedded ViT), a .gguf file, or a transformers model directory or "
              "hub id (e.g. a LLaMA-style LLM, BERT, ViT)")


def build_parser() -> argparse.ArgumentParser:
    from moee.demo.pipeline import DemoConfig, demo_extract_config
    from moee.demo.train_base import TrainBaseConfig

    parser = argparse.ArgumentParser(prog="moee", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
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

    ex = sub.add_parser("extract", help="turn a dense model into a MoE checkpoint")
    ex.add_argument("--model", default="default", help=MODEL_HELP)
    ex.add_argument("--out", required=True)
    add_extract_args(ex, ExtractConfig())
    add_data_args(ex, text=True)
    ex.set_defaults(func=cmd_extract, extract_base=ExtractConfig())

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

    cal = sub.add_parser("calibrate", help="time each MoE layer's executions at a batch size "
                                           "and keep the fastest (saved with the checkpoint)")
    add_checkpoint_arg(cal)
    cal.add_argument("--batch", type=count(1), default=demo_defaults.latency_batch,
                     help="images per batch you will serve")
    cal.add_argument("--force", choices=EXECUTIONS, help="set every layer to this instead")
    cal.add_argument("--out", required=True)
    add_data_args(cal, text=True)
    cal.set_defaults(func=cmd_calibrate)
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
    # Listed for --help; main() hands `moee bench ...` to moee.bench.suite directly.
    sub.add_parser("bench", help="dense vs MoE speed side by side (moee bench --help)")
    return parser


def _join_torchrun() -> None:
    """Under torchrun (WORLD_SIZE > 1) join its process group: NCCL on GPUs, gloo on CPUs."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch
        import torch.distributed as dist

        if not dist.is_initialized():
            if torch.cuda.is_available():
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


# A write that fails for want of room or rights: reported in one line, not a traceback.
WRITE_ERRORS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EACCES, errno.EPERM,
                errno.EROFS}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # its own parser: every option passes through untouched
        from moee.bench.suite import main as bench_main

        bench_main(argv[1:])
        return 0
    args = build_parser().parse_args(argv)
    _join_torchrun()
    try:
        check_data(args)  # a missing file or folder is reported before any model loads
        out_file = getattr(args, "to", None) == "gguf"  # a file, not a folder
        check_writable("out", None if out_file else getattr(args, "out", None))
        check_writable("work-dir", getattr(args, "work_dir", None))
        return args.func(args)
    except MoeeError as e:
        print(f"moee {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in WRITE_ERRORS:
            raise
        where = f" {e.filename}" if e.filename else ""
        print(f"moee {args.command}: error: cannot write{where}: {e.strerror}. Free space or "
              "choose another --out / --work-dir; with --work-dir, what was computed is kept "
              "and the same command resumes", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
