"""What an extraction found per layer and how long it took: `moee.ExtractionReport`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class ExtractionReport:
    """What extraction found per layer and how long it took; `work_dir` holds every stage."""

    layers: list[dict[str, Any]]
    n_tokens: int
    seconds: float
    work_dir: str | None  # None: a temporary store, removed once extraction finished
    config: dict[str, Any] = field(default_factory=dict)
    activations: str = ""  # "recorded" or "reused", and why
    budget: dict[str, Any] = field(default_factory=dict)  # budget mode's choice, if used

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        head = (f"{'layer':<22}{'p':>6}{'experts':>8}{'noise':>7}{'stab.':>7}{'kept':>6}"
                f"{'sizes (min/mean/max)':>22}{'top load':>9}{'act/tok':>8}{'sec':>6}")
        lines = [head]
        for r in self.layers:
            stab = "-" if r["stability"] is None else f"{r['stability']:.2f}"
            if r["experts"] == 0 or "expert_sizes" not in r:  # no cluster, or kept dense
                sizes, top, act = "dense", "-", str(r["hidden"])
            else:
                s = r["expert_sizes"]
                sizes = f"{min(s)}/{sum(s) / len(s):.0f}/{max(s)}"
                top, act = f"{max(r['load_share']):.0%}", f"{r['active_neurons_per_token']:.0f}"
            p = "dense" if r.get("p") is None else f"{r['p']:g}"
            lines.append(f"{r['site']:<22}{p:>6}{r['experts']:>8}{r['noise_fraction']:>7.0%}{stab:>7}"
                         f"{r['kept_neurons']:>6}{sizes:>22}{top:>9}{act:>8}{r['seconds']:>6.1f}")
        if self.budget.get("target_latency") is not None:
            lines.append(_latency_line(self.budget))
        elif self.budget:
            lines.append(f"MAC budget {self.budget['target_macs']:g} of dense "
                         f"({self.budget['scope']}): {self.budget['predicted_fraction']:.3f} "
                         "predicted on the probe batches")
        return "\n".join(lines)


def _latency_line(budget: dict[str, Any]) -> str:
    methods = [c["method"] for c in budget["choice"]]
    mix = ", ".join(f"{methods.count(m)} {m}" for m in ("dense", "static", "moee")
                    if m in methods)
    missed = ("" if budget.get("reached", True) else "; not reached: the fastest choice "
              "measured is kept")
    return (f"latency budget {budget['target_latency']:g} of dense in {budget['engine']} at "
            f"batch {budget['batch']}: measured {budget['measured_fraction']:.3f} ({mix}"
            f"{missed})")
