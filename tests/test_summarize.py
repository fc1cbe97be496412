"""dmlrun-summarize on run folders laid out as Hydra writes them."""

import json
import math

import pytest

from dmlrun.summarize import main, mean_std_ci, summarize


def fake_run(root, name, overrides, p1=None, failed=False):
    d = root / name
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "config.yaml").write_text("seed: 0\n")
    (d / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if p1 is not None:
        (d / "summary.json").write_text(json.dumps(
            {"test": {"precision_at_1": p1, "map_at_r": p1 / 2, "nmi": 0.5},
             "val": {"precision_at_1": p1}, "wall_seconds": 1.0}))
    if failed:
        (d / "FAILED").write_text("boom\n")
    return d


def test_ci_matches_hand_computation():
    n, mean, std, ci = mean_std_ci([0.90, 0.92, 0.97])
    assert n == 3 and mean == pytest.approx(0.93)
    assert std == pytest.approx(math.sqrt(((0.03) ** 2 + (0.01) ** 2 + (0.04) ** 2) / 2))
    # t(0.975, df=2) = 4.302653
    assert ci == pytest.approx(4.302653 * std / math.sqrt(3), rel=1e-6)


def test_groups_by_varying_settings_and_pools_seeds(tmp_path):
    values = {("contrastive", "hard"): [0.90, 0.92, 0.97],
              ("triplet", "hard"): [0.80, 0.81, 0.79],
              ("contrastive", "semihard"): [0.95, 0.96, 0.94],
              ("triplet", "semihard"): [0.5, 0.6, 0.7]}
    i = 0
    for (loss, miner), ps in values.items():
        for seed, p1 in enumerate(ps):
            fake_run(tmp_path, f"{i}", [f"loss={loss}", f"miner={miner}", f"seed={seed}",
                                        "trainer.max_epochs=1"], p1)
            i += 1
    fake_run(tmp_path, "99", ["loss=triplet", "miner=hard", "seed=3", "trainer.max_epochs=1"],
             failed=True)
    fake_run(tmp_path, "98", ["loss=triplet", "miner=hard", "seed=4", "trainer.max_epochs=1"])
    result = summarize([str(tmp_path)], "test.precision_at_1")
    rows = result["rows"]
    assert result["varying"] == ["loss", "miner"]
    assert len(rows) == 4 and all(r["test.precision_at_1 n"] == 3 for r in rows)
    assert [(r["loss"], r["miner"]) for r in rows][0] == ("contrastive", "semihard")  # sorted
    first = next(r for r in rows if (r["loss"], r["miner"]) == ("contrastive", "hard"))
    n, mean, std, ci = mean_std_ci([0.90, 0.92, 0.97])
    assert first["test.precision_at_1 mean"] == pytest.approx(mean)
    assert first["test.precision_at_1 ci95"] == pytest.approx(ci)
    assert first["runs"] == 3
    assert sorted(s for _, s in result["problems"]) == ["failed", "unfinished"]
    for f in ("summary.md", "summary.csv", "comparison.png"):
        assert (tmp_path / f).is_file()
    triplet_hard = next(r for r in rows if (r["loss"], r["miner"]) == ("triplet", "hard"))
    # the failed and the unfinished run are listed apart, not counted in the row
    assert triplet_hard["runs"] == 3 and triplet_hard["test.precision_at_1 n"] == 3
    page = (tmp_path / "report.html").read_text()
    assert "Failed or unfinished" in page and "boom" in page and "did not finish" in page


def test_command_lists_problems_and_errors(tmp_path, capsys):
    fake_run(tmp_path, "a", ["loss=triplet"], 0.9)
    fake_run(tmp_path, "b", ["loss=contrastive"], failed=True)
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| triplet |" in out and "failed:" in out
    assert main([str(tmp_path / "empty")]) == 2
    assert main([str(tmp_path), "--metric", "test.map_at_t"]) == 2
    assert "did you mean test.map_at_r?" in capsys.readouterr().err
    assert main([str(tmp_path), "--output", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "report.html").is_file()


def test_a_key_one_run_left_at_its_default_shows_the_default(tmp_path):
    a = fake_run(tmp_path, "a", ["loss.margin=0.5"], 0.9)
    b = fake_run(tmp_path, "b", [], 0.8)
    for d in (a, b):
        (d / ".hydra" / "config.yaml").write_text("seed: 0\nloss:\n  margin: 1.0\n")
    rows = summarize([str(tmp_path)], "test.precision_at_1")["rows"]
    assert sorted(r["loss.margin"] for r in rows) == ["0.5", "1.0"]


def test_a_group_left_at_its_default_shows_the_choice_hydra_recorded(tmp_path):
    fake_run(tmp_path, "a", ["loss=triplet", "experiment=triplet_hard"], 0.9)
    b = fake_run(tmp_path, "b", [], 0.8)
    c = fake_run(tmp_path, "c", ["loss=contrastive"], 0.7)
    (c / ".hydra" / "config.yaml").write_text(
        "seed: 0\nexperiment: null\nloss:\n  _target_: dmlrun.losses.ContrastiveLoss\n")
    # b ran the default recipe: Hydra's record names loss=triplet_soft, whose class
    # (TripletLoss) is the same as loss=triplet's
    (b / ".hydra" / "config.yaml").write_text(
        "seed: 0\nloss:\n  _target_: dmlrun.losses.TripletLoss\n")
    (b / ".hydra" / "hydra.yaml").write_text(
        "hydra:\n  runtime:\n    choices:\n      loss: triplet_soft\n      experiment: default\n"
        "      debug: null\n")
    result = summarize([str(tmp_path)], "test.precision_at_1")
    rows = {r["loss"]: r for r in result["rows"]}
    assert result["varying"] == ["experiment", "loss"]
    assert rows["triplet_soft"]["experiment"] == "default"
    assert rows["triplet"]["experiment"] == "triplet_hard"
    assert rows["contrastive"]["experiment"] == ""  # no record, no value: left blank
    # without Hydra's record, the group's class stands in
    (b / ".hydra" / "hydra.yaml").unlink()
    from dmlrun.summarize import _saved_choices

    _saved_choices.cache_clear()
    rows = summarize([str(tmp_path)], "test.precision_at_1")["rows"]
    assert "(TripletLoss)" in {r["loss"] for r in rows}
    # one run per row: no spread to show, a dash rather than "nan"
    table = (tmp_path / "summary.md").read_text()
    assert "nan" not in table and "| - |" in table
