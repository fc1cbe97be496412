"""What a new user meets first, through the real command: help, version, error messages
and exit codes, sweeps with failed jobs, and the folders a refused start leaves."""

import json
import os
import stat
from pathlib import Path

import pytest
import torch

from dmlrun.checkpoint import save_checkpoint
from tests.conftest import TINY, run_cli

QUICK = [*TINY, "trainer.epoch_plots=false", "evaluation.baselines=false"]


def test_help_is_ours_and_short(tmp_path):
    res = run_cli(["--help"], cwd=tmp_path)
    assert res.returncode == 0
    out = res.stdout
    assert "powered by Hydra" not in out and "== Config ==" not in out
    for part in ("Examples", "dmlrun experiment=contrastive", "loss: ", "miner: ",
                 "dmlrun-evaluate", "dmlrun-summarize", "dmlrun-index", "docs/usage.md"):
        assert part in out, part
    assert len(out.splitlines()) < 60


def test_version_is_dmlruns(tmp_path):
    import dmlrun

    res = run_cli(["--version"], cwd=tmp_path)
    assert res.returncode == 0 and res.stdout.strip() == f"dmlrun {dmlrun.__version__}"


@pytest.mark.parametrize("override,message", [
    ("dataset=image_folder", "dataset.root has no value"),
    ("model.embedding_dim=two", "model.embedding_dim must be an integer, got 'two'"),
    ("trainer.max_epochs=abc", "trainer.max_epochs must be an integer, got 'abc'"),
    ("loss.margin=wide", "loss.margin must be a number, got 'wide'"),
    ("+trainer.foo=1", "trainer has no setting 'foo'"),
    ("+trainer.max_epoch=1", "did you mean trainer.max_epochs?"),
    ("lr=0.01", "Did you mean optimizer.lr?"),
])
def test_bad_values_get_one_message_and_exit_2(tmp_path, override, message):
    res = run_cli([override, f"paths.output_dir={tmp_path / 'out'}"], cwd=tmp_path)
    assert res.returncode == 2, res.stderr[-2000:]
    assert message in res.stderr and "Traceback" not in res.stderr
    assert res.stderr.count("dmlrun: error") == 1


def test_a_config_error_prints_once_and_leaves_no_folder(tmp_path):
    out = tmp_path / "out"
    res = run_cli(["loss=triplet", "sampler=pairs", f"paths.output_dir={out}"], cwd=tmp_path)
    assert res.returncode == 2
    assert res.stderr.count("nothing to mine") == 1 and "nothing to mine" not in res.stdout
    assert not out.exists() or not any(out.iterdir())


def test_a_sweep_with_failed_jobs_says_so_and_exits_nonzero(tmp_path):
    res = run_cli(["-m", "loss=proxy_anchor", "miner=hard,semihard",
                   f"paths.multirun_dir={tmp_path / 'multi'}"], cwd=tmp_path)
    assert res.returncode == 1
    assert "2 of 2 jobs failed" in res.stderr
    assert res.stderr.count("takes no tuples") == 2  # each job's folder and reason


def test_an_optuna_sweep_whose_trials_all_fail_gets_one_message(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    res = run_cli(["-m", "sweep=optuna_lr_margin", "hydra.sweeper.n_trials=2",
                   "loss=proxy_anchor", "miner=hard",
                   f"paths.multirun_dir={tmp_path / 'multi'}"], cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "every trial of the sweep failed (2 of 2)" in res.stderr


def test_checkpoints_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        save_checkpoint(tmp_path / "c.pt", {"x": torch.zeros(1)})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "c.pt").stat().st_mode) == 0o644


def test_the_documented_class_disjoint_command_works(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    res = run_cli([*QUICK, "dataset.train_classes=[0,1,2,3,4]", f"hydra.run.dir={run_dir}"],
                  cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    log = (run_dir / "dmlrun.log").read_text()
    assert "sampler.p=5: the 5 training classes" in log and "5 classes in training" in log
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["train_classes"] == [0, 1, 2, 3, 4]
    assert summary["test_classes"] == [5, 6, 7, 8, 9]
    # a P the user sets is kept, and refused when it cannot be met
    res = run_cli([*QUICK, "dataset.train_classes=[0,1,2,3,4]", "sampler.p=6",
                   f"hydra.run.dir={tmp_path / 'p6'}"], cwd=tmp_path)
    assert res.returncode == 2 and "sampler.p=6" in res.stderr


def test_a_failed_download_leaves_nothing_behind(tmp_path):
    from dmlrun.data.idx import load_idx_dataset
    from dmlrun.errors import UserError

    def offline(folder, root, train):
        """Makes <root>/<folder>/raw as torchvision does, then fails like a lost network."""
        (Path(root) / folder / "raw").mkdir(parents=True, exist_ok=True)
        raise RuntimeError("Error downloading: no network")

    with pytest.raises(UserError, match="no network"):
        load_idx_dataset("Offline", str(tmp_path / "data" / "sub"), "offline", 100, None, None,
                         True, 0, fetch=offline)
    assert list(tmp_path.iterdir()) == []

    def wordy(folder, root, train):
        raise RuntimeError("Tried " + "http://mirror.example/ " * 20)

    # a long reason is cut with an ellipsis, and the advice after it is whole
    with pytest.raises(UserError) as err:
        load_idx_dataset("Wordy", str(tmp_path / "data"), "wordy", 100, None, None, True, 0,
                         fetch=wordy)
    message = str(err.value)
    assert "...). Put the four uncompressed files" in message
    assert message.endswith("(files under <dir>/Wordy/raw/).")


def test_missing_data_is_one_message_and_leaves_no_run_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    res = run_cli([*QUICK, "dataset.download=false", f"hydra.run.dir={tmp_path / 'r'}"],
                  cwd=tmp_path, env_extra={"DMLRUN_DATA_DIR": str(tmp_path / "empty")})
    assert res.returncode == 2 and "MNIST data not found" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "r").exists()


@pytest.fixture(scope="module")
def relative_run(tmp_path_factory):
    """A tiny run started in one folder with a relative data root (as CI's ../shared/data)."""
    from tests.conftest import DATA_DIR

    base = tmp_path_factory.mktemp("rel")
    start = base / "a" / "b"
    start.mkdir(parents=True)
    rel = os.path.relpath(DATA_DIR, start)
    res = run_cli([*QUICK, f"hydra.run.dir={base / 'run'}"], cwd=start,
                  env_extra={"DMLRUN_DATA_DIR": rel})
    assert res.returncode == 0, res.stderr[-2000:]
    return base / "run"


def evaluate_cli(args, cwd, env_extra=None):
    import sys

    env = {"DMLRUN_DATA_DIR": ""} if env_extra is None else env_extra
    return run_cli(args, cwd=cwd, exe=[sys.executable, "-m", "dmlrun.evaluate_cli"],
                   env_extra={"CUDA_VISIBLE_DEVICES": "", **env})


def test_evaluate_reads_the_data_root_in_order(relative_run, tmp_path, data_dir):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # the run's own relative root, read from the folder the run started in
    res = evaluate_cli([str(relative_run), "--output", str(tmp_path / "a.json")], elsewhere)
    assert res.returncode == 0, res.stderr[-2000:]
    # the environment before the stored root
    res = evaluate_cli([str(relative_run)], elsewhere, {"DMLRUN_DATA_DIR": str(tmp_path)})
    assert res.returncode == 2 and str(tmp_path / "MNIST" / "raw") in res.stderr
    # an explicit root before both, given after an option as well as before one
    res = evaluate_cli([str(relative_run), "--split", "test", f"paths.data_dir={data_dir}"],
                       elsewhere, {"DMLRUN_DATA_DIR": str(tmp_path)})
    assert res.returncode == 0, res.stderr[-2000:]


def test_evaluate_gives_the_runs_own_numbers_exactly(relative_run, tmp_path):
    summary = json.loads((relative_run / "summary.json").read_text())
    for split in ("test", "val"):
        out = tmp_path / f"{split}.json"
        res = evaluate_cli([str(relative_run), "--split", split, "--output", str(out)],
                           tmp_path)
        assert res.returncode == 0, res.stderr[-2000:]
        assert json.loads(out.read_text())["metrics"] == summary[split], split


def test_evaluate_help_is_quick_and_complete():
    import subprocess
    import sys

    code = ("import sys, dmlrun.evaluate_cli as e; p = e.parser(); "
            "print('torch' in sys.modules, all(a.help for a in p._actions))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.split() == ["False", "True"], out.stderr


def test_embedder_takes_uint8_or_unit_floats_and_refuses_the_rest(relative_run):
    import dmlrun
    from dmlrun.distances import EuclideanDistance

    model = dmlrun.load_embedder(relative_run)
    assert isinstance(model.distance, EuclideanDistance) and model.normalize is False
    images = torch.randint(0, 256, (6, 1, 28, 28), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(model(images), model(images.float() / 255))
    with pytest.raises(ValueError, match="divide by 255"):
        model(images.float())
    with pytest.raises(ValueError, match="uint8"):
        model(images.long())
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        model(images[:, :, 0])


PML_CONFIGS = {
    "loss/pml_ms.yaml": "_target_: pytorch_metric_learning.losses.MultiSimilarityLoss\n"
                        "alpha: 2\nbeta: 50\nbase: 0.5\n",
    "miner/pml_ms.yaml": "_target_: pytorch_metric_learning.miners.MultiSimilarityMiner\n"
                         "epsilon: 0.1\n",
    "loss/pml_proxy.yaml": "_target_: pytorch_metric_learning.losses.ProxyAnchorLoss\n"
                           "num_classes: 10\nembedding_size: 2\n",
}


def test_pytorch_metric_learning_losses_and_miners_train_as_they_are(tmp_path, data_dir):
    pytest.importorskip("pytorch_metric_learning")
    for rel, text in PML_CONFIGS.items():
        (tmp_path / "cfg" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "cfg" / rel).write_text(text)
    # the base settings (cosine per epoch, no warm-up), not the default recipe's
    base = ["--config-dir", str(tmp_path / "cfg"), *TINY, "trainer.epoch_plots=false",
            "experiment=contrastive"]
    res = run_cli([*base, "loss=pml_ms", "miner=pml_ms", f"hydra.run.dir={tmp_path / 'ms'}"],
                  cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads((tmp_path / "ms" / "summary.json").read_text())
    assert summary["test"]["map_at_r"] > summary["baselines"]["untrained"]["map_at_r"] + 0.05
    steps = [json.loads(x) for x in (tmp_path / "ms" / "steps.jsonl").read_text().splitlines()]
    assert all(s["mined"] > 0 and s["tuples"] == s["mined"] for s in steps)  # pairs given
    assert "yields pairs" in (tmp_path / "ms" / "dmlrun.log").read_text()
    # a loss with its own parameters: the proxies are optimised with the model
    res = run_cli([*base, "loss=pml_proxy", "miner=none", f"hydra.run.dir={tmp_path / 'px'}"],
                  cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    ckpt = torch.load(tmp_path / "px" / "checkpoints" / "last.pt", weights_only=False)
    torch.manual_seed(0)  # the run's seed: the loss is built first, so the same proxies
    from pytorch_metric_learning.losses import ProxyAnchorLoss

    initial = ProxyAnchorLoss(num_classes=10, embedding_size=2).proxies.detach()
    assert not torch.allclose(ckpt["loss"]["inner.proxies"], initial, atol=1e-3)


SQUARED_TRIPLET = '''
import torch

from dmlrun.losses.base import TripletFamilyLoss


class SquaredTripletLoss(TripletFamilyLoss):
    """max(0, D(a, p)^2 - D(a, n)^2 + margin) per triplet."""

    distance_params = ("margin",)

    def __init__(self, distance=None, margin: float = 1.0, reduction: str = "mean"):
        super().__init__(distance, reduction)
        self.margin = margin

    def triplet_losses(self, d_ap, d_an):
        return torch.relu(d_ap.pow(2) - d_an.pow(2) + self.margin)
'''


def test_a_triplet_family_loss_is_one_python_file_and_one_yaml(tmp_path, data_dir):
    """As docs/architecture.md ("How to add: a triplet-family loss") says."""
    (tmp_path / "my_losses.py").write_text(SQUARED_TRIPLET)
    (tmp_path / "cfg" / "loss").mkdir(parents=True)
    (tmp_path / "cfg" / "loss" / "sq_triplet.yaml").write_text(
        "_target_: my_losses.SquaredTripletLoss\ndistance: ${distance}\nmargin: 0.5\n")
    res = run_cli(["--config-dir", str(tmp_path / "cfg"), *QUICK, "loss=sq_triplet",
                   "miner=semihard", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path,
                  env_extra={"PYTHONPATH": str(tmp_path)})
    assert res.returncode == 0, res.stderr[-2000:]
    steps = [json.loads(x) for x in (tmp_path / "run" / "steps.jsonl").read_text().splitlines()]
    assert all(s["loss"] >= 0 for s in steps) and any(s["loss"] > 0 for s in steps)
    # the margin in distance units is checked like the shipped losses'
    res = run_cli(["--config-dir", str(tmp_path / "cfg"), *QUICK, "loss=sq_triplet",
                   "distance=cosine", "loss.margin=3", f"hydra.run.dir={tmp_path / 'r2'}"],
                  cwd=tmp_path, env_extra={"PYTHONPATH": str(tmp_path)})
    assert res.returncode == 2 and "loss.margin=3 can never be met" in res.stderr


def test_the_public_evaluate_grades_query_against_reference():
    import dmlrun
    import dmlrun.run  # noqa: F401  (importing the package's modules must not hide it)
    from dmlrun.distances import CosineDistance
    from dmlrun.metrics import clustering_metrics, retrieval_metrics

    g = torch.Generator().manual_seed(0)
    q, r = torch.randn(60, 4, generator=g), torch.randn(200, 4, generator=g)
    ql, rl = torch.randint(0, 4, (60,), generator=g), torch.randint(0, 4, (200,), generator=g)
    got = dmlrun.evaluate(q, ql, r, rl, distance="cosine")
    want = retrieval_metrics(q, ql, r, rl, CosineDistance())
    want.update(clustering_metrics(q, ql, CosineDistance()))
    assert got == want
    assert dmlrun.evaluate(q, ql)["precision_at_1"] == retrieval_metrics(q, ql)["precision_at_1"]
    with pytest.raises(ValueError, match="distance must be"):
        dmlrun.evaluate(q, ql, distance="manhattan")
    with pytest.raises(ValueError, match="together"):
        dmlrun.evaluate(q, ql, r)
