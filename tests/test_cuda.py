"""The CUDA path: same numbers as the CPU for mining and metrics, and a real run on the GPU.
Skipped where no GPU is present."""

import json

import pytest
import torch

from dmlrun.losses import ContrastiveLoss, TripletLoss
from dmlrun.metrics import clustering_metrics, retrieval_metrics
from dmlrun.miners import HardMiner, SemiHardMiner
from tests.conftest import TINY, run_cli

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _batch(n_classes: int = 8, per_class: int = 16, dim: int = 8):
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    emb = torch.randn(len(labels), dim, generator=g) + labels[:, None].float() * 0.3
    return emb, labels


@pytest.mark.parametrize("miner", [HardMiner(), SemiHardMiner(margin=0.5)])
def test_miners_pick_the_same_tuples_on_cuda(miner):
    emb, labels = _batch()
    cpu = miner(emb, labels)
    gpu = miner(emb.cuda(), labels.cuda())
    for a, b in zip(cpu.indices, gpu.indices, strict=True):
        assert torch.equal(a, b.cpu())


@pytest.mark.parametrize("loss", [ContrastiveLoss(), TripletLoss()])
def test_losses_match_cpu(loss):
    emb, labels = _batch()
    ref = loss(emb, labels, HardMiner()(emb, labels).indices)
    got = loss(emb.cuda(), labels.cuda(), HardMiner()(emb.cuda(), labels.cuda()).indices)
    torch.testing.assert_close(got.cpu(), ref, rtol=1e-5, atol=1e-5)


def test_metrics_match_cpu():
    emb, labels = _batch(10, 50, 4)
    ref = retrieval_metrics(emb, labels)
    got = retrieval_metrics(emb.cuda(), labels.cuda())
    for k, v in ref.items():
        assert got[k] == pytest.approx(v, abs=1e-6), k
    ref_c = clustering_metrics(emb, labels, seed=0)
    got_c = clustering_metrics(emb.cuda(), labels.cuda(), seed=0)
    assert got_c["nmi"] == pytest.approx(ref_c["nmi"], abs=0.05)


def test_cli_trains_on_cuda_with_amp(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    args = [a for a in TINY if not a.startswith("trainer.device")]
    res = run_cli(args + ["trainer.device=cuda", "trainer.amp=true", f"hydra.run.dir={run_dir}"],
                  cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["device"] == torch.cuda.get_device_name()
    assert summary["test"]["precision_at_1"] > 0.3
    assert (run_dir / "plots" / "embedding.png").stat().st_size > 0


def test_torchrun_on_one_gpu_uses_nccl(tmp_path, data_dir):
    """torchrun with one process per GPU: a process group on nccl, DDP on cuda:<local rank>;
    one run folder written by rank 0."""
    import sys

    n = torch.cuda.device_count()
    run_dir = tmp_path / "run"
    args = [a for a in TINY if not a.startswith("trainer.device")]
    exe = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={n}", "-m", "dmlrun"]
    res = run_cli(args + ["trainer.device=cuda", f"sampler.p={n * max(1, 10 // n)}",
                          f"hydra.run.dir={run_dir}"], cwd=tmp_path, exe=exe, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["backend"] == "nccl" and summary["processes"] == n
    assert summary["test"]["precision_at_1"] > 0.3


def test_label_propagation_on_cuda_recovers_what_the_cpu_does():
    from dmlrun.semi import LabelPropagation, knn_indices, pick_labeled

    g = torch.Generator().manual_seed(0)
    truth = torch.arange(5).repeat_interleave(300)
    x = (torch.randn(5, 60, generator=g) * 3)[truth] + 0.5 * torch.randn(1500, 60, generator=g)
    labeled = pick_labeled(truth, 3, 0)
    d_cpu, i_cpu = knn_indices(x, x, 8, exclude_self=True)
    d_gpu, i_gpu = knn_indices(x.cuda(), x.cuda(), 8, exclude_self=True)
    assert (i_gpu.cpu() == i_cpu).float().mean() > 0.99  # near-ties may order apart
    torch.testing.assert_close(d_gpu.cpu(), d_cpu, rtol=1e-3, atol=1e-3)
    prop = LabelPropagation(pca_dims=16)
    cpu = prop(x, labeled, truth[labeled], 5)
    gpu = prop(x.cuda(), labeled.cuda(), truth[labeled].cuda(), 5)
    assert (cpu.labels == truth).float().mean() > 0.99
    assert (gpu.labels.cpu() == truth).float().mean() > 0.99


def test_semi_run_with_views_on_cuda(tmp_path, data_dir):
    """Pseudo-labels, augmentation and the two-view term on the GPU."""
    run_dir = tmp_path / "run"
    args = [a for a in TINY if not a.startswith("trainer.device")]
    res = run_cli(args + ["trainer.device=cuda", "experiment=semi_views", "sampler.k=10",
                          "semi.views.batch=32",
                          f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert 0.5 < rows[0]["pseudo_accuracy"] <= 1 and "pseudo_val_accuracy" in rows[0]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["device"] == torch.cuda.get_device_name()


def test_a_cuda_run_is_graded_again_and_indexed_exactly(tmp_path, data_dir):
    """With bf16 autocast on the GPU: dmlrun-evaluate and an index of the test split give
    the run's own test metrics (both embed through embedder.RunEmbedding, as the run did)."""
    import sys

    from dmlrun.index import Index

    out = tmp_path / "run"
    res = run_cli([*[a for a in TINY if not a.startswith("trainer.device")],
                   "trainer.device=cuda", "model.embedding_dim=16", f"hydra.run.dir={out}"],
                  cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["amp"] == "bfloat16"
    res = run_cli([str(out), "--device", "cuda", "--output", str(tmp_path / "e.json")],
                  cwd=tmp_path, exe=[sys.executable, "-m", "dmlrun.evaluate_cli"])
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads((tmp_path / "e.json").read_text())["metrics"] == summary["test"]
    index = Index.build(out, ["split=test"], tmp_path / "idx", device="cuda", progress=False)
    hits = index.search_items(k=1)
    p1 = (hits.labels[:, 0] == index.labels).double().mean().item()
    assert p1 == summary["test"]["precision_at_1"]


def test_the_symmetric_search_matches_the_cpu_on_cuda():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(2000) % 500  # classes of 4
    emb = torch.randn(2000, 32, generator=g) + (labels % 7)[:, None] * 0.2
    assert retrieval_metrics(emb.cuda(), labels.cuda()) == pytest.approx(
        retrieval_metrics(emb, labels), abs=1e-6)
