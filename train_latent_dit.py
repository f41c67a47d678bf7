"""
Train a compact class-conditional Diffusion Transformer (DiT) on a stage-2 autoencoder's latents.

This is the generative model whose quality the paper's latent is meant to improve: for the same
DiT, a latent that is "closer" to the data (DAE) should give better samples than the latent of a
jointly trained autoencoder. The latents are encoded once with the frozen encoder, standardised
with the stored per-channel statistics, and cached in the run folder. At the end, the loss of the
EMA model on 1,000 held-out test latents at fixed steps and noise says how hard the latent is.

Read from the top: the defaults, the DiT, the forward process (schedule, noising, target, loss
weighting, timesteps), the latent cache and training; the reverse process is in sample.py.

    python train_latent_dit.py --run runs/shapes                 # autoencoder.pt -> dit.pt
    torchrun --nproc_per_node=4 train_latent_dit.py -- --run DIR # DistributedDataParallel
"""
import argparse
import copy
import math
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from data import save_loss_curve
from runs import (Interrupted, Progress, UserError, add_training_flags, autocast, clear_stage,
                  count_params, grad_scaler, load_optimizer, open_run, parse_training_args,
                  precision_name, resume_checkpoint, run_cli, save_checkpoint, seeded_generator,
                  setup_distributed)
from stage2_decoder import build_latent_cache, load_autoencoder

# -----------------------------------------------------------------------------
# Defaults: the recommended recipe (every one is a flag of main())
MODEL = "DiT-S"
PATCH = 1               # an 8x8 latent with patch 1 is 64 tokens
STEPS = 50000
BATCH_SIZE = 256
LR = 3e-4
WARMUP = 500            # steps of linear learning-rate warm-up
GRAD_CLIP = 1.0
EMA_DECAY = 0.9999
CLASS_DROPOUT = 0.1     # labels replaced by the null label, for classifier-free guidance
TARGET = "x"            # the DiT predicts the clean latent x0, with QK-norm (or v, or the noise eps)
MIN_SNR_GAMMA = 5.0     # min-SNR-gamma loss weighting (Hang et al. 2023; 0: plain MSE)
T_SAMPLING = "logit-normal"   # t / T = sigmoid(N(0, 1)): the middle steps more often than the ends
LR_SCHEDULE = "cosine"  # after the warm-up, the learning rate decays to zero at the last step
NUM_TIMESTEPS = 1000

DIT_SIZES = {           # depth, hidden size, heads
    "DiT-N": (6, 96, 3), "DiT-T": (6, 192, 3),   # DiT-N: half DiT-T's width
    "DiT-S": (12, 384, 6),
    "DiT-B": (12, 768, 12),
}


# -----------------------------------------------------------------------------
# Embedding layers: timesteps, labels and fixed 2-D sin-cos positions

def sinusoid(values, dim, max_period=10000):
    """(N,) numbers -> (N, dim) sin-cos features at geometrically spaced frequencies."""
    half = dim // 2
    steps = torch.arange(half, dtype=torch.float32, device=values.device)
    freqs = torch.exp(-math.log(max_period) * steps / half)
    args = values.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

def pos_embed_2d(dim, grid_size):
    """(grid_size^2, dim) fixed positions: half the channels encode the row, half the column."""
    coords = torch.arange(grid_size, dtype=torch.float32)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    half = dim // 2
    omega = 1.0 / 10000 ** (torch.arange(half // 2, dtype=torch.float32) / (half / 2))
    def embed(pos):  # (T,) -> (T, half)
        out = pos.flatten()[:, None] * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)
    return torch.cat([embed(rows), embed(cols)], dim=1)

class TimestepEmbedder(nn.Module):
    """(N,) diffusion steps -> (N, D): sinusoid features through a small MLP."""
    def __init__(self, hidden, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t):
        return self.mlp(sinusoid(t, self.freq_dim))

def drop_labels(labels, num_classes, p, generator):
    """Classifier-free guidance in training: each label becomes the null label with probability p."""
    drop = torch.rand(labels.shape, generator=generator) < p
    return torch.where(drop, torch.full_like(labels, num_classes), labels)


# -----------------------------------------------------------------------------
# The transformer: hand-written attention, adaLN-Zero blocks

class Attention(nn.Module):
    """Multi-head self-attention: softmax(q k^T / sqrt(d)) v, by hand or through PyTorch's fused SDPA;
    qk_norm: q and k layer-normalised per head (ViT-22B, SD3), which bounds the attention logits."""
    def __init__(self, dim, heads, impl="sdpa", qk_norm=False):
        super().__init__()
        self.heads = heads
        self.impl = impl
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.LayerNorm(dim // heads, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(dim // heads, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def queries_keys_values(self, x):
        """(N, T, D) -> q, k, v, each (N, H, T, d)."""
        N, T, D = x.shape
        q, k, v = self.qkv(x).reshape(N, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        return self.q_norm(q), self.k_norm(k), v

    def forward(self, x):
        N, T, D = x.shape
        q, k, v = self.queries_keys_values(x)                           # 3x (N, H, T, d)
        if self.impl == "sdpa":   # flash / memory-efficient kernels on GPU, same math
            out = F.scaled_dot_product_attention(q, k, v)
        else:                     # the math written out; torch.compile fuses it
            scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])   # (N, H, T, T)
            out = scores.softmax(dim=-1) @ v                            # (N, H, T, d)
        return self.proj(out.transpose(1, 2).reshape(N, T, D))

def modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]

class DiTBlock(nn.Module):
    """Attention and MLP, each scaled, shifted and gated by the conditioning (adaLN-Zero)."""
    def __init__(self, hidden, heads, attn="sdpa", qk_norm=False, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, heads, attn, qk_norm)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        mlp_hidden = int(hidden * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden, mlp_hidden), nn.GELU(approximate="tanh"),
                                 nn.Linear(mlp_hidden, hidden))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x, c):  # x: (N, T, D), c: (N, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = \
            self.adaLN_modulation(c).chunk(6, dim=1)                     # 6x (N, D)
        x = x + gate_msa[:, None] * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x

class FinalLayer(nn.Module):
    """adaLN then a linear map from each token to its patch of the prediction (v, eps or x0)."""
    def __init__(self, hidden, patch, out_channels):
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, patch * patch * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))

class DiT(nn.Module):
    """(N, C, H, W) noisy latent, (N,) step, (N,) label -> (N, C, H, W) prediction of the
    training target (the velocity v by default, the noise eps, or the clean latent x0)."""
    def __init__(self, input_size=8, in_channels=4, patch=PATCH, hidden=384, depth=12, heads=6,
                 num_classes=10, attn="sdpa", qk_norm=False):
        super().__init__()
        self.in_channels = in_channels
        self.patch = patch
        self.num_classes = num_classes
        self.grid = input_size // patch
        self.x_embedder = nn.Conv2d(in_channels, hidden, patch, stride=patch)   # patchify
        self.register_buffer("pos_embed", pos_embed_2d(hidden, self.grid)[None], persistent=False)
        self.t_embedder = TimestepEmbedder(hidden)
        self.y_embedder = nn.Embedding(num_classes + 1, hidden)   # the last row is the null label
        self.blocks = nn.ModuleList([DiTBlock(hidden, heads, attn, qk_norm) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden, patch, in_channels)
        self.initialize_weights()

    def initialize_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        nn.init.normal_(self.y_embedder.weight, std=0.02)
        for layer in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        # adaLN-Zero: every block starts as the identity, and the model starts by predicting zero.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, x):
        """(N, T, p*p*C) -> (N, C, H, W)."""
        N, p, g, C = x.shape[0], self.patch, self.grid, self.in_channels
        x = x.reshape(N, g, g, p, p, C)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(N, C, g * p, g * p)

    def forward(self, x, t, y):
        x = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed   # (N, T, D)
        c = self.t_embedder(t) + self.y_embedder(y)                          # (N, D)
        for block in self.blocks:
            x = block(x, c)                                                  # (N, T, D)
        return self.unpatchify(self.final_layer(x, c))                       # (N, C, H, W)

def build_dit(config):
    depth, hidden, heads = DIT_SIZES[config["model"]]
    return DiT(config["input_size"], config["in_channels"], config["patch"], hidden, depth, heads,
               config["num_classes"], config["attn"], config.get("qk_norm", False))


# -----------------------------------------------------------------------------
# The forward process: noise schedule, noising, prediction target, loss weighting, timesteps

def make_schedule(kind="linear", num_timesteps=NUM_TIMESTEPS):
    """alpha_bar_t for t = 0 .. T-1 (float64): `linear` betas 1e-4 .. 0.02 (DDPM, DiT), or
    `cosine` (Nichol & Dhariwal)."""
    if kind == "cosine":
        s = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
        f = torch.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    else:
        betas = torch.linspace(1e-4, 0.02, num_timesteps, dtype=torch.float64)
    return torch.cumprod(1 - betas, dim=0)

def q_sample(x0, t, noise, alphas_cumprod):
    """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise."""
    a = alphas_cumprod.to(x0.device)[t].float()[:, None, None, None]
    return a.sqrt() * x0 + (1 - a).sqrt() * noise

def training_target(x0, noise, a, target):
    """What the network learns to output: the noise `eps` (DDPM, DiT), the velocity
    `v` = sqrt(a) eps - sqrt(1 - a) x0 (Salimans & Ho), or the clean latent `x` = x0 itself (JiT,
    Li & He 2025: a narrow network can output a clean latent far better than noise, which has as
    many independent numbers as the token); a = alpha_bar_t, shaped to broadcast."""
    if target == "eps":
        return noise
    return x0 if target == "x" else a.sqrt() * noise - (1 - a).sqrt() * x0

JIT_CLAMP = 0.05   # JiT's loss: the denominator sqrt(1 - a) of the derived velocity is clamped here

def loss_weight(a, target, min_snr_gamma, x_loss="x0"):
    """Per-example weight of the squared error of the output. min-SNR-gamma (Hang et al.): the
    error of the implied x0 is weighted by min(SNR, gamma), SNR = a / (1 - a). An eps error is an
    x0 error times sqrt(SNR) and a v error one times sqrt(SNR + 1), so their weights are
    min(SNR, gamma) / SNR and min(SNR, gamma) / (SNR + 1); an x output is x0 itself, weighted
    min(SNR, gamma): every target minimises the same loss, only what the network outputs differs.
    gamma 0: weight 1, the plain MSE of the output for every target. x_loss "v", JiT's loss for an
    x output: the error of the velocity derived from it, (x0 - x_hat) / sqrt(1 - a), so the x0
    error is weighted 1 / (1 - a): near 1 at high noise, where min(SNR, gamma) is near 0."""
    if target == "x" and x_loss == "v":
        return 1 / (1 - a).clamp(min=JIT_CLAMP ** 2)
    if not min_snr_gamma:
        return torch.ones_like(a)
    snr = a / (1 - a)
    if target == "x":
        return snr.clamp(max=min_snr_gamma)
    return snr.clamp(max=min_snr_gamma) / (snr if target == "eps" else snr + 1)

def weighted_error(model, x0, t, y, noise, alphas_cumprod, config):
    """The training loss before its mean: (N, C, H, W) weighted squared errors of the model's
    output at x_t against its target; training and the held-out loss both average it."""
    a = alphas_cumprod[t].float()[:, None, None, None]
    with autocast(x0.device):
        out = model(q_sample(x0, t, noise, alphas_cumprod), t, y).float()
    error = out - training_target(x0, noise, a, config["target"])
    weight = loss_weight(a, config["target"], config["min_snr_gamma"], config.get("x_loss", "x0"))
    return weight * error ** 2

def sample_timesteps(n, kind, generator, num_timesteps=NUM_TIMESTEPS):
    """(n,) training steps: `uniform`, or `logit-normal`: t / T = sigmoid(u), u ~ N(0, 1), which
    draws the middle of the schedule more often than its ends."""
    if kind == "uniform":
        return torch.randint(0, num_timesteps, (n,), generator=generator)
    u = torch.sigmoid(torch.randn(n, generator=generator))
    return (u * num_timesteps).long().clamp(0, num_timesteps - 1)


# -----------------------------------------------------------------------------
# Training

@torch.no_grad()
def fixed_step_loss(model, latents, labels, config, device, num_t=10, batch_size=500):
    """The training loss at fixed steps t = 50, 150, ..., 950 and fixed noise, true labels: on
    held-out latents it measures how hard a latent is for the DiT, comparable between runs."""
    alphas_cumprod = make_schedule(config["schedule"]).to(device)
    g = torch.Generator().manual_seed(0)
    total = 0.0
    for t_value in range(NUM_TIMESTEPS // (2 * num_t), NUM_TIMESTEPS, NUM_TIMESTEPS // num_t):
        for i in range(0, len(latents), batch_size):
            x0 = latents[i:i + batch_size].to(device)
            y = labels[i:i + batch_size].to(device)
            noise = torch.randn(x0.shape, generator=g).to(device)
            t = torch.full((len(x0),), t_value, device=device, dtype=torch.long)
            error = weighted_error(model, x0, t, y, noise, alphas_cumprod, config)
            total += error.mean(dim=(1, 2, 3)).sum().item()
    return total / (num_t * len(latents))

def update_ema(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter."""
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1 - decay)

def lr_at(step, config, total_steps):
    """Linear warm-up, then `constant`, or half a `cosine` down to zero at total_steps."""
    if step < config["warmup"] or config["lr_schedule"] == "constant":
        return config["lr"] * min(1.0, (step + 1) / max(1, config["warmup"]))
    progress = (step - config["warmup"]) / max(1, total_steps - config["warmup"])
    return config["lr"] * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

def dit_config(args, ae, ae_path, ae_digest):
    """The DiT's configuration from the flags and the autoencoder, or, with --resume, the
    checkpoint's (and the checkpoint)."""
    latent_size = ae["config"]["image_size"] // 2 ** (len(ae["config"]["ch_mult"]) - 1)
    config = dict(model=args.model, patch=args.patch, input_size=latent_size,
                  in_channels=ae["config"]["latent_channels"], attn=args.attn, lr=args.lr,
                  batch_size=args.batch_size, warmup=args.warmup, grad_clip=args.grad_clip,
                  ema_decay=args.ema_decay, class_dropout=args.class_dropout, seed=args.seed,
                  target=args.target, schedule=args.schedule, min_snr_gamma=args.min_snr_gamma,
                  t_sampling=args.t_sampling, lr_schedule=args.lr_schedule,
                  x_loss=args.x_loss, qk_norm=args.qk_norm, autoencoder_path=str(ae_path))
    ckpt = None
    if args.resume:   # the checkpoint's configuration; a typed flag may not change it
        run = Path(args.run)
        ckpt = resume_checkpoint(run / "dit.pt", run / "log_dit.jsonl", 3, args, config,
                                 {k: k for k in config})
        config = ckpt["config"]
        if ckpt["autoencoder_sha256"] != ae_digest:
            raise UserError(f"{ae_path} is not the autoencoder {run / 'dit.pt'} was trained on (its "
                            f"sha256 differs): resuming would train on another latent space; start "
                            f"a new run instead")
    size = config["input_size"]
    if config["patch"] < 1 or size % config["patch"]:
        raise UserError(f"--patch {config['patch']} does not divide the {size}x{size} latent")
    return config, ckpt

def train(args):
    """Encode (once) and cache the latents, train the DiT on them with an EMA copy; write
    RUN/dit.pt with the held-out loss, and dit_samples.png."""
    run = Path(args.run)
    ae_path = (run / "autoencoder.pt").resolve()
    ckpt_path = run / "dit.pt"
    ae, ae_digest = load_autoencoder(ae_path)
    config, ckpt = dit_config(args, ae, ae_path, ae_digest)

    # Distributed data parallel: each process trains on its own shard of the latents with its
    # own random stream; DDP averages the gradients; process 0 alone writes files.
    rank, world, device = setup_distributed(args.device)
    is_main = rank == 0
    if config["batch_size"] % world:
        raise UserError(f"--batch-size {config['batch_size']} is not divisible by the {world} "
                        f"processes")
    local_batch = config["batch_size"] // world
    cache = build_latent_cache(ae, ae_digest, run / "latents.pt", device) if is_main else None
    if world > 1:
        dist.barrier()   # process 0 has written the cache; the others read it
        cache = cache or build_latent_cache(ae, ae_digest, run / "latents.pt", device)
    config.update(num_classes=len(cache["class_names"]), class_names=cache["class_names"])
    latents = cache["latents"][rank::world].to(device)
    labels = cache["labels"][rank::world].to(device)

    torch.manual_seed(config["seed"])
    model = build_dit(config).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config["lr"], weight_decay=0.0,
                                  fused=device.type == "cuda")
    step = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        load_optimizer(optimizer, ckpt["optimizer"], device)
        step = ckpt["step"]
    elif is_main:
        clear_stage(run, stage=3)
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    net = torch.compile(net) if args.compile else net
    scaler = grad_scaler(device)   # float16 only; a pass-through in bf16 and float32
    alphas_cumprod = make_schedule(config["schedule"]).to(device)
    progress = None
    if is_main:
        resuming = f", resuming at step {step}" if step else ""
        print(f"{config['model']}/{config['patch']}: {count_params(model)}, "
              f"{(config['input_size'] // config['patch']) ** 2} tokens, {len(cache['latents'])} "
              f"cached latents, device {device}, {precision_name(device)}, {world} process(es)"
              f"{resuming}", file=sys.stderr)
        progress = Progress(run / "log_dit.jsonl", args.steps, step, config["batch_size"],
                            args.log_every, "DiT")

    def checkpoint(metrics, path=ckpt_path):
        save_checkpoint({"stage": 3, "config": config, "model": model.state_dict(),
                         "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                         "step": step, "latent_stats": ae["latent_stats"],
                         "autoencoder_path": str(ae_path), "autoencoder_sha256": ae_digest,
                         "metrics": metrics}, path)

    model.train()
    try:
        while step < args.steps:
            # Every random draw of this step comes from its own generator: a resume repeats them.
            g = seeded_generator(config["seed"], step, stream=rank, num_streams=64)
            idx = torch.randint(len(latents), (local_batch,), generator=g).to(device)
            x0 = latents[idx]                                                # (N, C, h, w)
            y = drop_labels(labels[idx].cpu(), config["num_classes"], config["class_dropout"], g)
            t = sample_timesteps(local_batch, config["t_sampling"], g).to(device)
            noise = torch.randn(x0.shape, generator=g).to(device)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, config, args.steps)
            loss = weighted_error(net, x0, t, y.to(device), noise, alphas_cumprod, config).mean()
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)   # clip the true gradients, not the scaled ones
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config["grad_clip"])
            scaler.step(optimizer)
            scaler.update()
            # EMA warm-up: a short run's average does not start from (and stay near) the random
            # init; --ema-decay caps it (0.999 is reached after about 9,000 steps).
            update_ema(ema, model, min(config["ema_decay"], (1 + step) / (10 + step)))
            step += 1
            if is_main:
                progress.update(step, loss=loss, grad_norm=grad_norm)
                if args.snapshot_every and step % args.snapshot_every == 0:
                    checkpoint({}, run / f"dit_step{step:06d}.pt")
                if step % args.ckpt_every == 0 and step < args.steps:
                    progress.stop_if_diverged()
                    checkpoint({})
    except KeyboardInterrupt:
        raise Interrupted(ckpt_path) from None
    finally:
        if progress:
            progress.close()
    if is_main:
        ema.eval()
        heldout = fixed_step_loss(ema, cache["heldout_latents"], cache["heldout_labels"], config,
                                  device)
        progress.stop_if_diverged(heldout, "the held-out loss of the EMA weights")
        from sample import GRID_SAMPLER, save_sample_grid, seam_check   # it imports this file
        z = save_sample_grid(ema, ae, config, run / "dit_samples.png", device).cpu()
        metrics = {"final_loss": loss.item(), "heldout_loss": heldout,
                   "patch_seam_ratio": seam_check(z, cache["heldout_latents"], config, run, step)}
        checkpoint(metrics)
        save_loss_curve(run / "log_dit.jsonl", run / "dit_loss.png", "DiT")
        print(f"wrote {ckpt_path} and {run / 'dit_samples.png'} ({GRID_SAMPLER}); held-out loss "
              f"(EMA, fixed steps and noise) {heldout:.4f}", file=sys.stderr)
    if world > 1:
        dist.destroy_process_group()

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--run", required=True, help="run folder: reads autoencoder.pt, writes dit.pt")
    p.add_argument("--model", choices=list(DIT_SIZES), default=MODEL, help="DiT size")
    p.add_argument("--patch", type=int, default=PATCH, help="patch size on the latent")
    p.add_argument("--attn", choices=["sdpa", "manual"], default="sdpa",
                   help="fused SDPA or the hand-written attention")
    p.add_argument("--warmup", type=int, default=WARMUP, help="steps of linear warm-up of the lr")
    p.add_argument("--grad-clip", type=float, default=GRAD_CLIP, help="gradient norm clipping")
    p.add_argument("--ema-decay", type=float, default=EMA_DECAY, help="the most the EMA's decay "
                   "reaches: it warms up as (1 + step) / (10 + step) until it gets there")
    p.add_argument("--target", choices=["eps", "v", "x"], default=TARGET,
                   help="what the DiT outputs: the noise eps, the velocity v or the clean latent x")
    p.add_argument("--x-loss", choices=["x0", "v"], default="x0", help="with --target x: the x0 "
                   "error weighted min(SNR, gamma), or JiT's loss on the velocity derived from x")
    p.add_argument("--qk-norm", action=argparse.BooleanOptionalAction, default="auto", help="layer-"
                   "normalise queries and keys per head; auto: on with --target x, the x recipe")
    p.add_argument("--snapshot-every", type=int, default=0, help="also keep RUN/dit_stepNNNNNN.pt "
                   "every this many steps (0: none)")
    p.add_argument("--schedule", choices=["linear", "cosine"], default="linear", help="noise schedule")
    p.add_argument("--min-snr-gamma", type=float, default=MIN_SNR_GAMMA,
                   help="min-SNR loss weighting gamma (0: the plain MSE of the output, any target)")
    p.add_argument("--t-sampling", choices=["uniform", "logit-normal"], default=T_SAMPLING, help="how "
                   "training timesteps are drawn")
    p.add_argument("--lr-schedule", choices=["constant", "cosine"], default=LR_SCHEDULE, help="lr "
                   "after the warm-up: constant, or a cosine down to zero at this run's last --steps")
    p.add_argument("--class-dropout", type=float, default=CLASS_DROPOUT, help="label dropout (CFG)")
    add_training_flags(p, STEPS, BATCH_SIZE, LR, ckpt_every=2000, checkpoint="dit.pt")
    argv = sys.argv[1:] if argv is None else argv
    # torchrun's parser takes `--run` for its `--run-path`: `torchrun ... file.py -- --run DIR`
    args = parse_training_args(p, argv[1:] if argv[:1] == ["--"] else argv, STEPS)
    if args.qk_norm == "auto":   # an x run without QK-norm can break (RESULTS.md)
        args.qk_norm = args.target == "x"
    if args.patch < 1 or min(args.warmup, args.snapshot_every) < 0 or not (
            0 < args.grad_clip < float("inf") and 0 <= args.min_snr_gamma < float("inf")):
        raise UserError("--patch must be positive, --warmup and --snapshot-every >= 0, "
                        "--min-snr-gamma finite and >= 0, and --grad-clip finite and positive")
    if not (0 <= args.ema_decay < 1 and 0 <= args.class_dropout < 1):
        raise UserError("--ema-decay and --class-dropout must lie in [0, 1)")
    rank0 = os.environ.get("RANK", "0") == "0"   # under torchrun, one process locks the folder
    with open_run(args.run, 3, args.resume, args.overwrite, lock=rank0):
        train(args)


if __name__ == "__main__":
    run_cli(main, "--batch-size or --model")
