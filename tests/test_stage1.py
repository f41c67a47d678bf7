"""Stage 1: datasets, the autoencoder's pieces, and the training script."""
import hashlib
import io
import json
import pickle
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

import stage1_encoder as s1
from conftest import run_script

TINY = ["--channels", "16", "--batch-size", "16", "--log-every", "10"]


# --- CIFAR-10: the official archive layout, built small -----------------------------------------

def make_cifar_archive(path, n_per_batch=6, seed=0):
    """A tiny tarball with the layout and pickle format of cifar-10-python.tar.gz."""
    rng = np.random.default_rng(seed)
    contents = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        contents[name] = {b"batch_label": name.encode(), b"labels": rng.integers(0, 10, n_per_batch).tolist(),
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
    monkeypatch.setattr(s1, "CIFAR_URL", source.as_uri())
    monkeypatch.setattr(s1, "CIFAR_MD5", hashlib.md5(source.read_bytes()).hexdigest())
    data_dir = tmp_path / "data"

    train = s1.load_data("cifar10", data_dir, "train")
    test = s1.load_data("cifar10", data_dir, "test")
    assert (data_dir / "cifar-10-python.tar.gz").exists()
    assert train.images.shape == (30, 32, 32, 3) and train.images.dtype == torch.uint8
    assert test.images.shape == (6, 32, 32, 3)
    assert train.class_names == [f"class{i}" for i in range(10)]
    # Row-major CHW bytes -> HWC pixels: pixel (row 1, col 2) of image 0 in batch 1
    raw = contents["data_batch_1"][b"data"][0]
    assert train.images[0, 1, 2].tolist() == [raw[0 * 1024 + 32 + 2], raw[1024 + 32 + 2], raw[2048 + 32 + 2]]
    expected_labels = sum((contents[f"data_batch_{i}"][b"labels"] for i in range(1, 6)), [])
    assert train.labels.tolist() == expected_labels
    assert test.labels.tolist() == contents["test_batch"][b"labels"]


def test_cifar10_wrong_md5_is_refused_and_removed(tmp_path, monkeypatch):
    source = tmp_path / "cifar-10-python.tar.gz"
    make_cifar_archive(source)
    monkeypatch.setattr(s1, "CIFAR_URL", source.as_uri())
    data_dir = tmp_path / "data"
    with pytest.raises(s1.UserError, match="wrong md5"):
        s1.load_data("cifar10", data_dir, "train")
    assert not (data_dir / "cifar-10-python.tar.gz").exists()
    assert list(data_dir.iterdir()) == []  # nothing half-downloaded is left behind


def test_cifar10_without_network_says_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(s1, "CIFAR_URL", (tmp_path / "nowhere.tar.gz").as_uri())
    with pytest.raises(s1.UserError, match="put it at .*cifar-10-python.tar.gz"):
        s1.load_data("cifar10", tmp_path / "data", "train")


# --- A folder of images --------------------------------------------------------------------------

def write_image(path, size, colour):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_folder_with_class_subfolders(tmp_path):
    write_image(tmp_path / "cats" / "a.png", (40, 64), (255, 0, 0))
    write_image(tmp_path / "cats" / "b.jpg", (64, 64), (250, 0, 0))
    write_image(tmp_path / "dogs" / "c.png", (50, 30), (0, 0, 255))
    (tmp_path / "dogs" / "notes.txt").write_text("not an image")
    data = s1.load_data(str(tmp_path), split="train", image_size=16)
    assert data.class_names == ["cats", "dogs"]
    assert data.labels.tolist() == [0, 0, 1]
    assert data.images.shape == (3, 16, 16, 3)
    assert data.images[2, 8, 8].tolist() == [0, 0, 255]


def test_flat_folder_is_one_class(tmp_path):
    for i in range(3):
        write_image(tmp_path / "pics" / f"{i}.png", (32, 32), (i, i, i))
    data = s1.load_data(str(tmp_path / "pics"))
    assert data.class_names == ["pics"] and data.labels.tolist() == [0, 0, 0]


def test_corrupt_image_is_named(tmp_path):
    write_image(tmp_path / "a.png", (32, 32), (0, 0, 0))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(s1.UserError, match="broken.png"):
        s1.load_data(str(tmp_path))


# --- shapes --------------------------------------------------------------------------------------

def test_shapes_are_deterministic_and_balanced():
    x1, y1 = s1.make_shapes(300, seed=7)
    x2, y2 = s1.make_shapes(300, seed=7)
    x3, _ = s1.make_shapes(300, seed=8)
    assert x1.dtype == np.uint8 and x1.shape == (300, 32, 32, 3)
    assert x1.tobytes() == x2.tobytes() and np.array_equal(y1, y2)
    assert x1.tobytes() != x3.tobytes()
    assert np.bincount(y1).tolist() == [30] * 10
    assert x1.std() > 30  # real pictures, not blank


def test_shapes_splits(shapes_dir):
    train = s1.load_data("shapes", shapes_dir, "train")
    test = s1.load_data("shapes", shapes_dir, "test")
    assert train.images.shape == (50_000, 32, 32, 3) and test.images.shape == (10_000, 32, 32, 3)
    assert torch.bincount(train.labels).tolist() == [5000] * 10
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    assert not torch.equal(train.images[:100], test.images[:100])


def test_random_flips():
    data = s1.ImageData(torch.arange(4 * 4 * 3, dtype=torch.uint8).reshape(1, 4, 4, 3).repeat(64, 1, 1, 1),
                        torch.zeros(64, dtype=torch.long), ["a"], "toy")
    x, _ = s1.sample_batch(data, 64, torch.Generator().manual_seed(0))
    original = s1.to_model_input(data.images[:1])
    flipped = torch.tensor([torch.equal(xi, original[0].flip(2)) for xi in x])
    same = torch.tensor([torch.equal(xi, original[0]) for xi in x])
    assert (flipped | same).all() and 16 < flipped.sum() < 48


# --- the autoencoder -----------------------------------------------------------------------------

@pytest.mark.parametrize("ch_mult,latent", [((1, 2, 2), 8), ((1, 2), 16), ((1, 2, 2, 4), 4)])
def test_encoder_decoder_shapes(ch_mult, latent):
    encoder = s1.Encoder(channels=16, ch_mult=ch_mult, latent_channels=3)
    decoder = s1.Decoder(channels=16, ch_mult=ch_mult, latent_channels=3)
    z = encoder(torch.randn(2, 3, 32, 32))
    assert z.shape == (2, 3, latent, latent)
    assert decoder(z).shape == (2, 3, 32, 32)


def test_aux_width_makes_a_smaller_decoder():
    count = lambda m: sum(p.numel() for p in m.parameters())
    full, half = s1.Decoder(channels=32), s1.Decoder(channels=32, width=0.5)
    assert count(half) < 0.35 * count(full)
    assert half(torch.randn(1, 4, 8, 8)).shape == (1, 3, 32, 32)


def test_dropout_only_in_training_mode():
    z = torch.randn(2, 4, 8, 8)
    weak = s1.Decoder(channels=16, dropout=0.5)
    weak.train()
    assert not torch.allclose(weak(z), weak(z))
    weak.eval()
    assert torch.equal(weak(z), weak(z))
    plain = s1.Decoder(channels=16, dropout=0.0).train()
    assert torch.equal(plain(z), plain(z))


def test_psnr_known_value():
    x = torch.zeros(1, 3, 4, 4)
    # an error of 0.2 in [-1, 1] is 0.1 in [0, 1]: PSNR = 10 log10(1 / 0.01) = 20 dB
    assert s1.psnr(x + 0.2, x).item() == pytest.approx(20.0, abs=1e-4)


# --- the script ----------------------------------------------------------------------------------

def read_log(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_short_run_lowers_loss_and_writes_a_safe_checkpoint(tmp_path, shapes_dir):
    run = tmp_path / "run"
    run_script("stage1_encoder.py", "--data", "shapes", "--data-dir", shapes_dir, "--run", run,
               "--steps", "80", *TINY)
    log = read_log(run / "log_stage1.jsonl")
    assert [r["step"] for r in log] == list(range(10, 81, 10))
    assert log[-1]["loss"] < 0.7 * log[0]["loss"]
    ckpt = torch.load(run / "stage1.pt", weights_only=True)
    assert ckpt["stage"] == 1 and ckpt["step"] == 80
    assert ckpt["config"]["aux_dropout"] == s1.AUX_DROPOUT
    encoder = s1.Encoder(**s1.autoencoder_kwargs(ckpt["config"]))
    encoder.load_state_dict(ckpt["encoder"])
    assert ckpt["metrics"]["test_psnr_aux"] > 10
    assert Image.open(run / "stage1_recon.png").size[0] > 0


def test_resume_continues_the_step_count(tmp_path, shapes_dir):
    common = ["--data", "shapes", "--data-dir", shapes_dir, *TINY]
    run_script("stage1_encoder.py", *common, "--run", tmp_path / "a", "--steps", "30")
    run_script("stage1_encoder.py", *common, "--run", tmp_path / "b", "--steps", "20")
    run_script("stage1_encoder.py", *common, "--run", tmp_path / "b", "--steps", "30", "--resume")
    a = torch.load(tmp_path / "a" / "stage1.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "stage1.pt", weights_only=True)
    assert b["step"] == 30
    assert [r["step"] for r in read_log(tmp_path / "b" / "log_stage1.jsonl")] == [10, 20, 30]
    # the resumed run saw the same batches and dropout masks as the uninterrupted one
    for name in a["encoder"]:
        torch.testing.assert_close(a["encoder"][name], b["encoder"][name])


def test_any_width_gets_a_group_count_that_divides_it():
    # --channels 128 --aux-width 0.6: 152 channels, which 32 groups cannot split; 19 groups of 8 can
    decoder = s1.Decoder(channels=128, width=0.6)
    norms = [m for m in decoder.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert any(m.num_channels == 152 and m.num_groups == 19 for m in norms)
    assert all(m.num_channels % m.num_groups == 0 and m.num_channels // m.num_groups >= 4 for m in norms)
    assert decoder(torch.randn(1, 4, 8, 8)).shape == (1, 3, 32, 32)
