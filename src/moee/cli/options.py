"""The CLI's options and the configs they map onto; every default comes from a config."""

from __future__ import annotations

import argparse
import dataclasses

from moee.config import (
    CLUSTER_ALGORITHMS,
    DISTILL_LOSSES,
    LATENCY_ENGINES,
    METHODS,
    ROUTER_CENTRES,
    ROUTER_METRICS,
    SELECT_CRITERIA,
    CarveConfig,
    DistillConfig,
    ExtractConfig,
    LocalDistillConfig,
)

DEFAULT_BATCH = 64  # images (or text rows) a batch when timing and calibrating
KD_BATCH_SIZE = 128  # examples a distillation step
EXPORT_READY_MAX_EXPERTS = 8  # experts a layer with --export-ready unless --max-experts says


def add_checkpoint_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a directory written by extract / finetune / save_pretrained")
    p.add_argument("--no-verify", action="store_true",
                   help="skip checking the checkpoint against the digests recorded at save")


def count(minimum: int = 1, maximum: int | None = None):
    """An argparse type: an integer >= `minimum` (and <= `maximum`; argparse then exits 2 with
    the option's name instead of a traceback deep in the work)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"must be an integer {bounds}, got {value}")
        return value

    bounds = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
    parse.__name__ = f"integer {bounds}"
    return parse


SEED_MAX = 2**32 - 1  # numpy's and scikit-learn's seeds are 32-bit
SEED = count(0, SEED_MAX)


def positive(text: str) -> float:
    """An argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def fraction(text: str) -> float:
    """An argparse type: a number in (0, 1]."""
    value = positive(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def add_data_args(p: argparse.ArgumentParser, text: bool = False) -> None:
    if text:
        p.add_argument("--data", nargs="+", metavar="PATH",
                       help="text files (tokenized with the model's tokenizer) or one folder "
                       "of images (prepared by the model's image processor); without it, "
                       "Fashion-MNIST images")
        p.add_argument("--seq-len", type=count(1), default=256,
                       help="tokens per text row (default %(default)s)")
        p.add_argument("--image-batch", type=count(1), default=32,
                       help="images per calibration batch from an image folder")
    p.add_argument("--data-dir", help="folder with the Fashion-MNIST IDX files "
                   "(default: MOEE_DATA_DIR, /usr/share/datasets/fashion-mnist, ~/.cache/moee)")
    p.add_argument("--download", action="store_true",
                   help="download Fashion-MNIST from its official mirror if not found")


def add_extract_args(p: argparse.ArgumentParser, base: ExtractConfig) -> None:
    c, s = base.cluster, base.select
    p.add_argument("--tokens", type=count(1), default=base.record.n_tokens,
                   help="tokens to record (default %(default)s)")
    p.add_argument("--store-dtype", default=base.record.dtype, choices=["float16", "float32"],
                   help="activation store precision (float32 for activations beyond 65504)")
    p.add_argument("--p", type=float, default=s.p,
                   help="share of cluster variance kept (default %(default)s)")
    p.add_argument("--algorithm", default=c.algorithm, choices=CLUSTER_ALGORITHMS)
    p.add_argument("--min-cluster-fraction", type=float, default=c.min_cluster_fraction)
    p.add_argument("--min-samples", type=count(1), default=c.min_samples)
    p.add_argument("--max-experts", type=count(0), default=None,
                   help="merge the closest clusters until at most this many experts remain "
                   f"per layer (not in the paper; 0 = off; default {c.max_clusters or 0}, "
                   f"{EXPORT_READY_MAX_EXPERTS} with --export-ready: every expert of an "
                   "export is stored at full width)")
    p.add_argument("--dense-below-stability", type=float, default=c.dense_below_stability,
                   metavar="S", help="keep a layer dense when its cluster stability is below S")
    p.add_argument("--merge-below-stability", type=float, default=c.merge_below_stability,
                   metavar="S", help="give a layer one expert when its stability is below S")
    p.add_argument("--reduce-dims", type=count(0), default=c.reduce_dims or 0,
                   help="PCA dims before clustering (default %(default)s, 0 = off)")
    p.add_argument("--criterion", default=s.criterion, choices=SELECT_CRITERIA)
    p.add_argument("--select-tokens", default=s.tokens, choices=["routed", "cluster"],
                   help="expert statistics over routed tokens or cluster members only (paper)")
    p.add_argument("--no-compensate", action="store_true", default=not s.compensate_mean,
                   help="do not add left-out neurons' mean output back (the paper)")
    p.add_argument("--metric", default=base.router.metric, choices=ROUTER_METRICS)
    _add_reproduce_args(p, base)
    p.add_argument("--no-stability", action="store_true", default=not c.stability,
                   help="skip the half-split stability score")
    p.add_argument("--work-dir", help="keep recorded activations and labels here; reused on a "
                   "rerun with the same model, data and settings")
    p.add_argument("--max-memory", type=float, default=base.max_memory_gib, metavar="GIB",
                   help="memory for clustering a layer; beyond it a subsample is clustered and "
                   "the rest assigned (default: every token)")
    p.add_argument("--method", default="moee", choices=METHODS,
                   help="moee; or a baseline: random (random clusters, neurons and routing), "
                   "static (one set of neurons for every token: structured pruning), "
                   "cmoe (shared + balanced routed neuron groups, top-1), moefication "
                   "(balanced neuron groups, top-k)")
    carve = CarveConfig()
    p.add_argument("--groups", type=count(1), default=carve.experts,
                   help="cmoe / moefication: neuron groups per layer")
    p.add_argument("--active", type=float, default=carve.active, metavar="FRACTION",
                   help="cmoe: share of a layer's neurons one token computes")
    p.add_argument("--top-k", type=count(1), default=None,
                   help="experts one token computes: the union of its k most similar clusters' "
                   f"experts (moee, default 1) or neuron groups (moefication, default "
                   f"{carve.top_k})")
    _add_budget_args(p, base)
    p.add_argument("--seed", type=SEED, default=base.seed,
                   help="seeds every random draw of the extraction: clustering, random "
                   "selection and routing baselines, the router fit, carving, local distillation")


def _add_budget_args(p: argparse.ArgumentParser, base: ExtractConfig) -> None:
    """The MAC and latency budgets: a p per layer instead of one."""
    p.add_argument("--target-macs", type=float, default=base.budget.target_macs,
                   metavar="FRACTION", help="MAC-budget mode: choose p per layer (or keep it "
                   "dense) from measured sensitivity to reach this fraction of the dense MACs; "
                   "--p is then unused")
    p.add_argument("--budget-scope", default=base.budget.scope, choices=["model", "mlp"],
                   help="which MACs --target-macs counts: the whole model's or the MLPs'")
    p.add_argument("--target-latency", type=float, default=base.budget.target_latency,
                   metavar="FRACTION", help="latency-budget mode: per layer dense, static or "
                   "routed, at the p that reaches this fraction of the dense model's latency "
                   "measured in --engine at --batch rows on this machine; --p is then unused")
    p.add_argument("--engine", default=base.budget.engine, choices=LATENCY_ENGINES,
                   help="where --target-latency is measured: the engine you serve with "
                   "(onnxruntime, openvino: pip install 'moee[onnx]')")
    p.add_argument("--latency-methods", nargs="+", choices=["static", "moee"],
                   default=list(base.budget.methods), metavar="METHOD",
                   help="what --target-latency may choose besides dense: static (one expert: "
                   "pruning), moee (routed experts); default both")
    p.add_argument("--batch", type=count(1), default=base.budget.batch,
                   help="rows of the batch --target-latency is measured at (default "
                   "%(default)s)")


def _add_reproduce_args(p: argparse.ArgumentParser, base: ExtractConfig) -> None:
    """The stages that fit the experts to the dense layer's output (docs/method.md, 3b)."""
    p.add_argument("--router", default=base.router.centres, choices=ROUTER_CENTRES,
                   help="input_mean: the cluster means (paper); fitted: a linear router fitted "
                   "to the expert that reproduces each token's dense output best; random")
    p.add_argument("--refit", action=argparse.BooleanOptionalAction,
                   default=base.select.refit_down,
                   help="refit the down projection and offsets by least squares to the dense "
                   "output (ridge toward the original, chosen on held-out tokens)")
    p.add_argument("--export-ready", type=fraction, default=base.select.width, metavar="WIDTH",
                   help="experts a Mixtral export runs without padding: every layer MoE, every "
                   "expert WIDTH of its layer's neurons, no per-expert offsets (--p unused)")
    p.add_argument("--local-steps", type=count(0), default=0, metavar="N",
                   help="layer-local distillation: N Adam steps per MoE layer toward the dense "
                   "MLP's output on the recorded inputs (default 0 = off)")


def _max_experts(args: argparse.Namespace, base: int | None) -> int | None:
    """--max-experts, else the base's cap, else a cap with --export-ready (an uncapped
    SmolLM2-135M export measured 8 GB in f32 against the dense 0.5 GB); 0 = no cap."""
    if args.max_experts is not None:
        return args.max_experts or None
    return base or (EXPORT_READY_MAX_EXPERTS if args.export_ready is not None else None)


def extract_config(args: argparse.Namespace) -> ExtractConfig:
    base = args.extract_base
    r = dataclasses.replace
    return r(base, record=r(base.record, n_tokens=args.tokens, dtype=args.store_dtype),
             cluster=r(base.cluster, algorithm=args.algorithm,
                       min_cluster_fraction=args.min_cluster_fraction,
                       min_samples=args.min_samples, reduce_dims=args.reduce_dims or None,
                       stability=not args.no_stability,
                       max_clusters=_max_experts(args, base.cluster.max_clusters),
                       dense_below_stability=args.dense_below_stability,
                       merge_below_stability=args.merge_below_stability),
             select=r(base.select, criterion=args.criterion, p=args.p, tokens=args.select_tokens,
                      compensate_mean=not args.no_compensate and args.export_ready is None,
                      refit_down=args.refit, width=args.export_ready,
                      refit_offsets=args.export_ready is None),
             router=r(base.router, metric=args.metric, centres=args.router,
                      top_k=1 if args.method == "moefication" else args.top_k or 1),
             local=LocalDistillConfig(steps=args.local_steps)
             if args.local_steps else None,
             budget=r(base.budget, target_macs=args.target_macs, scope=args.budget_scope,
                      target_latency=args.target_latency, engine=args.engine,
                      batch=args.batch, methods=tuple(args.latency_methods)),
             work_dir=args.work_dir, seed=args.seed,
             max_memory_gib=args.max_memory,
             carve=CarveConfig(active=args.active, experts=args.groups,
                               top_k=args.top_k or CarveConfig.top_k)
             if args.method in ("cmoe", "moefication") else None).with_method(args.method)


def add_kd_args(p: argparse.ArgumentParser, batch_size: int = KD_BATCH_SIZE) -> None:
    """The distillation options; `batch_size`: the --kd-batch-size default (the demo passes
    its own config's)."""
    d = DistillConfig()
    p.add_argument("--kd-epochs", type=positive, default=d.epochs, help="KD epochs (fractions ok)")
    p.add_argument("--kd-lr", type=positive, default=d.lr)
    p.add_argument("--kd-loss", choices=DISTILL_LOSSES, default=d.loss,
                   help="auto: KL on logits, else MSE on hidden states; pooled_cosine for "
                        "sentence encoders")
    p.add_argument("--kd-no-dropout", action="store_true",
                   help="train the student without dropout (a deterministic loss)")
    p.add_argument("--kd-batch-size", type=count(1), default=batch_size)
    p.add_argument("--device", default=d.device, help="cpu, cuda, ...")


def distill_config(args: argparse.Namespace) -> DistillConfig:
    return DistillConfig(epochs=args.kd_epochs, lr=args.kd_lr, loss=args.kd_loss, seed=args.seed,
                         dropout=not args.kd_no_dropout,
                         device=args.device)
