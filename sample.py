"""
Sample images from a trained latent DiT: DDPM or DDIM with classifier-free guidance, then decode.

Reads RUN/dit.pt (its EMA weights by default), finds the autoencoder through it, and writes a grid
with one row per class (RUN/samples.png). With --num N it also writes N images as an npz in the
layout of the ADM / DiT evaluation suites (uint8 NHWC under arr_0, integer labels under arr_1),
ready for fid.py.

    python sample.py --run runs/shapes                      # -> runs/shapes/samples.png
    python sample.py --run runs/shapes --num 50000 --cfg-scale 1.5   # + runs/shapes/samples.npz
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from stage1_encoder import (Decoder, UserError, atomic_save, autoencoder_kwargs, load_checkpoint, pick_device,
                            run_cli, save_grid)
from train_latent_dit import build_dit, decode_latents, load_autoencoder, sample_latents


def load_models(run, device, use_ema=True):
    """(dit, decoder, dit checkpoint) from RUN/dit.pt and the autoencoder.pt it was trained on: the one beside
    dit.pt first (a copied run folder), else the recorded path; its sha256 must be the recorded one."""
    ckpt = load_checkpoint(Path(run) / "dit.pt", stage=3)
    beside = Path(run) / "autoencoder.pt"
    ae_path = beside if beside.exists() else Path(ckpt["autoencoder_path"])
    ae, digest = load_autoencoder(ae_path)
    if digest != ckpt.get("autoencoder_sha256", digest):
        raise UserError(f"{ae_path} is not the autoencoder {Path(run) / 'dit.pt'} was trained on (its sha256 "
                        f"differs); put the right autoencoder.pt beside dit.pt")
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
            raise UserError(f"--class {name} is not a class of this model ({', '.join(class_names)})")
    return classes


def batch_seed(seed, batch_index, grid=False):
    """Each batch has its own noise seed, so a batch's images do not depend on the batches before it."""
    return (2 * seed + grid) * 1_000_003 + batch_index


@torch.no_grad()
def generate(model, decoder, ckpt, labels, args, device, seed):
    """Sample and decode one batch: (N,) labels -> (N, H, W, 3) uint8 images."""
    config = ckpt["config"]
    z = sample_latents(model, labels.to(device), args.steps, args.sampler, args.eta, args.cfg_scale,
                       generator=torch.Generator().manual_seed(seed),
                       shape=(config["in_channels"], config["input_size"], config["input_size"]),
                       schedule=config.get("schedule", "linear"), target=config.get("target", "eps"))
    return decode_latents(decoder, z, ckpt["latent_stats"])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--run", default="runs/shapes", help="run folder holding dit.pt")
    p.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddpm", help="reverse-process update rule")
    p.add_argument("--steps", type=int, default=50, help="sampling steps (a respaced subset of the 1000)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM noise: 0 deterministic, 1 like DDPM")
    p.add_argument("--cfg-scale", type=float, default=4.0,
                   help="classifier-free guidance scale (1: none); DiT uses 4 for pictures, 1.5 for its FIDs")
    p.add_argument("--class", dest="classes", nargs="+", help="class indices or names (default: all)")
    p.add_argument("--per-class", type=int, default=8, help="images per class row in the grid")
    p.add_argument("--num", type=int, default=0, help="also write this many images to the npz (0: grid only)")
    p.add_argument("--out", help="npz path (default RUN/samples.npz)")
    p.add_argument("--batch-size", type=int, default=250, help="images per sampling batch")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--seed", type=int, default=0, help="same seed, same images (on the same device)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where to sample")
    p.add_argument("--compile", action="store_true", help="torch.compile the DiT")
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1 or args.num < 0 or args.per_class < 1:
        raise UserError("--steps, --batch-size and --per-class must be positive and --num not negative")
    if not 0 <= args.eta <= 1:
        raise UserError(f"--eta must lie in [0, 1] (0: deterministic DDIM, 1: DDPM), not {args.eta}")
    out = Path(args.out or Path(args.run) / "samples.npz")
    if args.num and out.suffix != ".npz":
        raise UserError(f"--out {out} must end in .npz")
    if args.num and not out.parent.is_dir():
        raise UserError(f"the folder of --out {out} does not exist; create it or choose another path")
    device = pick_device(args.device)
    model, decoder, ckpt = load_models(args.run, device, use_ema=not args.no_ema)
    if args.compile:
        model = torch.compile(model)   # attributes such as num_classes still reach the model
    classes = parse_classes(args.classes, ckpt["config"]["class_names"])
    what = f"{args.sampler} {args.steps} steps{f', eta {args.eta}' if args.sampler == 'ddim' else ''}, guidance {args.cfg_scale}"

    # The grid: one row per class.
    grid_labels = torch.tensor(classes).repeat_interleave(args.per_class)
    grid = torch.cat([generate(model, decoder, ckpt, grid_labels[i:i + args.batch_size], args, device,
                               seed=batch_seed(args.seed, i // args.batch_size, grid=True))
                      for i in range(0, len(grid_labels), args.batch_size)])
    save_grid(grid, Path(args.run) / "samples.png", nrow=args.per_class)
    print(f"wrote {Path(args.run) / 'samples.png'} ({what})", file=sys.stderr)

    # The npz: the same number of each chosen class, in batches, each batch seeded by its index.
    if args.num:
        labels = torch.tensor(classes)[torch.arange(args.num) % len(classes)]
        images = []
        for b, i in enumerate(tqdm(range(0, args.num, args.batch_size), desc="sampling")):
            images.append(generate(model, decoder, ckpt, labels[i:i + args.batch_size], args, device,
                                   seed=batch_seed(args.seed, b)))
        atomic_save(out, lambda tmp: np.savez(tmp, arr_0=torch.cat(images).numpy(), arr_1=labels.numpy()))
        print(f"wrote {args.num} images to {out} ({what})", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
