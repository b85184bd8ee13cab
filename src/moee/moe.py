"""The MoE MLP: a drop-in for a dense `fc2(act(fc1(x)))` with top-1 routed experts.

Weights are the pruned union of every expert's neurons (`fc1`, `fc2` over U kept neurons);
each expert is an index set into that union, so overlapping experts share weights. Eval mode
under no_grad runs the inference engine (`moee.engine`); otherwise a differentiable path.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from moee.engine import (
    ExecutionConfig,
    InferenceWeights,
    build_inference_weights,
    compiled_cache,
    derived_bytes,
    first_weights,
    route,
    router_weights,
    routing_dtype,
    run_experts,
    run_grouped,
    run_masked,
    run_one_expert,
    slice_expert,
)
from moee.engine.traced import is_exporting, run_traced, traced_route
from moee.moe_reference import reference_forward

_RUN = {"experts": run_experts, "masked": run_masked, "grouped": run_grouped}


class MoEMLP(nn.Module):
    """Router -> group tokens by expert -> per-expert matmuls on their neurons only -> scatter.

    Buffers (all in `state_dict`): `router_centres` (k, d) mean MLP input of each expert's
    cluster; `expert_indices` / `expert_offsets` the per-expert index sets into the union;
    `kept_neurons` (U,) the union's neuron ids in the dense MLP; `expert_bias` (k, d_out) each
    expert's left-out-neuron mean output (zeros = the paper's plain experts). `site` names the
    dense block replaced; `execution_config` says how it runs. `gate` (gated MLPs, LLaMA):
    hidden = act(gate(x)) * fc1(x); an expert slices gate, up and down together.
    """

    def __init__(self, fc1: nn.Linear, fc2: nn.Linear, activation: nn.Module,
                 experts: list[torch.Tensor], router_centres: torch.Tensor,
                 kept_neurons: torch.Tensor, metric: str = "cosine",
                 expert_bias: torch.Tensor | None = None, site: str = "",
                 execution_config: ExecutionConfig | None = None,
                 gate: nn.Linear | None = None) -> None:
        super().__init__()
        router_weights(router_centres[:1], metric)  # validates the metric
        if len(experts) != router_centres.shape[0] or not experts:
            raise ValueError(f"{len(experts)} experts but {router_centres.shape[0]} centres")
        union = fc1.out_features
        for i, idx in enumerate(experts):
            if idx.numel() == 0 or int(idx.min()) < 0 or int(idx.max()) >= union:
                raise ValueError(f"expert {i} indexes outside the {union} kept neurons or is empty")
        if gate is not None and gate.weight.shape != fc1.weight.shape:
            raise ValueError(f"gate {tuple(gate.weight.shape)} and up projection "
                             f"{tuple(fc1.weight.shape)} differ in shape")
        self.fc1, self.fc2, self.activation, self.metric, self.site = (
            fc1, fc2, activation, metric, site)
        self.gate = gate
        sizes = torch.tensor([0] + [len(e) for e in experts])
        self.register_buffer("expert_indices", torch.cat(experts).long())
        self.register_buffer("expert_offsets", sizes.cumsum(0))
        self.register_buffer("router_centres", router_centres.float().clone())
        self.register_buffer("kept_neurons", kept_neurons.long().clone())
        bias = torch.zeros(len(experts), fc2.out_features) if expert_bias is None else expert_bias
        self.register_buffer("expert_bias", bias.float().clone())
        self.execution_config = execution_config or ExecutionConfig()
        self.track_load = False
        self.load_counts: torch.Tensor | None = None  # tokens routed per expert while tracking
        self._cache: InferenceWeights | None = None
        self._spans = self._read_spans()

    def __getstate__(self) -> dict:
        """Copies and pickles leave the inference cache (the original's expert copies) behind."""
        return {**self.__dict__, "_cache": None}

    def _read_spans(self) -> list[tuple[int, int]]:
        """(start, size) of each expert's index set as ints (tracers need them to slice)."""
        if self.expert_offsets.is_meta:
            return []
        offsets = self.expert_offsets.tolist()
        return [(a, b - a) for a, b in zip(offsets[:-1], offsets[1:], strict=True)]

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._spans = self._read_spans()

    # ---- structure and settings ----------------------------------------------------------

    @property
    def num_experts(self) -> int:
        return self.router_centres.shape[0]

    def expert_index(self, e: int) -> torch.Tensor:
        """Expert e's neurons, as positions in the union."""
        return self.expert_indices[self.expert_offsets[e] : self.expert_offsets[e + 1]]

    def expert_sizes(self) -> list[int]:
        return self.expert_offsets.diff().tolist()

    def dense_experts(self) -> list[list[int]]:
        """Each expert's neurons as ids in the dense MLP (what checkpoints store)."""
        return [self.kept_neurons[self.expert_index(e)].tolist() for e in range(self.num_experts)]

    def configure(self, **changes) -> None:
        """Replace execution settings, e.g. `layer.configure(execution="masked")`."""
        self.execution_config = dataclasses.replace(self.execution_config, **changes)

    @contextlib.contextmanager
    def configured(self, **changes) -> Iterator[None]:
        """Run the block with other execution settings; the layer's own come back on exit."""
        saved = self.execution_config
        self.configure(**changes)
        try:
            yield
        finally:
            self.execution_config = saved

    def presliced_bytes(self) -> int:
        """Extra memory the pre-sliced expert copies take (0 in gather mode)."""
        if not self._presliced():
            return 0
        per_neuron = self.fc1.in_features + 1 + self.fc2.out_features
        return sum(self.inference_weights().widths) * per_neuron * self.fc1.weight.element_size()

    def cache_bytes(self) -> int:
        """Memory the built inference cache holds beyond the layer's own tensors (expert
        copies, the gated first matrix, "masked"'s union copies, oneDNN-blocked expert copies;
        0 before the first call)."""
        if self._cache is None:
            return 0
        own = {t.data_ptr() for t in [*self.parameters(), *self.buffers()]}
        return derived_bytes(self._cache, own)

    # ---- inference weights ---------------------------------------------------------------

    def _cache_key(self) -> tuple:
        """Identity, storage and version of every tensor inference derives from; plain dict
        reads instead of module attribute lookups because this runs on every call."""
        mods, bufs = self._modules, self._buffers
        p1, p2 = mods["fc1"]._parameters, mods["fc2"]._parameters
        gate = mods.get("gate")
        pg = gate._parameters if gate is not None else {}
        tensors = (p1["weight"], p1.get("bias"), p2["weight"], p2.get("bias"),
                   bufs["expert_bias"], bufs["router_centres"], bufs["expert_indices"],
                   pg.get("weight"), pg.get("bias"))
        try:
            versions = tuple(-1 if t is None else t._version for t in tensors)
        except RuntimeError:  # inference tensors (made under inference_mode) have no counter
            versions = ()
        # `.data = ...` swaps a tensor's storage, keeping its id and maybe its version
        storages = tuple(0 if t is None else t.data_ptr() for t in tensors)
        w1 = tensors[0]
        return (versions, *map(id, tensors), id(mods["activation"]), storages, w1.device,
                w1.dtype, self._presliced(), self.execution_config.width_multiple)

    def _presliced(self) -> bool:
        """Whether the cache holds expert copies: not for a layer that runs the union."""
        return self.execution_config.presliced and self.execution_config.execution != "union"

    def inference_weights(self) -> InferenceWeights:
        """The derived inference weights, rebuilt when a tensor they come from is replaced or
        updated in place, or the device, dtype or slicing settings change. Under torch.compile
        the last eager call's cache is read (storage pointers cannot be traced)."""
        if torch.compiler.is_compiling():
            return compiled_cache(self._cache)
        key = self._cache_key()
        if self._cache is None or self._cache.key != key:
            self._spans = self._read_spans()
            indices = [self.expert_index(e) for e in range(self.num_experts)]
            self._cache = build_inference_weights(
                key, self.fc1, self.fc2, self.gate, self.activation, indices, self.router_centres,
                self.expert_bias, self.metric, self._presliced(),
                self.execution_config.width_multiple)
        return self._cache

    # ---- routing and forward -------------------------------------------------------------

    def route(self, x: torch.Tensor) -> torch.Tensor:
        """(N, d) -> (N,) expert id, scored in `routing_dtype` (fp32 for bf16/fp16 models)."""
        if not self.training and x.dtype == self.fc1.weight.dtype:
            return route(x, self.inference_weights().router)
        return route(x, router_weights(self.router_centres.to(routing_dtype(x.dtype)),
                                       self.metric))

    def _track(self, expert: torch.Tensor) -> None:
        if self.track_load:
            c = torch.bincount(expert, minlength=self.num_experts).detach().cpu()
            self.load_counts = c if self.load_counts is None else self.load_counts + c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, d = x.shape[:-1], x.shape[-1]
        tokens = x.reshape(-1, d)  # (N, d)
        if is_exporting():
            y = self._forward_traced(tokens)
        elif self.training:
            y = self._forward_train(tokens)
        elif torch.is_grad_enabled() and (x.requires_grad or self.fc1.weight.requires_grad):
            # eval with autograd on: the same function, differentiably (the engine drops grads)
            union = self.execution_config.execution == "union"
            y = self._forward_union(tokens) if union else self._forward_train(tokens)
        else:
            with torch.no_grad():
                y = self._forward_inference(tokens)
        return y.reshape(*lead, y.shape[-1])

    def _forward_union(self, tokens: torch.Tensor) -> torch.Tensor:
        """The pruned union run densely, no routing (a different function: the speed
        fallback; when one expert holds the whole union it is that expert, offset included)."""
        if self.gate is not None:
            out = self.fc2(self.activation(self.gate(tokens)) * self.fc1(tokens))
        else:
            plain = torch.compiler.is_compiling() or is_exporting() or torch.is_grad_enabled()
            act = self.activation if plain else self.inference_weights().activation_
            out = self.fc2(act(self.fc1(tokens)))
        whole = len(self._spans) == 1 and self._spans[0][1] == self.fc2.in_features
        return out + self.expert_bias[0].to(out.dtype) if whole else out

    def _forward_traced(self, tokens: torch.Tensor) -> torch.Tensor:
        """What an exporter traces: the routing inside the graph (`moee.engine.traced`), in
        the form the layer's execution names ("masked", "union", else per-expert gather)."""
        config, spans = self.execution_config, self._spans
        if config.execution == "union":
            return self._forward_union(tokens)
        if not spans:
            raise RuntimeError(f"{self.site or 'MoEMLP'}: its expert index sets are not loaded "
                               "(meta tensors): load the weights before exporting")
        w1, b1 = first_weights(self.fc1, self.gate)
        out_bias = self.expert_bias.to(tokens.dtype)
        out_bias = out_bias + self.fc2.bias if self.fc2.bias is not None else out_bias
        router = router_weights(self.router_centres.to(routing_dtype(tokens.dtype)), self.metric)
        expert = traced_route(tokens, router) if len(spans) > 1 else None
        return run_traced(tokens, expert, w1, b1, self.fc2.weight, out_bias,
                          self.expert_indices, spans, self.activation, self.gate is not None,
                          "masked" if config.execution == "masked" else "gather")

    def _forward_inference(self, tokens: torch.Tensor) -> torch.Tensor:
        config = self.execution_config
        if config.execution == "union":
            return self._forward_union(tokens)
        w = self.inference_weights()
        expert = route(tokens, w.router)  # (N,)
        self._track(expert)
        if tokens.shape[0] == 1 and config.execution == "experts":
            # decoding: the loop's counting and sorting measured about a tenth of this call
            return run_one_expert(tokens, int(expert), w)
        mode, threshold = config.execution, config.small_batch_tokens
        if threshold is None:
            threshold = w.default_small_batch_tokens
        if mode == "experts" and 0 < tokens.shape[0] <= threshold:  # (one token: above)
            mode = "masked"
        return _RUN[mode](tokens, expert, w)

    def _forward_train(self, tokens: torch.Tensor) -> torch.Tensor:
        """Differentiable: expert slices cut from the shared union weights each call, so
        gradients reach them; the same arithmetic as the inference paths."""
        expert = self.route(tokens)
        self._track(expert)
        counts = torch.bincount(expert, minlength=self.num_experts)
        order = torch.argsort(expert)
        w1, b1 = first_weights(self.fc1, self.gate)
        outs = []
        for e, xe in enumerate(tokens[order].split(counts.tolist())):
            w1e, b1e, w2e = slice_expert(w1, b1, self.fc2.weight, self.expert_index(e),
                                         gated=self.gate is not None)
            h = F.linear(xe, w1e, b1e)  # (n_e, m_e), gated (n_e, 2·m_e)
            if self.gate is not None:
                g, u = h.chunk(2, dim=-1)
                h = self.activation(g) * u
            else:
                h = self.activation(h)
            outs.append(F.linear(h, w2e))  # (n_e, d_out)
        y = torch.cat(outs)[torch.argsort(order)]  # back to token order, (N, d_out)
        y = y + self.expert_bias.to(y.dtype)[expert]
        return y + self.fc2.bias if self.fc2.bias is not None else y

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """Slow, obviously-right per-token forward: the oracle the tests compare against."""
        return reference_forward(self, x)

    def extra_repr(self) -> str:
        return (f"site={self.site!r}, gated={self.gate is not None}, experts={self.num_experts}, "
                f"kept_neurons={self.fc1.out_features}, sizes={self.expert_sizes()}, "
                f"metric={self.metric}, {self.execution_config}")


def moe_layers(model: nn.Module) -> dict[str, MoEMLP]:
    """Every MoEMLP in `model`, by module path."""
    return {n: m for n, m in model.named_modules() if isinstance(m, MoEMLP)}
