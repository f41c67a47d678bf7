"""Sampling: the update rules against an exact Gaussian oracle, guidance, repeatability, the npz."""

import numpy as np
import pytest
import torch
from PIL import Image

import sample
import train_latent_dit as dit
from conftest import copy_run, run_main

M, S = 0.7, 0.5


class GaussianOracle(torch.nn.Module):
    """The exact predictor when the data is N(M, S^2): x_t ~ N(sqrt(a) M, a S^2 + 1 - a), so
    E[eps | x_t] = sqrt(1 - a) (x_t - sqrt(a) M) / (a S^2 + 1 - a) and
    E[x0 | x_t] = (x_t - sqrt(1 - a) eps) / sqrt(a)
                = M + sqrt(a) S^2 (x_t - sqrt(a) M) / (a S^2 + 1 - a);
    it answers in the target it is asked for."""

    num_classes = 10

    def __init__(self, schedule="linear", target="eps"):
        super().__init__()
        self.alphas_cumprod, self.target = dit.make_schedule(schedule), target

    def forward(self, x, t, y):
        a = self.alphas_cumprod[t].float()[:, None, None, None]
        var = a * S**2 + 1 - a
        eps = (1 - a).sqrt() * (x - a.sqrt() * M) / var
        x0 = M + a.sqrt() * S**2 * (x - a.sqrt() * M) / var
        if self.target == "x":
            return x0
        return eps if self.target == "eps" else a.sqrt() * eps - (1 - a).sqrt() * x0  # v again


def oracle_moments(sampler, eta=0.0, steps=1000, schedule="linear", target="eps"):
    labels = torch.zeros(
        4000, dtype=torch.long
    )  # 64,000 values: the standard error of the mean is 0.002
    x = sample.sample_latents(GaussianOracle(schedule, target), labels, steps, sampler, eta, 1.0,
                              torch.Generator().manual_seed(0), (1, 4, 4), schedule, target)
    return x.mean().item(), x.std().item()


@pytest.mark.parametrize(
    "sampler,eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 0.5), ("ddim", 1.0)]
)
def test_samplers_recover_the_gaussian(sampler, eta):
    mean, std = oracle_moments(sampler, eta, steps=1000)
    assert abs(mean - M) < 0.01 and abs(std - S) < 0.01, (mean, std)


TARGETS_AND_SCHEDULES = [("eps", "cosine"), ("v", "linear"), ("v", "cosine"), ("x", "linear"),
                         ("x", "cosine")]


@pytest.mark.parametrize("target,schedule", TARGETS_AND_SCHEDULES)
@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_every_target_and_schedule_samples_exactly(sampler, target, schedule):
    # 1000 steps: exact; 100 respaced steps: the mean stays, the spread may shrink a little.
    mean, std = oracle_moments(sampler, steps=1000, schedule=schedule, target=target)
    assert abs(mean - M) < 0.01 and abs(std - S) < 0.01, (mean, std)
    mean, std = oracle_moments(sampler, steps=100, schedule=schedule, target=target)
    assert abs(mean - M) < 0.01 and abs(std - S) < 0.05, (mean, std)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_respaced_samplers_stay_close(sampler):
    # Coarse steps cost some spread (the posterior variance ignores x0's uncertainty), not the mean.
    mean, std = oracle_moments(sampler, steps=100)
    assert abs(mean - M) < 0.01 and abs(std - S) < 0.05, (mean, std)


def broken_ddim_step(x_t, x0, eps, a_t, a_prev, noise, eta=0.0):
    """A plausible mistake: alpha_bar instead of its square root in front of x0."""
    return a_prev * x0 + (1 - a_prev) ** 0.5 * eps


def broken_ddpm_step(x_t, x0, a_t, a_prev, noise, ddpm_step=sample.ddpm_step):
    """Another: the posterior variance used where its square root, the std, belongs."""
    beta = 1 - a_t / a_prev
    mean = ddpm_step(x_t, x0, a_t, a_prev, torch.zeros_like(noise))
    return mean + beta * (1 - a_prev) / (1 - a_t) * noise


def broken_respacing_ddpm_step(x_t, x0, a_t, a_prev, noise, ddpm_step=sample.ddpm_step):
    """A respacing mistake: the schedule's one-step alpha_bar ratio, not the respaced one."""
    alphas_cumprod = dit.make_schedule()
    t = int(torch.searchsorted(-alphas_cumprod, torch.tensor(-a_t, dtype=torch.float64)))
    return ddpm_step(x_t, x0, a_t, alphas_cumprod[t - 1].item() if t > 0 else 1.0, noise)


def broken_v_conversion(out, x_t, a_t, target, to_x0_eps=sample.to_x0_eps):
    """A conversion mistake: v read with the roles of sqrt(a) and sqrt(1 - a) swapped."""
    if target != "v":
        return to_x0_eps(out, x_t, a_t, target)
    return (1 - a_t) ** 0.5 * x_t - a_t**0.5 * out, a_t**0.5 * x_t + (1 - a_t) ** 0.5 * out


def broken_v_sign(out, x_t, a_t, target, to_x0_eps=sample.to_x0_eps):
    """Another: v taken as sqrt(1 - a) x0 - sqrt(a) eps, the opposite sign."""
    return to_x0_eps(-out if target == "v" else out, x_t, a_t, target)


def broken_x_conversion(out, x_t, a_t, target, to_x0_eps=sample.to_x0_eps):
    """An x mistake: eps = (x_t - a x0) / sqrt(1 - a), alpha_bar where its square root belongs."""
    if target != "x":
        return to_x0_eps(out, x_t, a_t, target)
    return out, (x_t - a_t * out) / (1 - a_t) ** 0.5


@pytest.mark.parametrize(
    "name,broken,sampler,steps,target",
    [("ddim_step", broken_ddim_step, "ddim", 1000, "eps"),
     ("ddpm_step", broken_ddpm_step, "ddpm", 1000, "eps"),
     ("ddpm_step", broken_respacing_ddpm_step, "ddpm", 100, "eps"),
     ("to_x0_eps", broken_v_conversion, "ddpm", 100, "v"),
     ("to_x0_eps", broken_v_sign, "ddim", 100, "v"),
     ("to_x0_eps", broken_x_conversion, "ddim", 100, "x")],
)
def test_a_wrong_update_rule_fails_the_same_check(
    monkeypatch, name, broken, sampler, steps, target
):
    monkeypatch.setattr(sample, name, broken)
    mean, std = oracle_moments(sampler, steps=steps, target=target)
    assert abs(mean - M) > 0.05 or abs(std - S) > 0.05, (mean, std)


def test_ddim_with_eta_one_is_ddpm():
    x_t, eps, noise = torch.randn(3, 4, 8, 8, dtype=torch.float64).unbind(0)
    alphas_cumprod = dit.make_schedule()
    a_t, a_prev = alphas_cumprod[600].item(), alphas_cumprod[580].item()
    x0, eps = sample.to_x0_eps(eps, x_t, a_t, "eps")
    torch.testing.assert_close(sample.ddim_step(x_t, x0, eps, a_t, a_prev, noise, eta=1.0),
                               sample.ddpm_step(x_t, x0, a_t, a_prev, noise), rtol=1e-12,
                               atol=1e-12)


def test_respacing():
    assert sample.respaced_timesteps(5) == [999, 749, 500, 250, 0]
    assert sample.respaced_timesteps(1000) == list(range(999, -1, -1))


class LabelledModel(torch.nn.Module):
    """eps depends on the label: the null label predicts 0, label k predicts k."""

    num_classes = 10

    def forward(self, x, t, y):
        return torch.where(y == 10, 0.0, y.float())[:, None, None, None] * torch.ones_like(x)


def test_guidance_arithmetic():
    model, x, t = LabelledModel(), torch.randn(2, 4, 8, 8), torch.tensor([10, 10])
    y = torch.tensor([2, 5])
    assert torch.equal(
        sample.guided_output(model, x, t, y, 1.0), model(x, t, y)
    )  # 1.0: the conditional model
    # s = 3: eps_uncond + 3 (eps_cond - eps_uncond) = 0 + 3 * label
    torch.testing.assert_close(
        sample.guided_output(model, x, t, y, 3.0)[:, 0, 0, 0], torch.tensor([6.0, 15.0])
    )


def test_sample_script_is_repeatable_and_writes_an_fid_ready_npz(dit_run, tmp_path):
    run = copy_run(dit_run, tmp_path / "run", "autoencoder.pt", "dit.pt")
    args = ["--run", run, "--num", "13", "--batch-size", "8", "--steps", "5", "--per-class", "2"]
    run_main("sample.py", *args, "--out", tmp_path / "a.npz")
    run_main("sample.py", *args, "--out", tmp_path / "b.npz")
    a, b = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
    assert a["arr_0"].shape == (13, 32, 32, 3) and a["arr_0"].dtype == np.uint8
    assert a["arr_0"].max() > a["arr_0"].min()
    assert a["arr_1"].tolist() == [i % 10 for i in range(13)] and a["arr_1"].dtype.kind == "i"
    assert np.array_equal(a["arr_0"], b["arr_0"])  # same seed, same images
    assert Image.open(run / "samples.png").size == ((2 * 34 + 2) * 2,
                                                    (10 * 34 + 2) * 2)  # 10 rows of 2
    run_main("sample.py", *args, "--out", tmp_path / "c.npz", "--seed", "1", "--sampler", "ddim",
             "--class", "circle", "3")
    circle = torch.load(run / "dit.pt", weights_only=True)["config"]["class_names"].index("circle")
    c = np.load(tmp_path / "c.npz")
    assert not np.array_equal(a["arr_0"], c["arr_0"]) and set(c["arr_1"].tolist()) == {circle, 3}
