"""The CLI's options and the configs they map onto, from one table per config (moee.cli.fields);
every default comes from a config."""

from __future__ import annotations

import argparse

from moee.cli.fields import add_options, build_config, option
from moee.cli.plugins import add_default_data_args
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


def add_data_args(p: argparse.ArgumentParser) -> None:
    """--data and how it is read; and, when the embedded default is installed (moee-lab), the
    options saying where the default's data is."""
    p.add_argument("--data", nargs="+", metavar="PATH",
                   help="text files (tokenized with the model's tokenizer) or one folder "
                   "of images (prepared by the model's image processor); without it, "
                   "the embedded default's data (moee-lab)")
    p.add_argument("--seq-len", type=count(1), default=256,
                   help="tokens per text row (default %(default)s)")
    p.add_argument("--image-batch", type=count(1), default=32,
                   help="images per calibration batch from an image folder")
    add_default_data_args(p)


def _max_experts(value: int | None, args: argparse.Namespace, base: int | None) -> int | None:
    """--max-experts, else the base's cap, else a cap with --export-ready (an uncapped
    SmolLM2-135M export measured 8 GB in f32 against the dense 0.5 GB); 0 = no cap."""
    if value is not None:
        return value or None
    return base or (EXPORT_READY_MAX_EXPERTS if args.export_ready is not None else None)


def _carve(_value, args: argparse.Namespace, _base) -> CarveConfig | None:
    """The neuron groups of the cmoe and moefication baselines (--groups, --active, --top-k)."""
    if args.method not in ("cmoe", "moefication"):
        return None
    return CarveConfig(active=args.active, experts=args.groups,
                       top_k=args.top_k or CarveConfig.top_k)


def _not(value, _args=None, _base=None) -> bool:
    return not value


CARVE = CarveConfig()
# `moee extract`'s (and the demo's) options, in --help's order, and the ExtractConfig fields
# they set (with_method(--method) is applied last).
EXTRACT_OPTIONS = (
    option("--tokens", "record.n_tokens", type=count(1),
           help="tokens to record (default %(default)s)"),
    option("--store-dtype", "record.dtype", choices=["float16", "float32"],
           help="activation store precision (float32 for activations beyond 65504)"),
    option("--p", "select.p", type=float,
           help="share of cluster variance kept (default %(default)s)"),
    option("--algorithm", "cluster.algorithm", choices=CLUSTER_ALGORITHMS),
    option("--min-cluster-fraction", "cluster.min_cluster_fraction", type=float),
    option("--min-samples", "cluster.min_samples", type=count(1)),
    option("--max-experts", "cluster.max_clusters", _max_experts, type=count(0), default=None,
           help=lambda base: "merge the closest clusters until at most this many experts "
           f"remain per layer (not in the paper; 0 = off; default "
           f"{base.cluster.max_clusters or 0}, {EXPORT_READY_MAX_EXPERTS} with --export-ready: "
           "every expert of an export is stored at full width)"),
    option("--dense-below-stability", "cluster.dense_below_stability", type=float,
           metavar="S", help="keep a layer dense when its cluster stability is below S"),
    option("--merge-below-stability", "cluster.merge_below_stability", type=float,
           metavar="S", help="give a layer one expert when its stability is below S"),
    option("--reduce-dims", "cluster.reduce_dims", lambda v, _a, _b: v or None,
           lambda v: v or 0, type=count(0),
           help="PCA dims before clustering (default %(default)s, 0 = off)"),
    option("--criterion", "select.criterion", choices=SELECT_CRITERIA),
    option("--select-tokens", "select.tokens", choices=["routed", "cluster"],
           help="expert statistics over routed tokens or cluster members only (paper)"),
    option("--no-compensate", "select.compensate_mean",
           lambda v, a, _b: not v and a.export_ready is None, _not, action="store_true",
           help="do not add left-out neurons' mean output back (the paper)"),
    option(None, "select.refit_offsets", lambda _v, a, _b: a.export_ready is None),
    option("--metric", "router.metric", choices=ROUTER_METRICS),
    # The stages that fit the experts to the dense layer's output (docs/method.md, 3b)
    option("--router", "router.centres", choices=ROUTER_CENTRES,
           help="input_mean: the cluster means (paper); fitted: a linear router fitted to the "
           "expert that reproduces each token's dense output best; random"),
    option("--refit", "select.refit_down", action=argparse.BooleanOptionalAction,
           help="refit the down projection and offsets by least squares to the dense output "
           "(ridge toward the original, chosen on held-out tokens)"),
    option("--export-ready", "select.width", type=fraction, metavar="WIDTH",
           help="experts a Mixtral export runs without padding: every layer MoE, every "
           "expert WIDTH of its layer's neurons, no per-expert offsets (--p unused)"),
    option("--local-steps", "local",
           lambda v, _a, _b: LocalDistillConfig(steps=v) if v else None, type=count(0),
           default=0, metavar="N", help="layer-local distillation: N Adam steps per MoE "
           "layer toward the dense MLP's output on the recorded inputs (default 0 = off)"),
    option("--no-stability", "cluster.stability", _not, _not, action="store_true",
           help="skip the half-split stability score"),
    option("--work-dir", "work_dir", help="keep recorded activations and labels here; reused "
           "on a rerun with the same model, data and settings"),
    option("--max-memory", "max_memory_gib", type=float, metavar="GIB",
           help="memory for clustering a layer; beyond it a subsample is clustered and the "
           "rest assigned (default: every token)"),
    option("--method", None, default="moee", choices=METHODS,
           help="moee; or a baseline: random (random clusters, neurons and routing), "
           "static (one set of neurons for every token: structured pruning), "
           "cmoe (shared + balanced routed neuron groups, top-1), moefication "
           "(balanced neuron groups, top-k)"),
    option("--groups", None, type=count(1), default=CARVE.experts,
           help="cmoe / moefication: neuron groups per layer"),
    option("--active", None, type=float, default=CARVE.active, metavar="FRACTION",
           help="cmoe: share of a layer's neurons one token computes"),
    option("--top-k", "router.top_k",
           lambda v, a, _b: 1 if a.method == "moefication" else v or 1, type=count(1),
           default=None, help="experts one token computes: the union of its k most similar "
           f"clusters' experts (moee, default 1) or neuron groups (moefication, default "
           f"{CARVE.top_k})"),
    option(None, "carve", _carve),
    # The MAC and latency budgets: a p per layer instead of one
    option("--target-macs", "budget.target_macs", type=float, metavar="FRACTION",
           help="MAC-budget mode: choose p per layer (or keep it dense) from measured "
           "sensitivity to reach this fraction of the dense MACs; --p is then unused"),
    option("--budget-scope", "budget.scope", choices=["model", "mlp"],
           help="which MACs --target-macs counts: the whole model's or the MLPs'"),
    option("--target-latency", "budget.target_latency", type=float, metavar="FRACTION",
           help="latency-budget mode: per layer dense, static or routed, at the p that "
           "reaches this fraction of the dense model's latency measured in --engine at "
           "--batch rows on this machine; --p is then unused"),
    option("--engine", "budget.engine", choices=LATENCY_ENGINES,
           help="where --target-latency is measured: the engine you serve with "
           "(onnxruntime, openvino: pip install 'moee[onnx]')"),
    option("--latency-methods", "budget.methods", lambda v, _a, _b: tuple(v), list,
           nargs="+", choices=["static", "moee"], metavar="METHOD",
           help="what --target-latency may choose besides dense: static (one expert: "
           "pruning), moee (routed experts); default both"),
    option("--batch", "budget.batch", type=count(1),
           help="rows of the batch --target-latency is measured at (default %(default)s)"),
    option("--seed", "seed", type=SEED,
           help="seeds every random draw of the extraction: clustering, random selection "
           "and routing baselines, the router fit, carving, local distillation"),
)

# The distillation's options and the DistillConfig fields they set.
KD_OPTIONS = (
    option("--kd-epochs", "epochs", type=positive, help="KD epochs (fractions ok)"),
    option("--kd-lr", "lr", type=positive),
    option("--kd-loss", "loss", choices=DISTILL_LOSSES,
           help="auto: KL on logits, else MSE on hidden states; pooled_cosine for "
           "sentence encoders"),
    option("--kd-no-dropout", "dropout", _not, _not, action="store_true",
           help="train the student without dropout (a deterministic loss)"),
    option("--kd-batch-size", None, type=count(1), default=KD_BATCH_SIZE),
    option("--device", "device", help="cpu, cuda, ..."),
    option(None, "seed", lambda _v, a, _b: a.seed),  # --seed: the command's own
)


def add_extract_args(p: argparse.ArgumentParser, base: ExtractConfig) -> None:
    add_options(p, EXTRACT_OPTIONS, base)


def extract_config(args: argparse.Namespace) -> ExtractConfig:
    return build_config(args.extract_base, EXTRACT_OPTIONS, args).with_method(args.method)


def add_kd_args(p: argparse.ArgumentParser, batch_size: int = KD_BATCH_SIZE) -> None:
    """The distillation options; `batch_size`: the --kd-batch-size default (the demo passes
    its own config's)."""
    add_options(p, KD_OPTIONS, DistillConfig(), {"--kd-batch-size": batch_size})


def distill_config(args: argparse.Namespace) -> DistillConfig:
    return build_config(DistillConfig(), KD_OPTIONS, args)
