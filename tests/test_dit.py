"""The latent DiT: shapes, attention, adaLN-Zero, diffusion arithmetic, training, resume and DDP."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

import benchmark_dit
import sample
import train_latent_dit as dit
from conftest import ROOT, copy_run, run_main

TINY = ["--model", "DiT-N", "--patch", "4", "--batch-size", "16", "--log-every", "10", "--warmup",
        "1", "--lr", "1e-3"]


def small_dit(**kw):
    return dit.DiT(
        input_size=8, in_channels=4, patch=2, hidden=64, depth=2, heads=4, num_classes=10, **kw
    )


@pytest.mark.parametrize("model", list(dit.DIT_SIZES))
@pytest.mark.parametrize("patch", [1, 2, 4])
def test_output_shapes(model, patch):
    config = dict(
        model=model, patch=patch, input_size=8, in_channels=4, num_classes=10, attn="sdpa"
    )
    net = dit.build_dit(config)
    x, t, y = (torch.randn(2, 4, 8, 8), torch.tensor([0, 999]),
               torch.tensor([3, 10]))  # 10: the null label
    assert net(x, t, y).shape == (2, 4, 8, 8)
    depth, hidden, _ = dit.DIT_SIZES[model]
    assert len(net.blocks) == depth and net.pos_embed.shape == (1, (8 // patch) ** 2, hidden)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_manual_attention_equals_sdpa(dtype, tol):
    torch.manual_seed(0)
    sdpa = dit.Attention(64, 4, "sdpa").to(dtype)
    manual = dit.Attention(64, 4, "manual").to(dtype)
    manual.load_state_dict(sdpa.state_dict())
    x = torch.randn(3, 17, 64, dtype=dtype, requires_grad=True)
    out_s, out_m = sdpa(x), manual(x)
    torch.testing.assert_close(out_m, out_s, rtol=0, atol=tol)
    grad = torch.randn_like(out_s)
    (gx_s, gw_s), (gx_m, gw_m) = (
        torch.autograd.grad(o, (x, m.qkv.weight), grad) for o, m in ((out_s, sdpa), (out_m, manual))
    )
    torch.testing.assert_close(gx_m, gx_s, rtol=0, atol=tol)
    torch.testing.assert_close(gw_m, gw_s, rtol=0, atol=tol * 10)


def test_adaln_zero_starts_as_identity_and_predicts_zero():
    net = small_dit()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([5, 500]), torch.tensor([1, 2])
    assert torch.equal(net(x, t, y), torch.zeros_like(x))
    tokens, c = torch.randn(2, 16, 64), torch.randn(2, 64)
    for block in net.blocks:
        assert torch.equal(block(tokens, c), tokens)


def test_pos_embed_is_the_2d_sincos():
    pe = dit.pos_embed_2d(8, 3)  # 8 channels: 4 for the row, 4 for the column
    assert pe.shape == (9, 8)
    row, col = 1, 2
    expected_row = torch.tensor(
        [torch.sin(torch.tensor(row * w)) for w in (1.0, 0.01)]
        + [torch.cos(torch.tensor(row * w)) for w in (1.0, 0.01)]
    )
    torch.testing.assert_close(pe[row * 3 + col, :4], expected_row)
    assert torch.equal(pe[0 * 3 + col, 4:], pe[2 * 3 + col, 4:])  # same column, same column half


def test_q_sample_closed_form():
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    alphas_cumprod = dit.make_schedule()
    t = torch.tensor([0, 10, 500, 999])
    expected_abar = torch.stack([torch.prod(1 - betas[: int(s) + 1]) for s in t])
    torch.testing.assert_close(alphas_cumprod[t], expected_abar)
    x0, noise = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    xt = dit.q_sample(x0, t, noise, alphas_cumprod)
    a = expected_abar.float()[:, None, None, None]
    torch.testing.assert_close(xt, a.sqrt() * x0 + (1 - a).sqrt() * noise)
    assert 0.99 < alphas_cumprod[0] and alphas_cumprod[-1] < 1e-4   # almost clean .. pure noise


def test_label_dropout_rate():
    labels = torch.randint(0, 10, (200_000,))
    dropped = dit.drop_labels(labels, 10, 0.1, torch.Generator().manual_seed(0))
    rate = (dropped == 10).float().mean().item()
    assert abs(rate - 0.1) < 0.003
    assert torch.equal(dropped[dropped != 10], labels[dropped != 10])


def test_ema_arithmetic():
    model, ema = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
    model.weight.data.fill_(3.0)
    ema.weight.data.fill_(1.0)
    dit.update_ema(ema, model, 0.9)
    assert ema.weight.item() == pytest.approx(0.9 * 1 + 0.1 * 3)
    dit.update_ema(ema, model, 0.0)
    assert ema.weight.item() == 3.0


@pytest.mark.parametrize("target,factor", [("eps", 0.4), ("v", 0.85), ("x", 0.4)])
def test_the_training_loss_falls_on_tiny_random_latents(target, factor):
    # The project's own loss (weighted_error, min-SNR weighting) for every target, on one fixed
    # batch of steps and noise before and after 120 steps (measured: 0.20, 0.76, 0.15 of where it
    # started; v learns these latents slowest).
    torch.manual_seed(0)
    net = small_dit()
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3)
    latents = torch.randn(10, 4, 8, 8)   # one fixed latent per class: the model can learn it
    alphas_cumprod = dit.make_schedule()
    config = {"target": target, "min_snr_gamma": 5.0}
    loss = lambda y, t, noise: dit.weighted_error(net, latents[y], t, y, noise, alphas_cumprod,
                                                  config).mean()
    fixed = torch.arange(10).repeat(20), torch.randint(0, 1000, (200,)), torch.randn(200, 4, 8, 8)
    before = loss(*fixed).item()
    for step in range(120):
        batch = torch.randint(0, 10, (32,)), torch.randint(0, 1000, (32,)), torch.randn(32, 4, 8, 8)
        optimizer.zero_grad()
        loss(*batch).backward()
        optimizer.step()
    assert loss(*fixed).item() < factor * before, (loss(*fixed).item(), before)


@pytest.mark.parametrize("model,patch", [("DiT-S", 2), ("DiT-T", 4), ("DiT-N", 1)])
def test_flop_count_is_the_models_own_count_of_matmuls(model, patch):
    from torch.utils.flop_counter import FlopCounterMode

    config = dict(
        model=model, patch=patch, input_size=8, in_channels=4, num_classes=10, attn="manual"
    )
    net = dit.build_dit(config)
    with FlopCounterMode(display=False) as counter:  # every mm, bmm and conv of one forward pass
        net(torch.randn(3, 4, 8, 8), torch.tensor([1, 500, 999]), torch.tensor([0, 1, 10]))
    assert benchmark_dit.dit_flops_per_image(config) * 3 == counter.get_total_flops()


def read_log(path):
    """The logged steps (without an end-of-training warning, if one was written)."""
    return [r for r in map(json.loads, path.read_text().splitlines()) if "loss" in r]


def test_train_resume_reproduces_the_loss_curve(autoencoder_run, tmp_path):
    # A constant learning rate: a cosine one decays over each invocation's --steps.
    a = copy_run(autoencoder_run, tmp_path / "a", "autoencoder.pt")
    b = copy_run(autoencoder_run, tmp_path / "b", "autoencoder.pt")
    run_main("train_latent_dit.py", "--run", a, "--steps", "40", *TINY, "--lr-schedule", "constant")
    run_main("train_latent_dit.py", "--run", b, "--steps", "20", *TINY, "--lr-schedule", "constant")
    cache_time = (b / "latents.pt").stat().st_mtime_ns
    run_main("train_latent_dit.py", "--run", b, "--steps", "40", *TINY, "--resume")
    assert (b / "latents.pt").stat().st_mtime_ns == cache_time  # the latent cache was reused
    log_a, log_b = read_log(a / "log_dit.jsonl"), read_log(b / "log_dit.jsonl")
    assert [r["step"] for r in log_b] == [10, 20, 30, 40]
    for ra, rb in zip(log_a, log_b):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5)
    assert log_a[-1]["loss"] < log_a[0]["loss"]
    ckpt = torch.load(a / "dit.pt", weights_only=True)
    assert ckpt["stage"] == 3 and ckpt["step"] == 40 and ckpt["config"]["model"] == "DiT-N"
    assert set(ckpt["ema"]) == set(ckpt["model"])
    cache = torch.load(a / "latents.pt", weights_only=True)
    n = len(cache["labels"]) // 2
    assert cache["latents"].shape == (2 * n, 4, 8, 8)  # the images and their flips
    latents = cache["latents"]
    assert abs(latents.mean().item()) < 0.1 and abs(latents.std().item() - 1) < 0.1
    # eight samples per class, one row for each of the folder's ten classes, shown at 2x
    assert Image.open(a / "dit_samples.png").size == ((8 * 34 + 2) * 2, (10 * 34 + 2) * 2)


def test_two_process_gloo_run(autoencoder_run, tmp_path):
    run = copy_run(autoencoder_run, tmp_path / "ddp", "autoencoder.pt")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(ROOT / "train_latent_dit.py"), "--", "--run", str(run), "--steps", "6", *TINY],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.load(run / "dit.pt", weights_only=True)["step"] == 6
    assert sorted(p.name for p in run.iterdir() if p.suffix == ".pt") == ["autoencoder.pt",
                                                                          "dit.pt", "latents.pt"]
    assert len(read_log(run / "log_dit.jsonl")) == 1  # one writer: rank 0


@pytest.mark.parametrize("target", ["eps", "v", "x"])
def test_min_snr_weighting_is_the_clipped_snr_on_the_x0_error(target):
    # min-SNR-gamma: for every target, the weighted loss is min(SNR, gamma) * (x0_hat - x0)^2.
    alphas_cumprod = dit.make_schedule()
    t = torch.tensor([10, 200, 500, 900])
    a = alphas_cumprod[t].double()[:, None, None, None]
    x0, noise, out = torch.randn(3, 4, 4, 8, 8, dtype=torch.float64).unbind(0)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    weighted = (
        dit.loss_weight(a, target, 5.0) * (out - dit.training_target(x0, noise, a, target)) ** 2
    )
    x0_hat, _ = sample.to_x0_eps(out, x_t, a, target)
    snr = a / (1 - a)
    torch.testing.assert_close(weighted, snr.clamp(max=5.0) * (x0_hat - x0) ** 2)
    assert torch.equal(dit.loss_weight(a, target, 0.0), torch.ones_like(a))  # 0: plain MSE


def test_jit_loss_is_the_error_of_the_velocity_derived_from_the_x_output():
    # --x-loss v: the x0 error weighted 1 / (1 - a) is (v_hat - v)^2, v_hat derived from x_hat;
    # at the lowest noise (1 - a < 0.05^2) the weight is clamped at 1 / 0.05^2.
    alphas_cumprod = dit.make_schedule()
    t = torch.tensor([0, 200, 500, 900])
    a = alphas_cumprod[t].double()[:, None, None, None]
    x0, noise, x_hat = torch.randn(3, 4, 4, 8, 8, dtype=torch.float64).unbind(0)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    v = dit.training_target(x0, noise, a, "v")
    v_hat = (a.sqrt() * x_t - x_hat) / (1 - a).sqrt()   # x_t, x_hat -> eps_hat -> v_hat
    weight = dit.loss_weight(a, "x", 5.0, x_loss="v")
    torch.testing.assert_close((weight * (x_hat - x0) ** 2)[1:], ((v_hat - v) ** 2)[1:])
    assert weight[0].item() == pytest.approx(1 / dit.JIT_CLAMP ** 2)   # t = 0: 1 - a = 1e-4
    assert weight[-1].item() == pytest.approx(1.0, abs=1e-3)   # high noise: weight 1, not ~0
    assert dit.loss_weight(a, "x", 5.0)[-1].item() < 1e-3      # (min-SNR: almost nothing)


def test_qk_norm_bounds_the_attention_logits_and_keeps_sdpa_equal_to_manual():
    torch.manual_seed(0)
    x = 30 * torch.randn(2, 5, 64)   # large activations: large logits without the norm
    for qk_norm in (False, True):
        sdpa, manual = dit.Attention(64, 4, "sdpa", qk_norm), dit.Attention(64, 4, "manual", qk_norm)
        manual.load_state_dict(sdpa.state_dict())
        torch.testing.assert_close(manual(x), sdpa(x), rtol=0, atol=1e-4)
        q, k, _ = sdpa.queries_keys_values(x)
        largest = ((q @ k.transpose(-2, -1)) / math.sqrt(16)).abs().max().item()
        # q and k normalised to length sqrt(d) = 4: a logit is at most sqrt(d) (Cauchy-Schwarz)
        assert (largest <= 4 + 1e-4) if qk_norm else (largest > 40)


def test_snapshots_are_kept_and_overwrite_removes_them_and_the_default_x_has_qk_norm(
        autoencoder_run, tmp_path):
    run = copy_run(autoencoder_run, tmp_path / "snap", "autoencoder.pt")
    run_main("train_latent_dit.py", "--run", run, "--steps", "20", *TINY, "--snapshot-every", "10",
             "--target", "v")
    assert sorted(p.name for p in run.glob("dit_step*.pt")) == ["dit_step000010.pt",
                                                                "dit_step000020.pt"]
    ckpt = torch.load(run / "dit_step000010.pt", weights_only=True)
    assert ckpt["step"] == 10 and ckpt["config"]["qk_norm"] is False   # --target v: no QK-norm
    run_main("train_latent_dit.py", "--run", run, "--steps", "5", *TINY, "--overwrite")
    assert not list(run.glob("dit_step*.pt"))   # they belonged to the run started over
    ckpt = torch.load(run / "dit.pt", weights_only=True)   # the default, the x recipe: QK-norm
    assert ckpt["config"]["target"] == "x" and ckpt["config"]["qk_norm"] is True
    assert "blocks.0.attn.q_norm.weight" in ckpt["model"]


def test_lr_schedule():
    config = {"lr": 1e-3, "warmup": 10, "lr_schedule": "cosine"}
    lrs = [dit.lr_at(step, config, 110) for step in range(110)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)  # linear warm-up
    assert lrs[10] == pytest.approx(1e-3) and lrs[60] == pytest.approx(5e-4)  # half way down: half
    assert lrs[109] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 99 / 100)))
    assert lrs[109] < 1e-6
    assert all(x >= y for x, y in zip(lrs[10:], lrs[11:]))  # never rises again
    assert dit.lr_at(60, dict(config, lr_schedule="constant"), 110) == 1e-3


def test_timestep_sampling():
    g = torch.Generator().manual_seed(0)
    uniform = dit.sample_timesteps(100_000, "uniform", g).float()
    logit = dit.sample_timesteps(100_000, "logit-normal", g).float()
    assert uniform.min() == 0 and uniform.max() == 999
    assert abs((uniform < 100).float().mean() - 0.1) < 0.005
    # t / T = sigmoid(u), u ~ N(0, 1): median at the middle, P(t < 100) = P(u < logit(0.1)) = 1.4%
    assert abs(logit.median() - 500) < 5 and abs((logit < 100).float().mean() - 0.0139) < 0.002
    assert logit.min() >= 0 and logit.max() <= 999


@pytest.mark.parametrize("target", ["eps", "v", "x"])
def test_fixed_step_loss_of_a_zero_predictor(target):
    # A model that always outputs zero: its squared error is the target's second moment, which for
    # unit-variance latents is 1 at every step (eps, x0, v = sqrt(a) eps - sqrt(1 - a) x0), so the
    # loss is the mean min-SNR weight over the ten fixed steps; it is also the same on every call.
    class Zero(torch.nn.Module):
        def forward(self, x, t, y):
            return torch.zeros_like(x)

    config = {"schedule": "linear", "target": target, "min_snr_gamma": 5.0}
    latents = torch.randn(2000, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    labels = torch.zeros(2000, dtype=torch.long)
    a = dit.make_schedule()[torch.arange(50, 1000, 100)].float()
    expected = dit.loss_weight(a, target, 5.0).mean().item()
    loss = dit.fixed_step_loss(Zero(), latents, labels, config, torch.device("cpu"))
    assert abs(loss - expected) < 0.01 * expected
    assert loss == dit.fixed_step_loss(Zero(), latents, labels, config, torch.device("cpu"))


def test_a_damaged_latent_cache_is_built_again(autoencoder_run, tmp_path, capsys):
    run = copy_run(autoencoder_run, tmp_path / "run", "autoencoder.pt")
    args = ["--run", str(run), *TINY, "--steps", "3"]
    dit.main(args)
    good = torch.load(run / "latents.pt", weights_only=True)["latents"]
    (run / "latents.pt").write_bytes(b"damaged")
    dit.main([*args, "--overwrite"])
    assert "damaged" in capsys.readouterr().err
    assert torch.equal(torch.load(run / "latents.pt", weights_only=True)["latents"], good)


class FixedLatents(torch.nn.Module):
    """A stand-in DiT with the x target: the i-th image of a batch is always bank[i]. Sampling from
    it draws exactly the bank (both halves of a guided batch get the same output)."""
    num_classes = 10

    def __init__(self, bank):
        super().__init__()
        self.bank = bank

    def forward(self, x, t, y):
        return self.bank[torch.arange(len(x)) % len(self.bank)]


def test_seam_check_fires_on_a_broken_model_and_not_on_a_whole_one(autoencoder_run, tmp_path):
    g = torch.Generator().manual_seed(0)
    def smooth_latents(n):   # white noise blurred alike at every position (circular padding)
        z = torch.nn.functional.pad(torch.randn(n, 4, 8, 8, generator=g), (2, 2, 2, 2), "circular")
        return torch.nn.functional.avg_pool2d(z, 5, stride=1)
    whole, real = smooth_latents(80), smooth_latents(200)
    broken = whole.clone()   # each 4x4 token of an image taken from another image: seams
    broken[..., :4, 4:] = whole.roll(1, 0)[..., :4, 4:]
    broken[..., 4:, :4] = whole.roll(2, 0)[..., 4:, :4]
    broken[..., 4:, 4:] = whole.roll(3, 0)[..., 4:, 4:]
    assert 0.8 < sample.patch_seam_ratio(real, 4) < 1.2
    assert sample.patch_seam_ratio(real, 1) is None   # patch 1: no pixel pair inside a patch
    ae = torch.load(autoencoder_run / "autoencoder.pt", weights_only=True)
    config = dict(num_classes=10, in_channels=4, input_size=8, schedule="linear", target="x",
                  patch=4)
    log = tmp_path / "log_dit.jsonl"
    log.write_text("")
    ratios = {}
    for name, bank in (("whole", whole), ("broken", broken)):
        z = sample.save_sample_grid(FixedLatents(bank), ae, config, tmp_path / f"{name}.png",
                                    torch.device("cpu"))
        torch.testing.assert_close(z, bank, rtol=0, atol=1e-4)   # the sampler drew the bank
        ratios[name] = sample.seam_check(z, real, config, tmp_path, step=30)
        warnings = [json.loads(line) for line in log.read_text().splitlines()]
        assert len(warnings) == (name == "broken")
    assert ratios["whole"] < sample.SEAM_LIMIT < 1.5 < ratios["broken"]
    assert warnings[0]["step"] == 30 and "patch borders" in warnings[0]["warning"]
