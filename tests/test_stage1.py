"""Stage 1: the autoencoder's pieces, its weakening, the scale-equivariance term, and the script."""
import json

import pytest
import torch
from PIL import Image

import stage1_encoder as s1
from conftest import copy_run, run_main

TINY = ["--channels", "16", "--batch-size", "16", "--log-every", "10"]


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


# --- the scale-equivariance term ------------------------------------------------------------------

class PixelwiseLinear(torch.nn.Module):
    """A 1x1 conv: it commutes with 2x average pooling (pooling is linear and acts per channel)."""
    def __init__(self, weight):
        super().__init__()
        self.weight = weight

    def forward(self, x):
        return torch.einsum("oc,nchw->nohw", self.weight, x)


def test_scale_equivariance_is_zero_for_a_decoder_that_commutes_with_downsampling():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    mix = torch.randn(3, 3) + 3 * torch.eye(3)
    encode, decode = PixelwiseLinear(mix), PixelwiseLinear(torch.linalg.inv(mix))
    z = encode(x)
    torch.testing.assert_close(decode(z), x, atol=1e-5, rtol=0)        # a perfect autoencoder
    assert s1.scale_equivariance_loss(decode, z, x, "l1").item() < 1e-5
    assert s1.scale_equivariance_loss(decode, z, x, "mse").item() < 1e-10


def test_scale_equivariance_is_positive_otherwise():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    # A perfect autoencoder that does not commute with pooling: cube, then cube root, per value.
    z = x ** 3
    def decode(z):
        return z.sign() * z.abs() ** (1 / 3)
    torch.testing.assert_close(decode(z), x)
    assert s1.scale_equivariance_loss(decode, z, x, "l1").item() > 0.05
    # and the real auxiliary decoder, untrained, is far from scale-equivariant
    encoder, aux = s1.Encoder(channels=16), s1.Decoder(channels=16)
    x32 = torch.rand(2, 3, 32, 32) * 2 - 1
    assert s1.scale_equivariance_loss(aux, encoder(x32), x32, "l1").item() > 0.05


def test_psnr_known_value():
    x = torch.zeros(1, 3, 4, 4)
    # an error of 0.2 in [-1, 1] is 0.1 in [0, 1]: PSNR = 10 log10(1 / 0.01) = 20 dB
    assert s1.psnr(x + 0.2, x).item() == pytest.approx(20.0, abs=1e-4)


# --- the script ----------------------------------------------------------------------------------

def read_log(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_short_run_lowers_loss_and_writes_a_safe_checkpoint(tmp_path, shapes_dir):
    run = tmp_path / "run"
    run_main("stage1_encoder.py", "--data", "shapes", "--data-dir", shapes_dir, "--run", run,
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
    # ten test images above their reconstructions: 10 x 2 tiles of 32 + 2 pixels, shown at 2x
    assert Image.open(run / "stage1_recon.png").size == ((10 * 34 + 2) * 2, (2 * 34 + 2) * 2)


def test_resume_continues_the_step_count(tmp_path, shapes_dir):
    data = ["--data", "shapes", "--data-dir", shapes_dir, *TINY]
    run_main("stage1_encoder.py", *data, "--run", tmp_path / "a", "--steps", "30")
    run_main("stage1_encoder.py", *data, "--run", tmp_path / "b", "--steps", "20")
    run_main("stage1_encoder.py", *data, "--run", tmp_path / "b", "--steps", "30", "--resume")
    a = torch.load(tmp_path / "a" / "stage1.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "stage1.pt", weights_only=True)
    assert b["step"] == 30
    assert [r["step"] for r in read_log(tmp_path / "b" / "log_stage1.jsonl")] == [10, 20, 30]
    # the resumed run saw the same batches and dropout masks as the uninterrupted one
    for name in a["encoder"]:
        torch.testing.assert_close(a["encoder"][name], b["encoder"][name])


def test_scale_equivariance_trains_and_is_logged(tmp_path, shapes_folder):
    run = tmp_path / "run"
    run_main("stage1_encoder.py", "--data", shapes_folder, "--run", run, "--steps", "20",
             "--scale-equivariance", "0.25", *TINY)
    log = read_log(run / "log_stage1.jsonl")
    ckpt = torch.load(run / "stage1.pt", weights_only=True)
    assert ckpt["config"]["scale_equivariance"] == 0.25
    assert all(r["se_loss"] > 0 for r in log) and log[-1]["se_loss"] < log[0]["se_loss"]


def test_the_run_folder_defaults_to_runs_slash_the_data_name(tmp_path, shapes_folder, capsys,
                                                            monkeypatch):
    assert "runs/<data name>" in run_main("stage1_encoder.py", "--help", capsys=capsys)
    monkeypatch.chdir(tmp_path)
    run_main("stage1_encoder.py", "--data", shapes_folder, "--steps", "2", *TINY)
    assert (tmp_path / "runs" / shapes_folder.name / "stage1.pt").is_file()


def test_any_width_gets_a_group_count_that_divides_it():
    # --channels 128 --aux-width 0.6: 152 channels, which 32 groups cannot split; 19 groups of 8 can
    decoder = s1.Decoder(channels=128, width=0.6)
    norms = [m for m in decoder.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert any(m.num_channels == 152 and m.num_groups == 19 for m in norms)
    assert all(m.num_channels % m.num_groups == 0 and m.num_channels // m.num_groups >= 4
               for m in norms)
    assert decoder(torch.randn(1, 4, 8, 8)).shape == (1, 3, 32, 32)


def test_overwrite_starts_over_and_drops_what_later_stages_built(tmp_path, shapes_folder, dit_run,
                                                                  autoencoder_run):
    run = copy_run(autoencoder_run, tmp_path / "run", "stage1.pt", "log_stage1.jsonl",
                   "autoencoder.pt")
    copy_run(dit_run, run, "dit.pt", "latents.pt")
    old = (run / "stage1.pt").read_bytes()
    s1.main(["--data", str(shapes_folder), "--run", str(run), "--channels", "16", "--batch-size",
             "8", "--steps", "3", "--log-every", "1", "--overwrite"])
    assert (run / "stage1.pt").read_bytes() != old
    assert torch.load(run / "stage1.pt", weights_only=True)["step"] == 3
    assert len((run / "log_stage1.jsonl").read_text().splitlines()) == 3   # only the new run's
    assert not (run / "autoencoder.pt").exists() and not (run / "dit.pt").exists()
    assert (run / "latents.pt").exists()   # a cache, checked against its autoencoder's sha256
    assert not (run / ".lock").exists()
