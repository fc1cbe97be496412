"""Full-length MNIST runs with the shipped defaults (minutes each): marked slow."""

import json

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("overrides", [[], ["loss=triplet", "miner=easy_hard"]])
def test_default_2d_run_reaches_precision_at_1(tmp_path, data_dir, overrides):
    run_dir = tmp_path / "run"
    res = run_cli([*overrides, "trainer.progress_bar=false", f"hydra.run.dir={run_dir}"],
                  cwd=tmp_path, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["embedding_dim"] == 2
    assert summary["test"]["precision_at_1"] >= 0.95
