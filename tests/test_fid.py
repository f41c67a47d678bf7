"""fid.py against pytorch-fid's outputs (tests/fixtures: features and Frechet distances that
pytorch-fid computed with the deterministic weights below), and the classifier stand-in."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import runs
import fid
from conftest import run_main

FIXTURES = Path(__file__).parent / "fixtures"


def recipe_weights(seed=0):
    """Deterministic stand-in weights for pytorch-fid's Inception, drawn from one generator in the
    order of tests/fixtures/pt_inception_keys.txt (the recipe the fixtures were made with)."""
    g, state = torch.Generator().manual_seed(seed), {}
    for line in (FIXTURES / "pt_inception_keys.txt").read_text().splitlines():
        name, shape = line.split()
        shape = tuple(map(int, shape.split(",")))
        if name.endswith("running_var"):
            state[name] = 0.5 + torch.rand(shape, generator=g)
        elif name.endswith("running_mean") or name.endswith("bn.bias"):
            state[name] = 0.1 * torch.randn(shape, generator=g)
        elif name.endswith("bn.weight"):
            state[name] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif name == "fc.weight":
            state[name] = 0.01 * torch.randn(shape, generator=g)
        elif name == "fc.bias":
            state[name] = torch.zeros(shape)
        else:
            state[name] = torch.randn(shape, generator=g) * math.sqrt(
                2 / (shape[1] * shape[2] * shape[3])
            )
    return state


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "seed0_inception.pth"
    torch.save(recipe_weights(), path)
    return path


def test_network_has_exactly_the_names_and_shapes_of_the_weights_file():
    expected = [
        (name, tuple(map(int, shape.split(","))))
        for name, shape in (
            line.split() for line in (FIXTURES / "pt_inception_keys.txt").read_text().splitlines()
        )
    ]
    ours = [
        (k, tuple(v.shape))
        for k, v in fid.FIDInceptionV3().state_dict().items()
        if not k.endswith("num_batches_tracked")
    ]
    assert ours == expected and len(ours) == 472


def test_features_match_pytorch_fid(weights_file):
    with pytest.warns(UserWarning, match="not the official"):
        model, digest = fid.load_inception(weights_file)
    assert digest == runs.file_digest(weights_file, "sha256")[:8]
    images = np.load(FIXTURES / "images_seed0.npy")
    features, logits = fid.extract(model, images, torch.device("cpu"))
    expected = np.load(FIXTURES / "features_seed0_images0.npy")
    assert features.shape == (8, 2048) and logits.shape == (8, 1008)
    assert np.abs(features - expected).max() < 1e-4


@pytest.mark.parametrize("case", [0, 1, 2])
def test_frechet_distance_matches_pytorch_fid(case):
    c = np.load(FIXTURES / "frechet_cases_seed0.npz")
    d = fid.frechet_distance(
        c[f"mu1_{case}"], c[f"sigma1_{case}"], c[f"mu2_{case}"], c[f"sigma2_{case}"]
    )
    assert d == pytest.approx(float(c[f"fid_{case}"]), rel=1e-6)


def test_frechet_distance_of_a_set_with_itself_and_symmetry():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(500, 32)), rng.normal(0.3, 1.5, size=(500, 32)) @ rng.normal(
        size=(32, 32)
    )
    (mu_a, s_a), (mu_b, s_b) = fid.statistics(a), fid.statistics(b)
    assert abs(fid.frechet_distance(mu_a, s_a, mu_a, s_a)) < 1e-8
    assert fid.frechet_distance(mu_a, s_a, mu_b, s_b) == pytest.approx(
        fid.frechet_distance(mu_b, s_b, mu_a, s_a), rel=1e-9
    )
    # 1-D check against the closed form (mu1 - mu2)^2 + (s1 - s2)^2
    assert fid.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4 + 1)


def test_inception_score_extremes():
    uniform = np.zeros((100, 1008))
    assert fid.inception_score(uniform)[0] == pytest.approx(1.0)
    confident = np.full((1000, 1008), -1e4)
    confident[np.arange(1000), np.arange(1000) % 10] = 0  # 10 classes, each sample certain of one
    assert fid.inception_score(confident)[0] == pytest.approx(10.0, rel=1e-6)
    # fewer images than splits: each part still holds one (no empty part, no NaN)
    assert fid.inception_score(confident[:8])[0] == pytest.approx(1.0)


def test_wrong_sha256_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    bad = tmp_path / "mirror.pth"
    bad.write_bytes(b"not the weights")
    monkeypatch.setattr(fid, "FID_WEIGHTS_URL",
                        bad.as_uri().replace("mirror.pth", "pt_inception-2015-12-05-6726825d.pth"))
    (tmp_path / "pt_inception-2015-12-05-6726825d.pth").write_bytes(b"not the weights")
    with pytest.raises(runs.UserError, match="wrong sha256"):
        fid.load_inception()  # a corrupt download is refused and not kept
    cached = tmp_path / "hub" / "checkpoints" / "pt_inception-2015-12-05-6726825d.pth"
    assert not cached.exists()
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_bytes(b"a corrupt cached file")
    with pytest.raises(runs.UserError, match="wrong sha256"):
        fid.load_inception()


def test_without_network_or_weights_one_sentence_says_where(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(fid, "FID_WEIGHTS_URL",
                        (tmp_path / "offline" / "pt_inception-2015-12-05-6726825d.pth").as_uri())
    with pytest.raises(runs.UserError, match="put it at .*pt_inception-2015-12-05-6726825d.pth"):
        fid.load_inception()


def test_cli_with_weights_npz_folder_and_stats(weights_file, tmp_path, capsys):
    from PIL import Image

    images = np.load(FIXTURES / "images_seed0.npy")
    np.savez(tmp_path / "a.npz", arr_0=images, arr_1=np.arange(8))
    (tmp_path / "folder").mkdir()
    for i, im in enumerate(images[::-1]):
        Image.fromarray(im).save(tmp_path / "folder" / f"{i}.png")
    with pytest.warns(UserWarning, match="fewer than 2,048"):
        out = run_main("fid.py", tmp_path / "a.npz", tmp_path / "folder", "--weights", weights_file,
                       "--is", capsys=capsys)
    last = out.strip().splitlines()[-1]
    assert last.startswith("FID (Inception, pytorch-fid compatible): ")
    assert abs(float(last.split()[-1])) < 1e-3  # the same images in another order
    assert "Inception Score" in out and "nan" not in out
    run_main("fid.py", tmp_path / "a.npz", tmp_path / "stats.npz", "--save-stats", "--weights",
             weights_file)
    with np.load(tmp_path / "stats.npz") as f:
        assert f["mu"].shape == (2048,) and f["sigma"].shape == (2048, 2048)
    out = run_main("fid.py", tmp_path / "stats.npz", tmp_path / "a.npz", "--weights", weights_file,
                   capsys=capsys)
    assert abs(float(out.strip().splitlines()[-1].split()[-1])) < 1e-3


def test_classifier_features(shapes_dir):
    model, ckpt = fid.load_classifier(
        "shapes", shapes_dir, torch.device("cpu"), steps=300, batch_size=64
    )
    assert ckpt["test_accuracy"] > 0.9
    test = data.load_data("shapes", shapes_dir, "test")
    train = data.load_data("shapes", shapes_dir, "train")
    images = test.images[:2000].numpy()
    corrupted = np.clip(
        images.astype(np.int16) + np.random.default_rng(0).integers(-60, 61, images.shape), 0, 255
    )
    f_train, _ = fid.extract(model, train.images[:4000].numpy(), torch.device("cpu"))
    f_test, logits = fid.extract(model, images, torch.device("cpu"))
    f_bad, _ = fid.extract(model, corrupted.astype(np.uint8), torch.device("cpu"))
    ref = fid.statistics(f_train)
    d_real = fid.frechet_distance(*fid.statistics(f_test), *ref)
    d_bad = fid.frechet_distance(*fid.statistics(f_bad), *ref)
    assert d_real < 0.5 * d_bad, (d_real, d_bad)
    assert (logits.argmax(1) == test.labels[:2000].numpy()).mean() > 0.9
    # cached: a second call with the same settings loads the classifier instead of training it
    again, _ = fid.load_classifier("shapes", shapes_dir, torch.device("cpu"), steps=300)
    assert all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values())
    )
    # other settings are another cache file: never a classifier trained some other way
    assert fid.classifier_path("shapes", shapes_dir, 300, True).exists()
    assert not fid.classifier_path("shapes", shapes_dir, 300, False).exists()
    assert fid.classifier_path("shapes", shapes_dir, 1500, True) != fid.classifier_path(
        "shapes", shapes_dir, 300, True
    )


def test_classifier_features_of_an_image_folder_source(shapes_folder, tmp_path, capsys):
    """An image folder among the sources is the classifier's dataset (no --classifier-data)."""
    folder = data.load_folder(shapes_folder, 32)
    np.savez(tmp_path / "s.npz", folder.images[::4].numpy(), folder.labels[::4].numpy())
    out = run_main("fid.py", tmp_path / "s.npz", shapes_folder, "--features", "classifier",
                   "--no-flip", "--classifier-steps", "5", "--data-dir", tmp_path, capsys=capsys)
    assert "class accuracy" in out
    assert fid.classifier_path(str(shapes_folder), tmp_path, 5, False).exists()
    # the printed distance is the Frechet distance of the cached classifier's features
    cpu = torch.device("cpu")
    model, _ = fid.load_classifier(str(shapes_folder), tmp_path, cpu, steps=5, flip=False)
    features_samples, _ = fid.extract(model, folder.images[::4].numpy(), cpu)
    features_folder, _ = fid.extract(model, folder.images.numpy(), cpu)
    expected = fid.frechet_distance(
        *fid.statistics(features_samples), *fid.statistics(features_folder)
    )
    assert float(out.strip().split()[-1]) == pytest.approx(expected, rel=1e-3, abs=1e-3)


def test_damaged_caches_are_computed_again(shapes_dir, tmp_path, capsys):
    class Tiny(torch.nn.Module):  # features: the first five pixel values
        def forward(self, x):
            return x.flatten(1)[:, :5], x.flatten(1)[:, :5]

    images = np.random.default_rng(0).integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
    cache = tmp_path / "fid_stats_shapes_train_tiny.npz"
    cache.write_bytes(b"damaged")
    mu, sigma, _, _ = fid.source_statistics(("images", images, None, "shapes"), Tiny(),
                                            torch.device("cpu"), 10, cache)
    assert "damaged" in capsys.readouterr().err
    with np.load(cache) as f:
        assert np.array_equal(f["mu"], mu) and np.array_equal(f["sigma"], sigma)
    path = fid.classifier_path("shapes", shapes_dir, 5, True)
    path.write_bytes(b"damaged")
    _, ckpt = fid.load_classifier("shapes", shapes_dir, torch.device("cpu"), steps=5)
    assert "damaged" in capsys.readouterr().err and "test_accuracy" in ckpt
    torch.load(path, weights_only=True)  # a readable classifier replaced the damaged file
