"""The analysis as PNGs plus one HTML file that embeds them (base64), readable offline."""

from __future__ import annotations

import base64
import html
from pathlib import Path

import numpy as np

from moee_lab.analysis.collect import LayerAnalysis
from moee_lab.analysis.figures import matrix_figure, sizes_figure

# Sets the page title to how many figures decoded, so a headless browser can prove it.
_CHECK = ("<script>window.addEventListener('load', () => { const n = [...document.images]"
          ".filter(i => i.naturalWidth > 0).length; document.title = 'figures loaded: ' + n; "
          "});</script>")


def _table(layers: list[LayerAnalysis], load: dict[str, list[float]] | None) -> str:
    head = ("<tr><th>layer</th><th>experts</th><th>expert sizes</th><th>kept</th>"
            "<th>pruned</th><th>active neurons / token</th></tr>")
    rows = []
    for la in layers:
        share = (load or {}).get(la.site)
        active = "–" if share is None else f"{float(np.dot(share, la.expert_sizes)):.0f}"
        rows.append(f"<tr><td>{html.escape(la.site)}</td><td>{len(la.expert_sizes)}</td>"
                    f"<td>{', '.join(map(str, la.expert_sizes))}</td><td>{la.kept}</td>"
                    f"<td>{la.pruned} of {la.dense_width}</td><td>{active}</td></tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def write_report(layers: list[LayerAnalysis], out: str | Path, title: str,
                 by_class: dict[str, np.ndarray] | None = None,
                 class_names: list[str] | None = None) -> Path:
    """Write sizes.png, centre_similarity.png, neuron_overlap.png (and routing_by_class.png
    with `by_class`) and report.html embedding them under `out`; returns the HTML's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    titles = [f"layer {i}: {la.site}"[-40:] for i, la in enumerate(layers)]
    figures = [
        ("Expert sizes and pruned neurons", sizes_figure(layers, out / "sizes.png")),
        ("Cosine similarity of router centres", matrix_figure(
            [la.centre_similarity for la in layers], titles, out / "centre_similarity.png",
            -1.0, "expert", "expert")),
        ("Neuron overlap between experts (Jaccard)", matrix_figure(
            [la.neuron_overlap for la in layers], titles, out / "neuron_overlap.png", 0.0,
            "expert", "expert")),
    ]
    load = None
    if by_class:
        mats = [by_class[la.site] for la in layers]
        figures.append(("Share of each class's tokens routed to each expert", matrix_figure(
            mats, titles, out / "routing_by_class.png", 0.0, "expert", "class")))
        load = {la.site: by_class[la.site].mean(0).tolist() for la in layers}
    parts = [f"<h1>{html.escape(title)}</h1>", _table(layers, load)]
    if class_names:
        parts.append("<p>Classes: " + ", ".join(f"{i} {html.escape(c)}"
                                                for i, c in enumerate(class_names)) + "</p>")
    for name, path in figures:
        data = base64.b64encode(path.read_bytes()).decode()
        parts.append(f"<h2>{html.escape(name)}</h2><img alt='{html.escape(name)}' "
                     f"src='data:image/png;base64,{data}'>")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
            "</title><style>body{font-family:sans-serif;margin:2em} table{border-collapse:"
            "collapse} td,th{border:1px solid #ccc;padding:3px 8px} img{max-width:100%}</style>"
            f"{_CHECK}</head><body>{''.join(parts)}</body></html>")
    path = out / "report.html"
    path.write_text(page)
    return path
