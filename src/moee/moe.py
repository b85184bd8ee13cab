"""The MoE MLP: a drop-in for a dense `fc2(act(fc1(x)))` with top-1 routed experts.

Weights are the pruned union of every expert's neurons (`fc1`, `fc2` over U kept neurons);
each expert is an index set into that union, so overlapping experts share weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moee.config import ROUTER_METRICS

# How a MoEMLP runs its tokens:
#   "experts": grouped per-expert matmuls (each token computes only its expert's neurons);
#   "union":   the pruned union of all experts' neurons run densely for every token -- the
#              per-layer fallback when routing overhead would make the layer slower than that.
EXECUTIONS = ("experts", "union")


def router_weights(centres: torch.Tensor, metric: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(k, d) matrix W and optional (k,) offset b such that argmax(x @ W.T + b) is the route.

    Cosine: argmax x·c/|c| (|x| does not change the argmax); Euclidean: argmin |x-c|^2 =
    argmax x·c - |c|^2/2. Kept (k, d) for F.linear: with few experts that layout measured
    3.5x faster on CPU than x @ (d, k).
    """
    if metric == "cosine":
        return F.normalize(centres, dim=-1).contiguous(), None
    return centres.contiguous(), -0.5 * (centres * centres).sum(-1)


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
        self.track_load = False
        self.load_counts: torch.Tensor | None = None  # tokens routed per expert while tracking
        self._sliced: tuple | None = None  # (key, per-expert weights) cache for inference

    @property
    def num_experts(self) -> int:
        return self.router_centres.shape[0]

    def expert_index(self, e: int) -> torch.Tensor:
        return self.expert_indices[self.expert_offsets[e] : self.expert_offsets[e + 1]]

    def expert_sizes(self) -> list[int]:
        return self.expert_offsets.diff().tolist()

    def route(self, x: torch.Tensor) -> torch.Tensor:
        """(N, d) -> (N,) expert id: one (N, d) x (d, k) matmul (see `router_weights`)."""
        if not torch.is_grad_enabled() and x.dtype == self.fc1.weight.dtype:
            self._sliced_weights()  # validates the cache (weights, centres, device, dtype)
            weight, offset = self._sliced[2]
        else:
            weight, offset = router_weights(self.router_centres.to(x.dtype), self.metric)
        scores = F.linear(x, weight, offset)  # (N, k)
        return scores.argmax(-1)

    def _sliced_weights(self) -> list[tuple[torch.Tensor, ...]]:
        """Per-expert inference weights, cached as contiguous copies: W1_e^T (d, m),
        b1_e (m,), W2_e^T (m, d_out), and the expert's whole output bias (d_out,) = fc2 bias +
        its left-out-neuron offset. Rebuilt when the weights change (version counters)."""
        w1, b1, w2, b2 = self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias
        key = (w1._version, w2._version, self.expert_bias._version,
               self.router_centres._version, w1.device, w1.dtype, w1.data_ptr(), w2.data_ptr())
        if self._sliced is None or self._sliced[0] != key:
            with torch.no_grad():
                out_bias = self.expert_bias.to(w2.dtype) + (b2 if b2 is not None else 0)
                weights = []
                for e in range(self.num_experts):
                    i = self.expert_index(e)
                    b1e = b1[i] if b1 is not None else w1.new_zeros(len(i))
                    weights.append((w1[i].T.contiguous(), b1e.contiguous(),
                                    w2[:, i].T.contiguous(), out_bias[e].contiguous()))
                router = router_weights(self.router_centres.to(w1.dtype), self.metric)
            self._sliced = (key, weights, router)
        return self._sliced[1]

    def _group(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Route and sort: (expert per token, token order grouped by expert, count per expert)."""
        expert = self.route(tokens)  # (N,)
        counts = torch.bincount(expert, minlength=self.num_experts)  # (k,)
        if self.track_load:
            c = counts.detach().cpu()
            self.load_counts = c if self.load_counts is None else self.load_counts + c
        return expert, torch.argsort(expert), counts.tolist()

    def _forward_inference(self, tokens: torch.Tensor) -> torch.Tensor:
        """No autograd: each expert's two GEMMs (bias fused by addmm) write straight into one
        preallocated buffer in expert order, then one index_copy puts tokens back."""
        weights = self._sliced_weights()
        _, order, counts = self._group(tokens)
        if max(counts) == tokens.shape[0]:  # one expert takes every token: no sort, no scatter
            w1t, b1, w2t, b_out = weights[counts.index(tokens.shape[0])]
            return torch.addmm(b_out, self.activation(torch.addmm(b1, tokens, w1t)), w2t)
        grouped = tokens.index_select(0, order)  # (N, d) grouped by expert
        y_grouped = tokens.new_empty(tokens.shape[0], self.fc2.out_features)  # (N, d_out)
        start = 0
        for n_e, (w1t, b1, w2t, b_out) in zip(counts, weights, strict=True):
            if n_e:
                h = self.activation(torch.addmm(b1, grouped[start : start + n_e], w1t))
                torch.addmm(b_out, h, w2t, out=y_grouped[start : start + n_e])  # (n_e, d_out)
                start += n_e
        return torch.empty_like(y_grouped).index_copy_(0, order, y_grouped)

    def _forward_train(self, tokens: torch.Tensor) -> torch.Tensor:
        """Differentiable: expert slices are gathered from the shared union weights each call
        so gradients reach them; same arithmetic as `_forward_inference`."""
        expert, order, counts = self._group(tokens)
        w1, b1, w2 = self.fc1.weight, self.fc1.bias, self.fc2.weight
        outs = []
        for e, xe in enumerate(tokens[order].split(counts)):
            i = self.expert_index(e)
            h = self.activation(F.linear(xe, w1[i], b1[i] if b1 is not None else None))
            outs.append(h @ w2[:, i].T)  # (n_e, d_out)
        y = torch.cat(outs)[torch.argsort(order)]  # back to token order, (N, d_out)
        y = y + self.expert_bias.to(y.dtype)[expert]
        return y + self.fc2.bias if self.fc2.bias is not None else y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.execution == "union":
            return self.fc2(self.activation(self.fc1(x)))
        lead, d = x.shape[:-1], x.shape[-1]
        tokens = x.reshape(-1, d)  # (N, d)
        if torch.is_grad_enabled() and (x.requires_grad or self.fc1.weight.requires_grad):
            self._sliced = None
            y = self._forward_train(tokens)
        else:
            y = self._forward_inference(tokens)
        return y.reshape(*lead, y.shape[-1])

    @torch.no_grad()
    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """Slow, obviously-right per-token forward used by the tests."""
        lead, d = x.shape[:-1], x.shape[-1]
        out = []
        for t in x.reshape(-1, d):
            if self.metric == "cosine":
                sim = F.cosine_similarity(t[None], self.router_centres.to(t.dtype), dim=-1)
            else:
                sim = -((t[None] - self.router_centres.to(t.dtype)) ** 2).sum(-1)
            e = int(sim.argmax())
            idx = self.expert_index(e)
            h = self.activation(self.fc1.weight[idx] @ t + self.fc1.bias[idx])
            y = self.fc2.weight[:, idx] @ h + self.expert_bias[e].to(h.dtype)
            out.append(y + self.fc2.bias if self.fc2.bias is not None else y)
        return torch.stack(out).reshape(*lead, -1)

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, kept_neurons={self.fc1.out_features}, "
                f"sizes={self.expert_sizes()}, metric={self.metric}, execution={self.execution}")
