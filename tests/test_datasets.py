"""Dataset loaders on real MNIST and on small data the tests write themselves."""

import struct

import numpy as np
import pytest
import torch

from dmlrun.data.dataset import stratified_split
from dmlrun.data.idx import load_fashion_mnist, load_mnist, read_idx
from dmlrun.data.image_folder import load_image_folder
from dmlrun.errors import ConfigError, UserError


def write_idx(raw, prefix, images, labels):
    raw.mkdir(parents=True, exist_ok=True)
    n, h, w = images.shape
    (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
        struct.pack(">IIII", 2051, n, h, w) + images.astype(np.uint8).tobytes())
    (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(
        struct.pack(">II", 2049, n) + labels.astype(np.uint8).tobytes())


def test_mnist_real_files_and_stratified_split(data_dir):
    d = load_mnist(str(data_dir), val_size=5000, download=False, seed=0)
    assert (len(d.train), len(d.val), len(d.test)) == (55000, 5000, 10000)
    assert d.train.images.shape[1:] == (1, 28, 28) and d.train.images.dtype == torch.uint8
    counts = torch.bincount(d.val.labels, minlength=10)
    full = torch.bincount(torch.cat([d.train.labels, d.val.labels]), minlength=10)
    assert torch.allclose(counts.double() / 5000, full.double() / 60000, atol=1e-3)
    again = load_mnist(str(data_dir), val_size=5000, download=False, seed=0)
    assert torch.equal(again.val.labels, d.val.labels)


def test_class_disjoint_split(data_dir):
    d = load_mnist(str(data_dir), val_size=500, train_size=2000, test_size=1000,
                   download=False, train_classes=[0, 1, 2, 3, 4])
    assert set(d.train.labels.tolist()) == set(d.val.labels.tolist()) == {0, 1, 2, 3, 4}
    assert set(d.test.labels.tolist()) == {5, 6, 7, 8, 9}
    with pytest.raises(ConfigError, match="train_classes"):
        load_mnist(str(data_dir), download=False, train_classes=list(range(10)))


def test_idx_files_read_as_torchvision_reads_them(data_dir):
    from torchvision.datasets import MNIST

    for train, prefix in ((True, "train"), (False, "t10k")):
        want = MNIST(str(data_dir), train=train, download=False)
        raw = data_dir / "MNIST" / "raw"
        images = read_idx(raw / f"{prefix}-images-idx3-ubyte")
        assert images.dtype == torch.uint8 and torch.equal(images, want.data)
        assert torch.equal(read_idx(raw / f"{prefix}-labels-idx1-ubyte").long(), want.targets)


def test_a_truncated_or_foreign_idx_file_is_one_message(tmp_path):
    rng = np.random.default_rng(0)
    raw = tmp_path / "FashionMNIST" / "raw"
    write_idx(raw, "train", rng.integers(0, 256, (300, 28, 28)), np.arange(300) % 10)
    write_idx(raw, "t10k", rng.integers(0, 256, (50, 28, 28)), np.arange(50) % 10)
    images = raw / "train-images-idx3-ubyte"
    whole = images.read_bytes()
    images.write_bytes(whole[:-100])
    with pytest.raises(UserError, match="could not read FashionMNIST.*holds 235100 values "
                                         "after its header, which says 300 x 28 x 28"):
        load_fashion_mnist(str(tmp_path), val_size=100, download=False)
    images.write_bytes(b"\x1f\x8b" + whole[2:])  # e.g. a gzip file under the raw name
    with pytest.raises(UserError, match="not an IDX file of unsigned bytes"):
        load_fashion_mnist(str(tmp_path), val_size=100, download=False)
    images.write_bytes(whole)
    labels = raw / "t10k-labels-idx1-ubyte"
    labels.write_bytes(struct.pack(">II", 2049, 49) + bytes(49))  # 49 labels for 50 images
    with pytest.raises(UserError, match=r"t10k images of shape \(50, 28, 28\) with labels of "
                                        r"shape \(49,\)"):
        load_fashion_mnist(str(tmp_path), val_size=100, download=False)


def test_fashion_mnist_reads_torchvision_layout(tmp_path):
    rng = np.random.default_rng(0)
    raw = tmp_path / "FashionMNIST" / "raw"
    write_idx(raw, "train", rng.integers(0, 256, (300, 28, 28)), np.arange(300) % 10)
    write_idx(raw, "t10k", rng.integers(0, 256, (50, 28, 28)), np.arange(50) % 10)
    d = load_fashion_mnist(str(tmp_path), val_size=100, download=False)
    assert (len(d.train), len(d.val), len(d.test)) == (200, 100, 50)
    assert d.class_names[9] == "Ankle boot"
    assert torch.bincount(d.val.labels).tolist() == [10] * 10


def test_missing_files_message(tmp_path):
    with pytest.raises(UserError, match="t10k-labels-idx1-ubyte.*DMLRUN_DATA_DIR"):
        load_fashion_mnist(str(tmp_path), download=False)


def make_folder(root, classes, per_class, size=(20, 16), rgb=False):
    from PIL import Image

    rng = np.random.default_rng(1)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            shape = (*size[::-1], 3) if rgb else size[::-1]
            arr = np.clip(rng.normal(40 * c, 10, shape), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / name / f"{i}.png")


def test_image_folder_grey_and_rgb(tmp_path):
    make_folder(tmp_path / "imgs", ["cat", "dog", "eel"], 20)
    d = load_image_folder(str(tmp_path / "imgs"), image_size=12, channels=1, val_size=9)
    assert d.class_names == ["cat", "dog", "eel"] and d.num_classes == 3
    assert d.train.images.shape[1:] == (1, 12, 12)
    assert len(d.test) == 12 and len(d.val) == 9 and len(d.train) == 39
    # class 2 images are brighter than class 0 (pixels survive loading)
    assert d.train.images[d.train.labels == 2].float().mean() > \
        d.train.images[d.train.labels == 0].float().mean() + 50
    make_folder(tmp_path / "rgb", ["a", "b"], 10, rgb=True)
    make_folder(tmp_path / "rgb_test", ["a", "b"], 3, rgb=True)
    d = load_image_folder(str(tmp_path / "rgb"), image_size=8, channels=3, val_size=4,
                          test_root=str(tmp_path / "rgb_test"))
    assert d.train.images.shape[1:] == (3, 8, 8) and len(d.test) == 6


def test_image_folder_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_image_folder(str(tmp_path / "nope"))
    (tmp_path / "one" / "only").mkdir(parents=True)
    with pytest.raises(UserError, match="at least 2 class"):
        load_image_folder(str(tmp_path / "one"))


def test_stratified_split_exact_size():
    labels = torch.tensor([0] * 7 + [1] * 3 + [2] * 5)
    picked, rest = stratified_split(labels, 6, torch.Generator().manual_seed(0))
    assert len(picked) == 6 and len(rest) == 9
    assert set(picked.tolist()).isdisjoint(rest.tolist())
    assert torch.bincount(labels[picked], minlength=3).tolist() == [3, 1, 2]


def test_image_folder_end_to_end_run(tmp_path):
    from dmlrun.run import run
    from tests.conftest import compose_cfg

    make_folder(tmp_path / "imgs", ["a", "b", "c", "d"], 15, rgb=True)
    cfg = compose_cfg([
        "dataset=image_folder", f"dataset.root={tmp_path / 'imgs'}", "dataset.channels=3",
        "dataset.image_size=16", "dataset.val_size=8", "sampler.p=4", "sampler.k=4",
        "trainer.max_epochs=1", "trainer.device=cpu", "trainer.progress_bar=false",
    ])
    summary = run(cfg, tmp_path / "run")
    assert summary["embedding_dim"] == 2
    assert list(summary["per_class"]) == ["a", "b", "c", "d"]  # the folder names
    assert (tmp_path / "run" / "plots" / "embedding.png").is_file()


def save_mnist_folder(data_dir, root, per_class):
    """The first ``per_class`` MNIST training images of each digit as PNG files."""
    from PIL import Image

    d = load_mnist(str(data_dir), val_size=100, download=False, seed=0)
    for c in range(10):
        (root / str(c)).mkdir(parents=True)
        for i, img in enumerate(d.train.images[d.train.labels == c][:per_class]):
            Image.fromarray(img[0].numpy()).save(root / str(c) / f"{i}.png")


def test_streamed_image_folder_trains_exactly_as_in_memory(tmp_path, data_dir):
    """The same images read per batch by DataLoader workers give the same run."""
    from dmlrun.data.streaming import FileSplit
    from dmlrun.run import run
    from tests.conftest import compose_cfg

    save_mnist_folder(data_dir, tmp_path / "imgs", 60)
    d = load_image_folder(str(tmp_path / "imgs"), val_size=100, stream=True, workers=2)
    assert isinstance(d.train, FileSplit) and len(d.train) + len(d.val) + len(d.test) == 600
    memory = load_image_folder(str(tmp_path / "imgs"), val_size=100, stream=False)
    idx = torch.tensor([5, 0, 17])
    assert torch.equal(d.train.take(idx), memory.train.images[idx])
    assert torch.equal(torch.cat(list(d.train.batches([idx, idx[:1]]))),
                       memory.train.images[torch.cat([idx, idx[:1]])])
    summaries = {}
    for stream in ("true", "false"):
        cfg = compose_cfg([
            "dataset=image_folder", f"dataset.root={tmp_path / 'imgs'}",
            "dataset.val_size=100", f"dataset.stream={stream}", "sampler.batches_per_epoch=3",
            "trainer.max_epochs=2", "trainer.device=cpu", "trainer.progress_bar=false",
            "trainer.epoch_plots=false"])
        summaries[stream] = run(cfg, tmp_path / f"run_{stream}")
    assert summaries["true"]["test"] == summaries["false"]["test"]
    assert summaries["true"]["baselines"] == summaries["false"]["baselines"]
    with pytest.raises(UserError, match="stream must be"):
        load_image_folder(str(tmp_path / "imgs"), stream="sometimes")


@pytest.mark.parametrize("name,mode", [("g.png", "L"), ("c.png", "RGB"), ("p.png", "P"),
                                       ("c.jpg", "RGB")])
def test_the_fast_decoder_gives_pils_pixels(tmp_path, name, mode):
    """OpenCV reads files already stored as wanted; PIL converts and resizes the rest;
    either way the pixels are PIL's."""
    from PIL import Image

    from dmlrun.data.streaming import decode_image

    rng = np.random.default_rng(0)
    shape = (28, 28) if mode == "L" else (28, 28, 3)
    img = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))
    (img.convert("P") if mode == "P" else img).save(tmp_path / name)
    for channels in (1, 3):
        for size in (28, 20):
            with Image.open(tmp_path / name) as ref:
                want = mode_as(ref, channels, size)
            got = decode_image(tmp_path / name, size, channels)
            assert got.shape == want.shape and np.array_equal(got, want), (channels, size)


def mode_as(img, channels, size):
    from PIL import Image

    img = img.convert({1: "L", 3: "RGB"}[channels]).resize((size, size), Image.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1)


@pytest.mark.slow
def test_val_classes_validate_only_on_classes_training_never_sees(data_dir, tmp_path):
    """dataset.val_classes: class-disjoint model selection, through the real command."""
    import json

    from tests.conftest import TINY, run_cli

    out = tmp_path / "run"
    res = run_cli([*TINY, "dataset.val_classes=[8,9]", "dataset.test_size=null",
                   f"hydra.run.dir={out}"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "sampler.p=8: the 8 training classes" in (out / "dmlrun.log").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_classes"] == list(range(8))


def test_val_classes_splits_by_class():
    import torch

    from dmlrun.data.dataset import Split, make_splits
    from dmlrun.errors import ConfigError

    labels = torch.arange(200) % 10
    pool = Split(torch.zeros(200, 1, 2, 2, dtype=torch.uint8), labels)
    test = Split(torch.zeros(50, 1, 2, 2, dtype=torch.uint8), torch.arange(50) % 10)
    data = make_splits("x", 10, pool, test, 20, None, None, 0, val_classes=[8, 9])
    assert set(data.val.labels.tolist()) == {8, 9} and len(data.val) == 40
    assert set(data.train.labels.tolist()) == set(range(8)) and len(data.train) == 160
    assert len(data.test) == 50  # the test set is unchanged without train_classes
    both = make_splits("x", 10, pool, test, 20, None, None, 0, train_classes=[0, 1, 2, 3],
                       val_classes=[4, 5])
    assert set(both.train.labels.tolist()) == {0, 1, 2, 3}
    assert set(both.val.labels.tolist()) == {4, 5}
    assert set(both.test.labels.tolist()) == {6, 7, 8, 9}
    with pytest.raises(ConfigError, match="none of dataset.train_classes"):
        make_splits("x", 10, pool, test, 20, None, None, 0, train_classes=[0, 1, 2],
                    val_classes=[2, 3])
