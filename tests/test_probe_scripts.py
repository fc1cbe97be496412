"""scripts/probe_layers.py (each stage's features, the fresh 2-D head),
scripts/probe_pseudo_labels.py (held-out rows, propagation accuracy) and
scripts/semi_teachers.py (teachers and their student, one chain)."""

import importlib.util

import pytest
import torch

from dmlrun.models.convnet import ConvNet
from tests.conftest import REPO


def load_script(name: str = "probe_layers"):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stages_have_their_widths_and_the_last_is_the_embedding():
    probe = load_script()
    torch.manual_seed(0)
    model = ConvNet(embedding_dim=3, channels=(4, 8), hidden_dim=16, batch_norm=True,
                    pool_first=True).eval()
    images = torch.randint(0, 256, (10, 1, 28, 28), dtype=torch.uint8)
    out = probe.stage_outputs(model, images, batch=4)  # three chunks
    assert list(out) == ["conv", "hidden1", "hidden2", "embedding"]
    assert [v.shape for v in out.values()] == [(10, 8 * 4 * 4), (10, 16), (10, 16), (10, 3)]
    with torch.no_grad():
        assert torch.allclose(out["embedding"], model(images.float() / 255), atol=1e-6)
        assert torch.allclose(out["hidden2"] @ model.head[-1].weight.T + model.head[-1].bias,
                              out["embedding"], atol=1e-5)


def test_fresh_head_separates_separable_features():
    probe = load_script()
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(4).repeat_interleave(100)
    centres = torch.randn(4, 16, generator=g) * 3
    feats = centres[labels] + 0.5 * torch.randn(400, 16, generator=g)
    head = probe.train_head(feats, labels, seed=0, steps=150, p=4, k=10)
    with torch.no_grad():
        emb = head(feats)
    assert emb.shape == (400, 2)
    d = torch.cdist(emb, emb).fill_diagonal_(float("inf"))
    assert (labels[d.argmin(1)] == labels).float().mean() > 0.95


def test_rows_within_finds_an_ordered_subset_and_refuses_others():
    probe = load_script("probe_pseudo_labels")
    whole = torch.arange(40).view(10, 2, 2)
    whole[7] = whole[3]  # a repeated row: the subset's order decides
    picks = torch.tensor([1, 3, 4, 7, 9])
    assert probe.rows_within(whole[picks], whole).tolist() == picks.tolist()
    with pytest.raises(SystemExit):
        probe.rows_within(whole[[4, 1]], whole)  # not in the whole's order


def test_pseudo_accuracy_counts_only_unlabeled_rows():
    probe = load_script("probe_pseudo_labels")
    g = torch.Generator().manual_seed(0)
    truth = torch.arange(3).repeat_interleave(50)
    feats = torch.eye(3)[truth] * 5 + 0.1 * torch.randn(150, 3, generator=g)
    labeled = torch.tensor([0, 50, 100])
    assert probe.pseudo_accuracy(feats, truth, labeled, 3, pca_dims=None) == 1.0
    wrong = truth.clone()
    wrong[1] = 2  # a hidden label the graph cannot match: 1 of 147 unlabeled rows
    acc = probe.pseudo_accuracy(feats, wrong, labeled, 3, pca_dims=None)
    assert acc == pytest.approx(146 / 147)


@pytest.mark.slow  # three short runs; test_semi.py covers semi.graph=teachers itself
def test_semi_teachers_chain_trains_teachers_then_their_student(tmp_path, data_dir,
                                                                 monkeypatch):
    import json
    import sys

    from tests.conftest import TINY

    monkeypatch.syspath_prepend(str(REPO / "scripts"))  # its import of ablate_default
    monkeypatch.setenv("DMLRUN_DATA_DIR", str(data_dir))
    script = load_script("semi_teachers")
    tiny = [o for o in TINY if not o.startswith("dataset.val_size")]
    row = script.chain(tmp_path / "s3", 3, 2, [*tiny, "dataset.val_size=100"])
    picks = {json.loads((tmp_path / "s3" / name / "labeled_indices.json").read_text())["seed"]
             for name in ("teacher_1", "teacher_2", "student")}
    assert picks == {3}  # one split for all three
    assert row["seed"] == 3 and len(row["teachers"]) == 2 and 0.5 < row["pseudo"] <= 1
    assert 0 < row["p_at_1"] <= 1 and row["minutes"] > 0
    assert "the teachers' embeddings" in (tmp_path / "s3" / "student" / "dmlrun.log").read_text()
    text = script.table([row])
    assert text.splitlines()[-1].startswith("| 3 | ") and "%" in text.splitlines()[-1]
    # a student arm trained on those teachers, then read back without training again
    arm = script.student_arm(tmp_path, tmp_path / "arms", 3, "distill0",
                             [*tiny, "dataset.val_size=100"])
    log = tmp_path / "arms" / "s3" / "distill0" / "dmlrun.log"
    assert "semi.distill=0" in (log.parent / ".hydra" / "overrides.yaml").read_text()
    assert 0 < arm["p_at_1"] <= 1 and 0 <= arm["val_map_at_r"] <= 1
    stamp = log.stat().st_mtime
    assert script.student_arm(tmp_path, tmp_path / "arms", 3, "distill0") == arm
    assert log.stat().st_mtime == stamp
    assert script.arms_table([arm]).splitlines()[-1].startswith("| distill0 | ")
    with pytest.raises(SystemExit, match="no teacher_"):
        script.student_arm(tmp_path, tmp_path / "arms", 4, "distill0")
    monkeypatch.setattr(sys, "argv", ["semi_teachers.py", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="exists"):
        script.main()


def test_the_shipped_student_arm_is_the_preset_as_it_is(monkeypatch):
    """The student arm marked shipped adds no override to experiment=semi_teachers_64d,
    and its weight is the preset's."""
    from tests.conftest import compose_cfg

    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    script = load_script("semi_teachers")
    shipped = [name for name, (_, what) in script.STUDENT_ARMS.items() if "shipped" in what]
    assert shipped == ["distill1000"] and script.STUDENT_ARMS["distill1000"][0] == []
    assert compose_cfg(["experiment=semi_teachers_64d"]).semi.distill == 1000
    before = compose_cfg(["experiment=semi_teachers_64d",
                          *script.STUDENT_ARMS["contrastive_distill0"][0]])
    assert before.loss._target_.endswith("ContrastiveLoss") and before.semi.distill == 0
