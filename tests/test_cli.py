"""Every `moee` command's happy path, in process, on a tiny 28x28 ViT and a tiny IDX set; and
the one-line errors (exit code 2) for a missing checkpoint, model or data folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import fake_dataset
from transformers import ViTConfig, ViTForImageClassification

import moee
from moee.cli import main
from moee.engine import EXECUTIONS

N_IMAGES = 64
EXTRACT_ARGS = ["--tokens", "200", "--min-cluster-fraction", "0.05", "--min-samples", "5",
                "--reduce-dims", "8", "--no-stability"]


def tiny_fmnist_vit() -> ViTForImageClassification:
    """A transformers ViT classifier for 28x28 grey images: 2x2 patches of 14 + CLS = 5 tokens."""
    torch.manual_seed(0)
    config = ViTConfig(image_size=28, patch_size=14, num_channels=1, hidden_size=16,
                       num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                       num_labels=10, attn_implementation="eager")
    return ViTForImageClassification(config).eval()


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    data = root / "data"
    data.mkdir()
    fake_dataset(data, N_IMAGES)
    dense = root / "dense"
    tiny_fmnist_vit().save_pretrained(dense)
    return {"root": root, "data": data, "dense": dense}


@pytest.fixture(scope="module")
def extracted(work) -> Path:
    out = work["root"] / "X"
    code = main(["extract", "--model", str(work["dense"]), "--out", str(out),
                 "--data-dir", str(work["data"]), *EXTRACT_ARGS])
    assert code == 0
    return out


@pytest.fixture(scope="module")
def finetuned(work, extracted) -> Path:
    out = work["root"] / "Y"
    code = main(["finetune", str(extracted), "--teacher", str(work["dense"]), "--out", str(out),
                 "--data-dir", str(work["data"]), "--kd-epochs", "0.1"])
    assert code == 0
    return out


def _macs_ok(results: dict) -> None:
    dense, moe = results["dense"], results["moe"]
    for row in (dense, moe):
        assert row["executed_macs_per_image"] > 0 and row["params"] > 0
    assert moe["macs_per_image"] < dense["macs_per_image"]
    assert moe["params"] < dense["params"]


# ---- happy paths --------------------------------------------------------------------------


def test_demo_writes_results_and_both_checkpoints(work, capsys):
    out = work["root"] / "demo"
    code = main(["demo", "--model", str(work["dense"]), "--data-dir", str(work["data"]),
                 "--out", str(out), *EXTRACT_ARGS, "--kd-epochs", "0.1",
                 "--latency-batch", "8"])
    assert code == 0
    results = json.loads((out / "demo_results.json").read_text())
    assert {"dense", "moe", "moe_calibrated", "moe_calibrated_approximate"} <= set(results)
    _macs_ok(results)
    assert results["kd"]["steps"] == 1  # 0.1 epoch of one 128-image batch
    assert results["dense"]["latency_batch"] == 8
    for name in ("moe", "moe-calibrated"):
        assert (out / name / "moee_config.json").is_file()
        assert len(moee.load(out / name).moe_layers()) == 2
    # The calibrated checkpoint holds the per-layer choice the results report.
    chosen = [row["execution"] for row in results["moe_calibrated"]["layers"]]
    saved = [m.execution_config.execution
             for m in moee.load(out / "moe-calibrated").moe_layers().values()]
    assert len(chosen) == 2 and saved == chosen and set(chosen) <= set(EXECUTIONS) - {"union"}
    # the saved calibration is exact: the same top-1 as the routed model
    assert results["moe_calibrated"]["top1"] == results["moe"]["top1"]
    assert "exec MACs" in capsys.readouterr().out


def test_extract_saves_a_checkpoint_and_its_report(extracted, capsys):
    assert (extracted / "moee_config.json").is_file()
    report = json.loads((extracted / "extraction_report.json").read_text())
    assert report["n_tokens"] == 200
    model = moee.load(extracted)
    assert len(model.moe_layers()) == 2
    assert model(torch.randn(3, 1, 28, 28)).logits.shape == (3, 10)


def test_finetune_changes_the_weights(extracted, finetuned, capsys):
    assert (finetuned / "moee_config.json").is_file()
    before, after = moee.load(extracted).state_dict(), moee.load(finetuned).state_dict()
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_evaluate_writes_dense_and_moe(work, finetuned, capsys):
    path = work["root"] / "J.json"
    code = main(["evaluate", str(finetuned), "--dense", str(work["dense"]),
                 "--data-dir", str(work["data"]), "--latency-batch", "8", "--json", str(path)])
    assert code == 0
    results = json.loads(path.read_text())
    assert set(results) == {"dense", "moe"}
    _macs_ok(results)
    assert results["moe"]["latency_batch"] == 8 and results["moe"]["latency_ms"] > 0
    assert "exec MACs" in capsys.readouterr().out


def test_calibrate_times_layers_on_fashion_mnist(work, finetuned):
    out = work["root"] / "Z"
    code = main(["calibrate", str(finetuned), "--batch", "4", "--out", str(out),
                 "--data-dir", str(work["data"])])
    assert code == 0
    layers = moee.load(out).moe_layers().values()
    assert len(layers) == 2
    for m in layers:
        assert m.execution_config.execution in EXECUTIONS
        # Measured, not the cost model's default (None): at most the batch's 4 x 5 tokens.
        assert m.execution_config.small_batch_tokens is not None
        assert 0 <= m.execution_config.small_batch_tokens <= 20


def test_calibrate_allows_the_union_only_when_asked(work, finetuned, monkeypatch, capsys):
    from test_speed import fake_timer

    import moee.engine.calibrate

    times = {"masked": 1.0, "loop": 0.5, "experts": 1.0, "union": 0.1}  # the union "fastest"
    monkeypatch.setattr(moee.engine.calibrate, "time_interleaved", fake_timer(times.get))
    for extra, union in (([], False), (["--allow-approximate"], True)):
        out = work["root"] / f"Z{len(extra)}a"
        assert main(["calibrate", str(finetuned), "--batch", "4", "--out", str(out),
                     "--data-dir", str(work["data"]), *extra]) == 0
        layers = moee.load(out).moe_layers().values()
        assert all((m.execution_config.execution == "union") == union for m in layers)
        assert ("argmax agreement" in capsys.readouterr().out) == union


def test_calibrate_force_sets_every_layer(work, finetuned):
    out = work["root"] / "Z2"
    assert main(["calibrate", str(finetuned), "--force", "union", "--out", str(out)]) == 0
    layers = moee.load(out).moe_layers().values()
    assert len(layers) == 2
    assert all(m.execution_config.execution == "union" for m in layers)


@pytest.mark.parametrize("extra", [[], ["--quantize", "int8", "--graph", "masked"]])
def test_export_to_onnx_runs_in_onnxruntime(work, finetuned, capsys, extra):
    ort = pytest.importorskip("onnxruntime")
    out = work["root"] / f"m{len(extra)}.onnx"
    assert main(["export", str(finetuned), "--to", "onnx", "--out", str(out), *extra]) == 0
    printed = capsys.readouterr().out
    assert "MiB of weights to" in printed and "routing inside the graph" in printed
    assert ("routers kept in fp32" in printed) == bool(extra)
    x = torch.randn(6, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = moee.load(finetuned)(x).logits.numpy()
    got = ort.InferenceSession(str(out)).run(None, {"pixel_values": x.numpy()})[0]
    # fp32: moee's function; int8: its weights rounded (logits close, not equal)
    assert abs(got - ref).max() <= (1e-4 if not extra else 0.1 * abs(ref).max())


def test_export_options_of_another_format_are_refused(work, finetuned):
    assert main(["export", str(finetuned), "--to", "mixtral", "--quantize", "int8",
                 "--out", str(work["root"] / "mx")]) == 2
    assert not (work["root"] / "mx").exists()


def test_train_base_one_epoch(work, capsys):
    out = work["root"] / "B"
    assert main(["train-base", "--epochs", "1", "--data-dir", str(work["data"]),
                 "--out", str(out), "--device", "cpu"]) == 0
    card = json.loads((out / "fmnist_vit.json").read_text())
    assert len(card["history"]) == 1 and card["train_config"]["epochs"] == 1
    assert (out / "fmnist_vit.safetensors").is_file()
    assert "test top-1" in capsys.readouterr().out


def test_bench_blocks_only(work):
    out = work["root"] / "R"
    assert main(["bench", "--parts", "blocks", "--block-batches", "", "--block-tokens", "16",
                 "--out", str(out)]) == 0
    results = json.loads((out / "bench.json").read_text())
    assert len(results["blocks"]) == 2  # 25% and 50% active, one token count each
    assert results["default"] == [] and results["deit_base"] == []


# ---- errors -------------------------------------------------------------------------------


def _one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"moee {command}: error:"), err
    return err


def test_missing_checkpoint_is_one_line(work, capsys):
    code = main(["evaluate", "/nonexistent", "--dense", str(work["dense"]),
                 "--data-dir", str(work["data"])])
    assert code == 2
    assert "/nonexistent" in _one_line_error(capsys, "evaluate")


def test_unloadable_model_is_one_line(work, tmp_path, capsys):
    code = main(["extract", "--model", "/nonexistent", "--out", str(tmp_path / "X"),
                 "--data-dir", str(work["data"])])
    assert code == 2
    assert "does not exist" in _one_line_error(capsys, "extract")
    assert not (tmp_path / "X").exists()


@pytest.mark.parametrize("command", ["extract", "finetune", "evaluate", "calibrate"])
def test_missing_data_folder_is_named(work, extracted, tmp_path, capsys, command):
    missing = str(tmp_path / "nonexistent")
    argv = {
        "extract": ["extract", "--model", str(work["dense"]), "--out", str(tmp_path / "o")],
        "finetune": ["finetune", str(extracted), "--teacher", str(work["dense"]),
                     "--out", str(tmp_path / "o")],
        "evaluate": ["evaluate", str(extracted), "--dense", str(work["dense"])],
        "calibrate": ["calibrate", str(extracted), "--out", str(tmp_path / "o")],
    }[command]
    assert main([*argv, "--data-dir", missing]) == 2
    assert missing in _one_line_error(capsys, command)


# ---- text models ----------------------------------------------------------------------------


def test_extract_and_finetune_a_text_model_on_text_files(tiny_llm, tmp_path):
    folder, text = tiny_llm
    data = ["--data", str(text), "--seq-len", "16"]
    assert main(["extract", "--model", str(folder), "--out", str(tmp_path / "x"), *data,
                 "--tokens", "120", "--algorithm", "kmeans", "--reduce-dims", "8",
                 "--no-stability"]) == 0
    moe = moee.load(tmp_path / "x")
    assert type(moe.model).__name__ == "LlamaForCausalLM" and len(moe.moe_layers()) == 2
    assert all(m.gate is not None for m in moe.moe_layers().values())  # gated experts
    # No --teacher / --dense: the model `extract` recorded (then `finetune`) is the default.
    assert main(["finetune", str(tmp_path / "x"), *data,
                 "--kd-epochs", "1", "--out", str(tmp_path / "y")]) == 0
    tuned = moee.load(tmp_path / "y")
    before = next(iter(moe.moe_layers().values())).fc1.weight
    assert not torch.equal(before, next(iter(tuned.moe_layers().values())).fc1.weight)
    assert not (tmp_path / "y" / "distill_state").exists()  # removed once the model is saved
    report = tmp_path / "eval.json"
    assert main(["evaluate", str(tmp_path / "y"), *data, "--json", str(report)]) == 0
    result = json.loads(report.read_text())
    assert 1 < result["perplexity"] < 1e4 and 1 < result["reference_perplexity"] < 1e4
    assert result["moe_macs"] < result["dense_macs"]


def test_a_loaded_moe_works_in_a_transformers_pipeline(tiny_llm, tmp_path):
    from transformers import AutoTokenizer, pipeline

    folder, text = tiny_llm
    assert main(["extract", "--model", str(folder), "--out", str(tmp_path / "x"), "--data",
                 str(text), "--seq-len", "16", "--tokens", "120", "--algorithm", "kmeans",
                 "--reduce-dims", "8", "--no-stability"]) == 0
    moe, tokenizer = moee.load(tmp_path / "x"), AutoTokenizer.from_pretrained(folder)
    generate = pipeline("text-generation", model=moe.model, tokenizer=tokenizer)
    out = generate("Beautiful is better than", max_new_tokens=5, do_sample=False,
                   return_tensors=True)
    prompt = tokenizer("Beautiful is better than", return_tensors="pt")
    ids = moe.model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert list(out[0]["generated_token_ids"]) == ids[0].tolist()
    # The wrapper behaves like the model: generate, device, a pipeline built on it.
    assert torch.equal(moe.generate(**prompt, max_new_tokens=5, do_sample=False), ids)
    assert moe.device == torch.device("cpu") and moe.can_generate()
    wrapped = pipeline("text-generation", model=moe, tokenizer=tokenizer)
    again = wrapped("Beautiful is better than", max_new_tokens=5, do_sample=False,
                    return_tensors=True)
    assert list(again[0]["generated_token_ids"]) == ids[0].tolist()
    # The inner model's save_pretrained writes moee's checkpoint, never one transformers
    # would reload with random MLPs.
    moe.model.save_pretrained(tmp_path / "inner")
    reloaded = moee.load(tmp_path / "inner")
    assert torch.equal(reloaded.generate(**prompt, max_new_tokens=5, do_sample=False), ids)
    with pytest.raises(TypeError, match="moee's checkpoint"):
        moe.model.save_pretrained(tmp_path / "hub", push_to_hub=True)


def test_text_data_errors_are_one_line(tiny_llm, tmp_path, capsys):
    folder, _ = tiny_llm
    assert main(["extract", "--model", str(folder), "--out", str(tmp_path / "x"),
                 "--data", str(tmp_path / "missing.txt")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["extract", "--model", "default", "--out", str(tmp_path / "x"),
                 "--data", str(tmp_path / "zen.txt")]) == 2
    assert "need a model with a tokenizer" in capsys.readouterr().err


def test_extract_with_the_reproducing_stages_from_the_command_line(tiny_llm, tmp_path):
    folder, text = tiny_llm
    assert main(["extract", "--model", str(folder), "--out", str(tmp_path / "x"), "--data",
                 str(text), "--seq-len", "16", "--tokens", "240", "--algorithm", "kmeans",
                 "--reduce-dims", "8", "--no-stability", "--p", "0.7", "--router", "fitted",
                 "--refit", "--local-steps", "5", "--criterion", "output_variance"]) == 0
    report = json.loads((tmp_path / "x" / "extraction_report.json").read_text())
    assert report["config"]["router"]["centres"] == "fitted"
    assert report["config"]["select"]["refit_down"] and report["config"]["local"]["steps"] == 5
    assert all({"refit", "local"} <= set(row["reproduction"]) for row in report["layers"])


def test_calibrate_a_text_checkpoint_on_its_own_text(tiny_llm, tmp_path, capsys):
    folder, text = tiny_llm
    data = ["--data", str(text), "--seq-len", "16"]
    assert main(["extract", "--model", str(folder), "--out", str(tmp_path / "x"), *data,
                 "--tokens", "120", "--algorithm", "kmeans", "--reduce-dims", "8",
                 "--no-stability"]) == 0
    assert main(["calibrate", str(tmp_path / "x"), "--out", str(tmp_path / "c")]) == 2
    assert "give a batch of your own data with --data" in capsys.readouterr().err
    assert main(["calibrate", str(tmp_path / "x"), *data, "--batch", "2",
                 "--out", str(tmp_path / "c")]) == 0
    assert "tokens" in capsys.readouterr().out
    assert len(moee.load(tmp_path / "c").moe_layers()) == 2
