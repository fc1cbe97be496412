"""Multi-process training on the CPU with gloo: one step over 2 ranks equals one process
(global mining) or the mean of per-rank losses (local mining); real runs through torchrun
and ``trainer.devices=2`` write exactly one run folder and match a single process."""

import json
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dmlrun import distributed
from dmlrun.data.samplers import PKSampler, TripletSampler
from dmlrun.distributed import Ranks, gather_labels, gather_with_grad
from dmlrun.errors import ConfigError
from dmlrun.losses import ContrastiveLoss, TripletLoss
from dmlrun.miners import HardMiner
from dmlrun.models import MLP
from tests.conftest import TINY, run_cli


def batch():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(32, 1, 28, 28, generator=g)
    y = torch.arange(8).repeat_interleave(4)
    return x, y


def model():
    torch.manual_seed(0)
    return MLP(embedding_dim=4, hidden_dims=(32,))


def make_loss(name):
    return TripletLoss() if name == "triplet" else ContrastiveLoss()


def step(net, loss_fn, x, y, gather: bool, route=None):
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    emb = net(x)
    if gather:
        emb, y = gather_with_grad(emb), gather_labels(y)
    if route is not None:
        emb = route(emb)
    loss = loss_fn(emb, y, HardMiner()(emb, y).indices)
    opt.zero_grad()
    loss.backward()
    opt.step()
    module = net.module if hasattr(net, "module") else net
    return loss.detach(), [p.detach().clone() for p in module.parameters()]


def shards():
    """Interleaved shards of 16 images each (the single process sees them in rank
    order), so a gather that mixed up the order would show."""
    idx = torch.arange(32)
    return idx[idx % 8 < 4], idx[idx % 8 >= 4]


CASES = [("triplet", "global"), ("contrastive", "global"), ("triplet", "local")]


def worker(rank, size, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=size)
    try:
        torch.set_num_threads(1)
        x, y = batch()
        mine = shards()[rank]
        for loss_name, mode in CASES:
            net = torch.nn.parallel.DistributedDataParallel(model())
            loss, params = step(net, make_loss(loss_name), x[mine], y[mine],
                                mode == "global")
            if rank == 0:
                torch.save({"loss": loss, "params": params},
                           f"{out_dir}/{loss_name}-{mode}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()
    distributed.exit_now(0)  # as the product's ranks end (see exit_now)


@pytest.fixture(scope="module")
def two_rank_steps(tmp_path_factory):
    """One 2-process gloo job that takes one step for every case; rank 0's results."""
    out = tmp_path_factory.mktemp("ranks")
    mp.spawn(worker, args=(2, str(out / "init"), str(out)), nprocs=2)
    return out


def swap_gradient_slices(emb):
    """The same values, with the gradient of each half routed to the other half."""
    half = len(emb) // 2
    swapped = torch.cat([emb[half:], emb[:half]])
    return emb.detach() + swapped - swapped.detach()


def reference(loss_name, mode, mixed_up=False):
    """The same step in one process: on the whole batch (in rank order) for global
    mining; on the mean of the two shards' losses for local mining. ``mixed_up``
    sends each rank's embedding gradients to the other rank's images (same forward):
    what a gather whose backward kept the wrong slice would compute."""
    x, y = batch()
    net, loss_fn = model(), make_loss(loss_name)
    if mode == "global":
        order = torch.cat(shards())
        return step(net, loss_fn, x[order], y[order], gather=False,
                    route=swap_gradient_slices if mixed_up else None)
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    losses = []
    for idx in shards():
        emb = net(x[idx])
        losses.append(loss_fn(emb, y[idx], HardMiner()(emb, y[idx]).indices))
    opt.zero_grad()
    (sum(losses) / 2).backward()
    opt.step()
    return losses[0].detach(), [p.detach().clone() for p in net.parameters()]


# Float32 sums taken in another order (one process with several threads against two
# with one each, and DDP's all-reduce) differ by a few ulps of the largest term. Weights
# are therefore compared by their update, relative to the step's largest entry: 1e-4 of
# it is ~100x that rounding, and far below what a mix-up of ranks changes (checked
# below). Not per tensor: the last layer's bias has no gradient in exact arithmetic (a
# shift of every embedding changes no distance), so its update is rounding alone.
UPDATE_RTOL = 1e-4


def update_error(params, ref_params) -> float:
    """Largest difference from the reference weights, in units of the reference step's
    largest update."""
    start = [p.detach() for p in model().parameters()]
    scale = max(float((b - s).abs().max()) for b, s in zip(ref_params, start, strict=True))
    return max(float((a - b).abs().max()) for a, b in zip(params, ref_params, strict=True)
               ) / max(scale, 1e-12)


@pytest.mark.parametrize("loss_name,mode", CASES)
def test_two_ranks_match_one_process(two_rank_steps, loss_name, mode):
    got = torch.load(two_rank_steps / f"{loss_name}-{mode}.pt")
    ref_loss, ref_params = reference(loss_name, mode)
    torch.testing.assert_close(got["loss"], ref_loss, rtol=1e-5, atol=1e-6)
    assert update_error(got["params"], ref_params) < UPDATE_RTOL
    # the step did move the weights
    assert any(not torch.allclose(a, b) for a, b in zip(ref_params, model().parameters(),
                                                       strict=True))
    if mode == "global":  # and the comparison is strong enough to see ranks mixed up
        _, mixed = reference(loss_name, mode, mixed_up=True)
        assert update_error(mixed, ref_params) > 100 * UPDATE_RTOL


def test_single_process_is_a_no_op():
    x = torch.randn(5, 3, requires_grad=True)
    assert gather_with_grad(x) is x and os.environ.get("RANK") is None
    assert distributed.from_env() == Ranks()


def test_shards_are_whole_classes_and_rejoin_to_the_batch():
    labels = torch.arange(10).repeat_interleave(50)
    epoch = PKSampler(p=4, k=5, batches_per_epoch=3).epoch(labels, torch.Generator())
    parts = [distributed.shard(epoch, Ranks(r, 2)) for r in range(2)]
    assert torch.equal(torch.cat([p.indices for p in parts], dim=1), epoch.indices)
    for part in parts:
        assert part.indices.shape == (3, 10)
        for row in labels[part.indices]:  # 2 classes x 5 images on each rank
            assert sorted(torch.bincount(row).tolist())[-2:] == [5, 5]
    assert not set(parts[0].indices.flatten().tolist()) & set(
        parts[1].indices.flatten().tolist())


def test_uneven_splits_are_refused():
    with pytest.raises(ConfigError, match=r"sampler.p=5 .* 2 processes; use a multiple of 2"):
        distributed.check_divisible(PKSampler(p=5, k=4), 2, local_mining=False)
    with pytest.raises(ConfigError, match="1 class per process"):
        distributed.check_divisible(PKSampler(p=2, k=4), 2, local_mining=True)
    with pytest.raises(ConfigError, match="mining=local needs online mining"):
        distributed.check_divisible(TripletSampler(triplets_per_batch=8), 2, local_mining=True)
    distributed.check_divisible(PKSampler(p=4, k=4), 2, local_mining=True)


SLURM = {"SLURM_JOB_ID": "4242", "SLURM_PROCID": "3", "SLURM_NTASKS": "4",
         "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_NUM_NODES": "2",
         "SLURM_NODEID": "1"}


@pytest.fixture
def private_env(monkeypatch):
    """os.environ as a copy: the variables exported here must not reach later tests."""
    env = {k: v for k, v in os.environ.items() if k not in (
        "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE",
        "SUBMITIT_EXECUTOR")}
    monkeypatch.setattr(os, "environ", env)
    return env


def test_slurm_tasks_of_the_submitit_launcher_become_ranks(private_env):
    private_env.update(SLURM, SUBMITIT_EXECUTOR="slurm")
    assert distributed.from_env() == Ranks(rank=3, world=4, local_rank=1, launched=True)
    assert private_env["MASTER_ADDR"] == "gpu07" and int(private_env["MASTER_PORT"]) > 0


def test_a_bare_slurm_step_of_several_tasks_is_refused(private_env):
    private_env.update(SLURM)
    with pytest.raises(ConfigError, match="4 tasks .* torchrun"):
        distributed.from_env()


# SGD: Adam's first steps divide by tiny second moments and amplify float-rounding
# differences between the two reductions, so only SGD compares tightly over many steps.
# one process and several agree step for step without BatchNorm (statistics per rank's
# slice) and augmentation (each rank draws its own warps), and in fp32: bf16 autocast
# (trainer.amp=auto on a CPU with AMX tiles) rounds a rank's half batch differently from
# the whole one, and the semi-hard tuples mined from those embeddings then differ
SAME = [*TINY, "optimizer=sgd", "optimizer.lr=0.0002", "loss=triplet", "miner=semihard",
        "evaluation.baselines=false", "trainer.epoch_plots=false", "model=convnet",
        "augment=none", "trainer.amp=false"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc_per_node=2", "-m", "dmlrun"]


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def only_run_folder(cwd):
    """The one run folder under cwd/outputs/<date>/, and nothing else written in cwd."""
    assert sorted(p.name for p in cwd.iterdir()) == ["outputs"]
    folders = list((cwd / "outputs").glob("*/*"))
    assert len(folders) == 1, folders
    return folders[0]


def test_torchrun_writes_one_run_folder_and_matches_one_process(tmp_path, data_dir):
    (tmp_path / "ddp").mkdir()
    (tmp_path / "one").mkdir()
    env = {"OMP_NUM_THREADS": "1"}
    ddp = run_cli(SAME, cwd=tmp_path / "ddp", exe=TORCHRUN, env_extra=env, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one = run_cli(SAME, cwd=tmp_path / "one", env_extra=env, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    run_dir = only_run_folder(tmp_path / "ddp")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["mining"] == "global"
    assert (run_dir / "plots" / "embedding.png").is_file()
    assert (run_dir / "checkpoints" / "best.pt").is_file()
    assert "2 processes (gloo), each with 125 of the 250 images" in ddp.stdout
    # the same global batches, mined globally: the same losses and validation metrics
    ref_dir = only_run_folder(tmp_path / "one")
    got, ref = read_jsonl(run_dir / "steps.jsonl"), read_jsonl(ref_dir / "steps.jsonl")
    assert len(got) == len(ref) == 8
    for a, b in zip(got, ref, strict=True):
        for key in ("loss", "tuples", "active", "pos_distance", "neg_distance"):
            assert a[key] == pytest.approx(b[key], rel=1e-4), key
    for a, b in zip(read_jsonl(run_dir / "metrics.jsonl"), read_jsonl(ref_dir / "metrics.jsonl"),
                    strict=True):
        assert a["val_precision_at_1"] == pytest.approx(b["val_precision_at_1"], abs=2e-3)
        assert a["samples_per_s"] > 0


def test_devices_spawns_ranks_with_local_mining(tmp_path, data_dir):
    res = run_cli([*SAME, "trainer.devices=2", "trainer.mining=local"], cwd=tmp_path,
                  timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    run_dir = only_run_folder(tmp_path)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["mining"] == "local"
    assert summary["choices"]["loss"] == "triplet"  # the picked options reach the ranks
    log = (run_dir / "dmlrun.log").read_text()
    assert "starting 2 processes" in log and "mining local" in log
    assert len(read_jsonl(run_dir / "metrics.jsonl")) == 2


@pytest.mark.parametrize("args,exe,message", [
    (["trainer.devices=2", "sampler.p=5"], None, "sampler.p=5 classes per batch cannot be"),
    (["trainer.devices=3"], TORCHRUN, "trainer.devices=3 but 2 processes were started"),
    (["-m", "seed=0,1"], TORCHRUN, "a sweep (-m) cannot run inside torchrun"),
])
def test_multi_process_mistakes_get_one_message(tmp_path, data_dir, args, exe, message):
    res = run_cli([*TINY, *args], cwd=tmp_path, exe=exe, timeout=300)
    assert res.returncode != 0
    assert res.stderr.count(f"dmlrun: error: {message}") == 1, res.stderr[-3000:]


@pytest.mark.slow
def test_sigterm_stops_every_rank_and_the_run_resumes(tmp_path, data_dir):
    """SIGTERM to ``trainer.devices=2`` reaches both ranks, which stop at the same step;
    exit 143, no process left behind, and the run resumes to the end."""
    import signal
    import subprocess
    import time

    args = [*TINY, "sampler.batches_per_epoch=16", "trainer.log_every=2",
            "evaluation.baselines=false", "trainer.epoch_plots=false", "trainer.devices=2",
            "hydra.run.dir=run"]
    env = {**os.environ, "DMLRUN_DATA_DIR": str(data_dir)}
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.Popen([sys.executable, "-m", "dmlrun", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "run" / "dmlrun.log"
    deadline = time.time() + 240
    while time.time() < deadline and not (log.exists() and "epoch 1:" in log.read_text()):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert err.count("dmlrun: error: stopped by signal 15") == 1
    assert "trainer.resume=" in err
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(tmp_path) not in ps and "multiprocessing.spawn" not in ps
    res = run_cli([*args[:-1], "trainer.resume=run"], cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert [r["epoch"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")] == [1, 2]
    assert (tmp_path / "run" / "summary.json").is_file()
