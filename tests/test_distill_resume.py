"""An interrupted distillation resumes from its last saved state and ends with exactly the
weights of an uninterrupted run: after an exception, after SIGKILL of a subprocess, with data
that reshuffles every epoch and with dropout drawing from the random generator."""

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import text_batches, tiny_bert

import moee

TESTS = Path(__file__).parent
CONFIG = moee.DistillConfig(epochs=3, lr=1e-3, loss="mse", seed=3)


def models():
    return tiny_bert(seed=1, dropout=0.1), tiny_bert(seed=0, dropout=0.1)


def reshuffled(n=4):
    """Token batches through TrainingBatches-style reshuffling: each epoch a new order."""
    class Shuffled:
        def __init__(self):
            self.batches, self.g = text_batches(n), torch.Generator().manual_seed(0)

        def __len__(self):
            return len(self.batches)

        def __iter__(self):
            for i in torch.randperm(len(self.batches), generator=self.g).tolist():
                yield self.batches[i]
    return Shuffled()


def weights_after(data_factory, state_dir=None, stop_at=None):
    student, teacher = models()

    def crash(step, loss):
        if step == stop_at:
            raise KeyboardInterrupt
    try:
        moee.distill(student, teacher, data_factory(), CONFIG, on_step=crash,
                     state_dir=state_dir, save_every=2)
    except KeyboardInterrupt:
        return None
    return student.state_dict()


@pytest.mark.parametrize("data_factory", [lambda: text_batches(4), reshuffled],
                         ids=["list", "reshuffling"])
def test_resume_after_an_interruption_gives_the_uninterrupted_weights(tmp_path, data_factory):
    reference = weights_after(data_factory)
    assert weights_after(data_factory, tmp_path, stop_at=6) is None  # saved after step 6
    resumed = weights_after(data_factory, tmp_path)
    assert all(torch.equal(resumed[k], v) for k, v in reference.items())


def test_state_of_another_run_is_not_resumed(tmp_path, caplog):
    weights_after(lambda: text_batches(4), tmp_path, stop_at=5)
    student, teacher = models()
    other = moee.DistillConfig(epochs=3, lr=2e-3, loss="mse", seed=3)
    with caplog.at_level(logging.WARNING, logger="moee"):
        losses = moee.distill(student, teacher, text_batches(4), other, state_dir=tmp_path,
                              save_every=2)
    assert len(losses) == 12 and "from another run" in caplog.text


def test_the_state_holds_and_restores_the_cuda_generators(tmp_path, monkeypatch, caplog):
    """With CUDA available (simulated: no GPU here) the saved state holds every device's
    generator state, and a resumed run sets them back before its next step."""
    states = [torch.tensor([1, 2, 3], dtype=torch.uint8), torch.tensor([4, 5], dtype=torch.uint8)]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)  # no generator to fork
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [s.clone() for s in states])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.append)
    assert weights_after(lambda: text_batches(4), tmp_path, stop_at=6) is None
    saved = torch.load(tmp_path / "distill_state.pt", weights_only=True)
    assert saved["step"] == 6 and all(map(torch.equal, saved["cuda_rng"], states))
    assert restored == []
    with caplog.at_level(logging.INFO, logger="moee"):
        weights_after(lambda: text_batches(4), tmp_path)
    assert "resuming distillation at step 6" in caplog.text
    assert len(restored) == 1 and all(map(torch.equal, restored[0], states))


SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from conftest import text_batches
import moee
from test_distill_resume import CONFIG, models
student, teacher = models()
moee.distill(student, teacher, text_batches(4), CONFIG, state_dir={state!r}, save_every=1)
"""


def test_sigkill_during_distillation_resumes_to_the_same_weights(tmp_path):
    reference = weights_after(lambda: text_batches(4))
    state = tmp_path / "state"
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT.format(tests=str(TESTS), state=str(state))],
        env={**os.environ, "PYTHONPATH": str(TESTS)}, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if (state / "distill_state.pt").exists():
            time.sleep(0.05)  # a few more steps: the kill may land while a save is written
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    proc.wait()
    student, teacher = models()
    moee.distill(student, teacher, text_batches(4), CONFIG, state_dir=state, save_every=1)
    assert all(torch.equal(student.state_dict()[k], v) for k, v in reference.items())
