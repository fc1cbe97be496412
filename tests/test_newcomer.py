"""What a new user meets first, through the real command: help, version, error messages
and exit codes, sweeps with failed jobs, and the folders a refused start leaves."""

import json
import os
import stat

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
    for part in ("Examples", "dmlrun loss=triplet miner=hard", "loss: ", "miner: ",
                 "dmlrun-evaluate", "dmlrun-summarize", "docs/architecture.md"):
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
