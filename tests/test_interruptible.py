"""Long clustering runs in a child process: the same labels, errors raised in the parent, and
SIGTERM stops `moee extract` within seconds with its temporary store removed; a min_samples
no token can reach is refused before clustering."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from conftest import fake_dataset

import moee.extraction.cluster as cluster
from moee.config import ClusterConfig
from moee.errors import ConfigError
from moee.extraction.record import ActivationStore
from moee.util.child import run_in_child
from moee.util.stored_array import RowWriter


def _store(tmp_path: Path, x: np.ndarray) -> ActivationStore:
    writer = RowWriter(tmp_path / "layer_0.hidden.npy", np.dtype("float16"), x.shape)
    writer.write(0, x)
    writer.close()
    return ActivationStore(tmp_path, ["l0"], len(x), {})


def test_a_child_clusters_the_same_labels_as_this_process(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(c, 0.3, (300, 12)) for c in (-3, 0, 3)])
    hidden = _store(tmp_path, x).hidden(0)  # a StoredArray: its path goes to the child
    config = ClusterConfig(min_cluster_fraction=0.05, min_samples=5, reduce_dims=6,
                           max_tokens=600, max_clusters=2)
    here = cluster.cluster_layer(hidden, config, seed=3)
    monkeypatch.setattr(cluster, "IN_PROCESS_WORK", 0)
    calls = []
    monkeypatch.setattr(cluster, "run_in_child",
                        lambda *a: calls.append(1) or run_in_child(*a))
    child = cluster.cluster_layer(hidden, config, seed=3)
    assert calls and here.n_clusters == child.n_clusters == 2
    np.testing.assert_array_equal(here.labels, child.labels)
    assert here.stability == child.stability


def test_an_error_in_the_child_is_raised_in_the_parent():
    with pytest.raises(ConfigError, match="from the child"):
        run_in_child(_fail, "from the child")


def _fail(message: str) -> None:
    raise ConfigError(message)


@pytest.mark.parametrize(("n", "stability", "ok"), [(100, False, False), (101, False, True),
                                                     (200, True, False), (202, True, True)])
def test_min_samples_no_token_can_reach_is_refused(n, stability, ok):
    config = ClusterConfig(min_samples=100, stability=stability, min_cluster_fraction=0.1)
    if ok:
        cluster.check_min_samples(config, n)
        return
    with pytest.raises(ConfigError, match="min_samples.*--min-samples"):
        cluster.cluster_layer(np.zeros((n, 4), np.float32), config)


def test_cli_refuses_min_samples_above_tokens_before_loading_anything(tmp_path, capsys):
    from moee.cli import main

    code = main(["extract", "--model", str(tmp_path / "absent"), "--out", str(tmp_path / "o"),
                 "--tokens", "50", "--min-samples", "60", "--no-stability"])
    assert code == 2
    assert "--min-samples" in capsys.readouterr().err


@pytest.mark.slow  # about 18 s on 2 cores: CI runs it (-m "")
def test_sigterm_stops_a_long_clustering_and_removes_the_store(tmp_path):
    """HDBSCAN with min_samples 8000 over 20000 tokens runs for a minute in native code;
    SIGTERM a few seconds into it ends `moee extract` within seconds, store and child gone."""
    data, tmp = tmp_path / "data", tmp_path / "tmp"
    data.mkdir()
    tmp.mkdir()
    fake_dataset(data, 4000)  # 28x28 images, 5 tokens each in the tiny ViT below
    script = ("import sys; sys.path.insert(0, sys.argv[1]); from test_cli import "
              "tiny_fmnist_vit; tiny_fmnist_vit().save_pretrained(sys.argv[2])")
    subprocess.run([sys.executable, "-c", script, str(Path(__file__).parent),
                    str(tmp_path / "dense")], check=True)
    env = {**os.environ, "TMPDIR": str(tmp)}
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("moee")), "extract", "--model",
         str(tmp_path / "dense"), "--data-dir", str(data), "--out", str(tmp_path / "x"),
         "--tokens", "20000", "--min-samples", "8000", "--min-cluster-fraction", "0.05",
         "--reduce-dims", "8", "--no-stability"], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp.glob("moee-*/activations/store.json")):  # recorded: clustering comes next
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    time.sleep(8)  # the child has started, and is in HDBSCAN's native code
    children = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGTERM)
    start = time.monotonic()
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert time.monotonic() - start < 10
    assert "stopped by SIGTERM" in proc.stderr.read()
    assert not list(tmp.glob("moee-*"))
    # the clustering child is joined; helpers (multiprocessing's resource tracker) exit on
    # their own once the parent is gone, later on a loaded machine: a grace, not a minute
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not [c for c in alive if c.status() != psutil.STATUS_ZOMBIE]
