"""Stages resume: a rerun in the same work dir reuses what matches (activations, per-layer
clusterings) and redoes what does not; a run killed with SIGKILL at any point leaves a work dir
from which a rerun builds exactly the experts of an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import moee

TESTS = Path(__file__).parent
SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from conftest import blob_images, tiny_vit
import moee
from test_resume import config
images = blob_images(1200)
moee.extract(tiny_vit(), [images[i:i + 100] for i in range(0, 1200, 100)], config({work!r}))
"""


def config(work, p=0.8, **cluster):
    return moee.ExtractConfig(
        record=moee.RecordConfig(n_tokens=6_000),
        cluster=moee.ClusterConfig(**{"min_cluster_fraction": 0.05, "reduce_dims": 8, **cluster}),
        select=moee.SelectConfig(p=p), work_dir=str(work), progress=False)


def run(work, **kw):
    from conftest import blob_images, tiny_vit

    images = blob_images(1200)
    return moee.extract(tiny_vit(), [images[i : i + 100] for i in range(0, 1200, 100)],
                        config(work, **kw))


def experts(moe_model):
    return {name: m.dense_experts() for name, m in moe_model.moe_layers().items()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return experts(run(tmp_path_factory.mktemp("reference"))[0])


def test_rerun_reuses_activations_and_clusterings(tmp_path, reference):
    first = run(tmp_path)[1]
    assert "reused" not in first.activations
    moe_model, again = run(tmp_path)
    assert again.activations.startswith("reused") and "clusterings of 2 of 2 layers reused" in \
        again.activations
    assert experts(moe_model) == reference
    # another p selects again from the same clusterings; another clustering setting reclusters
    assert "clusterings of 2 of 2" in run(tmp_path, p=0.6)[1].activations
    assert "clusterings" not in run(tmp_path, min_samples=3)[1].activations


def test_a_sweep_of_methods_keeps_every_clustering(tmp_path, reference):
    """One clustering per layer and setting: running the static baseline in between does not
    push out the clusterings the default method reuses."""
    run(tmp_path)
    from conftest import blob_images, tiny_vit

    images = blob_images(1200)
    moee.extract(tiny_vit(), [images[i : i + 100] for i in range(0, 1200, 100)],
                 config(tmp_path).with_method("static"))
    moe_model, report = run(tmp_path)
    assert "clusterings of 2 of 2" in report.activations
    assert experts(moe_model) == reference


def test_damaged_clustering_files_are_redone(tmp_path, reference):
    run(tmp_path)
    (labels,) = tmp_path.glob("layer_0.*.labels.npy")
    labels.write_bytes(b"garbage")
    (manifest_file,) = tmp_path.glob("layer_1.*.clustering.json")
    manifest = json.loads(manifest_file.read_text())
    manifest_file.write_text(json.dumps({**manifest, "key": "other"}))
    moe_model, report = run(tmp_path)
    assert "clusterings" not in report.activations
    assert experts(moe_model) == reference


def test_a_disk_that_fills_during_recording_then_has_room_resumes_to_the_same_experts(
        tmp_path, reference, monkeypatch):
    """The third batch's write fails with ENOSPC (a clear error naming the store's file); the
    rerun with room records again and builds the experts of an uninterrupted run."""
    import errno

    import moee.util.stored_array

    writes, real = [], moee.util.stored_array.os.pwrite

    def filling(fd, data, offset):
        writes.append(1)
        if len(writes) > 8:  # 2 layers x (input, hidden) x 2 batches written, then full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(moee.util.stored_array.os, "pwrite", filling)
    with pytest.raises(OSError, match=r"cannot write .*activations.*\.npy: No space left"):
        run(tmp_path)
    monkeypatch.undo()
    moe_model, report = run(tmp_path)
    assert "reused" not in report.activations
    assert experts(moe_model) == reference


def _kill_when(work: Path, ready, timeout: float = 120.0) -> bool:
    """Start the extraction in a subprocess and SIGKILL it as soon as `ready(work)`; False if
    it finished first."""
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT.format(tests=str(TESTS), work=str(work))],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if ready(work):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.002)
    _, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err.decode()[-2000:]
    return False


@pytest.mark.parametrize("moment", ["recording", "clustering", "random"])
def test_killed_run_resumes_to_the_same_experts(tmp_path, reference, moment):
    start = time.monotonic()
    delay = np.random.default_rng().uniform(1.0, 6.0)
    ready = {
        "recording": lambda w: (w / "activations" / "layer_1.hidden.npy").exists(),
        "clustering": lambda w: any(w.glob("layer_0.*.clustering.json")),
        "random": lambda w: time.monotonic() - start > delay,
    }[moment]
    killed = _kill_when(tmp_path, ready)
    assert killed or moment == "random"  # a random moment may come after the end
    moe_model, _ = run(tmp_path)
    assert experts(moe_model) == reference
