"""Training and evaluation speed of dmlrun against the usual hand-written stack.

    python scripts/bench.py                      # 1 full epoch per training path
    python scripts/bench.py --steps 50           # quicker, fewer steps per path

Training, for the default convnet (2-D), batch 256 (8 classes x 32), triplet loss with
batch-hard mining, on the current device, the three paths measured in alternating rounds:
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
from dmlrun.data.samplers import Epoch, PKSampler
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


class DmlrunPath:
    """(a) dmlrun's own train step, one epoch of batches drawn up front."""

    def __init__(self, data, device, amp, channels_last, steps):
        self.model = model_for(device, channels_last)
        self.opt = torch.optim.Adam(self.model.parameters(), 1e-3)
        self.data, self.loss, self.miner = data, TripletLoss(), HardMiner()
        self.cfg = StepConfig(amp, channels_last, log_every=10**9, progress_bar=False)
        g = torch.Generator().manual_seed(0)
        self.epoch = PKSampler(P, K, batches_per_epoch=steps + 5).epoch(data.train.labels, g)
        self.pos, self.stats = 0, None

    def run(self, n: int) -> int:
        part = Epoch(self.epoch.indices[self.pos : self.pos + n])
        self.pos += n
        self.stats = train_epoch(self.model, self.loss, self.miner, self.opt, self.data.train,
                                 part, self.cfg)
        return part.indices.numel()


class UsualPath:
    """(b) torchvision MNIST + DataLoader + pytorch-metric-learning loss and miner."""

    def __init__(self, root, device, amp, workers, steps):
        from pytorch_metric_learning import distances, losses, miners, reducers, samplers
        from torchvision import datasets, transforms

        tf = transforms.Compose([transforms.ToTensor(),
                                 transforms.Normalize((0.1307,), (0.3081,))])
        ds = datasets.MNIST(root, train=True, transform=tf)
        sampler = samplers.MPerClassSampler(ds.targets, m=K, batch_size=P * K,
                                            length_before_new_iter=(steps + 5) * P * K)
        loader = torch.utils.data.DataLoader(ds, batch_size=P * K, sampler=sampler,
                                             num_workers=workers, drop_last=True,
                                             pin_memory=device.type == "cuda",
                                             persistent_workers=workers > 0)
        self.it = iter(loader)
        self.model = model_for(device, False, mean=0.0, std=1.0)  # Normalize is in transform
        self.opt = torch.optim.Adam(self.model.parameters(), 1e-3)
        lp = distances.LpDistance(normalize_embeddings=False)
        self.miner = miners.BatchHardMiner(distance=lp)
        self.loss = losses.TripletMarginLoss(margin=1.0, distance=lp,
                                             reducer=reducers.MeanReducer())
        self.device, self.amp = device, amp

    def run(self, n: int) -> int:
        done = 0
        for _ in range(n):
            x, y = next(self.it)
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
                emb = self.model(x)
            emb = emb.float()
            loss = self.loss(emb, y, self.miner(emb, y))
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
            done += len(y)
        return done


class CeilingPath:
    """(c) forward + backward + optimizer step on one fixed in-memory batch."""

    def __init__(self, device, amp, channels_last):
        self.model = model_for(device, channels_last)
        self.opt = torch.optim.Adam(self.model.parameters(), 1e-3)
        self.x = torch.rand(P * K, 1, 28, 28, device=device)
        if channels_last:
            self.x = self.x.contiguous(memory_format=torch.channels_last)
        self.device, self.amp = device, amp

    def run(self, n: int) -> int:
        for _ in range(n):
            with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
                emb = self.model(self.x)
            loss = emb.float().pow(2).mean()
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
        return n * P * K


def interleaved(paths: dict, steps: int, device, rounds: int = 4) -> dict[str, float]:
    """samples/s per path, measured in alternating rounds so that drifts in machine speed
    hit every path alike."""
    for p in paths.values():
        p.run(3)  # warm-up
    seconds = dict.fromkeys(paths, 0.0)
    samples = dict.fromkeys(paths, 0)
    per_round = [steps // rounds + (1 if r < steps % rounds else 0) for r in range(rounds)]
    for n in per_round:
        for name, p in paths.items():
            sync(device)
            t0 = time.perf_counter()
            samples[name] += p.run(n)
            sync(device)
            seconds[name] += time.perf_counter() - t0
    return {k: samples[k] / seconds[k] for k in paths}


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


def bench_scaling(data, device, amp, channels_last, steps=15) -> None:
    """dmlrun samples/s and miner cost per step against batch size (8 classes x B/8)."""
    from dmlrun.miners import SemiHardMiner

    print("\n| batch | train samples/s | hard miner ms/step | semihard miner ms/step |")
    print("|---|---|---|---|")
    global K
    k0 = K
    for b in (64, 128, 256, 512, 1024):
        K = b // P
        path = DmlrunPath(data, device, amp, channels_last, steps + 3)
        rate = interleaved({"a": path}, steps, device, rounds=1)["a"]
        emb = torch.randn(b, 2, device=device)
        labels = torch.arange(P, device=device).repeat_interleave(K)
        times = []
        for miner in (HardMiner(), SemiHardMiner(margin=1.0)):
            miner(emb, labels)
            sync(device)
            t0 = time.perf_counter()
            for _ in range(10):
                miner(emb, labels)
            sync(device)
            times.append((time.perf_counter() - t0) / 10 * 1000)
        print(f"| {b} | {rate:,.0f} | {times[0]:.2f} | {times[1]:.1f} |")
    K = k0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=None,
                   help="training steps per path (default: one epoch, 55000 // 256)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers for (b)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--data", default=os.environ.get("DMLRUN_DATA_DIR", "data"))
    p.add_argument("--scaling", action="store_true",
                   help="only the batch-size scaling table (samples/s, miner cost)")
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
    if args.scaling:
        bench_scaling(data, device, amp, channels_last)
        return

    ours = DmlrunPath(data, device, amp, channels_last, steps + 3)
    rates = interleaved({"a": ours, "b": UsualPath(root, device, amp, args.workers, steps + 3),
                         "c": CeilingPath(device, amp, channels_last)}, steps, device)
    a, b, c = rates["a"], rates["b"], rates["c"]
    stats = ours.stats
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
