"""The per-step learning-rate schedule (scheduler=cosine_steps): warm-up, then a cosine
from the optimizer's rate to zero over the run's steps, the rate each step applies."""

import math

import pytest
import torch

from dmlrun.losses import TripletLoss
from dmlrun.miners import HardMiner
from dmlrun.recorder import TrainingState
from dmlrun.run import run
from dmlrun.train import StepConfig, WeightAverage, lr_factor, train_epoch
from tests.conftest import TINY, compose_cfg, rate_recording_setup


def test_factor_without_anneal_is_the_warmup():
    cfg = StepConfig(warmup_epochs=0.5, max_epochs=3)
    assert [lr_factor(cfg, 1, s, 10) for s in range(6)] == pytest.approx(
        [0.2, 0.4, 0.6, 0.8, 1, 1])
    assert lr_factor(StepConfig(max_epochs=3), 3, 9, 10) == 1.0


def test_cosine_falls_from_one_to_near_zero_over_the_run():
    cfg = StepConfig(anneal="cosine", max_epochs=2)
    rates = [lr_factor(cfg, e, s, 10) for e in (1, 2) for s in range(10)]
    assert rates[0] == 1.0  # the first step trains at the optimizer's rate
    assert rates[10] == pytest.approx(0.5)  # half-way through the run
    assert all(a > b for a, b in zip(rates, rates[1:], strict=False))  # falls every step
    assert rates[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 19 / 20)))
    assert 0 < rates[-1] < 0.01


def test_cosine_starts_after_the_warmup_and_keeps_its_floor():
    cfg = StepConfig(anneal="cosine", max_epochs=3, warmup_epochs=1, min_lr_ratio=0.1)
    first = [lr_factor(cfg, 1, s, 4) for s in range(4)]
    assert first == pytest.approx([0.25, 0.5, 0.75, 1.0])  # warm-up alone
    second = [lr_factor(cfg, 2, s, 4) for s in range(4)]
    assert second[0] == pytest.approx(1.0)  # the cosine starts where the warm-up ends
    assert second[-1] < second[0]
    # half-way through the 2 epochs after the warm-up: the midpoint of 1 and the floor
    assert lr_factor(cfg, 3, 0, 4) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(cfg, 3, 3, 4) > 0.1


def test_each_step_trains_at_the_scheduled_rate():
    split, model, opt, epoch = rate_recording_setup()
    cfg = StepConfig(progress_bar=False, anneal="cosine", max_epochs=2)
    records = []
    for epoch_no in (1, 2):
        records.append(train_epoch(model, TripletLoss(), HardMiner(), opt, split, epoch, cfg,
                                   epoch_no=epoch_no))
        assert opt.param_groups[0]["lr"] == 0.01  # handed back for the epoch scheduler
    expected = [0.01 * 0.5 * (1 + math.cos(math.pi * i / 8)) for i in range(8)]
    assert opt.seen == pytest.approx(expected)
    # the epoch record keeps the rates its first and last steps applied (curves.png)
    assert [r[k] for r in records for k in ("lr_first", "lr_last")] == pytest.approx(
        [expected[0], expected[3], expected[4], expected[7]])


def test_cosine_steps_config_builds_no_epoch_scheduler():
    cfg = compose_cfg(["scheduler=cosine_steps"])
    assert cfg.scheduler.anneal == "cosine" and "_target_" not in cfg.scheduler


def test_weight_average_follows_then_averages_and_swaps_back():
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    avg = WeightAverage(model, decay=0.5)
    with torch.no_grad():
        model.weight.fill_(1.0)
    avg.update()  # update 1: decay min(0.5, 2 / 11): mostly the new weights
    assert avg.average[0] == pytest.approx(torch.full((1, 2), 9 / 11))
    for _ in range(40):
        avg.update()
    assert avg.average[0] == pytest.approx(torch.ones(1, 2))
    with torch.no_grad():
        model.weight.fill_(3.0)
    avg.update()  # decay 0.5 now: half-way to the new weights
    assert avg.average[0] == pytest.approx(torch.full((1, 2), 2.0))
    avg.swap()
    assert torch.equal(model.weight, torch.full((1, 2), 2.0))
    state = avg.state_dict()
    assert torch.equal(state["average"][0], torch.full((1, 2), 3.0))
    avg.swap()
    assert torch.equal(model.weight, torch.full((1, 2), 3.0))
    with pytest.raises(ValueError):
        WeightAverage(model, decay=1.0)


def test_a_run_with_averaged_weights_checkpoints_the_average(tmp_path, data_dir):
    cfg = compose_cfg(TINY + [f"paths.data_dir={data_dir}", "trainer.ema_decay=0.9",
                              "trainer.epoch_plots=false", "evaluation.baselines=false"])
    summary = run(cfg, tmp_path / "run")
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)
    assert last["ema"]["updates"] == cfg.trainer.max_epochs * cfg.sampler.batches_per_epoch
    # "model" is the average (validated and tested); "ema" keeps the trained weights, which
    # differ from it after a few steps
    weights = [v for v in last["model"].values() if v.is_floating_point()]
    assert len(weights) == len(last["ema"]["average"])
    assert any(not torch.equal(a, w) for a, w in zip(last["ema"]["average"], weights,
                                                     strict=True))
    assert summary["test"]["precision_at_1"] > 0.2


def test_a_checkpoint_with_averaged_weights_resumes_the_trained_ones():
    def state(seed):
        torch.manual_seed(seed)
        model = torch.nn.Linear(3, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        return TrainingState(model, torch.nn.Identity(), opt, None, torch.Generator(), None,
                             WeightAverage(model, decay=0.9))

    saved = state(0)
    for _ in range(5):  # a few steps, so the average and the weights differ
        with torch.no_grad():
            for p in saved.model.parameters():
                p.add_(1.0)
        saved.ema.update()
    trained = [p.detach().clone() for p in saved.model.parameters()]
    average = [a.clone() for a in saved.ema.average]
    saved.ema.swap()  # as fit does before validation and checkpointing
    checkpoint = saved.state_dict()
    assert all(torch.equal(p, a) for p, a in zip(saved.model.parameters(), average,
                                                   strict=True))
    resumed = state(1)
    resumed.load_state_dict(checkpoint)
    assert all(torch.equal(p, t) for p, t in zip(resumed.model.parameters(), trained,
                                                   strict=True))
    assert all(torch.equal(a, b) for a, b in zip(resumed.ema.average, average, strict=True))
    assert resumed.ema.updates == 5


@pytest.mark.parametrize("select, tested", [("best", 1), ("last", 3)])
def test_select_last_tests_the_last_finite_epoch_and_best_the_best_one(tmp_path, select,
                                                                        tested):
    from dmlrun.recorder import Recorder

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    training = TrainingState(model, torch.nn.Identity(), opt, None, torch.Generator())
    (tmp_path / "checkpoints").mkdir()
    recorder = Recorder(tmp_path, "precision_at_1", {}, select)
    for epoch, value in enumerate([0.9, 0.5, 0.7, float("nan")], 1):
        with torch.no_grad():
            model.weight.fill_(epoch)
        recorder.save({"epoch": epoch, "val_precision_at_1": value,
                       "first_neg_distance": 1.0}, training)
    assert recorder.best["epoch"] == tested
    state = recorder.best_state(torch.device("cpu"))
    assert state["epoch"] == tested and float(state["model"]["weight"][0, 0]) == tested
