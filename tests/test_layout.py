"""The package's shape: what importing moee loads, and modules small enough to read."""

import subprocess
import sys
from pathlib import Path

import moee

SRC = Path(moee.__file__).parent


def test_importing_moee_loads_no_demo_harness_or_clustering_module():
    script = ("import sys, moee\n"
              "bad = sorted(m for m in sys.modules if m.startswith(('moee.demo', 'moee.bench', "
              "'moee.cli', 'sklearn', 'fast_hdbscan', 'matplotlib')))\n"
              "print(','.join(bad))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == ""


def test_no_module_over_300_lines():
    long = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 300}
    assert long == {}
