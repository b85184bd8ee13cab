"""Free disk is checked before each stage writes: the error names the path and the sizes, comes
before the work, and leaves what was already computed in place."""

import pytest
import torch
from conftest import pretend_free_disk

import moee
import moee.util.disk_space
from moee.util.disk_space import ensure_room, nearest_existing


def _config(tmp_path):
    return moee.ExtractConfig(
        record=moee.RecordConfig(n_tokens=600),
        cluster=moee.ClusterConfig(algorithm="kmeans", n_clusters=2, stability=False,
                                   reduce_dims=None),
        work_dir=str(tmp_path / "work"), progress=False)


def test_room_is_measured_where_the_path_will_be(tmp_path, monkeypatch):
    assert nearest_existing(tmp_path / "a" / "b") == tmp_path
    ensure_room(tmp_path / "a", 10, "ten bytes", "never")  # this disk has ten bytes
    pretend_free_disk(monkeypatch, 2**20)
    with pytest.raises(moee.ResourceError, match=r"the thing needs 2\.0 MiB but .* has 1\.0 MiB"):
        ensure_room(tmp_path / "a", 2**21, "the thing", "free space")


def test_a_full_disk_stops_clustering_and_keeps_the_recorded_activations(vit, images,
                                                                          tmp_path, monkeypatch):
    batches = [images[i : i + 40] for i in range(0, 240, 40)]
    config = _config(tmp_path)
    moee.extract(vit, batches, config)  # records and clusters
    for f in (tmp_path / "work").glob("layer_*"):  # the clusterings, not the store
        f.unlink()
    pretend_free_disk(monkeypatch, 1000)
    with pytest.raises(moee.ResourceError, match="the clustering of layer 0 in .*work"):
        moee.extract(vit, batches, config)
    monkeypatch.undo()
    _, report = moee.extract(vit, batches, config)
    assert report.activations.startswith("reused")


def test_a_full_disk_stops_saving_and_distilling_before_they_write(vit, images, tmp_path,
                                                                    monkeypatch):
    batches = [images[i : i + 40] for i in range(0, 240, 40)]
    moe_model, _ = moee.extract(vit, batches, _config(tmp_path))
    before = {k: v.clone() for k, v in moe_model.state_dict().items()}
    pretend_free_disk(monkeypatch, 1000)
    with pytest.raises(moee.ResourceError, match="the checkpoint .*ckpt needs"):
        moe_model.save_pretrained(tmp_path / "ckpt")
    assert not any((tmp_path / "ckpt").glob("*.safetensors*"))
    with pytest.raises(moee.ResourceError, match="resume state in .*state"):
        moee.distill(moe_model, vit, batches, moee.DistillConfig(epochs=1),
                     state_dir=tmp_path / "state")
    after = moe_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # not one step taken


def test_a_full_disk_stops_layer_local_distillation_and_export(tiny_llm, tmp_path, monkeypatch,
                                                                capsys):
    from moee.cli import main

    folder, text = tiny_llm
    out = tmp_path / "moe"
    assert main(["extract", "--model", str(folder), "--out", str(out), "--data", str(text),
                 "--tokens", "120", "--seq-len", "16", "--algorithm", "kmeans",
                 "--no-stability", "--reduce-dims", "8", "--export-ready", "0.5",
                 "--max-experts", "0",  # the clustering the second extract reuses
                 "--work-dir", str(tmp_path / "work")]) == 0
    pretend_free_disk(monkeypatch, 1000)
    capsys.readouterr()
    assert main(["export", str(out), "--to", "mixtral", "--out", str(tmp_path / "mx")]) == 2
    err = capsys.readouterr().err
    assert "the export" in err and "MiB free" in err and "Traceback" not in err
    assert not (tmp_path / "mx").exists()
    assert main(["extract", "--model", str(folder), "--out", str(tmp_path / "moe2"), "--data",
                 str(text), "--tokens", "120", "--seq-len", "16", "--algorithm", "kmeans",
                 "--no-stability", "--reduce-dims", "8", "--work-dir", str(tmp_path / "work"),
                 "--local-steps", "2"]) == 2
    assert "layer-local distillation" in capsys.readouterr().err
    assert any((tmp_path / "work" / "activations").iterdir())
