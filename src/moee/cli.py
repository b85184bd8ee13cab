"""`moee` command line: demo, train-base, extract, finetune, evaluate (thin over the API)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from moee.moe import EXECUTIONS

DEFAULT_DEMO_OUT = "runs/demo"


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", help="folder with the Fashion-MNIST IDX files "
                   "(default: MOEE_DATA_DIR, /usr/share/datasets/fashion-mnist, ~/.cache/moee)")
    p.add_argument("--download", action="store_true",
                   help="download Fashion-MNIST from its official mirror if not found")


def _add_extract_args(p: argparse.ArgumentParser, tokens: int, p_default: float,
                      max_experts: int | None = None) -> None:
    p.add_argument("--tokens", type=int, default=tokens,
                   help="tokens to record (default %(default)s)")
    p.add_argument("--p", type=float, default=p_default,
                   help="share of cluster variance kept (default %(default)s)")
    p.add_argument("--algorithm", default="hdbscan",
                   choices=["hdbscan", "dbscan", "optics", "kmeans", "birch"])
    p.add_argument("--min-cluster-fraction", type=float, default=0.006)
    p.add_argument("--min-samples", type=int, default=10)
    p.add_argument("--max-experts", type=int, default=max_experts,
                   help="merge the closest clusters until at most this many experts remain "
                   "per layer (not in the paper; default %(default)s, 0 = off)")
    p.add_argument("--reduce-dims", type=int, default=30,
                   help="PCA dims before clustering (0 = off)")
    p.add_argument("--criterion", default="variance", choices=["variance", "magnitude"])
    p.add_argument("--select-tokens", default="routed", choices=["routed", "cluster"],
                   help="expert statistics over routed tokens (default) or cluster members "
                   "only (the paper)")
    p.add_argument("--no-compensate", action="store_true",
                   help="do not add left-out neurons' mean output back (the paper)")
    p.add_argument("--metric", default="cosine", choices=["cosine", "euclidean"])
    p.add_argument("--no-stability", action="store_true",
                   help="skip the half-split stability score")
    p.add_argument("--work-dir",
                   help="keep recorded activations and labels here (reused on rerun)")
    p.add_argument("--seed", type=int, default=0)


def _extract_config(args: argparse.Namespace):
    from moee.config import ClusterConfig, ExtractConfig, RecordConfig, RouterConfig, SelectConfig

    return ExtractConfig(
        record=RecordConfig(n_tokens=args.tokens),
        cluster=ClusterConfig(algorithm=args.algorithm,
                              min_cluster_fraction=args.min_cluster_fraction,
                              min_samples=args.min_samples, reduce_dims=args.reduce_dims or None,
                              stability=not args.no_stability, seed=args.seed,
                              max_clusters=args.max_experts or None),
        select=SelectConfig(criterion=args.criterion, p=args.p, tokens=args.select_tokens,
                            compensate_mean=not args.no_compensate),
        router=RouterConfig(metric=args.metric),
        work_dir=args.work_dir,
    )


def _load_dense(spec: str):
    from moee.default_model import load_default_model

    if spec == "default":
        return load_default_model()
    from transformers import AutoModelForImageClassification

    return AutoModelForImageClassification.from_pretrained(spec).eval()


def _calibration_batches(images: torch.Tensor, seed: int, batch_size: int = 256):
    from moee.data import image_batches

    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    return image_batches(images[perm], None, batch_size)


def _run_extract(dense, args, train_x):
    import moee

    t0 = time.perf_counter()
    moe_model, report = moee.extract(dense, _calibration_batches(train_x, args.seed),
                                     _extract_config(args))
    print(f"\nExtracted in {time.perf_counter() - t0:.0f} s from {report.n_tokens} tokens "
          f"(work dir {report.work_dir}):")
    print(report.table())
    return moe_model, report


def _run_distill(student, teacher, train_x, args):
    from moee.config import DistillConfig
    from moee.distill import distill, image_training_batches

    config = DistillConfig(epochs=args.kd_epochs, lr=args.kd_lr, batch_size=args.kd_batch_size,
                           seed=args.seed, device=getattr(args, "device", "cpu"))
    batches, steps = image_training_batches(train_x, config)
    t0 = time.perf_counter()
    losses = distill(student, teacher, batches, steps, config)
    print(f"KD fine-tune: {steps} steps of {config.batch_size} in "
          f"{time.perf_counter() - t0:.0f} s, loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    return losses


def cmd_demo(args: argparse.Namespace) -> int:
    import copy

    from moee.data import image_batches, load_fashion_mnist
    from moee.default_model import default_model_card, load_default_model
    from moee.evaluate import accuracy, comparison_table, measure, time_side_by_side
    from moee.speed import calibrate_execution

    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.work_dir is None:
        args.work_dir = str(out / "work")
    train_x, _ = load_fashion_mnist("train", args.data_dir, args.download)
    test_x, test_y = load_fashion_mnist("test", args.data_dir, args.download)
    dense = load_default_model()
    card = default_model_card()
    print(f"Embedded default: ViT (6 layers, width 192, MLP 768, patch 7 -> 17 tokens) trained "
          f"on Fashion-MNIST, {card.get('test_top1_fp16_weights', float('nan')):.2%} test top-1")
    moe_model, report = _run_extract(dense, args, train_x)
    before = accuracy(moe_model, test_x, test_y)
    print(f"MoE top-1 before fine-tuning: {before:.2%}")
    _run_distill(moe_model, dense, train_x, args)
    rows = {"dense": measure(dense, test_x, test_y, latency=False),
            "moe (after KD)": measure(moe_model, test_x, test_y, latency=False)}
    with moe_model.track_routing():
        accuracy(moe_model, test_x, test_y, limit=2000)
    routing = moe_model.routing_report()
    # Per-layer fallback: time experts vs the dense pruned union at the latency batch size.
    calibrated = copy.deepcopy(moe_model)
    choice = calibrate_execution(calibrated, next(image_batches(test_x, None,
                                                                args.latency_batch))[0])
    n_union = sum(c["execution"] == "union" for c in choice)
    rows[f"moe calibrated ({n_union} union)"] = measure(calibrated, test_x, test_y,
                                                       latency=False)
    time_side_by_side(dict(zip(rows, (dense, moe_model, calibrated), strict=True)), rows,
                      test_x, args.latency_batch)
    print("\nDense vs MoE on the Fashion-MNIST test set (10,000 images):")
    print(comparison_table(rows))
    moe_model.save_pretrained(out / "moe")
    calibrated.save_pretrained(out / "moe-calibrated")
    results = {
        "dense": rows["dense"].as_dict(), "moe": rows["moe (after KD)"].as_dict(),
        "moe_calibrated": {**rows[f"moe calibrated ({n_union} union)"].as_dict(),
                           "layers": choice},
        "moe_top1_before_kd": before,
        "kd": {"epochs": args.kd_epochs, "lr": args.kd_lr, "batch_size": args.kd_batch_size},
        "extraction": report.as_dict(), "test_routing": routing,
        "seconds": time.perf_counter() - t0, "threads": torch.get_num_threads(),
    }
    path = out / "demo_results.json"
    path.write_text(json.dumps(results, indent=1))
    print(f"\nMoE checkpoints: {out / 'moe'} (routed experts in every layer), "
          f"{out / 'moe-calibrated'} (per-layer fastest path)\nResults JSON: {path}\n"
          f"Demo took {results['seconds'] / 60:.1f} min.")
    return 0


def cmd_train_base(args: argparse.Namespace) -> int:
    from moee.train_base import TrainBaseConfig, train_base

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
    from moee.data import load_fashion_mnist

    train_x, _ = load_fashion_mnist("train", args.data_dir, args.download)
    moe_model, report = _run_extract(_load_dense(args.model), args, train_x)
    out = moe_model.save_pretrained(args.out)
    (out / "extraction_report.json").write_text(json.dumps(report.as_dict(), indent=1))
    print(f"Saved MoE checkpoint to {out}")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    import moee
    from moee.data import load_fashion_mnist

    train_x, _ = load_fashion_mnist("train", args.data_dir, args.download)
    student = moee.load(args.checkpoint)
    _run_distill(student, _load_dense(args.teacher), train_x, args)
    student.cpu()
    print(f"Saved fine-tuned MoE checkpoint to {student.save_pretrained(args.out)}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    import moee
    from moee.data import load_fashion_mnist
    from moee.evaluate import comparison_table, measure, time_side_by_side

    test_x, test_y = load_fashion_mnist("test", args.data_dir, args.download)
    moe_model, dense = moee.load(args.checkpoint), _load_dense(args.dense)
    rows = {"dense": measure(dense, test_x, test_y, latency=False),
            "moe": measure(moe_model, test_x, test_y, latency=False)}
    time_side_by_side({"dense": dense, "moe": moe_model}, rows, test_x, args.latency_batch)
    print(comparison_table(rows))
    from moee.evaluate import accuracy

    with moe_model.track_routing():
        accuracy(moe_model, test_x, test_y, limit=2000)
    for row in moe_model.routing_report():
        print(f"{row['site']:<22} {row['experts']:>3} experts, top load "
              f"{max(row['load_share']):.0%}, {row['active_neurons_per_token']:.0f} of "
              f"{row['kept_neurons']} kept neurons active per token")
    if args.json:
        Path(args.json).write_text(json.dumps({k: v.as_dict() for k, v in rows.items()}, indent=1))
        print(f"Results JSON: {args.json}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    import moee
    from moee.data import load_fashion_mnist, normalize_images
    from moee.speed import calibrate_execution, set_execution

    moe_model = moee.load(args.checkpoint)
    if args.force:
        set_execution(moe_model, args.force)
        print(f"every MoE layer set to execution={args.force!r}")
    else:
        config = moe_model.config
        shape = (config.num_channels, config.image_size, config.image_size)
        if shape != (1, 28, 28):
            raise ValueError(f"this checkpoint takes {shape} images; the CLI calibrates on "
                             "Fashion-MNIST only. Use moee.speed.calibrate_execution(model, "
                             "your_batch) from Python.")
        images = normalize_images(load_fashion_mnist("test", args.data_dir, args.download)[0])
        rows = calibrate_execution(moe_model, images[: args.batch])
        print(f"{'layer':<22}{'tokens':>7}{'experts ms':>12}{'union ms':>10}{'kept':>9}"
              f"{'masked up to':>14}")
        for r in rows:
            print(f"{r['site']:<22}{r['tokens']:>7}{r['experts_ms']:>12.3f}{r['union_ms']:>10.3f}"
                  f"{r['execution']:>9}{r['small_batch_tokens']:>11} tok")
    print(f"Saved to {moe_model.save_pretrained(args.out)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moee", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="extract, fine-tune and compare the embedded default")
    # 8 experts at most: as accurate and as fast as uncapped, with fewer parameters and
    # smaller pre-sliced expert copies (README, "Deviations from the paper").
    _add_extract_args(demo, tokens=20_000, p_default=0.8, max_experts=8)
    _add_kd_args(demo, epochs=1.0, lr=3e-4)
    demo.add_argument("--out", default=DEFAULT_DEMO_OUT)
    demo.add_argument("--latency-batch", type=int, default=64)
    _add_data_args(demo)
    demo.set_defaults(func=cmd_demo)

    tb = sub.add_parser("train-base", help="train the embedded-default ViT on Fashion-MNIST")
    tb.add_argument("--epochs", type=int, default=61)
    tb.add_argument("--batch-size", type=int, default=128)
    tb.add_argument("--lr", type=float, default=1e-3)
    tb.add_argument("--seed", type=int, default=0)
    tb.add_argument("--device", default="auto")
    tb.add_argument("--out", default="runs/base")
    _add_data_args(tb)
    tb.set_defaults(func=cmd_train_base)

    ex = sub.add_parser("extract", help="turn a dense model into a MoE checkpoint")
    ex.add_argument("--model", default="default",
                    help="'default' or a transformers image classifier (dir or hub id)")
    ex.add_argument("--out", required=True)
    _add_extract_args(ex, tokens=100_000, p_default=0.8)
    _add_data_args(ex)
    ex.set_defaults(func=cmd_extract)

    ft = sub.add_parser("finetune", help="knowledge-distil a MoE checkpoint from its dense teacher")
    ft.add_argument("checkpoint")
    ft.add_argument("--teacher", default="default")
    ft.add_argument("--out", required=True)
    ft.add_argument("--seed", type=int, default=0)
    ft.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    _add_kd_args(ft, epochs=1.0, lr=3e-4)
    _add_data_args(ft)
    ft.set_defaults(func=cmd_finetune)

    ev = sub.add_parser("evaluate", help="dense vs MoE: top-1, MACs, params, latency")
    ev.add_argument("checkpoint")
    ev.add_argument("--dense", default="default")
    ev.add_argument("--latency-batch", type=int, default=64)
    ev.add_argument("--json", help="also write the results here")
    _add_data_args(ev)
    ev.set_defaults(func=cmd_evaluate)

    cal = sub.add_parser("calibrate", help="time each MoE layer's executions at a batch size "
                                           "and keep the fastest (saved with the checkpoint)")
    cal.add_argument("checkpoint")
    cal.add_argument("--batch", type=int, default=64, help="images per batch you will serve")
    cal.add_argument("--force", choices=EXECUTIONS, help="set every layer to this instead")
    cal.add_argument("--out", required=True)
    _add_data_args(cal)
    cal.set_defaults(func=cmd_calibrate)
    # Listed for --help; main() hands `moee bench ...` to moee.bench_suite directly.
    sub.add_parser("bench", help="dense vs MoE speed side by side (moee bench --help)")
    return parser


def _add_kd_args(p: argparse.ArgumentParser, epochs: float, lr: float) -> None:
    p.add_argument("--kd-epochs", type=float, default=epochs, help="KD epochs (fractions allowed)")
    p.add_argument("--kd-lr", type=float, default=lr)
    p.add_argument("--kd-batch-size", type=int, default=128)


def main(argv: list[str] | None = None) -> int:
    from moee.api import NoClustersError, ResourceError
    from moee.data import FashionMNISTNotFound
    from moee.io import CheckpointError

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # its own parser: every option passes through untouched
        from moee.bench_suite import main as bench_main

        bench_main(argv[1:])
        return 0
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FashionMNISTNotFound, CheckpointError, NoClustersError, ResourceError,
            ValueError) as e:
        print(f"moee {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
