"""Acceptance: a BERT-style encoder through extract -> distill -> save -> reload, on keyword
(input_ids + attention_mask) batches with padding, and every evaluation helper leaving a
dropout model in eval mode."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import text_batches, tiny_bert

import moee


def small_config(work_dir) -> moee.ExtractConfig:
    return moee.ExtractConfig(
        record=moee.RecordConfig(n_tokens=600),
        cluster=moee.ClusterConfig(min_cluster_fraction=0.05, min_samples=5, reduce_dims=8),
        work_dir=str(work_dir), progress=False)


def all_eval(model: torch.nn.Module) -> bool:
    return model.training is False and not any(m.training for m in model.modules())


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(dense tiny BERT with dropout 0.1, its extracted MoE model, the extraction report)."""
    dense = tiny_bert()
    assert dense.config.hidden_dropout_prob > 0  # the eval-mode checks below mean something
    moe_model, report = moee.extract(dense, text_batches(), small_config(
        tmp_path_factory.mktemp("work")))
    return dense, moe_model, report


def test_extract_distill_save_reload_is_bit_identical(converted, tmp_path):
    dense, extracted, report = converted
    assert extracted.training is False and all_eval(extracted)
    layers = extracted.moe_layers()
    routed = {r["site"] for r in report.layers if r["experts"] > 0}
    assert routed and routed == {m.site for m in layers.values()}, report.table()
    assert any(r["experts"] >= 2 for r in report.layers), report.table()
    assert not any(isinstance(m, moee.MoEMLP) for m in dense.modules())  # input untouched

    moe_model = copy.deepcopy(extracted)
    losses = moee.distill(moe_model, dense, text_batches(4, seed=1),
                          moee.DistillConfig(epochs=1, lr=1e-3))
    assert len(losses) == 4 and all(v == v for v in losses)
    assert all_eval(moe_model)

    saved = moe_model.save_pretrained(tmp_path / "ckpt")
    assert (saved / "model.safetensors").is_file() and (saved / "moee_config.json").is_file()
    reloaded = moee.MoEModel.from_pretrained(tmp_path / "ckpt")

    assert reloaded.training is False and reloaded.model.training is False
    assert all_eval(reloaded)
    assert isinstance(reloaded.model, type(dense))
    assert set(reloaded.moe_layers()) == set(moe_model.moe_layers())
    for name, p in reloaded.named_parameters():
        assert p.device.type == "cpu", name
        assert not p.is_meta, name
    for name, b in reloaded.named_buffers():
        assert b.device.type == "cpu" and not b.is_meta, name

    unpadded = {"input_ids": torch.arange(1, 17)[None],
                "attention_mask": torch.ones(1, 16, dtype=torch.long)}
    for batch in [*text_batches(3, seed=9), unpadded]:
        with torch.no_grad():
            want = moe_model(**batch)
            got = reloaded(**batch)
        assert torch.equal(got.last_hidden_state, want.last_hidden_state)
        assert torch.equal(got.pooler_output, want.pooler_output)
    # The distilled weights were saved, not the extracted ones.
    batch = text_batches(1, seed=9)[0]
    with torch.no_grad():
        assert not torch.equal(reloaded(**batch).last_hidden_state,
                               extracted(**batch).last_hidden_state)


def test_load_returns_an_eval_model(converted, tmp_path):
    _, extracted, _ = converted
    extracted.save_pretrained(tmp_path / "ckpt")
    loaded = moee.load(tmp_path / "ckpt")
    assert loaded.training is False and all_eval(loaded)
    batch = text_batches(1, seed=3)[0]
    with torch.no_grad():
        assert torch.equal(loaded(**batch).last_hidden_state,
                           extracted(**batch).last_hidden_state)


def _forward(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).last_hidden_state


def _mean_abs(out: torch.Tensor, batch) -> tuple[float, int]:
    return float(out.abs().mean()), 1


HELPERS = {
    "evaluate": lambda m, b: moee.evaluate(m, [b, b], _mean_abs),
    "count_macs": lambda m, b: moee.count_macs(m, b),
    "count_macs_executed": lambda m, b: moee.count_macs(m, b, executed=True),
    "calibrate": lambda m, b: moee.calibrate(m, b, repeats=2),
}


@pytest.mark.parametrize("helper", list(HELPERS))
def test_helpers_leave_a_dropout_model_in_eval_mode(converted, helper):
    _, extracted, _ = converted
    moe_model = copy.deepcopy(extracted)
    batch = text_batches(1, seed=4)[0]
    assert all_eval(moe_model)
    HELPERS[helper](moe_model, batch)
    assert moe_model.training is False
    assert all_eval(moe_model), [n for n, m in moe_model.named_modules() if m.training]
    assert torch.equal(_forward(moe_model, batch), _forward(moe_model, batch))


def test_evaluate_and_count_macs_run_in_eval_and_restore_train_mode(converted):
    """A model handed over in train mode is measured without dropout and given back in train
    mode (each module's own flag restored)."""
    _, extracted, _ = converted
    moe_model = copy.deepcopy(extracted)
    batch = text_batches(1, seed=4)[0]
    reference = moee.evaluate(moe_model, [batch], _mean_abs)
    macs = moee.count_macs(moe_model, batch)
    assert macs > 0
    moe_model.train()
    assert moe_model.training is True
    assert moee.evaluate(moe_model, [batch], _mean_abs) == reference
    assert moe_model.training is True and all(m.training for m in moe_model.modules())
    assert moee.count_macs(moe_model, batch) == macs
    assert moe_model.training is True and all(m.training for m in moe_model.modules())
