"""Sampling: the update rules against an exact Gaussian oracle, guidance, repeatability, the npz."""
import numpy as np
import pytest
import torch
from PIL import Image

import train_latent_dit as dit
from conftest import assert_user_error, copy_run, run_script

ALPHAS_CUMPROD = dit.make_schedule()
M, S = 0.7, 0.5


class GaussianOracle(torch.nn.Module):
    """The exact noise predictor E[eps | x_t] when the data is N(M, S^2):
    x_t ~ N(sqrt(a) M, a S^2 + 1 - a), so E[eps | x_t] = sqrt(1 - a) (x_t - sqrt(a) M) / (a S^2 + 1 - a)."""
    num_classes = 10

    def forward(self, x, t, y):
        a = ALPHAS_CUMPROD[t].float()[:, None, None, None]
        return (1 - a).sqrt() * (x - a.sqrt() * M) / (a * S ** 2 + 1 - a)


def oracle_moments(sampler, eta=0.0, steps=1000):
    labels = torch.zeros(20000, dtype=torch.long)
    x = dit.sample_latents(GaussianOracle(), labels, steps, sampler, eta, generator=torch.Generator().manual_seed(0),
                           shape=(1, 4, 4))
    return x.mean().item(), x.std().item()


@pytest.mark.parametrize("sampler,eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 0.5), ("ddim", 1.0)])
def test_samplers_recover_the_gaussian(sampler, eta):
    mean, std = oracle_moments(sampler, eta, steps=1000)
    assert abs(mean - M) < 0.01 and abs(std - S) < 0.01, (mean, std)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_respaced_samplers_stay_close(sampler):
    # Coarse steps cost some spread (DDPM's posterior variance ignores the uncertainty of x0), not the mean.
    mean, std = oracle_moments(sampler, steps=100)
    assert abs(mean - M) < 0.01 and abs(std - S) < 0.05, (mean, std)


def broken_ddim_step(x_t, eps, a_t, a_prev, noise, eta=0.0):
    """A plausible mistake: alpha_bar instead of its square root in front of x0."""
    x0 = dit.predict_x0(x_t, eps, a_t)
    return a_prev * x0 + (1 - a_prev) ** 0.5 * eps


def broken_ddpm_step(x_t, eps, a_t, a_prev, noise, ddpm_step=dit.ddpm_step):
    """Another: the posterior variance used where its square root, the standard deviation, belongs."""
    beta = 1 - a_t / a_prev
    mean = ddpm_step(x_t, eps, a_t, a_prev, torch.zeros_like(noise))
    return mean + beta * (1 - a_prev) / (1 - a_t) * noise


def broken_respacing_ddpm_step(x_t, eps, a_t, a_prev, noise, ddpm_step=dit.ddpm_step):
    """A respacing mistake: the original schedule's single-step alpha_bar ratio instead of the respaced one."""
    t = int(torch.searchsorted(-ALPHAS_CUMPROD, torch.tensor(-a_t, dtype=torch.float64)))
    return ddpm_step(x_t, eps, a_t, ALPHAS_CUMPROD[t - 1].item() if t > 0 else 1.0, noise)


@pytest.mark.parametrize("name,broken,sampler,steps", [("ddim_step", broken_ddim_step, "ddim", 1000),
                                                       ("ddpm_step", broken_ddpm_step, "ddpm", 1000),
                                                       ("ddpm_step", broken_respacing_ddpm_step, "ddpm", 100)])
def test_a_wrong_update_rule_fails_the_same_check(monkeypatch, name, broken, sampler, steps):
    monkeypatch.setattr(dit, name, broken)
    mean, std = oracle_moments(sampler, steps=steps)
    assert abs(mean - M) > 0.05 or abs(std - S) > 0.05, (mean, std)


def test_ddim_with_eta_one_is_ddpm():
    x_t, eps, noise = torch.randn(3, 4, 8, 8, dtype=torch.float64).unbind(0)
    a_t, a_prev = ALPHAS_CUMPROD[600].item(), ALPHAS_CUMPROD[580].item()
    torch.testing.assert_close(dit.ddim_step(x_t, eps, a_t, a_prev, noise, eta=1.0),
                               dit.ddpm_step(x_t, eps, a_t, a_prev, noise), rtol=1e-12, atol=1e-12)


def test_respacing():
    assert dit.respaced_timesteps(5) == [999, 749, 500, 250, 0]
    assert dit.respaced_timesteps(1000) == list(range(999, -1, -1))


class LabelledModel(torch.nn.Module):
    """eps depends on the label: the null label predicts 0, label k predicts k."""
    num_classes = 10

    def forward(self, x, t, y):
        return torch.where(y == 10, 0.0, y.float())[:, None, None, None] * torch.ones_like(x)


def test_guidance_arithmetic():
    model, x, t = LabelledModel(), torch.randn(2, 4, 8, 8), torch.tensor([10, 10])
    y = torch.tensor([2, 5])
    assert torch.equal(dit.guided_eps(model, x, t, y, 1.0), model(x, t, y))   # 1.0: the conditional model
    # s = 3: eps_uncond + 3 (eps_cond - eps_uncond) = 0 + 3 * label
    torch.testing.assert_close(dit.guided_eps(model, x, t, y, 3.0)[:, 0, 0, 0], torch.tensor([6.0, 15.0]))


def test_sample_script_is_repeatable_and_writes_an_fid_ready_npz(dit_run, tmp_path):
    run = copy_run(dit_run, tmp_path / "run", "autoencoder.pt", "dit.pt")
    args = ["--run", run, "--num", "13", "--batch-size", "8", "--steps", "5", "--per-class", "2"]
    run_script("sample.py", *args, "--out", tmp_path / "a.npz")
    run_script("sample.py", *args, "--out", tmp_path / "b.npz")
    a, b = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
    assert a["arr_0"].shape == (13, 32, 32, 3) and a["arr_0"].dtype == np.uint8
    assert a["arr_0"].max() > a["arr_0"].min()
    assert a["arr_1"].tolist() == [i % 10 for i in range(13)] and a["arr_1"].dtype.kind == "i"
    assert np.array_equal(a["arr_0"], b["arr_0"])   # same seed, same images
    assert Image.open(run / "samples.png").size == ((2 * 34 + 2) * 2, (10 * 34 + 2) * 2)  # 10 rows of 2
    run_script("sample.py", *args, "--out", tmp_path / "c.npz", "--seed", "1", "--sampler", "ddim",
               "--class", "circle", "3")
    circle = torch.load(run / "dit.pt", weights_only=True)["config"]["class_names"].index("circle")
    c = np.load(tmp_path / "c.npz")
    assert not np.array_equal(a["arr_0"], c["arr_0"]) and set(c["arr_1"].tolist()) == {circle, 3}


def test_sample_script_user_mistakes(dit_run, tmp_path):
    assert_user_error(run_script("sample.py", "--run", tmp_path, check=False), "train_latent_dit.py")
    run = copy_run(dit_run, tmp_path / "run", "autoencoder.pt")
    (run / "dit.pt").write_bytes((run / "autoencoder.pt").read_bytes())
    assert_user_error(run_script("sample.py", "--run", run, check=False), "stage-2")
    run = copy_run(dit_run, tmp_path / "run2", "autoencoder.pt", "dit.pt")
    assert_user_error(run_script("sample.py", "--run", run, "--class", "unicorn", check=False), "unicorn")
