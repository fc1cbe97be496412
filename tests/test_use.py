"""Using a trained model: index and search (dmlrun-index, dmlrun.Index), clusters
(dmlrun-cluster), export (dmlrun-export), on a short real MNIST run."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dmlrun.distances import (
    CosineDistance,
    DotProductDistance,
    EuclideanDistance,
    SquaredEuclideanDistance,
)
from dmlrun.errors import UserError
from dmlrun.index import Index
from dmlrun.search import nearest_neighbours
from tests.conftest import DATA_DIR, TINY, render_dom, run_cli

DIM = 16


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    """A short 16-D run through the real command."""
    out = tmp_path_factory.mktemp("use") / "run"
    res = run_cli([*TINY, f"model.embedding_dim={DIM}", f"hydra.run.dir={out}"],
                  cwd=out.parent)
    assert res.returncode == 0, res.stderr[-2000:]
    return out, json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def test_index(trained, tmp_path_factory):
    run_dir, _ = trained
    out = tmp_path_factory.mktemp("idx") / "test-split"
    os.environ.setdefault("DMLRUN_DATA_DIR", str(DATA_DIR))
    return Index.build(run_dir, ["split=test"], out, progress=False)


@pytest.fixture(scope="module")
def digit_folder(tmp_path_factory, test_index):
    """60 MNIST test digits as PNG files, nested two levels deep by class."""
    root = tmp_path_factory.mktemp("digits") / "digits"
    for i, img in zip(range(60), test_index.display_images(range(60)), strict=False):
        label = int(test_index.labels[i])
        path = root / f"class_{label}" / f"batch_{i % 2}" / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        img.convert("L").save(path)
    return root


def tool(name: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return run_cli(args, cwd=cwd, exe=[sys.executable, "-m", f"dmlrun.{name}"],
                   env_extra={"CUDA_VISIBLE_DEVICES": ""})


# ---- the search itself -------------------------------------------------------------------
@pytest.mark.parametrize("distance", [EuclideanDistance(), SquaredEuclideanDistance(),
                                      CosineDistance(), DotProductDistance(),
                                      EuclideanDistance(normalize=True)])
def test_nearest_neighbours_equal_a_stable_sort_with_ties_by_index(distance):
    g = torch.Generator().manual_seed(0)
    ref = torch.randint(-2, 3, (300, 3), generator=g).float()  # many exact ties
    queries = torch.cat([ref[:40], torch.randn(10, 3, generator=g)])
    exclude = torch.cat([torch.arange(40), torch.full((10,), -1)])
    idx, dist = nearest_neighbours(queries, ref, 7, distance, exclude)
    full = distance.pairwise(queries, ref)
    full[torch.arange(40), torch.arange(40)] = float("inf")
    want = torch.sort(full, dim=1, stable=True).indices[:, :7]
    assert torch.equal(idx, want)
    # the distances of the pairs found, computed again difference first
    torch.testing.assert_close(dist, full.gather(1, want), atol=1e-5, rtol=1e-6)


def test_a_copy_of_a_reference_reads_zero_away_not_the_matrix_forms_rounding():
    g = torch.Generator().manual_seed(1)
    ref = torch.randn(500, 64, generator=g) * 3  # norms about 24: |x|^2 about 580
    idx, dist = nearest_neighbours(ref[:20].clone(), ref, 3, EuclideanDistance())
    assert torch.equal(idx[:, 0], torch.arange(20))
    assert dist[:, 0].max() < 1e-5  # sqrt of the 1e-12 floor
    expected = (ref[:20, None] - ref[idx[:, 1:]]).norm(dim=2)
    torch.testing.assert_close(dist[:, 1:], expected, atol=1e-5, rtol=1e-6)


def test_an_index_of_the_test_split_gives_the_runs_test_p_at_1_exactly(trained, test_index):
    _, summary = trained
    hits = test_index.search_items(k=1)
    assert len(test_index) == 800 and test_index.dim == DIM
    p1 = (hits.labels[:, 0] == test_index.labels).double().mean().item()
    assert p1 == summary["test"]["precision_at_1"]
    assert not (hits.indices[:, 0] == torch.arange(800)).any()  # itself excluded


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_an_approximate_index_keeps_recall_and_says_so(trained, tmp_path, kind):
    run_dir, _ = trained
    index = Index.build(run_dir, ["split=test"], tmp_path / kind, kind=kind, progress=False)
    ann = json.loads((tmp_path / kind / "index.json").read_text())["ann"]
    assert ann["recall_at_k"] >= 0.95 and ann["sample"] == 800 and ann["speedup"] > 0
    exact = index.search_items(torch.arange(100), 10, exact=True)
    approx = index.search_items(torch.arange(100), 10)
    assert not (approx.indices == torch.arange(100)[:, None]).any()  # itself excluded
    found = (approx.indices[:, :, None] == exact.indices[:, None, :]).any(2).double().mean()
    assert found >= 0.9
    both = approx.indices == exact.indices
    assert torch.allclose(approx.distances[both], exact.distances[both], atol=1e-4)


def test_a_folder_index_finds_each_image_first_and_grows_with_add(trained, digit_folder,
                                                                   tmp_path):
    run_dir, _ = trained
    part = tmp_path / "part"
    shutil.copytree(digit_folder / "class_7", part / "class_7")
    out = tmp_path / "idx"
    res = tool("index_cli", ["build", str(run_dir), str(part), "--out", str(out), "--labels"],
               tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    n7 = len(list((digit_folder / "class_7").rglob("*.png")))
    assert f"{n7} images" in res.stdout
    res = tool("index_cli", ["add", str(out), str(digit_folder)], tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    index = Index.load(out)
    assert len(index) == n7 + 60 and len(index.meta["parts"]) == 2
    assert index.labels is None  # the added folder had none
    files = sorted(str(p) for p in digit_folder.rglob("*.png") if "class_7" not in str(p))[:5]
    hits = index.search_files(files, k=3)
    assert [row[0] for row in hits.names] == files  # each finds itself first
    # itself at about zero: a batch of another size may round the convolutions differently
    assert (hits.distances[:, 0] < 1e-2 * hits.distances[:, 1]).all()


# ---- what users get wrong ----------------------------------------------------------------
def test_an_empty_folder_or_one_without_images_is_refused(trained, tmp_path):
    run_dir, _ = trained
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    res = tool("index_cli", ["build", str(run_dir), str(tmp_path / "empty"), "--out",
                             str(tmp_path / "idx")], tmp_path)
    assert res.returncode == 2 and "no images under" in res.stderr
    assert res.stderr.count("error") == 1 and "Traceback" not in res.stderr
    assert not (tmp_path / "idx").exists()


def test_unreadable_images_are_skipped_counted_and_named(trained, digit_folder, tmp_path):
    run_dir, _ = trained
    src = tmp_path / "src"
    shutil.copytree(digit_folder / "class_1", src)
    good = sorted(src.rglob("*.png"))
    data = good[0].read_bytes()
    (src / "truncated.png").write_bytes(data[: len(data) // 2])
    (src / "not_an_image.png").write_text("hello")
    res = tool("index_cli", ["build", str(run_dir), str(src), "--out", str(tmp_path / "i")],
               tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "skipped 2 unreadable images" in res.stdout
    meta = json.loads((tmp_path / "i" / "index.json").read_text())
    assert meta["count"] == len(good) and meta["skipped_count"] == 2
    assert {Path(s["name"]).name for s in meta["skipped"]} == {"truncated.png",
                                                              "not_an_image.png"}


def test_an_index_refuses_another_model(trained, test_index, tmp_path):
    run_dir, _ = trained
    other = tmp_path / "other"
    shutil.copytree(run_dir / "checkpoints", other / "checkpoints")
    state = torch.load(other / "checkpoints" / "best.pt", weights_only=True)
    state["model"] = {k: v + 0.01 if v.is_floating_point() else v
                      for k, v in state["model"].items()}
    torch.save(state, other / "checkpoints" / "best.pt")
    with pytest.raises(UserError, match="built with another model"):
        Index.load(test_index.folder, run=other)
    res = tool("index_cli", ["add", str(test_index.folder), "split=val", "--run", str(other)],
               tmp_path)
    assert res.returncode == 2 and "built with another model" in res.stderr
    with pytest.raises(UserError, match=f"queries must be \\(Q, {DIM}\\)"):
        test_index.search(torch.zeros(2, DIM + 1))


def test_a_missing_faiss_is_one_message(trained, tmp_path, monkeypatch):
    run_dir, _ = trained
    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(UserError, match=r"pip install 'dmlrun\[index\]'"):
        Index.build(run_dir, ["split=test"], tmp_path / "i", kind="hnsw", progress=False)
    assert not (tmp_path / "i").exists()


def test_an_interrupted_build_or_add_leaves_the_old_index_or_none(trained, test_index,
                                                                   tmp_path, monkeypatch):
    run_dir, _ = trained
    from dmlrun import index as index_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(index_module.Index, "_write_part", interrupted)
    with pytest.raises(KeyboardInterrupt):
        Index.build(run_dir, ["split=test"], tmp_path / "new", progress=False)
    assert list(tmp_path.iterdir()) == []  # no index, no partial folder
    copy = test_index.save(tmp_path / "copy")
    before = sorted(p.name for p in copy.iterdir())
    with pytest.raises(KeyboardInterrupt):
        Index.load(copy).add(["split=val"], progress=False)
    monkeypatch.undo()
    assert sorted(p.name for p in copy.iterdir()) == before
    again = Index.load(copy)
    assert len(again) == 800 and len(again.search_items([0, 1], 3).names) == 2


def test_names_are_escaped_in_every_page(trained, digit_folder, tmp_path):
    run_dir, _ = trained
    evil = tmp_path / "<script>alert(1)</script>"
    shutil.copytree(digit_folder / "class_2", evil / "a&b")
    out, page = tmp_path / "idx", tmp_path / "search.html"
    query = sorted(evil.rglob("*.png"))[0]
    for args in (["build", str(run_dir), str(evil), "--out", str(out)],
                 ["search", str(out), str(query), "-k", "3", "--html", str(page)]):
        res = tool("index_cli", args, tmp_path)
        assert res.returncode == 0, res.stderr[-2000:]
    res = tool("cluster_cli", [str(run_dir), str(evil), "--out", str(tmp_path / "cl"),
                               "--k", "2"], tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    for html_file in (page, tmp_path / "cl" / "clusters.html"):
        text = html_file.read_text()
        assert "<script>alert" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
        assert "a&amp;b" in text and 'src="http' not in text
    if shutil.which("chromium"):
        for n, html_file in enumerate((page, tmp_path / "cl" / "clusters.html")):
            dom = render_dom(html_file, tmp_path / f"profile{n}")
            assert 'data-images-ok="true"' in dom.stdout, dom.stderr[-2000:]
            assert "CONSOLE" not in dom.stderr


def test_search_command_prints_json_and_refuses_missing_files(test_index, tmp_path):
    res = tool("index_cli", ["search", str(test_index.folder), "item:0", "item:5", "-k", "4",
                             "--json"], tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = json.loads(res.stdout)
    want = test_index.search_items([0, 5], 4)
    assert [[nb["item"] for nb in r["neighbours"]] for r in rows] == want.indices.tolist()
    res = tool("index_cli", ["search", str(test_index.folder), "nope.png"], tmp_path)
    assert res.returncode == 2 and "no such query file: nope.png" in res.stderr


# ---- clusters ----------------------------------------------------------------------------
def test_clusters_of_the_test_split_beat_raw_pixels_and_are_written(trained, tmp_path):
    run_dir, _ = trained
    out = tmp_path / "cl"
    res = tool("cluster_cli", [str(run_dir), "split=test", "--out", str(out), "--k", "10"],
               tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    result = json.loads((out / "clusters.json").read_text())
    assert result["k"] == 10 and sum(result["sizes"]) == 800
    assert result["sizes"] == sorted(result["sizes"], reverse=True)
    assert result["nmi"] > result["raw_pixels"]["nmi"]
    rows = (out / "assignments.csv").read_text().splitlines()
    assert rows[0] == "name,cluster,label" and len(rows) == 801
    assert (out / "clusters.html").read_text().count("<h2>Cluster") == 10
    res = tool("cluster_cli", [str(run_dir), "split=test", "--out", str(out), "--k", "3"],
               tmp_path)
    assert res.returncode == 2 and "exists" in res.stderr  # never overwritten


def test_k_by_silhouette_and_by_threshold():
    from dmlrun.cluster_cli import cluster

    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    x = (centres[:, None, :] + 0.3 * torch.randn(4, 50, 2, generator=g)).reshape(-1, 2)
    truth = torch.arange(4).repeat_interleave(50)
    for how in ({"k_range": (2, 8)}, {"threshold": 4.0}):
        ids, info = cluster(x, how.get("k"), how.get("k_range"), how.get("threshold"),
                            "euclidean", 0)
        assert info["k"] == 4
        from dmlrun.clustering import normalized_mutual_info
        assert normalized_mutual_info(ids, truth) == pytest.approx(1.0)


# ---- export ------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_equals_load_embedder_on_256_test_images(trained, test_index, tmp_path, fmt):
    from dmlrun import load_embedder

    run_dir, _ = trained
    out = tmp_path / f"model.{fmt}"
    res = tool("export", [str(run_dir), "--format", fmt, "--out", str(out)], tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    source, _ = test_index.source(0)
    images = torch.cat([b.images for b in source.batches(256)])[:256]
    want = load_embedder(run_dir)(images)
    if fmt == "torchscript":
        with pytest.warns(FutureWarning):  # TorchScript is deprecated, still loads
            got = torch.jit.load(str(out))(images)
    else:
        np.save(tmp_path / "images.npy", images.numpy())
        script = ("import sys, numpy as np, onnxruntime as ort\n"
                  f"s = ort.InferenceSession({str(out)!r})\n"
                  f"x = np.load({str(tmp_path / 'images.npy')!r})\n"
                  f"np.save({str(tmp_path / 'out.npy')!r}, s.run(None, {{'images': x}})[0])\n"
                  "assert 'torch' not in sys.modules, 'torch was imported'\n"
                  "print(dict(s.get_modelmeta().custom_metadata_map))\n")
        res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                             timeout=120)
        assert res.returncode == 0, res.stderr[-2000:]
        assert "'distance': 'euclidean'" in res.stdout
        got = torch.from_numpy(np.load(tmp_path / "out.npy"))
    assert got.shape == (256, DIM)
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    res = tool("export", [str(run_dir), "--format", fmt, "--out", str(out)], tmp_path)
    assert res.returncode == 2 and "exists" in res.stderr


def test_an_image_of_the_wrong_kind_still_embeds_as_the_run_reads_it(test_index, tmp_path):
    path = tmp_path / "colour.jpg"
    Image.new("RGB", (50, 40), (200, 30, 30)).save(path)
    hits = test_index.search_files([path], k=2)
    assert hits.indices.shape == (1, 2)


def test_a_missing_onnx_is_one_message_and_no_file(trained, tmp_path, monkeypatch):
    from dmlrun.export import export

    run_dir, _ = trained
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    with pytest.raises(UserError, match=r"pip install 'dmlrun\[export\]'"):
        export(run_dir, tmp_path / "m.onnx", "onnx")
    assert list(tmp_path.iterdir()) == []
