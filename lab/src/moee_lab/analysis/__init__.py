"""`moee analyze`: what a MoE checkpoint is made of and how it routes — per-layer expert sizes,
pruned neurons, router-centre similarity, neuron overlap between experts, and routing per class
— as PNG figures and one self-contained HTML report. The core library never imports this
package; matplotlib comes with moee-lab."""

from moee_lab.analysis.collect import LayerAnalysis, analyse_layers, routing_by_class
from moee_lab.analysis.html import write_report

__all__ = ["LayerAnalysis", "analyse_layers", "routing_by_class", "write_report"]
