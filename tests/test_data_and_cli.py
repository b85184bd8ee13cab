"""Fashion-MNIST IDX reading, its clear errors, and CLI options on a tiny checkpoint."""

import numpy as np
import pytest
from conftest import fake_dataset, write_idx

import moee
from moee.cli import main
from moee_lab.demo import FashionMNISTNotFound, load_fashion_mnist
from moee_lab.demo.fashion_mnist import read_idx


def test_reads_idx_from_a_user_folder(tmp_path):
    fake_dataset(tmp_path)
    x, y = load_fashion_mnist("test", tmp_path)
    assert x.shape == (5, 28, 28) and y.shape == (5,)


def test_truncated_idx_is_a_clear_error(tmp_path):
    path = tmp_path / "bad"
    write_idx(path, np.zeros((4, 28, 28)))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(path)


def test_missing_dataset_says_how_to_get_it(tmp_path, monkeypatch):
    import moee_lab.demo.fashion_mnist as fm

    monkeypatch.setattr(fm, "DEBIAN_DIR", tmp_path / "none")
    monkeypatch.setattr(fm, "CACHE_DIR", tmp_path / "none2")
    monkeypatch.delenv("MOEE_DATA_DIR", raising=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FashionMNISTNotFound, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("train", tmp_path / "empty")
    with pytest.raises(FashionMNISTNotFound, match="does not exist"):
        load_fashion_mnist("train", tmp_path / "nonexistent")


def test_cli_reports_bad_checkpoint_without_traceback(tmp_path, capsys):
    fake_dataset(tmp_path)
    code = main(["evaluate", str(tmp_path / "missing"), "--data-dir", str(tmp_path)])
    assert code == 2
    assert "not a directory" in capsys.readouterr().err


def test_cli_calibrate_force_sets_every_layer_and_saves(tmp_path, capsys):
    from conftest import tiny_moe_model

    import moee

    tiny_moe_model().save_pretrained(tmp_path / "moe")
    assert main(["calibrate", str(tmp_path / "moe"), "--force", "masked",
                 "--out", str(tmp_path / "forced")]) == 0
    layers = moee.load(tmp_path / "forced").moe_layers().values()
    assert {m.execution_config.execution for m in layers} == {"masked"}
    # Timing needs real inputs: without --data, Fashion-MNIST; other shapes are told to give it.
    assert main(["calibrate", str(tmp_path / "moe"), "--out", str(tmp_path / "c")]) == 2
    assert "give a batch of your own data with --data" in capsys.readouterr().err


def test_cli_max_experts_defaults_demo_to_8_and_extract_to_the_paper():
    from moee.cli import build_parser, extract_config

    parser = build_parser()
    cluster = lambda *argv: extract_config(parser.parse_args(list(argv))).cluster  # noqa: E731
    assert cluster("demo").max_clusters == 8
    assert cluster("demo", "--max-experts", "0").max_clusters is None
    assert cluster("extract", "--out", "x").max_clusters is None
    assert cluster("extract", "--out", "x", "--max-experts", "4").max_clusters == 4
    # --export-ready stores every expert at full width: capped unless asked otherwise
    assert cluster("extract", "--out", "x", "--export-ready", "0.7").max_clusters == 8
    assert cluster("extract", "--out", "x", "--export-ready", "0.7",
                   "--max-experts", "0").max_clusters is None
    remedies = cluster("demo", "--dense-below-stability", "0.1", "--merge-below-stability", ".5")
    assert (remedies.dense_below_stability, remedies.merge_below_stability) == (0.1, 0.5)
    assert cluster("demo").dense_below_stability is None


def test_cli_method_and_mac_budget_reach_the_config():
    from moee.cli import build_parser, extract_config

    parser = build_parser()
    config = extract_config(parser.parse_args(
        ["extract", "--out", "x", "--method", "random", "--target-macs", "0.6",
         "--budget-scope", "mlp"]))
    assert (config.cluster.algorithm, config.select.criterion, config.router.centres) == (
        "random", "random", "random")
    assert (config.budget.target_macs, config.budget.scope) == (0.6, "mlp")
    plain = extract_config(parser.parse_args(["extract", "--out", "x"]))
    assert plain.budget.target_macs is None and plain.cluster.algorithm == "hdbscan"
    assert plain.carve is None
    cmoe = extract_config(parser.parse_args(["extract", "--out", "x", "--method", "cmoe",
                                             "--active", "0.3", "--groups", "6"]))
    assert cmoe.carve == moee.CarveConfig(active=0.3, experts=6)
    assert cmoe.router.metric == "dot"
    moef = extract_config(parser.parse_args(["extract", "--out", "x", "--method", "moefication",
                                             "--top-k", "3"]))
    assert moef.carve == moee.CarveConfig(style="moefication", top_k=3)
    assert moef.router.top_k == 1  # moefication's k lives in its groups
    assert plain.router.top_k == 1
    top2 = extract_config(parser.parse_args(["extract", "--out", "x", "--top-k", "2"]))
    assert top2.router.top_k == 2 and top2.carve is None
    study = parser.parse_args(["study", "--quick", "--out", "s"])
    assert study.quick and study.kd_epochs is None and study.only is None
    assert parser.parse_args(["study", "--only", "budget", "p=0.7"]).only == ["budget", "p=0.7"]
