"""
Sample images from a trained latent DiT: the reverse process (DDPM or DDIM, with classifier-free
guidance) from pure noise to latents, then the stage-2 decoder from latents to images.

Reads RUN/dit.pt (its EMA weights by default), finds the autoencoder through it, and writes a grid
with one row per class (RUN/samples.png). With --num N it also writes N images as an npz in the
layout of the ADM / DiT evaluation suites (uint8 NHWC under arr_0, integer labels under arr_1),
ready for fid.py.

    python sample.py --run runs/shapes                      # -> runs/shapes/samples.png
    python sample.py --run runs/shapes --num 50000 --cfg-scale 1.5   # + runs/shapes/samples.npz
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from data import save_grid, to_uint8_images
from runs import (UserError, atomic_save, autocast, exact_float32, load_checkpoint, pick_device,
                  run_cli, seeded_generator)
from stage1_encoder import Decoder, autoencoder_kwargs
from stage2_decoder import load_autoencoder
from train_latent_dit import NUM_TIMESTEPS, build_dit, make_schedule

# -----------------------------------------------------------------------------
# The reverse process: from the network's output to the next, less noisy latent

def to_x0_eps(out, x_t, a_t, target):
    """The network's output at x_t -> (predicted x0, predicted eps), whichever target it learned;
    a = alpha_bar_t. From v: x0 = sqrt(a) x_t - sqrt(1-a) v and eps = sqrt(1-a) x_t + sqrt(a) v;
    from x (the clean latent), x_t = sqrt(a) x0 + sqrt(1-a) eps solved for eps:
    eps = (x_t - sqrt(a) x0) / sqrt(1-a)."""
    if target == "eps":
        return (x_t - (1 - a_t) ** 0.5 * out) / a_t ** 0.5, out
    if target == "x":
        return out, (x_t - a_t ** 0.5 * out) / (1 - a_t) ** 0.5
    x0 = a_t ** 0.5 * x_t - (1 - a_t) ** 0.5 * out
    eps = (1 - a_t) ** 0.5 * x_t + a_t ** 0.5 * out
    return x0, eps

def respaced_timesteps(num_steps, num_timesteps=NUM_TIMESTEPS):
    """num_steps of the training steps, evenly spread, noisiest first: [999, 979, ..., 0]."""
    return np.linspace(0, num_timesteps - 1, num_steps).round().astype(np.int64)[::-1].tolist()

def ddpm_step(x_t, x0, a_t, a_prev, noise):
    """Ancestral sampling from the posterior q(x_prev | x_t, x0) with the predicted x0.
    a_t, a_prev: alpha_bar of this and the next (respaced) step; beta = 1 - a_t / a_prev."""
    beta = 1 - a_t / a_prev
    mean = ((a_prev ** 0.5 * beta / (1 - a_t)) * x0
            + ((1 - beta) ** 0.5 * (1 - a_prev) / (1 - a_t)) * x_t)
    variance = beta * (1 - a_prev) / (1 - a_t)
    return mean + variance ** 0.5 * noise

def ddim_step(x_t, x0, eps, a_t, a_prev, noise, eta=0.0):
    """DDIM: move to the predicted x0, re-noised to step a_prev; eta=0 is deterministic, eta=1
    is DDPM."""
    sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
    return a_prev ** 0.5 * x0 + (1 - a_prev - sigma ** 2) ** 0.5 * eps + sigma * noise

def guided_output(model, x, t, labels, cfg_scale):
    """Classifier-free guidance: out_uncond + s * (out_cond - out_uncond), both passes in one
    batch; s = 1 is the conditional model alone (one pass). The target conversions are affine in
    the output with weights summing to one, so guiding eps, x0 or v gives the same x0 and eps."""
    with autocast(x.device):
        if cfg_scale == 1.0:
            return model(x, t, labels).float()
        null = torch.full_like(labels, model.num_classes)
        out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null])).float()
    out_cond, out_uncond = out.chunk(2)
    return out_uncond + cfg_scale * (out_cond - out_uncond)

@torch.no_grad()
def sample_latents(model, labels, num_steps, sampler, eta, cfg_scale, generator, shape, schedule,
                   target):
    """Run the reverse process from pure noise to standardised latents (N, C, H, W)."""
    device, n = labels.device, len(labels)
    alphas_cumprod = make_schedule(schedule)
    x = torch.randn((n, *shape), generator=generator).to(device)
    steps = respaced_timesteps(num_steps, len(alphas_cumprod))
    for i, t in enumerate(steps):
        a_t = alphas_cumprod[t].item()
        a_prev = alphas_cumprod[steps[i + 1]].item() if i + 1 < len(steps) else 1.0
        t_batch = torch.full((n,), t, device=device, dtype=torch.long)
        out = guided_output(model, x, t_batch, labels, cfg_scale)
        x0, eps = to_x0_eps(out, x, a_t, target)
        noise = torch.randn(x.shape, generator=generator).to(device)
        if i + 1 == len(steps):
            noise = torch.zeros_like(noise)   # the last step adds no noise
        if sampler == "ddpm":
            x = ddpm_step(x, x0, a_t, a_prev, noise)
        else:
            x = ddim_step(x, x0, eps, a_t, a_prev, noise, eta)
    return x

def decode_latents(decoder, z, latent_stats):
    """Undo the standardisation and decode, in float32 like the reconstructions that fid.py
    compares with: (N, C, h, w) -> (N, H, W, 3) uint8."""
    mean, std = (latent_stats[k].to(z.device)[None, :, None, None] for k in ("mean", "std"))
    with exact_float32(z.device):
        return to_uint8_images(decoder(z * std + mean))


GRID_STEPS, GRID_CFG = 25, 2.0   # the training script's first look: fast and still clear
GRID_SAMPLER = f"{GRID_STEPS} DDIM steps, guidance {GRID_CFG}"

def save_sample_grid(ema, ae, config, path, device):
    """A first look at what the DiT learned: 8 samples per class, one row per class; returns their
    latents."""
    decoder = Decoder(**autoencoder_kwargs(ae["config"])).to(device).eval()
    decoder.load_state_dict(ae["decoder"])
    y = torch.arange(config["num_classes"], device=device).repeat_interleave(8)
    shape = (config["in_channels"], config["input_size"], config["input_size"])
    z = sample_latents(ema, y, GRID_STEPS, "ddim", 0.0, GRID_CFG,
                       torch.Generator().manual_seed(0), shape, config["schedule"],
                       config["target"])
    save_grid(decode_latents(decoder, z, ae["latent_stats"]), path, nrow=8)
    return z


# -----------------------------------------------------------------------------
# Did the DiT draw whole latents? Seams along its patch borders mark a broken run

SEAM_LIMIT = 1.35   # whole runs measured 0.94-1.32, broken 1.21-2.20: no limit parts all, this one
                    # warns on no whole run and misses the least broken (RESULTS.md)

def patch_seam_ratio(z, patch):
    """How much more neighbouring latent pixels differ across the borders of the DiT's patches
    than inside them, (N, C, H, W) -> a number: a DiT whose tokens do not agree on one image draws
    seams along the patch borders (broken strokes, empty cells). None for patch 1 (no inside)."""
    if patch == 1:
        return None
    across_columns = (z[..., :, 1:] - z[..., :, :-1]).pow(2).mean((0, 1, 2))   # (W - 1,) per gap
    across_rows = (z[..., 1:, :] - z[..., :-1, :]).pow(2).mean((0, 1, 3))      # (H - 1,)
    gaps = torch.cat([across_columns, across_rows])
    border = torch.cat([torch.arange(1, z.shape[3]), torch.arange(1, z.shape[2])]) % patch == 0
    return (gaps[border].mean() / gaps[~border].mean()).item()

def seam_check(samples, real, config, run, step):
    """Does the finished DiT draw whole latents? Its samples' patch seam ratio against the real
    latents'; above SEAM_LIMIT one warning line goes to the screen and to RUN/log_dit.jsonl."""
    ratio = patch_seam_ratio(samples, config["patch"])
    if ratio is None:
        return None
    ratio /= patch_seam_ratio(real, config["patch"])
    if ratio > SEAM_LIMIT:
        warning = (f"the samples' latents differ {ratio:.2f}x as much across the DiT's patch borders "
                   f"as real latents do (limit {SEAM_LIMIT}): the tokens do not agree, look at "
                   f"dit_samples.png and expect seams (this run may have broken)")
        print(f"warning: {warning}", file=sys.stderr)
        with open(run / "log_dit.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "warning": warning}) + "\n")
    return ratio


# -----------------------------------------------------------------------------
# Loading a run and sampling it in batches

def load_models(run, device, use_ema=True):
    """(dit, decoder, dit checkpoint) from RUN/dit.pt and the autoencoder.pt it was trained on: the
    one beside dit.pt first (a copied run folder), else the recorded path; its sha256 must match."""
    ckpt = load_checkpoint(Path(run) / "dit.pt", stage=3)
    beside = Path(run) / "autoencoder.pt"
    ae_path = beside if beside.exists() else Path(ckpt["autoencoder_path"])
    ae, digest = load_autoencoder(ae_path)
    if digest != ckpt["autoencoder_sha256"]:
        raise UserError(f"{ae_path} is not the autoencoder {Path(run) / 'dit.pt'} was trained on "
                        f"(its sha256 differs); put the right autoencoder.pt beside dit.pt")
    model = build_dit(ckpt["config"]).to(device).eval()
    model.load_state_dict(ckpt["ema"] if use_ema else ckpt["model"])
    decoder = Decoder(**autoencoder_kwargs(ae["config"])).to(device).eval()
    decoder.load_state_dict(ae["decoder"])
    return model, decoder, ckpt

def parse_classes(names, class_names):
    """--class values as indices or class names -> a list of indices (default: every class)."""
    if not names:
        return list(range(len(class_names)))
    classes = []
    for name in names:
        if name in class_names:
            classes.append(class_names.index(name))
        elif name.isdigit() and int(name) < len(class_names):
            classes.append(int(name))
        else:
            raise UserError(f"--class {name} is not a class of this model "
                            f"({', '.join(class_names)})")
    return classes

@torch.no_grad()
def generate(model, decoder, ckpt, labels, args, device, generator):
    """Sample and decode one batch: (N,) labels -> (N, H, W, 3) uint8 images."""
    config = ckpt["config"]
    shape = (config["in_channels"], config["input_size"], config["input_size"])
    z = sample_latents(model, labels.to(device), args.steps, args.sampler, args.eta,
                       args.cfg_scale, generator, shape, config["schedule"], config["target"])
    return decode_latents(decoder, z, ckpt["latent_stats"])

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--run", required=True, help="run folder holding dit.pt")
    p.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddpm",
                   help="reverse-process update rule")
    p.add_argument("--steps", type=int, default=50,
                   help="sampling steps (a respaced subset of the 1000)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM noise: 0 deterministic, 1 DDPM")
    p.add_argument("--cfg-scale", type=float, default=4.0, help="classifier-free guidance scale "
                   "(1: none); DiT uses 4 for pictures, 1.5 for its FIDs")
    p.add_argument("--class", dest="classes", nargs="+",
                   help="class indices or names (default: all)")
    p.add_argument("--per-class", type=int, default=8, help="images per class row in the grid")
    p.add_argument("--num", type=int, default=0,
                   help="also write this many images to the npz (0: grid only)")
    p.add_argument("--out", help="npz path (default RUN/samples.npz)")
    p.add_argument("--batch-size", type=int, default=250, help="images per sampling batch")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--seed", type=int, default=0, help="same seed, same images (on one device)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where to sample")
    p.add_argument("--compile", action="store_true", help="torch.compile the DiT")
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1 or args.num < 0 or args.per_class < 1:
        raise UserError("--steps, --batch-size and --per-class must be positive and --num "
                        "not negative")
    if args.steps > NUM_TIMESTEPS:
        raise UserError(f"--steps {args.steps} is more than the schedule's {NUM_TIMESTEPS} steps")
    if not 0 <= args.cfg_scale <= 100:   # beyond, guidance only saturates the images
        raise UserError(f"--cfg-scale must lie in [0, 100], not {args.cfg_scale}")
    if not 0 <= args.eta <= 1:
        raise UserError(f"--eta must lie in [0, 1] (0: deterministic, 1: DDPM), not {args.eta}")
    if not 0 <= args.seed < 2 ** 32:
        raise UserError(f"--seed must be an integer from 0 to {2 ** 32 - 1}, not {args.seed}")
    if Path(args.run).exists() and not Path(args.run).is_dir():
        raise UserError(f"--run {args.run} is a file, not a folder; name the run folder that "
                        f"holds dit.pt")
    out = Path(args.out or Path(args.run) / "samples.npz")
    if args.num and out.suffix != ".npz":
        raise UserError(f"--out {out} must end in .npz")
    if args.num and not out.parent.is_dir():
        raise UserError(f"the folder of --out {out} does not exist; create it or choose another")
    device = pick_device(args.device)
    model, decoder, ckpt = load_models(args.run, device, use_ema=not args.no_ema)
    if args.compile:
        model = torch.compile(model)   # attributes such as num_classes still reach the model
    classes = parse_classes(args.classes, ckpt["config"]["class_names"])
    eta = f", eta {args.eta}" if args.sampler == "ddim" else ""
    what = f"{args.sampler} {args.steps} steps{eta}, guidance {args.cfg_scale}"

    # Every batch draws from a generator of its own, so a batch's images do not depend on the
    # batches before it; the grid uses seed 2s + 1 and the npz seed 2s, for --seed s.
    grid_labels = torch.tensor(classes).repeat_interleave(args.per_class)   # one row per class
    grid = torch.cat([generate(model, decoder, ckpt, grid_labels[i:i + args.batch_size], args,
                               device, seeded_generator(2 * args.seed + 1, i // args.batch_size))
                      for i in range(0, len(grid_labels), args.batch_size)])
    save_grid(grid, Path(args.run) / "samples.png", nrow=args.per_class)
    print(f"wrote {Path(args.run) / 'samples.png'} ({what})", file=sys.stderr)

    if args.num:   # the same number of each chosen class
        labels = torch.tensor(classes)[torch.arange(args.num) % len(classes)]
        images = []
        for b, i in enumerate(tqdm(range(0, args.num, args.batch_size), desc="sampling")):
            images.append(generate(model, decoder, ckpt, labels[i:i + args.batch_size], args,
                                   device, seeded_generator(2 * args.seed, b)))
        atomic_save(out, lambda tmp: np.savez(tmp, arr_0=torch.cat(images).numpy(),
                                              arr_1=labels.numpy()))
        print(f"wrote {args.num} images to {out} ({what})", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main, "--batch-size")
