from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module

import dmlrun  # noqa: F401  (registers resolvers)
from dmlrun.data.dataset import Split
from dmlrun.data.samplers import PKSampler
from dmlrun.models import MLP

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("DMLRUN_DATA_DIR", REPO.parent / "shared" / "data")).resolve()

# With pytest-xdist (pyproject's addopts: one worker per core) the workers share the
# cores: each worker, and every command it starts, takes its share of threads instead of
# all of them, so two workers on two cores do not slow each other down.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _THREADS = max(1, (os.cpu_count() or 1) // _WORKERS)
    os.environ["OMP_NUM_THREADS"] = str(_THREADS)
    torch.set_num_threads(_THREADS)

# Small, fast settings for end-to-end runs on real MNIST.
TINY = [
    "dataset.train_size=1500",
    "dataset.val_size=500",
    "dataset.test_size=800",
    "dataset.download=false",
    "sampler.batches_per_epoch=4",
    "trainer.max_epochs=2",
    "trainer.device=cpu",
    "trainer.progress_bar=false",
]


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA_DIR / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file():
        pytest.fail(f"MNIST not found under {DATA_DIR}; set DMLRUN_DATA_DIR")
    return DATA_DIR


def compose_cfg(overrides: list[str] | None = None, return_hydra_config: bool = False):
    """Compose the shipped configs as the CLI would (Hydra's own node only on request)."""
    with initialize_config_module(config_module="dmlrun.configs", version_base="1.3"):
        return compose(config_name="config", overrides=overrides or [],
                       return_hydra_config=return_hydra_config)


def run_cli(args: list[str], cwd: Path, env_extra: dict | None = None, timeout: int = 600,
            exe: list[str] | None = None) -> subprocess.CompletedProcess:
    """Run the real ``dmlrun`` command in a subprocess."""
    env = {**os.environ, "DMLRUN_DATA_DIR": str(DATA_DIR), **(env_extra or {})}
    env.pop("HYDRA_FULL_ERROR", None)  # the tests assert on the short, user-facing errors
    cmd = (exe or [sys.executable, "-m", "dmlrun"]) + args
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def render_dom(page: Path, profile: Path) -> subprocess.CompletedProcess:
    """The DOM of ``page`` after it loaded in headless chromium (stderr has the console)."""
    return subprocess.run(["chromium", "--headless=new", "--no-sandbox", "--disable-gpu",
                           "--disable-background-networking", "--disable-component-update",
                           f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
                           "--virtual-time-budget=10000", "--dump-dom", page.as_uri()],
                          capture_output=True, text=True, timeout=120)



class RecordingAdam(torch.optim.Adam):
    """Adam that notes the learning rate of every step (schedule and warm-up tests)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: list[float] = []

    def step(self, closure=None):
        self.seen.append(self.param_groups[0]["lr"])
        return super().step(closure)


def rate_recording_setup() -> tuple:
    """A tiny six-class split (60 random images), a 2-D MLP, a RecordingAdam at lr 0.01
    and one 3 x 4 epoch of four batches: the learning-rate-per-step tests' set-up."""
    g = torch.Generator().manual_seed(0)
    split = Split(torch.randint(0, 256, (60, 1, 28, 28), dtype=torch.uint8, generator=g),
                  torch.arange(6).repeat(10))
    model = MLP(embedding_dim=2, hidden_dims=(8,))
    opt = RecordingAdam(model.parameters(), lr=0.01)
    return split, model, opt, PKSampler(p=3, k=4, batches_per_epoch=4).epoch(split.labels, g)
