"""Resume after a real SIGKILL ends with the same metrics as an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time

import torch

from tests.conftest import DATA_DIR, TINY, run_cli

TIMING = {"train_seconds", "samples_per_s", "epoch_seconds"}
ARGS = [a for a in TINY if not a.startswith(("trainer.max_epochs", "sampler.batches"))] + [
    "trainer.max_epochs=3", "sampler.batches_per_epoch=12"]


SHORT = [a for a in ARGS if not a.startswith(("trainer.max_epochs", "sampler.batches"))] + [
    "trainer.max_epochs=1", "sampler.batches_per_epoch=2"]


def records(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path, data_dir):
    whole = tmp_path / "whole"
    res = run_cli(ARGS + [f"hydra.run.dir={whole}"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]

    killed = tmp_path / "killed"
    env = {**os.environ, "DMLRUN_DATA_DIR": str(DATA_DIR)}
    proc = subprocess.Popen([sys.executable, "-m", "dmlrun", *ARGS, f"hydra.run.dir={killed}"],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    metrics = killed / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text().count("\n") >= 1:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "summary.json").exists()
    done_before = len(records(killed))
    assert 1 <= done_before < 3

    res = run_cli(ARGS + [f"trainer.resume={killed}"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resuming" in (killed / "dmlrun.log").read_text()
    assert records(killed) == records(whole)
    a = json.loads((whole / "summary.json").read_text())
    b = json.loads((killed / "summary.json").read_text())
    assert a["test"] == b["test"] and a["best_epoch"] == b["best_epoch"]
    assert (killed / ".hydra" / "overrides.yaml").read_text() == \
        (whole / ".hydra" / "overrides.yaml").read_text().replace(str(whole), str(killed))
    assert (killed / ".hydra-resume" / "overrides.yaml").is_file()
    # the per-epoch frames from before the kill survive: the same frames, PNGs and GIF
    frames = sorted(p.name for p in (whole / "plots" / "epochs").glob("frame_*.pt"))
    assert frames == [f"frame_{e:03d}.pt" for e in range(4)]
    for name in frames:
        assert torch.equal(torch.load(whole / "plots" / "epochs" / name),
                           torch.load(killed / "plots" / "epochs" / name)), name
    assert len(list((killed / "plots" / "epochs").glob("epoch_*.png"))) == 4
    assert (killed / "plots" / "epochs" / "embedding.gif").is_file()

    # a finished run is not resumed again, and nothing in it changes
    def snapshot():
        return {str(p.relative_to(killed)): (p.stat().st_size, p.stat().st_mtime_ns)
                for p in killed.rglob("*")}
    before = snapshot()
    res = run_cli(ARGS + [f"trainer.resume={killed}"], cwd=tmp_path)
    assert res.returncode == 2 and "has finished" in res.stderr
    assert snapshot() == before


def test_resume_refuses_a_different_config(tmp_path, data_dir):
    run_dir = tmp_path / "r"
    res = run_cli(SHORT + [f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    (run_dir / "summary.json").unlink()  # pretend it was killed before the end
    res = run_cli(SHORT + ["loss.margin=0.5", f"trainer.resume={run_dir}"], cwd=tmp_path)
    assert res.returncode == 2 and "config differs" in res.stderr
    # the key and both values, and the command that resumes with the run's own settings
    assert "loss.margin: 0.0 in the run, 0.5 now" in res.stderr  # the soft margin's 0
    command = res.stderr.split("Resume with the run's own settings: ", 1)[1].split("\n")[0]
    assert command.startswith("dmlrun ") and "loss.margin" not in command
    assert command.endswith(f"trainer.resume={run_dir}") and "trainer.max_epochs=1" in command
    res = run_cli(ARGS + [f"trainer.resume={tmp_path / 'nothing'}"], cwd=tmp_path)
    assert res.returncode == 2 and "no such run folder" in res.stderr
    assert not (tmp_path / "nothing").exists()  # refused before Hydra made the folder
    (tmp_path / "empty").mkdir()
    res = run_cli(ARGS + [f"trainer.resume={tmp_path / 'empty'}"], cwd=tmp_path)
    assert res.returncode == 2 and "no checkpoints/last.pt" in res.stderr
    assert list((tmp_path / "empty").iterdir()) == []
