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


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at its top or inside a function (absolute imports)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def imports_of_package(package: str, forbidden: str) -> dict[str, list[str]]:
    root = SOURCES[0] / package
    return {str(p.relative_to(SOURCES[0])): hits for p in root.rglob("*.py")
            if (hits := sorted(m for m in imported_modules(p)
                               if m == forbidden or m.startswith(forbidden + ".")))}


def test_loading_a_checkpoint_never_imports_the_extraction():
    # a checkpoint builds its MoE layers through moee.moe_build, beside the MoE layer
    assert imports_of_package("checkpoint", "moee.extraction") == {}


def test_the_extraction_never_imports_training():
    # the MAC budget's sensitivity uses the distillation losses of moee.losses
    assert imports_of_package("extraction", "moee.training") == {}
