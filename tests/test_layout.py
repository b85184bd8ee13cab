"""The package's shape: what importing moee loads, and modules small enough to read."""

import ast
import subprocess
import sys
from pathlib import Path

import moee
import moee_lab

SOURCES = [Path(moee.__file__).parent, Path(moee_lab.__file__).parent]


def test_importing_moee_loads_no_demo_harness_or_clustering_module():
    script = ("import sys, moee\n"
              "bad = sorted(m for m in sys.modules if m.startswith(('moee_lab', 'moee.cli', "
              "'sklearn', 'fast_hdbscan', 'matplotlib')))\n"
              "print(','.join(bad))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == ""


def test_no_module_over_300_lines():
    long = {str(p): n for src in SOURCES for p in src.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 300}
    assert long == {}


def test_benchmarks_readme_lists_every_script():
    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    listed = (bench / "README.md").read_text()
    scripts = [p for p in bench.rglob("*") if p.suffix in (".py", ".sh")]
    assert scripts and [p.name for p in scripts if f"`{p.name}`" not in listed] == []


def test_no_function_over_60_lines():
    long = {f"{p.name}:{node.name}": node.end_lineno - node.lineno + 1
            for src in SOURCES for p in src.rglob("*.py")
            for node in ast.walk(ast.parse(p.read_text()))
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            and node.end_lineno - node.lineno + 1 > 60}
    assert long == {}
