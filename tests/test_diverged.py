"""A diverged fine-tune is never saved: distill stops at the first non-finite loss naming the
step and the learning rate, its last good resume state kept; save_pretrained and load refuse
NaN or Inf weights naming the tensor; `moee finetune --kd-lr 1e30` exits 2 in one line."""

from __future__ import annotations

import pytest
import torch
from conftest import llm_moe_checkpoint, text_batches, tiny_bert, tiny_moe_model

import moee
from moee.cli import main
from moee.training.training_state import STATE_NAME

HUGE_LR = moee.DistillConfig(epochs=2, lr=1e30, loss="mse")


def test_distill_stops_at_the_first_nan_loss_naming_the_step_and_the_rate():
    student, teacher = tiny_bert(seed=1), tiny_bert(seed=0)
    seen = []
    with pytest.raises(moee.NonFiniteError, match=r"loss is nan at step 2 of 8.*1e\+30"):
        moee.distill(student, teacher, text_batches(4), HUGE_LR,
                     on_step=lambda step, loss: seen.append(loss))
    assert len(seen) == 1  # the diverged step is never reported as a step done


def test_the_last_good_resume_state_is_not_overwritten(tmp_path):
    student, teacher = tiny_bert(seed=1), tiny_bert(seed=0)
    with pytest.raises(moee.NonFiniteError, match="step 2"):
        moee.distill(student, teacher, text_batches(4), HUGE_LR, state_dir=tmp_path,
                     save_every=1)
    state = torch.load(tmp_path / STATE_NAME, weights_only=True)
    assert state["step"] == 1 and len(state["losses"]) == 1
    assert all(torch.isfinite(v).all() for v in state["student"].values())


def test_a_gradient_that_is_not_finite_is_never_applied():
    student, teacher = tiny_bert(seed=1), tiny_bert(seed=0)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    hook = student.embeddings.word_embeddings.weight.register_hook(
        lambda g: torch.full_like(g, float("inf")))
    with pytest.raises(moee.NonFiniteError, match="gradient holds NaN or Inf.*step 1 of"):
        moee.distill(student, teacher, text_batches(2), moee.DistillConfig(loss="mse"))
    hook.remove()
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())


def _poisoned(model: moee.MoEModel) -> str:
    name = next(iter(model.moe_layers())) + ".fc1.weight"
    with torch.no_grad():
        model.model.get_parameter(name)[0, 0] = float("nan")
    return name


def test_save_pretrained_refuses_nan_weights_naming_the_tensor(tmp_path):
    model = tiny_moe_model()
    name = _poisoned(model)
    with pytest.raises(moee.NonFiniteError, match=f"tensor {name} holds NaN or Inf"):
        model.save_pretrained(tmp_path / "moe")
    assert not (tmp_path / "moe").exists()


@pytest.mark.parametrize("verify", [True, False])
def test_load_refuses_a_checkpoint_with_nan_weights(tmp_path, monkeypatch, verify):
    import moee.checkpoint.io

    model = tiny_moe_model()
    name = _poisoned(model)
    with monkeypatch.context() as m:  # what a moee before this check saved
        m.setattr(moee.checkpoint.io, "non_finite", lambda tensors: None)
        model.save_pretrained(tmp_path / "moe")
    with pytest.raises(moee.CheckpointError, match=f"tensor {name} holds NaN or Inf"):
        moee.load(tmp_path / "moe", verify=verify)


def test_finetune_with_a_huge_learning_rate_exits_2_in_one_line(tiny_llm, tmp_path, capsys):
    folder, text = tiny_llm
    llm_moe_checkpoint(folder, tmp_path / "moe")
    capsys.readouterr()
    code = main(["finetune", str(tmp_path / "moe"), "--teacher", str(folder), "--data",
                 str(text), "--seq-len", "16", "--kd-batch-size", "2", "--kd-epochs", "1",
                 "--kd-lr", "1e30", "--out", str(tmp_path / "kd")])
    err = capsys.readouterr().err  # above the error: transformers' progress bars
    line = err.strip().splitlines()[-1]
    assert code == 2 and "Traceback" not in err, err
    assert line.startswith("moee finetune: error: distill:") and "1e+30" in line
    assert not (tmp_path / "kd" / "moee_config.json").exists()
