"""Under torchrun (2 CPU processes, gloo): each rank records its shard, rank 0 merges and
clusters, every rank builds the same experts (those of one process reading the shards in
rank order), and distillation with DDP keeps the ranks' weights identical."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import blob_images, tiny_vit

import moee

TESTS = Path(__file__).parent
SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import torch
import torch.distributed as dist
from conftest import tiny_vit
import moee
from test_distributed import batches, config
dist.init_process_group("gloo")
rank = dist.get_rank()
moe_model, report = moee.extract(tiny_vit(), batches(), config({work!r}))
extracted = {{k: v.clone() for k, v in moe_model.state_dict().items()}}
moee.distill(moe_model, tiny_vit(), batches(), moee.DistillConfig(epochs=2, lr=1e-3))
experts = {{k: m.dense_experts() for k, m in moe_model.moe_layers().items()}}
torch.save({{"experts": experts, "tokens": report.n_tokens, "extracted": extracted,
            "tuned": moe_model.state_dict()}}, {out!r} + f"/rank{{rank}}.pt")
dist.destroy_process_group()
"""


def batches():
    images = blob_images(240)
    return [images[i : i + 40] for i in range(0, 240, 40)]  # 6 batches of 200 tokens


def config(work):
    return moee.ExtractConfig(
        record=moee.RecordConfig(n_tokens=1200),
        cluster=moee.ClusterConfig(min_cluster_fraction=0.05, min_samples=5, reduce_dims=8),
        work_dir=str(work), progress=False)


@pytest.mark.slow
def test_torchrun_extract_and_distill_on_two_cpu_processes(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(tests=str(TESTS), work=str(tmp_path / "work"),
                                    out=str(tmp_path)))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", str(script)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0]["tokens"] == ranks[1]["tokens"] == 1200
    assert ranks[0]["experts"] == ranks[1]["experts"]
    # one process reading the shards in rank order builds the same experts
    b = batches()
    single, _ = moee.extract(tiny_vit(), b[0::2] + b[1::2], config(tmp_path / "single"))
    assert ranks[0]["experts"] == {k: m.dense_experts() for k, m in single.moe_layers().items()}
    # DDP: both ranks hold the same weights after distillation, and they changed
    for k, v in ranks[0]["tuned"].items():
        assert torch.equal(v, ranks[1]["tuned"][k]), k
    assert any(not torch.equal(v, ranks[0]["extracted"][k]) for k, v in ranks[0]["tuned"].items())
