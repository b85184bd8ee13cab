"""The MoE MLP: a drop-in for a dense `fc2(act(fc1(x)))` with top-1 routed experts.

Weights are the pruned union of every expert's neurons (`fc1`, `fc2` over U kept neurons);
each expert is an index set into that union, so overlapping experts share weights.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moee.config import ROUTER_METRICS

# How a MoEMLP runs its tokens. The first three compute the same function (each token gets
# only its expert's neurons); "union" is the approximate speed fallback.
#   "experts": tokens sorted by expert, two matmuls per expert on its own neurons. At or below
#              `small_batch_tokens` tokens it runs "masked" instead, where per-expert call
#              overhead would cost more than the saved arithmetic.
#   "masked":  every union neuron for every token, hidden multiplied by the expert's 0/1 mask:
#              five kernel calls whatever the number of experts (fast for a handful of tokens).
#   "grouped": one `torch.nn.functional.grouped_mm` per projection over expert weights padded to
#              the largest expert; token counts stay on the device (no host sync), for GPUs and
#              CUDA graphs.
#   "union":   the pruned union of all experts' neurons run densely for every token, without
#              routing: the per-layer fallback when routing would make the layer slower.
EXECUTIONS = ("experts", "masked", "grouped", "union")
# Tokens per expert at which a small GEMM (addmm) runs at about half its large-batch speed per
# token, measured on this project's CPUs; drives the default `small_batch_tokens`.
#   fp32: ~32 on AVX2 and on AVX-512 alike.
#   bf16/fp16 through AMX tiles: every call pays a fixed cost of tens of microseconds, and the
#     loop's other per-token work (routing, sort, gathers, bf16 elementwise) weighs more against
#     narrow GEMMs: HALF_SPEED_TOKENS_AMX at AMX_REFERENCE_WIDTH, times (768 / width)^1.5, and
#     the loop never below AMX_MIN_TOKENS_PER_EXPERT tokens per expert. An empirical fit to the
#     loop-vs-masked choices measured in bf16 on machine C (the side that measured faster in
#     every case): DeiT-base-sized (width 768) at 197 tokens, masked with 8 experts (whole-model
#     layers and the 25% / 50% blocks), the loop with 2-4; embedded default (width 192), masked
#     at 1,088 tokens (by 15-40%), the loop at 4,352. The earlier rule (128 tokens at 768,
#     scaled by 1/width) sent the 2-4-expert DeiT layers to masked: side by side, the bf16
#     DeiT-base-sized model ran 1.02x of dense at 1 image with it, 1.06x with this one.
HALF_SPEED_TOKENS_FP32 = 32
HALF_SPEED_TOKENS_AMX = 64
AMX_REFERENCE_WIDTH = 768
AMX_WIDTH_EXPONENT = 1.5
AMX_MIN_TOKENS_PER_EXPERT = 48
HALF_SPEED_TOKENS_LOW_PRECISION = 8
FLAT_ACTIVATION_MAX_ELEMENTS = 2**20  # above this, the activation runs per expert (see below)
# Expert weight copies are zero-padded to a multiple of this many neurons: a GEMM whose output
# width is not a multiple of 16 ran 12-20% slower per neuron on CPU (544 tokens x 192 -> 239
# vs 240 neurons), and the padded embedded default ran 4-6% faster end to end at 64-256 images.
# Padded neurons have zero weights in and out, so they add nothing to the output.
EXPERT_WIDTH_MULTIPLE = 16


def router_weights(centres: torch.Tensor, metric: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(k, d) matrix W and optional (k,) offset b such that argmax(x @ W.T + b) is the route.

    Cosine: argmax x·c/|c| (|x| does not change the argmax); Euclidean: argmin |x-c|^2 =
    argmax x·c - |c|^2/2. Kept (k, d) for F.linear: with few experts that layout measured
    3.5x faster on CPU than x @ (d, k).
    """
    if metric == "cosine":
        return F.normalize(centres, dim=-1).contiguous(), None
    return centres.contiguous(), -0.5 * (centres * centres).sum(-1)


def routing_dtype(dtype: torch.dtype) -> torch.dtype:
    """Routing runs in at least fp32, whatever the model's dtype.

    Why: a bf16 score has 8 bits of mantissa, so near-ties between experts flip with the
    rounding and the route drifts from the fp32 one extraction measured (`api.route_tokens`).
    Cost on an AMX CPU, embedded default (d = 192) in bf16: faster up to ~136 tokens (AMX's
    per-call cost; 17 tokens 8 vs 23 us), slower past that where casting the tokens dominates
    (1,088 tokens 52 vs 40 us, 4,352 tokens 214 vs 98 us).
    """
    return torch.promote_types(dtype, torch.float32)


def top1(scores: torch.Tensor) -> torch.Tensor:
    """Index of each row's largest score (first one on ties, like argmax). On CPU, argmax over
    a short last dim is slow for many rows (1088 x 29 scores: 94 us vs 26 us for max().indices)
    while max() has a fixed ~4 us cost that argmax beats for a few scores."""
    return scores.argmax(-1) if scores.numel() < 2048 else scores.max(-1).indices


def inplace_activation(act: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """An in-place function computing `act` exactly, or None when none is known.

    Why: the expert loop applies the activation to a hidden buffer it owns; in place it skips
    allocating (and page-faulting) a second buffer of the same size and one pass over memory:
    10-15% faster per MoE layer of the embedded default at 64-256 images. Covers torch's ReLU,
    SiLU and GELU (also transformers' GELUActivation, which wraps F.gelu); checked against the
    module on a probe, so a subclass that changes the function falls back to out of place.
    """
    if isinstance(act, nn.ReLU):
        fn = F.relu_
    elif isinstance(act, nn.SiLU):
        fn = functools.partial(F.silu, inplace=True)
    elif isinstance(act, nn.GELU):
        fn = functools.partial(torch._C._nn.gelu_, approximate=act.approximate)
    elif getattr(act, "act", None) is F.gelu:  # transformers.activations.GELUActivation
        fn = torch._C._nn.gelu_
    else:
        return None
    probe = torch.linspace(-4, 4, 32).reshape(4, 8)  # fixed values: no draw from the global RNG
    return fn if torch.equal(fn(probe.clone()), act(probe)) else None


@functools.cache
def cpu_has_amx(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies `dtype` (bf16 / fp16) on AMX tiles."""
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return bool(caps.get({torch.bfloat16: "amx_bf16", torch.float16: "amx_fp16"}.get(dtype, "")))


def on_amx(dtype: torch.dtype, device_type: str) -> bool:
    """Whether GEMMs of `dtype` on this device run on AMX tiles (CPU bf16 / fp16 only)."""
    return device_type == "cpu" and dtype != torch.float32 and cpu_has_amx(dtype)


def half_speed_tokens(dtype: torch.dtype, device_type: str = "cpu",
                      width: int = AMX_REFERENCE_WIDTH) -> int:
    """Tokens per expert at which a small GEMM of input width `width` runs at about half its
    large-batch speed."""
    if dtype == torch.float32:
        return HALF_SPEED_TOKENS_FP32
    if on_amx(dtype, device_type):
        scale = (AMX_REFERENCE_WIDTH / width) ** AMX_WIDTH_EXPONENT
        return max(HALF_SPEED_TOKENS_FP32, round(HALF_SPEED_TOKENS_AMX * scale))
    return HALF_SPEED_TOKENS_LOW_PRECISION


def default_small_batch_tokens(union: int, sizes: list[int],
                               dtype: torch.dtype = torch.float32,
                               device_type: str = "cpu",
                               width: int = AMX_REFERENCE_WIDTH) -> int:
    """Token count up to which "masked" is expected to beat the expert loop, before any
    calibration. Model: with n tokens per expert a GEMM runs at n / (n + n_half) of full speed,
    so the loop costs N·m·(1 + n_half·k/N) against N·U for masked (m mean expert size, U union,
    k experts); masked wins while N < n_half·k / (U/m - 1). On AMX also while experts would get
    fewer than AMX_MIN_TOKENS_PER_EXPERT tokens on average. One expert: the loop is always a
    plain MLP on its neurons, never worse."""
    k = len(sizes)
    if k == 1:
        return 0
    spread = union / (sum(sizes) / k) - 1  # how many more neurons masked computes per token
    n_half = half_speed_tokens(dtype, device_type, width)
    threshold = int(n_half * k / max(spread, 0.125))
    if on_amx(dtype, device_type):
        threshold = max(threshold, AMX_MIN_TOKENS_PER_EXPERT * k - 1)
    return threshold


# "masked" silences the neurons outside a token's expert by adding this to their fc1 bias: the
# activation of (x·w + b + MASK_OFFSET) is exactly 0 for GELU, ReLU, SiLU and the like
# whenever |x·w + b| < 10^4 (checked per activation; others multiply by a 0/1 mask instead).
# Replacing the (N, U) multiply by a bias measured 5-12% faster per masked layer in bf16 and
# 2-10% in fp32 (embedded default, 1-64 images).
MASK_OFFSET = -3e4

COMPILE_NEEDS_EAGER_CALL = (
    "MoEMLP under torch.compile reads inference weights built by an eager call: run the model "
    "once (same execution, dtype and device) before compiling it, and compile again after "
    "changing its weights")


def _compiled_cache(value):
    """What compiled code reads instead of (re)building a cache: the eager-built value."""
    if value is None:
        raise RuntimeError(COMPILE_NEEDS_EAGER_CALL)
    return value


_workspace = threading.local()  # per thread: scratch buffers reused across calls (see below)


def scratch(name: str, numel: int, like: torch.Tensor) -> torch.Tensor:
    """A 1-D buffer of `numel` elements of `like`'s dtype and device, reused across calls.

    Why: PyTorch's CPU allocator returns large blocks to the OS, so a fresh buffer of tens of
    MB page-faults on every forward; reusing the expert loop's sorted-token, hidden and output
    buffers measured 12-19% faster on a DeiT-base-sized block (6,304-25,216 tokens). Kept per
    thread (two threads never share one) and per inference mode (an inference-mode tensor cannot
    be written outside it); grows to the largest call. CUDA's caching allocator already reuses
    memory, so other devices get a fresh tensor. `clear_workspace()` frees the buffers.
    """
    if like.device.type != "cpu":
        return like.new_empty(numel)
    buffers = _workspace.__dict__.setdefault("buffers", {})
    key = (name, like.dtype, torch.is_inference_mode_enabled())
    buf = buffers.get(key)
    if buf is None or buf.numel() < numel:
        buffers.pop(key, None)  # free the smaller one first: peak memory stays one buffer
        buf = buffers[key] = like.new_empty(numel)
    return buf[:numel]


def workspace_bytes() -> int:
    """Bytes of scratch buffers this thread keeps between calls."""
    return sum(b.numel() * b.element_size()
               for b in _workspace.__dict__.get("buffers", {}).values())


def clear_workspace() -> None:
    """Free this thread's scratch buffers (they are rebuilt on the next call)."""
    _workspace.__dict__.pop("buffers", None)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def expert_width(size: int, multiple: int = EXPERT_WIDTH_MULTIPLE) -> int:
    """Neurons an expert's weight copies hold: its size rounded up to `multiple`."""
    return round_up(size, multiple)


@contextlib.contextmanager
def kept_settings(layers: Iterable[MoEMLP], *names: str) -> Iterator[None]:
    """Restore the named attributes (e.g. "execution", "small_batch_tokens") of every layer on
    exit, whatever the body set them to: for measurements that try other settings."""
    saved = [(layer, {n: getattr(layer, n) for n in names}) for layer in layers]
    try:
        yield
    finally:
        for layer, values in saved:
            for n, v in values.items():
                setattr(layer, n, v)


def _pad8(n: int) -> int:
    return round_up(n, 8)  # grouped_mm wants row strides that are multiples of 16 bytes


@dataclass
class InferenceWeights:
    """Everything inference reads, derived once from the parameters (see `MoEMLP._weights`).

    Plain references, so the hot path avoids `nn.Module.__getattr__` (microseconds per lookup,
    which adds up at one-image batch sizes). `experts[e]` = (W1_e (w_e, d), b1_e (w_e,),
    W2_e (d_out, w_e)) as contiguous copies in nn.Linear's (out, in) layout, zero-padded from
    the expert's m_e neurons to w_e = `expert_width(m_e)`, or None when
    `MoEMLP.presliced` is off (then they are gathered from the union each call). The matmuls
    read them transposed, as F.linear does: in bfloat16 on CPU that layout measured 5-15x
    faster than (in, out) copies (fp32: equal).
    """

    key: tuple
    w1: torch.Tensor  # (U, d) union weights, shared with the parameters
    b1: torch.Tensor | None
    w2t: torch.Tensor  # (U, d_out) transposed view of fc2.weight
    sizes: list[int]
    widths: list[int]  # neurons in each expert's (zero-padded) weight copies
    router: tuple[torch.Tensor, torch.Tensor | None]
    out_bias: torch.Tensor  # (k, d_out): fc2 bias + each expert's left-out-neuron offset
    experts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None
    elementwise_activation: bool  # act may run once over all experts' hidden values
    activation_: Callable[[torch.Tensor], torch.Tensor]  # act, in place where it can be
    default_small_batch_tokens: int  # for these weights' dtype (MoEMLP.small_batch_tokens=None)
    # "masked" path, built on its first call: ("bias", (k, U) fc1 bias with MASK_OFFSET on the
    # neurons an expert lacks) or ("mul", (k, U) 0/1 masks) where act(MASK_OFFSET) != 0
    masking: tuple[str, torch.Tensor] | None = None
    padded: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # for "grouped"


class MoEMLP(nn.Module):
    """Router -> group tokens by expert -> per-expert matmuls on their neurons only -> scatter.

    Buffers (all in `state_dict`): `router_centres` (k, d) mean MLP input of each expert's
    cluster; `expert_indices` / `expert_offsets` the concatenated per-expert index sets into the
    union; `kept_neurons` (U,) the union's neuron ids in the original dense MLP.
    """

    def __init__(
        self,
        fc1: nn.Linear,
        fc2: nn.Linear,
        activation: nn.Module,
        experts: list[torch.Tensor],
        router_centres: torch.Tensor,
        kept_neurons: torch.Tensor,
        metric: str = "cosine",
        expert_bias: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if metric not in ROUTER_METRICS:
            raise ValueError(f"metric must be one of {ROUTER_METRICS}, got {metric!r}")
        if len(experts) != router_centres.shape[0] or not experts:
            raise ValueError(f"{len(experts)} experts but {router_centres.shape[0]} centres")
        union = fc1.out_features
        for i, idx in enumerate(experts):
            if idx.numel() == 0 or int(idx.min()) < 0 or int(idx.max()) >= union:
                raise ValueError(f"expert {i} indexes outside the {union} kept neurons or is empty")
        self.fc1, self.fc2, self.activation, self.metric = fc1, fc2, activation, metric
        sizes = torch.tensor([0] + [len(e) for e in experts])
        self.register_buffer("expert_indices", torch.cat(experts).long())
        self.register_buffer("expert_offsets", sizes.cumsum(0))
        self.register_buffer("router_centres", router_centres.float().clone())
        self.register_buffer("kept_neurons", kept_neurons.long().clone())
        # Optional per-expert output offset (k, d_out): the mean contribution of the neurons an
        # expert leaves out (SelectConfig.compensate_mean). Zeros = the paper's plain experts.
        bias = torch.zeros(len(experts), fc2.out_features) if expert_bias is None else expert_bias
        self.register_buffer("expert_bias", bias.float().clone())
        self.execution = "experts"
        # None: `default_small_batch_tokens` for the weights' dtype; an int once calibrated.
        self.small_batch_tokens: int | None = None
        # Pre-sliced per-expert weight copies (fast; costs sum(w_e)/U more weight memory) or
        # index-gather from the shared union weights on every call (no extra memory).
        self.presliced = True
        # Expert copies padded with zero neurons to a multiple of this (1 = no padding; padding
        # is skipped anyway for activations that are not elementwise, where zeros would change
        # the row). `count_macs` sets 1 to count the model, not the padding.
        self.width_multiple = EXPERT_WIDTH_MULTIPLE
        self.track_load = False
        self.load_counts: torch.Tensor | None = None  # tokens routed per expert while tracking
        self._cache: InferenceWeights | None = None

    def __getstate__(self) -> dict:
        """Copies and pickles leave the derived inference cache behind (rebuilt on first use):
        it is megabytes of expert copies, and belongs to the original's tensors."""
        state = self.__dict__.copy()
        state["_cache"] = None
        return state

    @property
    def num_experts(self) -> int:
        return self.router_centres.shape[0]

    def expert_index(self, e: int) -> torch.Tensor:
        return self.expert_indices[self.expert_offsets[e] : self.expert_offsets[e + 1]]

    def expert_sizes(self) -> list[int]:
        return self.expert_offsets.diff().tolist()

    def presliced_bytes(self) -> int:
        """Extra memory the pre-sliced expert copies take (0 when `presliced` is off)."""
        w = self.fc1.weight
        per_neuron = (self.fc1.in_features + 1 + self.fc2.out_features) * w.element_size()
        return sum(self._weights().widths) * per_neuron if self.presliced else 0

    # ---- inference weights -------------------------------------------------------------

    def _cache_key(self) -> tuple:
        """Identity, storage and version of every tensor inference derives from; plain dict
        reads instead of module attribute lookups because this runs on every call."""
        mods, bufs = self._modules, self._buffers
        p1, p2 = mods["fc1"]._parameters, mods["fc2"]._parameters
        tensors = (p1["weight"], p1.get("bias"), p2["weight"], p2.get("bias"),
                   bufs["expert_bias"], bufs["router_centres"])
        try:
            versions = tuple(-1 if t is None else t._version for t in tensors)
        except RuntimeError:  # inference tensors (made under inference_mode) have no counter
            versions = ()
        w1 = tensors[0]
        return (versions, *map(id, tensors), id(mods["activation"]), w1.data_ptr(),
                tensors[2].data_ptr(), w1.device, w1.dtype, self.presliced, self.width_multiple)

    def _weights(self) -> InferenceWeights:
        """Derived inference weights, cached; rebuilt when a parameter or buffer is replaced or
        updated in place, or the device, dtype, `presliced` or `width_multiple` change.

        Under `torch.compile` the cache is read as the last eager call left it: the staleness
        check compares storage pointers, which Dynamo cannot trace (see `_compiled_cache`)."""
        if torch.compiler.is_compiling():
            return _compiled_cache(self._cache)
        key = self._cache_key()
        if self._cache is not None and self._cache.key == key:
            return self._cache
        w1, b1, w2, b2 = self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias
        with torch.no_grad():
            out_bias = self.expert_bias.to(w2.dtype) + (b2 if b2 is not None else 0)
            probe = torch.linspace(-3, 3, 15, dtype=w1.dtype, device=w1.device).reshape(3, 5)
            elementwise = bool(torch.equal(self.activation(probe).reshape(-1),
                                           self.activation(probe.reshape(-1))))
            sizes = self.expert_sizes()
            multiple = self.width_multiple if elementwise else 1
            widths = [expert_width(m, multiple) for m in sizes]
            experts = None
            if self.presliced:
                experts = [self._gather_expert(e, widths[e]) for e in range(self.num_experts)]
            router = router_weights(self.router_centres.to(routing_dtype(w1.dtype)), self.metric)
            w2t = w2.T  # made under no_grad: no autograd view kept in the cache
        self._cache = InferenceWeights(
            key, w1, b1, w2t, sizes, widths, router, out_bias.contiguous(),
            experts, elementwise, self._inplace_activation(),
            default_small_batch_tokens(w1.shape[0], sizes, w1.dtype, w1.device.type,
                                       w1.shape[1]))
        return self._cache

    def _gather_expert(self, e: int, width: int) -> tuple[torch.Tensor, torch.Tensor,
                                                          torch.Tensor]:
        """Expert e's weights as contiguous copies zero-padded to `width` neurons."""
        i = self.expert_index(e)
        w1, b1, w2 = self.fc1.weight, self.fc1.bias, self.fc2.weight
        m = len(i)
        w1e, b1e = w1.new_zeros(width, w1.shape[1]), w1.new_zeros(width)
        w2e = w2.new_zeros(w2.shape[0], width)
        w1e[:m], w2e[:, :m] = w1[i], w2[:, i]
        if b1 is not None:
            b1e[:m] = b1[i]
        return w1e, b1e, w2e

    def _masking(self, cache: InferenceWeights) -> tuple[str, torch.Tensor]:
        """How "masked" silences the neurons a token's expert lacks (see `MASK_OFFSET`)."""
        if torch.compiler.is_compiling():
            return _compiled_cache(cache.masking)
        if cache.masking is None:
            w, b1 = self.fc1.weight, self.fc1.bias
            masks = w.new_zeros(self.num_experts, self.fc1.out_features)
            for e in range(self.num_experts):
                masks[e, self.expert_index(e)] = 1
            far = torch.tensor([MASK_OFFSET * 0.5, MASK_OFFSET, MASK_OFFSET * 1.5],
                               dtype=w.dtype, device=w.device)
            if cache.elementwise_activation and not bool(self.activation(far).any()):
                bias = 0 if b1 is None else b1.detach()
                cache.masking = ("bias", ((masks - 1) * -MASK_OFFSET + bias).contiguous())
            else:
                cache.masking = ("mul", masks)
        return cache.masking

    def _padded(self, cache: InferenceWeights) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """W1 (k, d_pad, m_max), b1 (k, m_max), W2 (k, m_max, d_out_pad), zero-padded (padded
        neurons have zero fc2 rows, so they add nothing whatever act(0) is); the two weights
        are transposed views of (out, in) storage, the layout grouped_mm runs fast in bf16."""
        if torch.compiler.is_compiling():
            return _compiled_cache(cache.padded)
        if cache.padded is None:
            w1, b1, w2 = self.fc1.weight, self.fc1.bias, self.fc2.weight
            k, d, d_out = self.num_experts, self.fc1.in_features, self.fc2.out_features
            m_max = _pad8(max(self.expert_sizes()))
            pw1 = w1.new_zeros(k, m_max, _pad8(d))
            pb1 = w1.new_zeros(k, m_max)
            pw2 = w1.new_zeros(k, _pad8(d_out), m_max)
            for e in range(k):
                i = self.expert_index(e)
                pw1[e, : len(i), :d] = w1[i]
                if b1 is not None:
                    pb1[e, : len(i)] = b1[i]
                pw2[e, :d_out, : len(i)] = w2[:, i]
            cache.padded = (pw1.transpose(1, 2), pb1, pw2.transpose(1, 2))
        return cache.padded

    def _inplace_activation(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """`inplace_activation(self.activation)` or the module itself, remembered per module
        (without building the expert copies a "union" layer does not use)."""
        act = self.activation
        if getattr(self, "_act_inplace", (None,))[0] is not act:
            self._act_inplace = (act, inplace_activation(act) or act)
        return self._act_inplace[1]

    # ---- routing -----------------------------------------------------------------------

    def route(self, x: torch.Tensor) -> torch.Tensor:
        """(N, d) -> (N,) expert id: one (N, d) x (d, k) matmul (see `router_weights`), in
        `routing_dtype` (fp32 for bf16/fp16 models)."""
        if not torch.is_grad_enabled():
            cache = self._weights()
            if x.dtype == cache.w1.dtype:
                return self._route(x, cache)
        dtype = routing_dtype(x.dtype)
        weight, offset = router_weights(self.router_centres.to(dtype), self.metric)
        return top1(F.linear(x.to(dtype), weight, offset))

    @staticmethod
    def _route(tokens: torch.Tensor, c: InferenceWeights) -> torch.Tensor:
        """Inference routing on the cached router (a no-op cast for fp32 tokens)."""
        weight, offset = c.router
        return top1(F.linear(tokens.to(weight.dtype), weight, offset))

    def _track(self, counts: torch.Tensor) -> None:
        if self.track_load:
            c = counts.detach().cpu()
            self.load_counts = c if self.load_counts is None else self.load_counts + c

    # ---- executions --------------------------------------------------------------------

    @torch.compiler.disable  # see the docstring
    def _forward_experts(self, tokens: torch.Tensor, c: InferenceWeights) -> torch.Tensor:
        """No autograd. Tokens sorted by expert; each expert's first matmul (bias fused by
        addmm) writes into one flat hidden buffer, the activation runs once over all of it (per
        expert when the buffer is large), each second matmul writes into one output buffer in
        expert order; one gather restores token order.

        Under torch.compile this loop runs eagerly: its shapes depend on the routing, so Dynamo
        would break the graph at every expert and recompile per layer until it hit its
        recompile limit (embedded default with inductor at 64 / 256 images: compiled MoE 1.09×
        / 1.02× of compiled dense when traced, 1.21× / 1.48× when left eager)."""
        expert = self._route(tokens, c)
        counts_t = torch.bincount(expert, minlength=len(c.sizes))
        self._track(counts_t)
        counts = counts_t.tolist()
        n, widths = tokens.shape[0], c.widths
        act = c.activation_  # in place where it can be: the buffers are ours
        weights = c.experts or [None] * len(widths)
        if max(counts) == n:  # one expert takes every token: no sort, no scatter
            e = counts.index(n)
            w1e, b1, w2e = weights[e] or self._gather_expert(e, widths[e])
            return torch.addmm(c.out_bias[e], act(torch.addmm(b1, tokens, w1e.T)), w2e.T)
        order = torch.argsort(expert)
        grouped = scratch("grouped", tokens.numel(), tokens).view(n, -1)  # sorted by expert
        torch.index_select(tokens, 0, order, out=grouped)
        used = [(e, n_e) for e, n_e in enumerate(counts) if n_e]
        total = sum(n_e * widths[e] for e, n_e in used)
        # One activation call over all experts saves a call per expert; past a few MiB of
        # hidden values that extra pass over memory costs more than the calls it saves.
        flat_act = c.elementwise_activation and total <= FLAT_ACTIVATION_MAX_ELEMENTS
        flat = scratch("hidden", total, tokens)  # every expert's hidden values, in expert order
        spans, activated, start, at = [], [], 0, 0  # span: (expert, W2_e, first token, at)
        for e, n_e in used:
            w1e, b1, w2e = weights[e] or self._gather_expert(e, widths[e])
            h = flat[at : at + n_e * widths[e]].view(n_e, widths[e])
            torch.addmm(b1, grouped[start : start + n_e], w1e.T, out=h)
            if not flat_act:
                activated.append(act(h))
            spans.append((e, w2e, start, at))
            start, at = start + n_e, at + n_e * widths[e]
        if flat_act:
            flat = act(flat)
            activated = [flat[at : at + counts[e] * widths[e]].view(counts[e], widths[e])
                         for e, _, _, at in spans]
        y = scratch("output", n * c.out_bias.shape[1], tokens).view(n, -1)  # in expert order
        for (e, w2e, start, _), h in zip(spans, activated, strict=True):
            torch.addmm(c.out_bias[e], h, w2e.T, out=y[start : start + counts[e]])
        # Back to token order through the inverse permutation, built by one scatter (index_put
        # was slower); gathering rows measured 2x faster than scattering them (index_copy_).
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(n, device=order.device))
        return y.index_select(0, inverse)

    def _forward_masked(self, tokens: torch.Tensor, c: InferenceWeights) -> torch.Tensor:
        expert = self._route(tokens, c)
        if self.track_load:
            self._track(torch.bincount(expert, minlength=len(c.sizes)))
        how, table = self._masking(c)
        if how == "bias":  # the mask rides in fc1's bias: no multiply over (N, U) values
            h = c.activation_(torch.addmm(table.index_select(0, expert), tokens, c.w1.T))
        else:
            h = c.activation_(F.linear(tokens, c.w1, c.b1)).mul_(table.index_select(0, expert))
        return torch.addmm(c.out_bias.index_select(0, expert), h, c.w2t)

    def _forward_grouped(self, tokens: torch.Tensor, cache: InferenceWeights) -> torch.Tensor:
        if not hasattr(F, "grouped_mm"):
            raise NotImplementedError("'grouped' needs torch.nn.functional.grouped_mm "
                                      f"(not in torch {torch.__version__})")
        pw1, pb1, pw2 = self._padded(cache)
        n, d, d_out = tokens.shape[0], self.fc1.in_features, self.fc2.out_features
        expert = self._route(tokens, cache)
        # Counted into a fixed-size vector (bincount's output size depends on the data, which
        # torch.compile cannot capture in one graph).
        counts = expert.new_zeros(self.num_experts).index_add_(0, expert, torch.ones_like(expert))
        self._track(counts)
        order = torch.argsort(expert)
        sorted_expert = expert.index_select(0, order)
        offs = counts.cumsum(0).to(torch.int32)
        x = tokens.new_zeros(n, pw1.shape[1])
        x[:, :d] = tokens.index_select(0, order)
        h = cache.activation_(F.grouped_mm(x, pw1, offs=offs) + pb1.index_select(0, sorted_expert))
        y = F.grouped_mm(h, pw2, offs=offs)[:, :d_out] + cache.out_bias.index_select(
            0, sorted_expert)
        return torch.empty_like(y).index_copy_(0, order, y)

    def _forward_train(self, tokens: torch.Tensor) -> torch.Tensor:
        """Differentiable: expert slices are gathered from the shared union weights each call
        so gradients reach them; same arithmetic as the inference paths."""
        expert = self.route(tokens)
        counts = torch.bincount(expert, minlength=self.num_experts)
        self._track(counts)
        order = torch.argsort(expert)
        w1, b1, w2 = self.fc1.weight, self.fc1.bias, self.fc2.weight
        outs = []
        for e, xe in enumerate(tokens[order].split(counts.tolist())):
            i = self.expert_index(e)
            h = self.activation(F.linear(xe, w1[i], b1[i] if b1 is not None else None))
            outs.append(h @ w2[:, i].T)  # (n_e, d_out)
        y = torch.cat(outs)[torch.argsort(order)]  # back to token order, (N, d_out)
        y = y + self.expert_bias.to(y.dtype)[expert]
        return y + self.fc2.bias if self.fc2.bias is not None else y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.execution == "union":
            if torch.is_grad_enabled():
                return self.fc2(self.activation(self.fc1(x)))
            return self.fc2(self._inplace_activation()(self.fc1(x)))
        if self.execution not in EXECUTIONS:
            raise ValueError(f"execution must be one of {EXECUTIONS}, got {self.execution!r}")
        lead, d = x.shape[:-1], x.shape[-1]
        tokens = x.reshape(-1, d)  # (N, d)
        if torch.is_grad_enabled() and (x.requires_grad or self.fc1.weight.requires_grad):
            self._cache = None
            y = self._forward_train(tokens)
        else:
            cache = self._weights()
            mode = self.execution
            threshold = self.small_batch_tokens
            if threshold is None:
                threshold = cache.default_small_batch_tokens
            if mode == "experts" and tokens.shape[0] <= threshold:
                mode = "masked"
            run = {"experts": self._forward_experts, "masked": self._forward_masked,
                   "grouped": self._forward_grouped}[mode]
            y = run(tokens, cache)
        return y.reshape(*lead, y.shape[-1])

    @torch.no_grad()
    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """Slow, obviously-right per-token forward used by the tests."""
        lead, d = x.shape[:-1], x.shape[-1]
        out = []
        for t in x.reshape(-1, d):
            r = t.to(routing_dtype(t.dtype))
            centres = self.router_centres.to(r.dtype)
            if self.metric == "cosine":
                sim = F.cosine_similarity(r[None], centres, dim=-1)
            else:
                sim = -((r[None] - centres) ** 2).sum(-1)
            e = int(sim.argmax())
            idx = self.expert_index(e)
            h = self.activation(self.fc1.weight[idx] @ t + self.fc1.bias[idx])
            y = self.fc2.weight[:, idx] @ h + self.expert_bias[e].to(h.dtype)
            out.append(y + self.fc2.bias if self.fc2.bias is not None else y)
        return torch.stack(out).reshape(*lead, -1)

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, kept_neurons={self.fc1.out_features}, "
                f"sizes={self.expert_sizes()}, metric={self.metric}, execution={self.execution}, "
                f"small_batch_tokens={self.small_batch_tokens}")
