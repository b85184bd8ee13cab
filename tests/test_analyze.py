"""`moee analyze`: the numbers behind the figures, and the HTML report opened in headless
Chromium (when installed; CI installs it) to prove every figure renders."""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
from conftest import tiny_moe_model
from test_cli import EXTRACT_ARGS, work  # noqa: F401 - the module-scoped fixture

pytest.importorskip("matplotlib")

from moee.cli import main  # noqa: E402
from moee_lab.analysis import analyse_layers, routing_by_class  # noqa: E402


@pytest.fixture
def tiny_moe():
    return tiny_moe_model()


def test_layer_numbers_match_the_experts(tiny_moe):
    layers = analyse_layers(tiny_moe, {})
    for la, m in zip(layers, tiny_moe.moe_layers().values(), strict=True):
        experts = [set(e) for e in m.dense_experts()]
        assert la.expert_sizes == [len(e) for e in experts]
        assert la.kept == len(set().union(*experts))
        j = len(experts[0] & experts[1]) / len(experts[0] | experts[1])
        assert la.neuron_overlap[0, 1] == pytest.approx(j)
        np.testing.assert_allclose(np.diag(la.centre_similarity), 1.0, atol=1e-6)


def test_routing_by_class_is_a_share_per_class(tiny_moe):
    x = torch.randn(12, 1, 8, 8)
    y = torch.tensor([0, 1, 2] * 4)
    shares = routing_by_class(tiny_moe, [(x[:6], y[:6]), (x[6:], y[6:])], 3)
    for m in tiny_moe.moe_layers().values():
        s = shares[m.site]
        assert s.shape == (3, m.num_experts)
        np.testing.assert_allclose(s.sum(1), 1.0)


def test_analyze_writes_a_report_that_renders(work, tmp_path):  # noqa: F811
    ckpt = tmp_path / "moe"
    assert main(["extract", "--model", str(work["dense"]), "--out", str(ckpt),
                 "--data-dir", str(work["data"]), *EXTRACT_ARGS]) == 0
    out = tmp_path / "analysis"
    assert main(["analyze", str(ckpt), "--dense", str(work["dense"]), "--out", str(out),
                 "--data-dir", str(work["data"]), "--images", "32"]) == 0
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["centre_similarity.png", "neuron_overlap.png", "routing_by_class.png",
                    "sizes.png"]
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no Chromium here: the page was written but not opened")
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                          "--virtual-time-budget=5000", "--dump-dom",
                          (out / "report.html").as_uri()],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    assert re.search(r"<title>figures loaded: 4</title>", dom), dom[:300]
