"""moee-lab's commands, added to `moee` through the `moee.commands` entry point: demo,
study, train-base, analyze (over the embedded default and Fashion-MNIST) and bench (its own
parser; every option after `bench` passes through)."""

from __future__ import annotations

import argparse

import torch

from moee.cli.commands import recorded_source
from moee.cli.options import (
    add_checkpoint_arg,
    add_extract_args,
    add_kd_args,
    count,
    distill_config,
    extract_config,
    positive,
)
from moee.cli.provenance import check_source
from moee.cli.sources import load_dense
from moee_lab.default_source import add_data_args


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add demo, study, train-base, analyze and bench to `moee`'s subcommands."""
    for add in (_demo, _study, _train_base, _analyze, _bench):
        add(sub)


def _bench(sub: argparse._SubParsersAction) -> None:
    """`moee bench`: its own parser reads everything after the command."""
    bench = sub.add_parser("bench", add_help=False,
                           help="dense vs MoE speed side by side (moee bench --help)")
    bench.set_defaults(func=cmd_bench, takes_rest=True)


def cmd_bench(args: argparse.Namespace) -> int:
    from moee_lab.bench.suite import main as bench_main

    bench_main(args.rest)
    return 0


def _demo(sub: argparse._SubParsersAction) -> None:
    """`moee demo`: extract, fine-tune and compare the embedded default."""
    from moee_lab.demo.pipeline import DemoConfig, demo_extract_config

    demo_defaults = DemoConfig()
    demo = sub.add_parser("demo", help="extract, fine-tune and compare the embedded default")
    add_extract_args(demo, demo_extract_config())
    add_kd_args(demo, demo_defaults.kd_batch_size)
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
    from moee_lab.demo.train_base import TrainBaseConfig

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



def cmd_demo(args: argparse.Namespace) -> int:
    from moee_lab.demo import DemoConfig, run_demo

    run_demo(DemoConfig(extract=extract_config(args), distill=distill_config(args),
                        kd_batch_size=args.kd_batch_size, latency_batch=args.latency_batch,
                        seed=args.seed, out=args.out, data_dir=args.data_dir,
                        download=args.download),
             dense=None if args.model == "default" else load_dense(args.model)[0])
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    from moee_lab.study import StudyConfig, run_study

    run_study(StudyConfig(out=args.out, quick=args.quick, kd_epochs=args.kd_epochs,
                          test_images=args.test_images, seed=args.seed, data_dir=args.data_dir,
                          download=args.download, only=tuple(args.only or ())))
    return 0


def cmd_train_base(args: argparse.Namespace) -> int:
    from moee_lab.demo.train_base import TrainBaseConfig, train_base

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    card = train_base(TrainBaseConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                                      seed=args.seed, device=device),
                      args.out, args.data_dir, args.download)
    print(f"Saved to {args.out}: test top-1 {card['test_top1_fp16_weights']:.2%} "
          f"after {args.epochs} epochs ({card['train_minutes']:.1f} min)")
    return 0



def cmd_analyze(args: argparse.Namespace) -> int:
    from moee.adapters import find_mlp_sites
    from moee.moe_model import MoEModel
    from moee_lab.analysis import analyse_layers, routing_by_class, write_report

    moe_model = MoEModel.from_pretrained(args.checkpoint, verify=not args.no_verify)
    source = recorded_source(args.checkpoint, args.dense)
    dense = load_dense(source)[0]
    check_source(args.checkpoint, "dense", args.dense, source, dense)
    widths = {s.name: s.weights().hidden_size for s in find_mlp_sites(dense, validate=False)}
    by_class = names = None
    config = moe_model.config
    if (getattr(config, "num_channels", None), getattr(config, "image_size", None)) == (1, 28):
        from moee_lab.demo import FASHION_MNIST_CLASSES, image_batches, load_fashion_mnist

        test_x, test_y = load_fashion_mnist("test", args.data_dir, args.download)
        by_class = routing_by_class(moe_model, image_batches(test_x, test_y, 500, args.images),
                                    len(FASHION_MNIST_CLASSES))
        names = list(FASHION_MNIST_CLASSES)
    else:
        print("routing per class: only for checkpoints taking Fashion-MNIST images; skipped")
    path = write_report(analyse_layers(moe_model, widths), args.out,
                        f"moee analysis of {args.checkpoint}", by_class, names)
    print(f"Report: {path} (figures beside it)")
    return 0
