"""Sweeps through the launcher and sweeper plugins, on a tiny MNIST subset."""

import json

import yaml

from tests.conftest import TINY, compose_cfg, run_cli

QUICK = [*TINY, "sampler.batches_per_epoch=2", "trainer.max_epochs=1",
         "trainer.epoch_plots=false", "evaluation.baselines=false"]


def summaries(root):
    return [json.loads(p.read_text()) for p in sorted(root.glob("**/summary.json"))]


def test_joblib_launcher_runs_jobs_in_parallel(tmp_path, data_dir):
    res = run_cli(["-m", *QUICK, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                   "loss=contrastive,triplet", "miner=easy_hard",
                   f"paths.multirun_dir={tmp_path}/m"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert {s["choices"]["loss"] for s in summaries(tmp_path / "m")} == {"contrastive", "triplet"}


def test_submitit_local_executor_and_slurm_preset(tmp_path, data_dir):
    """Two jobs of two tasks each: every job trains as one 2-process group (ranks from
    submitit's job environment) and writes its one folder."""
    res = run_cli(["-m", *QUICK, "hydra/launcher=submitit_local",
                   "hydra.launcher.tasks_per_node=2", "seed=0,1",
                   f"paths.multirun_dir={tmp_path}/m"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    runs = summaries(tmp_path / "m")
    assert sorted(s["seed"] for s in runs) == [0, 1]
    assert all(s["processes"] == 2 and s["backend"] == "gloo" for s in runs)
    assert len(list((tmp_path / "m").glob("*/*/*_*"))) == 2
    res = run_cli(["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "--cfg", "hydra"],
                  cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    launcher = yaml.safe_load(res.stdout)["hydra"]["launcher"]
    assert launcher["_target_"].endswith("SlurmLauncher") and launcher["partition"] == "gpu"
    assert launcher["gpus_per_node"] == 1


def test_optuna_objective_is_the_validation_metric(tmp_path, data_dir):
    res = run_cli(["-m", *QUICK, "sweep=optuna_lr_margin", "hydra.sweeper.n_trials=2",
                   f"paths.multirun_dir={tmp_path}/m"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    runs = summaries(tmp_path / "m")
    assert len(runs) == 2
    (result,) = (tmp_path / "m").glob("*/*/optimization_results.yaml")
    best = yaml.safe_load(result.read_text())["best_value"]
    assert best == max(r["val"]["precision_at_1"] for r in runs)


def test_sweep_presets_list_their_grids():
    cfg = compose_cfg(["sweep=losses_miners"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    sizes = [len(str(v).split(",")) for v in params.values()]
    assert sizes == [2, 3, 3]
    margins = compose_cfg(["sweep=margins"], return_hydra_config=True)
    assert margins.loss._target_.endswith("TripletLoss")


def test_tensorboard_logger_writes_scalars_and_projector(tmp_path, data_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dmlrun.run import run

    cfg = compose_cfg([*QUICK, f"paths.data_dir={data_dir}", "logger=tensorboard"])
    run(cfg, tmp_path / "run")
    tb = tmp_path / "run" / "tensorboard"
    acc = EventAccumulator(str(tb))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "val/precision_at_1" in tags and "train/train_loss" in tags
    assert len(acc.Scalars("val/precision_at_1")) == 1
    assert [e.step for e in acc.Scalars("step/loss")] == [1, 2]  # every step (QUICK: 2)
    events = b"".join(p.read_bytes() for p in tb.rglob("events.out.tfevents.*"))
    assert b"_hparams_/session_start_info" in events and b"hparam/test_map_at_r" in events
    assert (tb / "projector_config.pbtxt").is_file()
    (tensors,) = tb.glob("**/tensors.tsv")
    rows = tensors.read_text().splitlines()
    assert len(rows) == 800 and len(rows[0].split("\t")) == 2  # the 800 test points, 2-D
    assert (tensors.parent / "sprite.png").is_file()
