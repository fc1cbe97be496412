"""A run's plots and report.html: every file written, numbers consistent with the summary,
and the page checked in a real headless browser where one is installed (Debian's
chromium), else by decoding every inlined image."""

import base64
import io
import json
import re
import shutil

import matplotlib.pyplot as plt
import pytest
import torch
from PIL import Image

from dmlrun import plots
from tests.conftest import TINY, render_dom, run_cli

PLOTS = ("embedding.png", "curves.png", "gallery.png", "distances.png", "confusion.png",
         "per_class.png", "epochs/epoch_000.png", "epochs/epoch_002.png",
         "epochs/embedding.gif")


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data_dir):
    """A run through the real command, so the report has the command to show."""
    out = tmp_path_factory.mktemp("report") / "run"
    res = run_cli([*TINY, f"hydra.run.dir={out}"], cwd=out.parent)
    assert res.returncode == 0, res.stderr[-2000:]
    return out, json.loads((out / "summary.json").read_text())


def inlined_images(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/\w+;base64,([^"]+)"',
                                                    page)]


def test_every_plot_and_the_report_are_written(finished):
    run_dir, summary = finished
    for rel in PLOTS:
        assert (run_dir / "plots" / rel).stat().st_size > 0, rel
    page = (run_dir / "report.html").read_text()
    assert "http://" not in page and "https://" not in page  # needs no network
    assert page.count("<img") == len(inlined_images(page)) == 7  # every plot, inlined
    for blob in inlined_images(page):
        Image.open(io.BytesIO(blob)).load()  # decodes
    assert "dmlrun dataset.train_size=1500" in page.replace("\n", " ")  # the command
    assert summary["versions"]["torch"] in page


def test_per_class_metrics_add_up_to_the_test_metrics(finished):
    _, summary = finished
    per_class = summary["per_class"]
    assert list(per_class) == [str(c) for c in range(10)]
    n = sum(v["n"] for v in per_class.values())
    assert n == 800
    p1 = sum(v["precision_at_1"] * v["n"] for v in per_class.values()) / n
    assert p1 == pytest.approx(summary["test"]["precision_at_1"], abs=1e-12)
    map_r = sum(v["map_at_r"] * v["n"] for v in per_class.values()) / n
    assert map_r == pytest.approx(summary["test"]["map_at_r"], abs=1e-9)
    assert 0.0 <= summary["distance_overlap"] <= 1.0


@pytest.mark.skipif(not shutil.which("chromium"), reason="no chromium; the decoding test "
                    "above checks the images instead")
def test_the_report_renders_in_a_headless_browser(finished, tmp_path):
    run_dir, _ = finished
    res = render_dom(run_dir / "report.html", tmp_path / "profile")
    assert res.returncode == 0, res.stderr[-2000:]
    assert 'data-images="7"' in res.stdout and 'data-images-ok="true"' in res.stdout
    assert "CONSOLE" not in res.stderr, res.stderr[-2000:]  # no console message at all


def test_a_broken_image_is_marked_by_the_page(tmp_path):
    from dmlrun import report

    (tmp_path / "p.html").write_text(report.page("t", ['<img alt="x" src="data:image/png;'
                                                       'base64,AAAA">']))
    if not shutil.which("chromium"):
        pytest.skip("no chromium")
    res = render_dom(tmp_path / "p.html", tmp_path / "profile")
    assert 'data-images-ok="false"' in res.stdout and "image failed to load" in res.stdout


def test_a_one_epoch_axis_has_whole_epochs():
    fig, ax = plt.subplots()
    ax.plot([0.25, 0.5, 1.0], [1, 2, 3])
    plots.epoch_axis(ax, 1)
    assert list(ax.get_xticks()) == [0, 1]
    plt.close(fig)


def test_a_scatter_of_many_classes_has_no_legend_and_fits(tmp_path):
    import warnings

    g = torch.Generator().manual_seed(0)
    points, labels = torch.randn(2000, 2, generator=g), torch.arange(100).repeat(20)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a legend of 100 names made tight_layout give up
        path = plots.scatter(points, labels, tmp_path / "many.png", "test")
    assert path.stat().st_size > 0
    few = plots.scatter(points[:200], labels[:200] % 10, tmp_path / "few.png", "test")
    assert few.stat().st_size > 0


def test_confusion_counts_match_a_dense_table_and_pick_the_most_mixed_classes():
    from dmlrun import analysis

    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 12, (3000,), generator=g)
    nn_labels = torch.where(torch.rand(3000, generator=g) < 0.8, labels,
                            torch.randint(0, 12, (3000,), generator=g))
    dense = torch.zeros(12, 12, dtype=torch.long)
    for a, b in zip(labels.tolist(), nn_labels.tolist(), strict=True):
        dense[a, b] += 1
    every = analysis.confused_classes(labels, nn_labels, 20)
    assert every.tolist() == list(range(12))
    counts = analysis.nn_confusion(labels, nn_labels, every)
    assert torch.equal(counts[:, :12], dense) and not counts[:, 12].any()
    # classes 3 -> 7 mixed up most, then 5 -> 3: the first three classes drawn
    nn_labels[labels == 3] = 7
    nn_labels[(labels == 5) & (torch.arange(3000) % 2 == 0)] = 3
    drawn = analysis.confused_classes(labels, nn_labels, 3)
    assert drawn.tolist() == [3, 5, 7]
    counts = analysis.nn_confusion(labels, nn_labels, drawn)
    assert counts.shape == (3, 4)
    assert counts[0].tolist() == [0, 0, int((labels == 3).sum()), 0]  # every 3 -> 7
    assert counts.sum(1).tolist() == [int((labels == c).sum()) for c in (3, 5, 7)]
    assert int(counts[1, 3]) == int(((labels == 5) & ~torch.isin(nn_labels, drawn)).sum())


def test_the_plots_of_a_test_split_of_thousands_of_classes_stay_small_and_fast(tmp_path):
    """SOP tests on 11,316 classes: the confusion and per-class plots draw 20 classes and
    a ranked curve, not a table of every class (a 100-class one took about a minute)."""
    from dmlrun.data.dataset import Split
    from dmlrun.distances import EuclideanDistance
    from dmlrun.retrieval_plots import MAX_CONFUSION_CLASSES, write_all

    g = torch.Generator().manual_seed(0)
    labels = torch.arange(3000).repeat_interleave(3)
    emb = torch.randn(3000, 8, generator=g)[labels] + 0.3 * torch.randn(9000, 8, generator=g)
    split = Split(torch.randint(0, 256, (9000, 3, 8, 8), dtype=torch.uint8, generator=g),
                  labels)
    out = write_all(emb, split, EuclideanDistance(), None, tmp_path, "many", None, 0)
    assert len(out["per_class"]) == 3000
    for name in ("confusion.png", "per_class.png"):
        width, height = Image.open(tmp_path / name).size
        assert width <= 1500 and height <= 1400, (name, width, height)
    # 20 rows, 21 columns ("other"): at 100 dpi about 1.0 + 0.55 x 21 inches wide
    assert Image.open(tmp_path / "confusion.png").size[0] >= 100 * 0.55 * \
        (MAX_CONFUSION_CLASSES + 1)
    # report.html's table: worst classes first, as per_class.png ranks them
    from dmlrun.report import _per_class_table

    page = _per_class_table(out)
    first = re.search(r"<tr><td>([^<]+)</td>", page).group(1)
    assert "worst first" in page
    assert out["per_class"][first]["precision_at_1"] == min(
        v["precision_at_1"] for v in out["per_class"].values())


def test_summary_json_is_valid_json_with_the_new_fields(finished):
    run_dir, _ = finished
    summary = json.loads((run_dir / "summary.json").read_text())
    assert {"per_class", "distance_overlap", "plot_seconds"} <= set(summary)


def test_evaluate_draws_the_same_plots_for_a_finished_run(finished, tmp_path):
    import sys

    run_dir, summary = finished
    out = tmp_path / "eval.json"
    res = run_cli([str(run_dir), "--plots", "--output", str(out)], cwd=tmp_path,
                  exe=[sys.executable, "-m", "dmlrun.evaluate_cli"],
                  env_extra={"CUDA_VISIBLE_DEVICES": ""})
    assert res.returncode == 0, res.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["per_class"] == summary["per_class"]  # graded as the run graded itself
    for name in ("embedding.png", "gallery.png", "distances.png", "confusion.png",
                 "per_class.png"):
        assert (run_dir / "plots" / "evaluate-mnist-test" / name).stat().st_size > 0
