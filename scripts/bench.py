"""Training and evaluation speed of dmlrun against the usual hand-written stack.

    python scripts/bench.py                      # 1 full epoch per training path
    python scripts/bench.py --steps 50           # quicker, fewer steps per path

Training, for the default convnet (2-D), batch 256 (8 classes x 32), triplet loss with
batch-hard mining, on the current device:
  (a) dmlrun: device-resident uint8 data, vectorised P x K sampler and miner;
  (b) the usual stack: torchvision MNIST + DataLoader (ToTensor, Normalize) with
      pytorch-metric-learning's MPerClassSampler, BatchHardMiner and TripletMarginLoss;
  (c) the ceiling: forward + backward + optimizer step on one fixed in-memory batch,
      no data, no mining.
Evaluation: embed the 10k test set, then P@1 and MAP@R (leave-one-out, exact), dmlrun vs
pytorch-metric-learning's AccuracyCalculator (faiss). Needs the [dev] extras.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from dmlrun.data.idx import load_mnist
from dmlrun.data.samplers import PKSampler
from dmlrun.evaluate import embed, retrieval_metrics
from dmlrun.losses import TripletLoss
from dmlrun.miners import HardMiner
from dmlrun.models import ConvNet
from dmlrun.train import StepConfig, train_epoch

P, K = 8, 32


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def model_for(device: torch.device, channels_last: bool, **kw) -> ConvNet:
    torch.manual_seed(0)
    m = ConvNet(embedding_dim=2, **kw).to(device)
    return m.to(memory_format=torch.channels_last) if channels_last else m


def bench_dmlrun(data, device, steps, amp, channels_last) -> float:
    model = model_for(device, channels_last)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    sampler = PKSampler(P, K, batches_per_epoch=steps)
    g = torch.Generator().manual_seed(0)
    step_cfg = StepConfig(amp, channels_last, log_every=50, progress_bar=False)
    warm = sampler.epoch(data.train.labels, g)
    warm.indices = warm.indices[:5]
    train_epoch(model, TripletLoss(), HardMiner(), opt, data.train, warm, step_cfg)
    epoch = sampler.epoch(data.train.labels, g)
    sync(device)
    t0 = time.perf_counter()
    stats = train_epoch(model, TripletLoss(), HardMiner(), opt, data.train, epoch, step_cfg)
    sync(device)
    return epoch.indices.numel() / (time.perf_counter() - t0), stats


def bench_usual(root, device, steps, amp, workers) -> float:
    from pytorch_metric_learning import distances, losses, miners, samplers
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    ds = datasets.MNIST(root, train=True, transform=tf)
    sampler = samplers.MPerClassSampler(ds.targets, m=K, batch_size=P * K,
                                        length_before_new_iter=steps * P * K)
    loader = torch.utils.data.DataLoader(ds, batch_size=P * K, sampler=sampler,
                                         num_workers=workers, drop_last=True,
                                         pin_memory=device.type == "cuda",
                                         persistent_workers=workers > 0)
    model = model_for(device, False, mean=0.0, std=1.0)  # Normalize is in the transform
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    lp = distances.LpDistance(normalize_embeddings=False)
    miner, loss_fn = miners.BatchHardMiner(distance=lp), losses.TripletMarginLoss(
        margin=1.0, distance=lp, reducer=__import__(
            "pytorch_metric_learning.reducers", fromlist=["MeanReducer"]).MeanReducer())

    def run(n_steps):
        n = 0
        for i, (x, y) in enumerate(loader):
            if i >= n_steps:
                break
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                emb = model(x)
            emb = emb.float()
            loss = loss_fn(emb, y, miner(emb, y))
            opt.zero_grad()
            loss.backward()
            opt.step()
            n += len(y)
        return n

    run(5)
    sync(device)
    t0 = time.perf_counter()
    n = run(steps)
    sync(device)
    return n / (time.perf_counter() - t0)


def bench_ceiling(device, steps, amp, channels_last) -> float:
    model = model_for(device, channels_last)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    x = torch.rand(P * K, 1, 28, 28, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    def step():
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            emb = model(x)
        loss = emb.float().pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(5):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return steps * P * K / (time.perf_counter() - t0)


def bench_eval(data, root, device) -> tuple[float, float, dict, dict]:
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    from torchvision import datasets, transforms

    model = model_for(device, False).eval()
    sync(device)
    t0 = time.perf_counter()
    emb = embed(model, data.test.images)
    ours = retrieval_metrics(emb, data.test.labels)
    sync(device)
    t_ours = time.perf_counter() - t0

    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    ds = datasets.MNIST(root, train=False, transform=tf)
    loader = torch.utils.data.DataLoader(ds, batch_size=2048)
    ref_model = model_for(device, False, mean=0.0, std=1.0).eval()
    ref_model.load_state_dict({k: v for k, v in model.state_dict().items()
                               if k not in ("mean", "std")}, strict=False)
    calc = AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r"),
                              device=device)
    sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        embs, labels = zip(*[(ref_model(x.to(device)), y) for x, y in loader], strict=True)
    ref = calc.get_accuracy(torch.cat(embs), torch.cat(labels).to(device),
                            ref_includes_query=True)
    sync(device)
    t_ref = time.perf_counter() - t0
    return t_ours, t_ref, ours, ref


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=None,
                   help="training steps per path (default: one epoch, 55000 // 256)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers for (b)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--data", default=os.environ.get("DMLRUN_DATA_DIR", "data"))
    args = p.parse_args()
    device = torch.device(args.device)
    amp = torch.bfloat16 if device.type == "cuda" else None
    channels_last = device.type == "cpu"
    root = str(Path(args.data))
    data = load_mnist(root, download=False).to(device)
    steps = args.steps or len(data.train) // (P * K)
    name = torch.cuda.get_device_name() if device.type == "cuda" else \
        f"cpu ({torch.get_num_threads()} threads)"
    print(f"device {name}, amp {amp}, batch {P}x{K}, {steps} steps per path, torch "
          f"{torch.__version__}")

    a, stats = bench_dmlrun(data, device, steps, amp, channels_last)
    b = bench_usual(root, device, steps, amp, args.workers)
    c = bench_ceiling(device, steps, amp, channels_last)
    print("\n| path | samples/s |\n|---|---|")
    print(f"| (a) dmlrun | {a:,.0f} |")
    print(f"| (b) torchvision DataLoader ({args.workers} workers) + pml | {b:,.0f} |")
    print(f"| (c) model-only ceiling | {c:,.0f} |")
    print(f"\na/b = {a / b:.2f}, a/c = {a / c:.2f}  (dmlrun epoch: loss {stats['train_loss']:.3f},"
          f" {stats['mined_per_step']:.0f} triplets/step)")

    t_ours, t_ref, ours, ref = bench_eval(data, root, device)
    print("\n| evaluation of 10k test images | seconds | P@1 | MAP@R |\n|---|---|---|---|")
    print(f"| dmlrun embed + retrieval_metrics | {t_ours:.2f} | {ours['precision_at_1']:.4f} "
          f"| {ours['map_at_r']:.4f} |")
    print(f"| DataLoader + AccuracyCalculator | {t_ref:.2f} | {ref['precision_at_1']:.4f} | "
          f"{ref['mean_average_precision_at_r']:.4f} |")
    print(f"\neval speed-up: {t_ref / t_ours:.2f}x")


if __name__ == "__main__":
    main()
