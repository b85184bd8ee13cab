"""benchmarks/render_results.py renders every result file: JSON by kind, and the one-off
experiments' printed text results as printed, with the command from their first line."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "render_results.py"


@pytest.fixture(scope="module")
def render_results():
    spec = importlib.util.spec_from_file_location("render_results", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_text_results_are_rendered_with_their_command_newest_first(render_results, tmp_path):
    (tmp_path / "2026-11-28-some-cpu-torch2.13.0-cpu-0123abc-gemm-layout.txt").write_text(
        "# python benchmarks/experiments/gemm_layout.py --repeats 3\nrows  ms\n   8  1.25\n")
    (tmp_path / "2026-11-29-some-cpu-torch2.13.0-cpu-4567def-unknown.json").write_text(
        json.dumps({"meta": {"kind": "nothing-known"}, "result": {}}))
    page = render_results.render(tmp_path)
    text_at = page.index("## 2026-11-28 · gemm-layout · some-cpu")
    assert page.index("## 2026-11-29 · nothing-known") < text_at
    section = page[text_at:]
    assert "python benchmarks/experiments/gemm_layout.py --repeats 3" in section
    assert "```\nrows  ms\n   8  1.25\n```" in section
    assert "- commit: 0123abc" in section and "- torch: 2.13.0-cpu" in section


def test_a_text_result_named_otherwise_is_refused(render_results, tmp_path):
    (tmp_path / "notes.txt").write_text("anything")
    with pytest.raises(SystemExit, match="DATE-MACHINE-torchVERSION-COMMIT-KIND.txt"):
        render_results.render(tmp_path)
