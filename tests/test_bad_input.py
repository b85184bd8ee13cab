"""Bad input gets a clear moee error naming what is wrong, raised before work is lost or a wrong
result is built: too few tokens, NaN/Inf in data or activations, values beyond the activation
store's range, non-tensor batches, wrongly typed settings."""

import numpy as np
import pytest
import torch
from conftest import tiny_vit

import moee


def _config(tmp_path, **record):
    return moee.ExtractConfig(record=moee.RecordConfig(n_tokens=record.pop("n_tokens", 400),
                                                       **record),
                              cluster=moee.ClusterConfig(min_cluster_fraction=0.05),
                              work_dir=str(tmp_path), progress=False)


def test_fewer_tokens_than_pca_dimensions(tmp_path):
    with pytest.raises(moee.TooFewTokensError, match="cannot be clustered in 30 PCA dim"):
        moee.extract(tiny_vit(), [torch.randn(1, 1, 8, 8)], _config(tmp_path, n_tokens=5))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf_in_the_calibration_data(tmp_path, value):
    images = torch.randn(8, 1, 8, 8)
    images[3, 0, 2, 2] = value
    with pytest.raises(moee.NonFiniteError, match="batch 1: the inputs hold NaN or Inf"):
        moee.extract(tiny_vit(), [torch.ones(4, 1, 8, 8), images], _config(tmp_path))


def test_nan_activations_name_the_layer(tmp_path):
    model = tiny_vit()
    with torch.no_grad():
        model.vit.layers[1].mlp.fc1.weight[0, 0] = float("nan")
    message = r"layer vit\.layers\.1\.mlp: NaN or Inf in the MLP's hidden"
    with pytest.raises(moee.NonFiniteError, match=message):
        moee.extract(model, [torch.randn(8, 1, 8, 8)], _config(tmp_path))


def test_activations_beyond_float16_are_refused_and_float32_records_them(tmp_path):
    model = tiny_vit()
    with torch.no_grad():
        model.vit.layers[0].mlp.fc1.weight.mul_(1e6)
    images = [torch.randn(40, 1, 8, 8)]
    with pytest.raises(moee.NonFiniteError, match="exceeds the activation store's range.*float32"):
        moee.extract(model, images, _config(tmp_path / "a"))
    moe_model, report = moee.extract(model, images, _config(tmp_path / "b", dtype="float32"))
    assert report.n_tokens == 40 * 5  # every token of the 40 images (4 patches + CLS)


@pytest.mark.parametrize(("data", "message"), [
    ([np.zeros((4, 1, 8, 8), np.float32)], "ndarray .convert with torch.from_numpy"),
    ([[1, 2, 3]], "model inputs are a int"),
    ("images", "model inputs are a str"),
    ([{"pixel_values": [1.0]}], "model inputs are a dict"),
    ([()], "an empty tuple is not a batch"),
])
def test_batches_that_are_not_tensors(tmp_path, data, message):
    with pytest.raises(moee.BadBatchError, match=message):
        moee.extract(tiny_vit(), data, _config(tmp_path))


def test_distill_checks_every_batch_before_the_first_step():
    student, teacher = tiny_vit(seed=1), tiny_vit()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    bad = torch.randn(4, 1, 8, 8)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(moee.NonFiniteError, match="batch 2"):
        moee.distill(student, teacher, [torch.randn(4, 1, 8, 8)] * 2 + [bad])
    assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items())


@pytest.mark.parametrize(("make", "field"), [
    (lambda: moee.SelectConfig(p="0.8"), "select.p"),
    (lambda: moee.ClusterConfig(reduce_dims=2.0), "cluster.reduce_dims"),
    (lambda: moee.ClusterConfig(stability="yes"), "cluster.stability"),
    (lambda: moee.ExtractConfig(layers=[0, "1"]), "extract.layers"),
    (lambda: moee.ExtractConfig(record={"n_tokens": 10}), "extract.record"),
    (lambda: moee.DistillConfig(epochs=True), "distill.epochs"),
    (lambda: moee.RouterConfig(metric=1), "router.metric"),
])
def test_wrongly_typed_settings_name_the_field(make, field):
    with pytest.raises(moee.ConfigError, match=f"{field}: must be of type"):
        make()


def test_numpy_numbers_are_accepted_as_plain_values():
    config = moee.ExtractConfig(record=moee.RecordConfig(n_tokens=np.int64(300)),
                                select=moee.SelectConfig(p=np.float32(0.5)), layers=[0, 1])
    assert type(config.record.n_tokens) is int and type(config.select.p) is float
    assert config.layers == (0, 1)


def test_out_of_range_settings_name_the_field():
    with pytest.raises(moee.ConfigError, match="cluster.reduce_dims: must be >= 1 or None"):
        moee.ClusterConfig(reduce_dims=0)
    with pytest.raises(moee.ConfigError, match="extract.max_memory_gib: must be > 0"):
        moee.ExtractConfig(max_memory_gib=0.0)


def test_available_memory_counts_reclaimable_page_cache(tmp_path):
    """After recording, the store's pages fill the page cache: MemAvailable (free plus
    reclaimable), not MemFree, is what clustering can use."""
    from moee.extraction.resources import available_memory

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemFree:          400000 kB\n"
                       "MemAvailable:   20000000 kB\nCached:         15000000 kB\n")
    assert available_memory(str(meminfo)) == 20000000 * 1024


def test_clustering_that_cannot_fit_in_memory_is_refused_before_it_starts(tmp_path, monkeypatch):
    import moee.extraction.resources

    monkeypatch.setattr(moee.extraction.resources, "available_memory", lambda: 1024)
    model = tiny_vit()
    config = moee.ExtractConfig(record=moee.RecordConfig(n_tokens=300), work_dir=str(tmp_path))
    data = [torch.randn(8, 1, 8, 8) for _ in range(8)]
    with pytest.raises(moee.ResourceError, match="max_memory_gib"):
        moee.extract(model, data, config)


NUMERIC = {"extract": ["--seq-len", "--image-batch", "--tokens", "--p", "--min-cluster-fraction",
                       "--min-samples", "--max-experts", "--reduce-dims", "--local-steps",
                       "--max-memory", "--groups", "--active", "--top-k", "--target-macs",
                       "--seed"],
           "demo": ["--latency-batch", "--kd-epochs", "--kd-lr", "--kd-batch-size"],
           "calibrate": ["--batch"]}


@pytest.mark.parametrize("command", sorted(NUMERIC))
def test_cli_numbers_are_checked_before_any_work(command):
    """Any value of any numeric option: argparse's exit 2 naming the option, or a config
    that builds, or a ConfigError naming the setting — never another exception."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from moee.cli import build_parser, extract_config

    values = st.one_of(st.integers(-10**6, 10**6).map(str), st.floats().map(repr),
                       st.sampled_from(["", "abc", "1e400", "-0", "0x10", "nan"]))

    @settings(max_examples=60, deadline=None)
    @given(option=st.sampled_from(NUMERIC[command]), value=values)
    def check(option, value):
        argv = [command, *(["CKPT"] if command == "calibrate" else []), f"{option}={value}"]
        if command != "demo":
            argv += ["--out", "/tmp/never-written"]
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as e:
            assert e.code == 2
            return
        if hasattr(args, "extract_base"):
            try:
                extract_config(args)
            except moee.ConfigError as e:
                assert str(e)

    check()


@pytest.mark.parametrize("argv", [["extract", "--seq-len", "0", "--out", "/tmp/x"],
                                  ["extract", "--seq-len", "-5", "--out", "/tmp/x"],
                                  ["demo", "--latency-batch", "0"],
                                  ["calibrate", "CKPT", "--batch", "0", "--out", "/tmp/x"],
                                  ["demo", "--kd-lr", "nan"]])
def test_cli_refuses_bad_counts_naming_the_option(argv, capsys):
    from moee.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and argv[1 if argv[0] != "calibrate" else 2] in err


def test_binary_files_are_not_taken_for_text(tmp_path):
    noise = tmp_path / "noise.txt"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 60_000, dtype=np.uint8).tobytes())
    with pytest.raises(moee.ConfigError, match="noise.txt is not UTF-8 text"):
        moee.read_texts([noise])
    text = tmp_path / "text.txt"
    text.write_text("Readability counts. Caf\u00e9 na\u00efve. " * 50)
    assert moee.read_texts([text]).startswith("Readability")


def test_text_models_refuse_rows_past_their_positions_and_foreign_teachers(tiny_llm, tmp_path,
                                                                          capsys):
    """Checked before any work: rows longer than the model's 64 positions; a teacher whose
    vocabulary is not the student's."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from moee.cli import main

    folder, text = tiny_llm
    data = ["--data", str(text), "--tokens", "120", "--algorithm", "kmeans", "--no-stability"]
    assert main(["extract", "--model", str(folder), "--out", str(tmp_path / "x"), *data,
                 "--seq-len", "100"]) == 2
    assert "the model has 64 positions" in capsys.readouterr().err
    assert main(["extract", "--model", str(folder), "--out", str(tmp_path / "x"), *data,
                 "--seq-len", "16", "--reduce-dims", "8"]) == 0
    other = tmp_path / "other"
    LlamaForCausalLM(LlamaConfig(vocab_size=77, hidden_size=16, intermediate_size=48,
                                 num_hidden_layers=2, num_attention_heads=2,
                                 num_key_value_heads=1)).save_pretrained(other)
    for folder_file in folder.glob("tok*"):  # the same tokenizer, another vocabulary size
        (other / folder_file.name).write_bytes(folder_file.read_bytes())
    capsys.readouterr()
    assert main(["finetune", str(tmp_path / "x"), "--teacher", str(other), "--data", str(text),
                 "--seq-len", "16", "--out", str(tmp_path / "y")]) == 2
    assert "vocab_size is 77" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()


def test_sigterm_during_extraction_removes_the_temporary_store(tmp_path):
    """A run without a work_dir that is terminated leaves no activation store behind."""
    import os
    import signal
    import subprocess
    import sys
    import textwrap
    import time

    script = textwrap.dedent("""
        import sys, time, torch
        sys.path.insert(0, sys.argv[1])
        from conftest import tiny_vit
        import moee

        def data():
            while True:
                print("batch", flush=True)
                time.sleep(0.2)
                yield torch.randn(4, 1, 8, 8)

        moee.extract(tiny_vit(), data(), moee.ExtractConfig(
            record=moee.RecordConfig(n_tokens=10**6), progress=False))
    """)
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-c", script, os.path.dirname(__file__)],
                            stdout=subprocess.PIPE, env=env, text=True)
    assert proc.stdout.readline().strip() == "batch"  # recording has started
    time.sleep(0.5)
    assert any(p.name.startswith("moee-") for p in tmp_path.iterdir())
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert not any(p.name.startswith("moee-") for p in tmp_path.iterdir())


def test_cli_probes_outputs_before_work_and_reports_a_full_disk_in_one_line(tmp_path, capsys,
                                                                             monkeypatch):
    import errno

    import moee.cli
    from moee.cli import main

    a_file = tmp_path / "file"
    a_file.write_text("")
    assert main(["extract", "--out", str(a_file)]) == 2
    assert "exists and is not a directory" in capsys.readouterr().err
    assert main(["extract", "--out", str(a_file / "inside")]) == 2
    assert "is a file" in capsys.readouterr().err

    def full_disk(args):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "model.safetensors"))

    monkeypatch.setattr(moee.cli.parser, "cmd_extract", full_disk)
    assert main(["extract", "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "cannot write" in err and "model.safetensors" in err and "Traceback" not in err


def test_the_cli_seed_is_the_run_seed_and_no_stage_has_its_own():
    from moee.cli import build_parser
    from moee.cli.options import extract_config

    args = build_parser().parse_args(["extract", "--out", "x", "--seed", "7", "--local-steps", "3",
                                      "--method", "cmoe"])
    config = extract_config(args)
    assert config.seed == 7
    stages = (config.cluster, config.select, config.router, config.local, config.carve)
    assert [s for s in stages if hasattr(s, "seed")] == []


def test_settings_saved_with_a_seed_per_stage_still_load():
    old = moee.ExtractConfig().as_dict()
    del old["seed"]
    for stage in ("cluster", "select", "router"):
        old[stage]["seed"] = 3
    old["local"] = {"steps": 5, "seed": 3}
    config = moee.ExtractConfig.from_dict(old)
    assert config.seed == 3 and config.local.steps == 5


def test_a_memory_budget_too_small_to_cluster_is_refused_before_clustering(tmp_path):
    config = _config(tmp_path)
    config = moee.ExtractConfig(record=config.record, cluster=config.cluster,
                                work_dir=str(tmp_path), progress=False, max_memory_gib=1e-9)
    with pytest.raises(moee.ResourceError, match="max_memory_gib=1e-09 allows clustering 0"):
        moee.extract(tiny_vit(), [torch.randn(8, 1, 8, 8) for _ in range(20)], config)
