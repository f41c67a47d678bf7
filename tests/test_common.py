"""The shared plumbing: data sources, batches and their random streams, checkpoints."""
import hashlib
import io
import pickle
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

import common

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
    monkeypatch.setattr(common, "CIFAR_URL", source.as_uri())
    monkeypatch.setattr(common, "CIFAR_MD5", hashlib.md5(source.read_bytes()).hexdigest())
    data_dir = tmp_path / "data"

    train = common.load_data("cifar10", data_dir, "train")
    test = common.load_data("cifar10", data_dir, "test")
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
    monkeypatch.setattr(common, "CIFAR_URL", source.as_uri())
    data_dir = tmp_path / "data"
    with pytest.raises(common.UserError, match="wrong md5"):
        common.load_data("cifar10", data_dir, "train")
    assert not (data_dir / "cifar-10-python.tar.gz").exists()
    assert list(data_dir.iterdir()) == []  # nothing half-downloaded is left behind


def test_cifar10_without_network_says_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "CIFAR_URL", (tmp_path / "nowhere.tar.gz").as_uri())
    with pytest.raises(common.UserError, match="put it at .*cifar-10-python.tar.gz"):
        common.load_data("cifar10", tmp_path / "data", "train")


# --- A folder of images --------------------------------------------------------------------------

def write_image(path, size, colour):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_folder_with_class_subfolders(tmp_path):
    write_image(tmp_path / "cats" / "a.png", (40, 64), (255, 0, 0))
    write_image(tmp_path / "cats" / "b.jpg", (64, 64), (250, 0, 0))
    write_image(tmp_path / "dogs" / "c.png", (50, 30), (0, 0, 255))
    (tmp_path / "dogs" / "notes.txt").write_text("not an image")
    data = common.load_data(str(tmp_path), split="train", image_size=16)
    assert data.class_names == ["cats", "dogs"]
    assert data.labels.tolist() == [0, 0, 1]
    assert data.images.shape == (3, 16, 16, 3)
    assert data.images[2, 8, 8].tolist() == [0, 0, 255]


def test_flat_folder_is_one_class(tmp_path):
    for i in range(3):
        write_image(tmp_path / "pics" / f"{i}.png", (32, 32), (i, i, i))
    data = common.load_data(str(tmp_path / "pics"))
    assert data.class_names == ["pics"] and data.labels.tolist() == [0, 0, 0]


def test_corrupt_image_is_named(tmp_path):
    write_image(tmp_path / "a.png", (32, 32), (0, 0, 0))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(common.UserError, match="broken.png"):
        common.load_data(str(tmp_path))


def test_a_16_bit_grey_image_is_scaled_not_clipped_to_white(tmp_path):
    grey = np.full((8, 8), 32768, np.uint16)   # mid-grey in 16 bits
    Image.fromarray(grey).save(tmp_path / "a.png")
    assert Image.open(tmp_path / "a.png").mode.startswith("I")   # Pillow reads it as 16-bit
    data = common.load_data(str(tmp_path), image_size=8)
    assert data.images.unique().tolist() == [128]   # 32768 / 257, rounded


# --- shapes --------------------------------------------------------------------------------------

def test_shapes_are_deterministic_and_balanced():
    x1, y1 = common.make_shapes(300, seed=7)
    x2, y2 = common.make_shapes(300, seed=7)
    x3, _ = common.make_shapes(300, seed=8)
    assert x1.dtype == np.uint8 and x1.shape == (300, 32, 32, 3)
    assert x1.tobytes() == x2.tobytes() and np.array_equal(y1, y2)
    assert x1.tobytes() != x3.tobytes()
    assert np.bincount(y1).tolist() == [30] * 10
    assert x1.std() > 30  # real pictures, not blank


def test_shapes_splits(shapes_dir):
    train = common.load_data("shapes", shapes_dir, "train")
    test = common.load_data("shapes", shapes_dir, "test")
    assert train.images.shape == (50_000, 32, 32, 3) and test.images.shape == (10_000, 32, 32, 3)
    assert torch.bincount(train.labels).tolist() == [5000] * 10
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    assert not torch.equal(train.images[:100], test.images[:100])


def test_random_flips():
    image = torch.arange(4 * 4 * 3, dtype=torch.uint8).reshape(1, 4, 4, 3)
    data = common.ImageData(image.repeat(64, 1, 1, 1), torch.zeros(64, dtype=torch.long), ["a"],
                            "toy")
    x, _ = common.sample_batch(data, 64, torch.Generator().manual_seed(0), flip=True)
    original = common.to_model_input(data.images[:1])
    flipped = torch.tensor([torch.equal(xi, original[0].flip(2)) for xi in x])
    same = torch.tensor([torch.equal(xi, original[0]) for xi in x])
    assert (flipped | same).all() and 16 < flipped.sum() < 48



def test_a_damaged_shapes_cache_is_built_again(tmp_path, monkeypatch):
    real = common.make_shapes
    monkeypatch.setattr(common, "make_shapes", lambda n, seed: real(n // 500, seed))   # 120, 20
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / f"shapes-seed{common.SHAPES_SEED}-v1.npz").write_bytes(b"damaged")
    rebuilt = common.load_shapes(data_dir, "test")
    expected, _ = real(20, common.SHAPES_SEED + 1)
    assert np.array_equal(rebuilt.images.numpy(), expected)


# --- random streams ------------------------------------------------------------------------------

def test_each_step_has_its_own_repeatable_stream_and_the_stages_differ():
    draw = lambda g: torch.randint(1000, (16,), generator=g)
    same = draw(common.seeded_generator(0, 5, stream=1, num_streams=8))
    assert torch.equal(same, draw(common.seeded_generator(0, 5, stream=1, num_streams=8)))
    # step 5 of stage 2 (stream 2) and step 6 of stage 1 are other batches than step 5 of stage 1
    for other in (common.seeded_generator(0, 5, stream=2, num_streams=8),
                  common.seeded_generator(0, 6, stream=1, num_streams=8),
                  common.seeded_generator(1, 5, stream=1, num_streams=8)):
        assert not torch.equal(same, draw(other))
    # the seeds of stage 1's steps and stage 2's steps never collide (8 streams, 2 used)
    seeds = lambda stream: {(0 * 1_000_003 + step) * 8 + stream for step in range(10_000)}
    assert not seeds(1) & seeds(2)


# --- checkpoints ---------------------------------------------------------------------------------

def test_a_checkpoint_of_another_format_is_refused_in_one_sentence(tmp_path):
    path = tmp_path / "stage1.pt"
    common.save_checkpoint({"stage": 1, "encoder": {"w": torch.ones(2)}}, path)
    assert common.load_checkpoint(path, stage=1)["format"] == common.CHECKPOINT_FORMAT
    torch.save({"stage": 1, "encoder": {"w": torch.ones(2)}}, path)   # no format: an older file
    with pytest.raises(common.UserError, match="older version of this project; train it again"):
        common.load_checkpoint(path, stage=1)


# --- the progress log's divergence stop -----------------------------------------------------------

def test_a_loss_1000_times_its_running_median_stops_training(tmp_path):
    progress = common.Progress(tmp_path / "log.jsonl", 100, 0, 1, log_every=2, desc="test")
    for step, loss in enumerate([1.0, 0.5, 0.4, 0.3, 200.0], start=1):   # 200: far, but < 1000x
        progress.update(step, loss=torch.tensor(loss))
    with pytest.raises(common.UserError, match="diverged; try a lower --lr"):
        progress.update(6, loss=torch.tensor(1e6))   # this window's mean 5e5 > 1000 x median
    with pytest.raises(common.UserError, match="held-out loss became nan"):
        progress.check_finite(float("nan"), "the held-out loss")
    progress.close()
