"""Stage 2: the frozen encoder, the joint baseline, PSNR, latent statistics and user mistakes."""

import json

import pytest
import torch

import numpy as np
from PIL import Image

import data
import stage1_encoder as s1
import stage2_decoder as s2
import train_latent_dit as dit
from conftest import copy_run, run_main

TINY = ["--channels", "16", "--batch-size", "16", "--log-every", "10"]


@pytest.fixture(scope="module")
def stage1_runs(shapes_folder, tmp_path_factory):
    """Two tiny stage-1 runs on a small folder of shapes: a weakened (DAE) and an unweakened one."""
    root = tmp_path_factory.mktemp("stage1")
    args = ["--data", shapes_folder, "--steps", "30", *TINY]
    run_main("stage1_encoder.py", *args, "--run", root / "dae", "--aux-dropout", "0.3",
             "--aux-width", "0.5")
    run_main("stage1_encoder.py", *args, "--run", root / "joint", "--aux-dropout", "0",
             "--aux-width", "1", "--scale-equivariance", "0.5")
    return root


def test_dae_freezes_the_encoder_and_the_decoder_learns(stage1_runs, tmp_path):
    run = copy_run(stage1_runs / "dae", tmp_path / "dae", "stage1.pt")
    run_main("stage2_decoder.py", "--run", run, "--steps", "60", "--batch-size", "16",
             "--log-every", "10", "--lr", "1e-3")
    before = torch.load(run / "stage1.pt", weights_only=True)
    after = torch.load(run / "autoencoder.pt", weights_only=True)
    assert after["stage"] == 2 and not after["config"]["joint"]
    assert after["config"]["decoder_init"] == "fresh"   # --aux-width 0.5: other shapes
    assert before["encoder"].keys() == after["encoder"].keys()
    for name, value in before["encoder"].items():
        assert torch.equal(value, after["encoder"][name]), name  # bit for bit
    log = [json.loads(line) for line in (run / "log_stage2.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < 0.9 * log[0]["loss"]
    # the decoder is full strength: full width, no dropout
    decoder = s1.Decoder(**s1.autoencoder_kwargs(after["config"]))
    decoder.load_state_dict(after["decoder"])
    assert all(m.p == 0 for m in decoder.modules() if isinstance(m, torch.nn.Dropout))
    stats = after["latent_stats"]
    assert stats["mean"].shape == (4,) and stats["std"].shape == (4,) and (stats["std"] > 0).all()
    assert after["metrics"]["test_psnr"] > 10
    # ten test images above their reconstructions: 10 x 2 tiles of 32 + 2 pixels, shown at 2x
    assert Image.open(run / "stage2_recon.png").size == ((10 * 34 + 2) * 2, (2 * 34 + 2) * 2)
    # every test image (200, fewer than 2,000) through the autoencoder, with its label, for fid.py
    with np.load(run / "reconstructions.npz") as f:
        assert f["arr_0"].shape == (200, 32, 32, 3) and f["arr_0"].dtype == np.uint8
        assert np.bincount(f["arr_1"]).tolist() == [20] * 10


def test_joint_moves_the_encoder(stage1_runs, tmp_path):
    run = copy_run(stage1_runs / "joint", tmp_path / "joint", "stage1.pt")
    run_main("stage2_decoder.py", "--run", run, "--steps", "10", "--batch-size", "16", "--joint")
    before = torch.load(run / "stage1.pt", weights_only=True)
    after = torch.load(run / "autoencoder.pt", weights_only=True)
    assert after["config"]["joint"] and after["config"]["scale_equivariance"] == 0.5
    moved = [
        not torch.equal(v, after["encoder"][k])
        for k, v in before["encoder"].items()
        if v.is_floating_point()
    ]
    assert all(moved)
    # the encoder still learns, so stage 2 keeps stage 1's scale-equivariance term
    log = [json.loads(line) for line in (run / "log_stage2.jsonl").read_text().splitlines()]
    assert log[-1]["se_loss"] > 0 and log[-1]["loss"] > log[-1]["rec_loss"]


def test_gan_loss_runs_and_resume_continues(stage1_runs, tmp_path):
    run = copy_run(stage1_runs / "dae", tmp_path / "gan", "stage1.pt")
    gan = ["--gan-weight", "0.1", "--gan-start", "5", "--batch-size", "8", "--log-every", "5"]
    run_main("stage2_decoder.py", "--run", run, "--steps", "10", *gan)
    run_main("stage2_decoder.py", "--run", run, "--steps", "15", *gan, "--resume")
    ckpt = torch.load(run / "autoencoder.pt", weights_only=True)
    assert ckpt["step"] == 15 and ckpt["discriminator"] is not None
    log = [json.loads(line) for line in (run / "log_stage2.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [5, 10, 15]
    assert "d_loss" in log[-1] and "d_loss" not in log[0]


def test_the_weak_decoder_probe_leaves_the_autoencoder_alone(autoencoder_run, tmp_path):
    # The paper's measure: a fresh decoder of width 0.25 on the frozen encoder; more steps, a
    # higher test PSNR; autoencoder.pt untouched.
    run = copy_run(autoencoder_run, tmp_path / "run", "stage1.pt", "autoencoder.pt")
    before = (run / "autoencoder.pt").read_bytes()
    probe = ["--probe-width", "0.25", "--batch-size", "16"]
    run_main("stage2_decoder.py", "--run", run, *probe, "--steps", "1")
    one_step = json.loads((run / "probe_w0.25_d0.json").read_text())["test_psnr"]
    run_main("stage2_decoder.py", "--run", run, *probe, "--steps", "40")
    result = json.loads((run / "probe_w0.25_d0.json").read_text())
    assert result["steps"] == 40 and result["test_psnr"] > one_step + 1, (result, one_step)
    assert len((run / "log_probe_w0.25_d0.jsonl").read_text().splitlines()) == 1   # its own log
    assert (run / "autoencoder.pt").read_bytes() == before
    assert Image.open(run / "probe_w0.25_d0_recon.png").size[0] > 0


def test_hinge_and_latent_statistics():
    assert s2.hinge_d_loss(torch.full((4,), 2.0), torch.full((4,), -2.0)).item() == 0.0
    assert s2.hinge_d_loss(torch.zeros(4), torch.zeros(4)).item() == 2.0

    class Affine(torch.nn.Module):  # a fake "encoder" whose latent we know: channel c is 3c + 2 x
        def forward(self, x):
            return torch.cat([3.0 * c + 2 * x[:, :1] for c in range(2)], 1)

    images = torch.randint(0, 256, (64, 8, 8, 3), dtype=torch.uint8)
    dataset = data.ImageData(images, torch.zeros(64, dtype=torch.long), ["a"], "toy")
    stats = s2.latent_statistics(Affine(), dataset, torch.device("cpu"), batch_size=10)
    x = data.to_model_input(images)[:, 0]
    torch.testing.assert_close(
        stats["mean"], torch.tensor([0.0, 3.0]) + 2 * x.mean(), rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(stats["std"], (2 * x.double().std(unbiased=False)).float().repeat(2))
    # images 0, 3, 7, .., 63: first to last, so every class of a class-sorted folder
    spread = s2.latent_statistics(Affine(), dataset, torch.device("cpu"), num=20, batch_size=10)
    picked = [round(i * 63 / 19) for i in range(20)]
    torch.testing.assert_close(
        spread["mean"], torch.tensor([0.0, 3.0]) + 2 * x[picked].mean(), rtol=1e-5, atol=1e-5
    )
    assert not torch.allclose(
        spread["mean"], torch.tensor([0.0, 3.0]) + 2 * x[:20].mean()
    )  # not the first 20


def test_dae_decoder_starts_from_the_aux_decoder_when_only_dropout_weakened_it(
    stage1_runs, tmp_path
):
    # full width (dropout-only weakening): the same shapes, so stage 2 continues the aux decoder
    for fresh in (False, True):
        run = copy_run(stage1_runs / "joint", tmp_path / f"run{fresh}", "stage1.pt")
        s2.main(
            ["--run", str(run), "--steps", "1", "--lr", "1e-12", "--batch-size", "4"]
            + ["--fresh-decoder"] * fresh
        )
        aux = torch.load(run / "stage1.pt", weights_only=True)["aux_decoder"]
        after = torch.load(run / "autoencoder.pt", weights_only=True)
        assert after["config"]["decoder_init"] == ("fresh" if fresh else "aux")
        same = all(
            torch.allclose(v, after["decoder"][k], atol=1e-6)
            for k, v in aux.items()
            if v.is_floating_point()
        )
        assert same != fresh
        assert 0 < after["metrics"]["latent_high_freq"] < 1
        # eight test images, each beside its four latent channels: 8 rows of 1 + 4 tiles, at 3x
        assert Image.open(run / "latents.png").size == ((5 * 34 + 2) * 3, (8 * 34 + 2) * 3)


def test_high_frequency_share():
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(500, 4, 8, 8, generator=g)
    smooth = torch.nn.functional.interpolate(
        torch.randn(500, 4, 2, 2, generator=g), size=(8, 8), mode="bilinear", align_corners=True
    )
    checker = (
        torch.arange(8)[:, None] + torch.arange(8)[None]
    ) % 2 * 2.0 - 1  # the highest frequency only
    # white noise: 51 of the 63 non-constant frequencies are high
    assert s2.high_frequency_share(noise) == pytest.approx(51 / 63, abs=0.02)
    assert s2.high_frequency_share(smooth) < 0.3
    assert s2.high_frequency_share(checker.expand(1, 1, 8, 8)) == pytest.approx(1.0)


def test_without_flips_no_batch_and_no_cached_latent_is_mirrored(
    shapes_folder, tmp_path, monkeypatch
):
    seen = []
    real = data.sample_batch

    def spy(dataset, batch_size, generator, flip):
        seen.append(flip)
        return real(dataset, batch_size, generator, flip)

    monkeypatch.setattr(s1, "sample_batch", spy)
    monkeypatch.setattr(s2, "sample_batch", spy)
    run = tmp_path / "run"
    s1.main(["--data", str(shapes_folder), *TINY, "--steps", "3", "--run", str(run), "--no-flip"])
    s2.main(["--run", str(run), "--steps", "3", "--batch-size", "8"])
    assert seen == [False] * 6  # every batch of stage 1 and stage 2 was drawn without flips
    dit.main(
        ["--run", str(run), "--model", "DiT-T", "--patch", "2", "--batch-size", "8", "--steps", "3"]
    )
    cache = torch.load(run / "latents.pt", weights_only=True)
    dataset = data.load_data(str(shapes_folder))
    assert cache["flip"] is False and len(cache["latents"]) == len(dataset.images)  # no mirrors
    x = torch.arange(2 * 4 * 4 * 3, dtype=torch.uint8).reshape(2, 4, 4, 3)
    toy = data.ImageData(x, torch.zeros(2, dtype=torch.long), ["a"], "toy")
    batch, _ = real(toy, 64, torch.Generator().manual_seed(0), flip=False)
    assert all(any(torch.equal(b, o) for o in data.to_model_input(x)) for b in batch)
