"""`moee` command line: demo, train-base, extract, finetune, evaluate, calibrate, bench.

Thin over the Python API; every default comes from the config dataclasses. moee's own errors
print as one line (exit code 2); anything else shows its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from moee.config import (
    CLUSTER_ALGORITHMS,
    ROUTER_METRICS,
    SELECT_CRITERIA,
    DistillConfig,
    ExtractConfig,
)
from moee.engine import EXECUTIONS
from moee.errors import ConfigError, MoeeError


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", help="folder with the Fashion-MNIST IDX files "
                   "(default: MOEE_DATA_DIR, /usr/share/datasets/fashion-mnist, ~/.cache/moee)")
    p.add_argument("--download", action="store_true",
                   help="download Fashion-MNIST from its official mirror if not found")


def _add_extract_args(p: argparse.ArgumentParser, base: ExtractConfig) -> None:
    c, s = base.cluster, base.select
    p.add_argument("--tokens", type=int, default=base.record.n_tokens,
                   help="tokens to record (default %(default)s)")
    p.add_argument("--p", type=float, default=s.p,
                   help="share of cluster variance kept (default %(default)s)")
    p.add_argument("--algorithm", default=c.algorithm, choices=CLUSTER_ALGORITHMS)
    p.add_argument("--min-cluster-fraction", type=float, default=c.min_cluster_fraction)
    p.add_argument("--min-samples", type=int, default=c.min_samples)
    p.add_argument("--max-experts", type=int, default=c.max_clusters or 0,
                   help="merge the closest clusters until at most this many experts remain "
                   "per layer (not in the paper; default %(default)s, 0 = off)")
    p.add_argument("--reduce-dims", type=int, default=c.reduce_dims or 0,
                   help="PCA dims before clustering (default %(default)s, 0 = off)")
    p.add_argument("--criterion", default=s.criterion, choices=SELECT_CRITERIA)
    p.add_argument("--select-tokens", default=s.tokens, choices=["routed", "cluster"],
                   help="expert statistics over routed tokens or cluster members only (paper)")
    p.add_argument("--no-compensate", action="store_true", default=not s.compensate_mean,
                   help="do not add left-out neurons' mean output back (the paper)")
    p.add_argument("--metric", default=base.router.metric, choices=ROUTER_METRICS)
    p.add_argument("--no-stability", action="store_true", default=not c.stability,
                   help="skip the half-split stability score")
    p.add_argument("--work-dir", help="keep recorded activations and labels here; reused on a "
                   "rerun with the same model, data and settings")
    p.add_argument("--seed", type=int, default=c.seed)


def _extract_config(args: argparse.Namespace) -> ExtractConfig:
    base = args.extract_base
    r = dataclasses.replace
    return r(base, record=r(base.record, n_tokens=args.tokens),
             cluster=r(base.cluster, algorithm=args.algorithm,
                       min_cluster_fraction=args.min_cluster_fraction,
                       min_samples=args.min_samples, reduce_dims=args.reduce_dims or None,
                       stability=not args.no_stability, seed=args.seed,
                       max_clusters=args.max_experts or None),
             select=r(base.select, criterion=args.criterion, p=args.p, tokens=args.select_tokens,
                      compensate_mean=not args.no_compensate),
             router=r(base.router, metric=args.metric), work_dir=args.work_dir)


def _add_kd_args(p: argparse.ArgumentParser) -> None:
    from moee.demo.pipeline import DemoConfig

    d = DistillConfig()
    p.add_argument("--kd-epochs", type=float, default=d.epochs, help="KD epochs (fractions ok)")
    p.add_argument("--kd-lr", type=float, default=d.lr)
    p.add_argument("--kd-batch-size", type=int, default=DemoConfig.kd_batch_size)
    p.add_argument("--device", default=d.device, help="cpu, cuda, ...")


def _distill_config(args: argparse.Namespace) -> DistillConfig:
    return DistillConfig(epochs=args.kd_epochs, lr=args.kd_lr, seed=args.seed, device=args.device)


def _load_dense(spec: str):
    from moee.demo import load_default_model

    if spec == "default":
        return load_default_model()
    from transformers import AutoModelForImageClassification

    try:
        return AutoModelForImageClassification.from_pretrained(spec).eval()
    except OSError as e:
        raise ConfigError(f"model: cannot load {spec!r} as a transformers image classifier "
                          f"({str(e).splitlines()[0]})") from e


def cmd_demo(args: argparse.Namespace) -> int:
    from moee.demo import DemoConfig, run_demo

    run_demo(DemoConfig(extract=_extract_config(args), distill=_distill_config(args),
                        kd_batch_size=args.kd_batch_size, latency_batch=args.latency_batch,
                        seed=args.seed, out=args.out, data_dir=args.data_dir,
                        download=args.download),
             dense=None if args.model == "default" else _load_dense(args.model))
    return 0


def cmd_train_base(args: argparse.Namespace) -> int:
    from moee.demo.train_base import TrainBaseConfig, train_base

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    card = train_base(TrainBaseConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                                      seed=args.seed, device=device),
                      args.out, args.data_dir, args.download)
    print(f"Saved to {args.out}: test top-1 {card['test_top1_fp16_weights']:.2%} "
          f"after {args.epochs} epochs ({card['train_minutes']:.1f} min)")
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    from moee.api import extract
    from moee.demo import load_fashion_mnist
    from moee.demo.pipeline import calibration_batches

    train_x, _ = load_fashion_mnist("train", args.data_dir, args.download)
    moe_model, report = extract(_load_dense(args.model),
                                calibration_batches(train_x, args.seed), _extract_config(args))
    print(f"Extracted in {report.seconds:.0f} s from {report.n_tokens} tokens:\n{report.table()}")
    out = moe_model.save_pretrained(args.out)
    (out / "extraction_report.json").write_text(json.dumps(report.as_dict(), indent=1))
    print(f"Saved MoE checkpoint to {out}")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from moee.demo import TrainingBatches, load_fashion_mnist
    from moee.distill import distill
    from moee.moe_model import MoEModel

    train_x, _ = load_fashion_mnist("train", args.data_dir, args.download)
    student = MoEModel.from_pretrained(args.checkpoint)
    losses = distill(student, _load_dense(args.teacher),
                     TrainingBatches(train_x, args.kd_batch_size, seed=args.seed),
                     _distill_config(args))
    print(f"KD fine-tune: {len(losses)} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    print(f"Saved fine-tuned MoE checkpoint to {student.cpu().save_pretrained(args.out)}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from moee.demo import image_batches, load_fashion_mnist
    from moee.demo.report import comparison_table, measure, time_side_by_side
    from moee.evaluate import evaluate
    from moee.moe_model import MoEModel

    test_x, test_y = load_fashion_mnist("test", args.data_dir, args.download)
    moe_model, dense = MoEModel.from_pretrained(args.checkpoint), _load_dense(args.dense)
    rows = {"dense": measure(dense, test_x, test_y, args.latency_batch),
            "moe": measure(moe_model, test_x, test_y, args.latency_batch)}
    time_side_by_side({"dense": dense, "moe": moe_model}, rows, test_x, args.latency_batch)
    print(comparison_table(rows))
    with moe_model.track_routing():
        evaluate(moe_model, image_batches(test_x, test_y, 500, 2000))
    for row in moe_model.routing_report():
        print(f"{row['site']:<22} {row['experts']:>3} experts, top load "
              f"{max(row['load_share']):.0%}, {row['active_neurons_per_token']:.0f} of "
              f"{row['kept_neurons']} kept neurons active per token")
    if args.json:
        Path(args.json).write_text(json.dumps({k: v.as_dict() for k, v in rows.items()}, indent=1))
        print(f"Results JSON: {args.json}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from moee.api import calibrate
    from moee.demo import load_fashion_mnist, normalize_images
    from moee.moe_model import MoEModel

    moe_model = MoEModel.from_pretrained(args.checkpoint)
    if args.force:
        moe_model.configure(execution=args.force)
        print(f"every MoE layer set to execution={args.force!r}")
    else:
        config = moe_model.config
        shape = (config.num_channels, config.image_size, config.image_size)
        if shape != (1, 28, 28):
            raise ConfigError(f"this checkpoint takes {shape} images; the CLI calibrates on "
                              "Fashion-MNIST only. Use moee.calibrate(model, your_batch) from "
                              "Python.")
        images = normalize_images(load_fashion_mnist("test", args.data_dir, args.download)[0])
        rows = calibrate(moe_model, images[: args.batch])
        print(f"{'layer':<22}{'tokens':>7}{'experts ms':>12}{'union ms':>10}{'kept':>9}"
              f"{'masked up to':>14}")
        for r in rows:
            print(f"{r['site']:<22}{r['tokens']:>7}{r['experts_ms']:>12.3f}{r['union_ms']:>10.3f}"
                  f"{r['execution']:>9}{r['small_batch_tokens']:>11} tok")
    print(f"Saved to {moe_model.save_pretrained(args.out)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from moee.demo.pipeline import DemoConfig, demo_extract_config
    from moee.demo.train_base import TrainBaseConfig

    parser = argparse.ArgumentParser(prog="moee", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo_defaults = DemoConfig()

    demo = sub.add_parser("demo", help="extract, fine-tune and compare the embedded default")
    _add_extract_args(demo, demo_extract_config())
    _add_kd_args(demo)
    demo.add_argument("--model", default="default",
                      help="'default' or a transformers image classifier taking 28x28 grey "
                      "images (dir or hub id)")
    demo.add_argument("--out", default=demo_defaults.out)
    demo.add_argument("--latency-batch", type=int, default=demo_defaults.latency_batch)
    _add_data_args(demo)
    demo.set_defaults(func=cmd_demo, extract_base=demo_extract_config())

    tb = sub.add_parser("train-base", help="train the embedded-default ViT on Fashion-MNIST")
    tb_defaults = TrainBaseConfig()
    tb.add_argument("--epochs", type=int, default=tb_defaults.epochs)
    tb.add_argument("--batch-size", type=int, default=tb_defaults.batch_size)
    tb.add_argument("--lr", type=float, default=tb_defaults.lr)
    tb.add_argument("--seed", type=int, default=tb_defaults.seed)
    tb.add_argument("--device", default="auto")
    tb.add_argument("--out", default="runs/base")
    _add_data_args(tb)
    tb.set_defaults(func=cmd_train_base)

    ex = sub.add_parser("extract", help="turn a dense model into a MoE checkpoint")
    ex.add_argument("--model", default="default",
                    help="'default' or a transformers image classifier (dir or hub id)")
    ex.add_argument("--out", required=True)
    _add_extract_args(ex, ExtractConfig())
    _add_data_args(ex)
    ex.set_defaults(func=cmd_extract, extract_base=ExtractConfig())

    ft = sub.add_parser("finetune", help="knowledge-distil a MoE checkpoint from its dense teacher")
    ft.add_argument("checkpoint")
    ft.add_argument("--teacher", default="default")
    ft.add_argument("--out", required=True)
    ft.add_argument("--seed", type=int, default=DistillConfig().seed)
    _add_kd_args(ft)
    _add_data_args(ft)
    ft.set_defaults(func=cmd_finetune)

    ev = sub.add_parser("evaluate", help="dense vs MoE: top-1, MACs, params, latency")
    ev.add_argument("checkpoint")
    ev.add_argument("--dense", default="default")
    ev.add_argument("--latency-batch", type=int, default=demo_defaults.latency_batch)
    ev.add_argument("--json", help="also write the results here")
    _add_data_args(ev)
    ev.set_defaults(func=cmd_evaluate)

    cal = sub.add_parser("calibrate", help="time each MoE layer's executions at a batch size "
                                           "and keep the fastest (saved with the checkpoint)")
    cal.add_argument("checkpoint")
    cal.add_argument("--batch", type=int, default=demo_defaults.latency_batch,
                     help="images per batch you will serve")
    cal.add_argument("--force", choices=EXECUTIONS, help="set every layer to this instead")
    cal.add_argument("--out", required=True)
    _add_data_args(cal)
    cal.set_defaults(func=cmd_calibrate)
    # Listed for --help; main() hands `moee bench ...` to moee.bench.suite directly.
    sub.add_parser("bench", help="dense vs MoE speed side by side (moee bench --help)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # its own parser: every option passes through untouched
        from moee.bench.suite import main as bench_main

        bench_main(argv[1:])
        return 0
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except MoeeError as e:
        print(f"moee {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
