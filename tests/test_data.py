"""data.py: CIFAR-10 (a tiny archive of the official layout), image folders, shapes, batches."""
import hashlib
import io
import pickle
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

import data
import runs

# --- CIFAR-10: the official archive layout, built small -----------------------------------------

def make_cifar_archive(path, n_per_batch=6, seed=0):
    """A tiny tarball with the layout and pickle format of cifar-10-python.tar.gz."""
    rng = np.random.default_rng(seed)
    contents = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        contents[name] = {b"batch_label": name.encode(),
                          b"labels": rng.integers(0, 10, n_per_batch).tolist(),
                          b"data": rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8),
                          b"filenames": [b"x.png"] * n_per_batch}
    contents["batches.meta"] = {b"label_names": [f"class{i}".encode() for i in range(10)],
                                b"num_cases_per_batch": n_per_batch, b"num_vis": 3072}
    with tarfile.open(path, "w:gz") as tar:
        for name, obj in contents.items():
            blob = pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return contents


def test_cifar10_download_and_parse(tmp_path, monkeypatch):
    source = tmp_path / "mirror" / "cifar-10-python.tar.gz"
    source.parent.mkdir()
    contents = make_cifar_archive(source)
    monkeypatch.setattr(data, "CIFAR_URL", source.as_uri())
    monkeypatch.setattr(data, "CIFAR_MD5", hashlib.md5(source.read_bytes()).hexdigest())
    data_dir = tmp_path / "data"

    train = data.load_data("cifar10", data_dir, "train")
    test = data.load_data("cifar10", data_dir, "test")
    assert (data_dir / "cifar-10-python.tar.gz").exists()
    assert train.images.shape == (30, 32, 32, 3) and train.images.dtype == torch.uint8
    assert test.images.shape == (6, 32, 32, 3)
    assert train.class_names == [f"class{i}" for i in range(10)]
    # Row-major CHW bytes -> HWC pixels: pixel (row 1, col 2) of image 0 in batch 1
    raw = contents["data_batch_1"][b"data"][0]
    pixel = 32 + 2
    assert train.images[0, 1, 2].tolist() == [raw[pixel], raw[1024 + pixel], raw[2048 + pixel]]
    expected_labels = sum((contents[f"data_batch_{i}"][b"labels"] for i in range(1, 6)), [])
    assert train.labels.tolist() == expected_labels
    assert test.labels.tolist() == contents["test_batch"][b"labels"]


def test_cifar10_wrong_md5_is_refused_and_removed(tmp_path, monkeypatch):
    source = tmp_path / "cifar-10-python.tar.gz"
    make_cifar_archive(source)
    monkeypatch.setattr(data, "CIFAR_URL", source.as_uri())
    data_dir = tmp_path / "data"
    with pytest.raises(runs.UserError, match="wrong md5"):
        data.load_data("cifar10", data_dir, "train")
    assert not (data_dir / "cifar-10-python.tar.gz").exists()
    assert list(data_dir.iterdir()) == []  # nothing half-downloaded is left behind


def test_cifar10_without_network_says_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "CIFAR_URL", (tmp_path / "nowhere.tar.gz").as_uri())
    with pytest.raises(runs.UserError, match="put it at .*cifar-10-python.tar.gz"):
        data.load_data("cifar10", tmp_path / "data", "train")


# --- A folder of images --------------------------------------------------------------------------

def write_image(path, size, colour):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_folder_with_class_subfolders(tmp_path):
    write_image(tmp_path / "cats" / "a.png", (40, 64), (255, 0, 0))
    write_image(tmp_path / "cats" / "b.jpg", (64, 64), (250, 0, 0))
    write_image(tmp_path / "dogs" / "c.png", (50, 30), (0, 0, 255))
    (tmp_path / "dogs" / "notes.txt").write_text("not an image")
    dataset = data.load_data(str(tmp_path), split="train", image_size=16)
    assert dataset.class_names == ["cats", "dogs"]
    assert dataset.labels.tolist() == [0, 0, 1]
    assert dataset.images.shape == (3, 16, 16, 3)
    assert dataset.images[2, 8, 8].tolist() == [0, 0, 255]


def test_flat_folder_is_one_class(tmp_path):
    for i in range(3):
        write_image(tmp_path / "pics" / f"{i}.png", (32, 32), (i, i, i))
    dataset = data.load_data(str(tmp_path / "pics"))
    assert dataset.class_names == ["pics"] and dataset.labels.tolist() == [0, 0, 0]


def test_corrupt_image_is_named(tmp_path):
    write_image(tmp_path / "a.png", (32, 32), (0, 0, 0))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(runs.UserError, match="broken.png"):
        data.load_data(str(tmp_path))


def test_a_16_bit_grey_image_is_scaled_not_clipped_to_white(tmp_path):
    grey = np.full((8, 8), 32768, np.uint16)   # mid-grey in 16 bits
    Image.fromarray(grey).save(tmp_path / "a.png")
    assert Image.open(tmp_path / "a.png").mode.startswith("I")   # Pillow reads it as 16-bit
    dataset = data.load_data(str(tmp_path), image_size=8)
    assert dataset.images.unique().tolist() == [128]   # 32768 / 257, rounded


# --- shapes --------------------------------------------------------------------------------------

def test_shapes_are_deterministic_and_balanced():
    x1, y1 = data.make_shapes(300, seed=7)
    x2, y2 = data.make_shapes(300, seed=7)
    x3, _ = data.make_shapes(300, seed=8)
    assert x1.dtype == np.uint8 and x1.shape == (300, 32, 32, 3)
    assert x1.tobytes() == x2.tobytes() and np.array_equal(y1, y2)
    assert x1.tobytes() != x3.tobytes()
    assert np.bincount(y1).tolist() == [30] * 10
    assert x1.std() > 30  # real pictures, not blank


def test_shapes_splits(shapes_dir):
    train = data.load_data("shapes", shapes_dir, "train")
    test = data.load_data("shapes", shapes_dir, "test")
    assert train.images.shape == (50_000, 32, 32, 3) and test.images.shape == (10_000, 32, 32, 3)
    assert torch.bincount(train.labels).tolist() == [5000] * 10
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    assert not torch.equal(train.images[:100], test.images[:100])


def test_random_flips():
    image = torch.arange(4 * 4 * 3, dtype=torch.uint8).reshape(1, 4, 4, 3)
    dataset = data.ImageData(image.repeat(64, 1, 1, 1), torch.zeros(64, dtype=torch.long), ["a"],
                            "toy")
    x, _ = data.sample_batch(dataset, 64, torch.Generator().manual_seed(0), flip=True)
    original = data.to_model_input(dataset.images[:1])
    flipped = torch.tensor([torch.equal(xi, original[0].flip(2)) for xi in x])
    same = torch.tensor([torch.equal(xi, original[0]) for xi in x])
    assert (flipped | same).all() and 16 < flipped.sum() < 48



def test_a_damaged_shapes_cache_is_built_again(tmp_path, monkeypatch):
    real = data.make_shapes
    monkeypatch.setattr(data, "make_shapes", lambda n, seed: real(n // 500, seed))   # 120, 20
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / f"shapes-seed{data.SHAPES_SEED}-v1.npz").write_bytes(b"damaged")
    rebuilt = data.load_shapes(data_dir, "test")
    expected, _ = real(20, data.SHAPES_SEED + 1)
    assert np.array_equal(rebuilt.images.numpy(), expected)


# --- Loss curves: a PNG from a JSONL log --------------------------------------------------------

def curve_rows(png):
    """{x: mean row} of the plot's blue curve pixels in a loss-curve PNG."""
    pixels = np.asarray(Image.open(png).convert("RGB")).astype(int)
    blue = (pixels[..., 2] > 150) & (pixels[..., 0] < 100)
    return {x: np.nonzero(blue[:, x])[0].mean() for x in range(pixels.shape[1]) if blue[:, x].any()}

def test_loss_curve_follows_the_log_on_a_log_scale(tmp_path):
    import json
    log, png = tmp_path / "log.jsonl", tmp_path / "loss.png"
    decay = [{"step": s, "loss": 10 * 0.1 ** (s / 1000)} for s in range(0, 3001, 50)]   # 3 decades
    log.write_text("".join(json.dumps(r) + "\n" for r in decay))
    data.save_loss_curve(log, png, "test")
    rows = curve_rows(png)
    xs = sorted(rows)
    first, middle, last = rows[xs[0]], rows[xs[len(xs) // 2]], rows[xs[-1]]
    assert first < middle < last   # the loss falls: the curve goes down the picture
    # on a log scale an exponential decay is a straight line: its middle lies halfway
    assert abs(middle - (first + last) / 2) < 4
    before = png.read_bytes()
    with open(log, "a") as f:   # training goes on and the loss rises again: the picture changes
        f.write("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(3050, 4001, 50)))
    data.save_loss_curve(log, png, "test")
    rows = curve_rows(png)
    assert png.read_bytes() != before and rows[max(rows)] < last - 50   # it ends higher up
    # a loss within one decade is plotted on a linear scale: a linear fall is then a straight line
    log.write_text("".join(json.dumps({"step": s, "loss": 2 - s / 3000}) + "\n"
                           for s in range(0, 3001, 50)))
    data.save_loss_curve(log, png, "test")
    rows = curve_rows(png)
    xs = sorted(rows)
    assert abs(rows[xs[len(xs) // 2]] - (rows[xs[0]] + rows[xs[-1]]) / 2) < 4
