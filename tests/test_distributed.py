"""Cross-rank mining with 2 gloo processes on the CPU: one optimisation step on a global
batch split over 2 ranks equals the same step in one process."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dmlrun.distributed import gather_labels, gather_with_grad
from dmlrun.losses import ContrastiveLoss, TripletLoss
from dmlrun.miners import HardMiner
from dmlrun.models import MLP


def batch():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(32, 1, 28, 28, generator=g)
    y = torch.arange(8).repeat_interleave(4)
    return x, y


def model():
    torch.manual_seed(0)
    return MLP(embedding_dim=4, hidden_dims=(32,))


def step(net, loss_fn, x, y, distributed: bool):
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    emb = net(x)
    if distributed:
        emb, y = gather_with_grad(emb), gather_labels(y)
    loss = loss_fn(emb, y, HardMiner()(emb, y).indices)
    opt.zero_grad()
    loss.backward()
    opt.step()
    module = net.module if hasattr(net, "module") else net
    return loss.detach(), [p.detach().clone() for p in module.parameters()]


def worker(rank, size, init_file, loss_name, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=size)
    try:
        torch.set_num_threads(1)
        x, y = batch()
        # uneven, interleaved shards: rank 0 gets 20 images, rank 1 the other 12
        idx = torch.arange(32)
        mine = idx[idx % 8 < 5] if rank == 0 else idx[idx % 8 >= 5]
        net = torch.nn.parallel.DistributedDataParallel(model())
        loss_fn = TripletLoss() if loss_name == "triplet" else ContrastiveLoss()
        # the single process sees the batch in the same (rank) order
        loss, params = step(net, loss_fn, x[mine], y[mine], distributed=True)
        if rank == 0:
            torch.save({"loss": loss, "params": params}, out_file)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("loss_name", ["triplet", "contrastive"])
def test_two_ranks_match_one_process(tmp_path, loss_name):
    out = tmp_path / "rank0.pt"
    mp.spawn(worker, args=(2, str(tmp_path / "init"), loss_name, str(out)), nprocs=2)
    got = torch.load(out)
    x, y = batch()
    idx = torch.arange(32)
    order = torch.cat([idx[idx % 8 < 5], idx[idx % 8 >= 5]])
    loss_fn = TripletLoss() if loss_name == "triplet" else ContrastiveLoss()
    ref_loss, ref_params = step(model(), loss_fn, x[order], y[order], distributed=False)
    torch.testing.assert_close(got["loss"], ref_loss, rtol=1e-5, atol=1e-5)
    for a, b in zip(got["params"], ref_params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # and the step did move the weights
    assert any(not torch.allclose(a, b) for a, b in zip(ref_params, model().parameters(),
                                                       strict=True))


def test_single_process_is_a_no_op():
    x = torch.randn(5, 3, requires_grad=True)
    assert gather_with_grad(x) is x and os.environ.get("RANK") is None
