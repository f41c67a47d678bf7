"""
Stage 1 of the Decoupled Autoencoder (DAE): train the encoder with a *weaker* auxiliary decoder.

The paper ("Complexity Matters: Rethinking the Latent Space for Generative Modeling", Hu et al.,
NeurIPS 2023, Fig. 1) argues that an encoder trained with a strong decoder has no reason to make its
latent simple: the strong decoder can undo an awkward latent. Training the encoder against a decoder
of limited capacity (here: dropout inside its blocks and/or fewer channels) pushes the encoder
towards a latent that is easy to decode, and so easy to generate. Stage 2 (stage2_decoder.py) then
freezes this encoder and trains the real decoder.

Read from the top: the defaults, the autoencoder and its weakening, stage-1 training, main(). Below
them, under one banner, are the data sources (cifar10, the offline `shapes`, a folder of images) and
the helpers every later stage imports (errors, checkpoints, logs, pictures).

    python stage1_encoder.py --data shapes --run runs/shapes          # -> runs/shapes/stage1.pt
    python stage1_encoder.py --data shapes --run runs/joint --aux-dropout 0 --aux-width 1  # baseline
    python stage1_encoder.py --data digits_folder --no-flip           # digits, text: no mirror images
"""
import argparse
import hashlib
import json
import math
import os
import pickle
import re
import sys
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError
from tqdm import tqdm

# -----------------------------------------------------------------------------
# Defaults: the recommended recipe (every one is a flag of main())
STEPS = 20000           # training steps (the CIFAR-10 GPU recipe; the CPU quick start uses fewer)
BATCH_SIZE = 128
LR = 1e-3
CHANNELS = 64           # base width of the autoencoder
CH_MULT = (1, 2, 2)     # one level per entry; every level after the first halves the resolution
LATENT_CHANNELS = 4     # 32x32x3 -> 8x8x4
AUX_DROPOUT = 0.3       # stage-1 weakening: dropout inside the auxiliary decoder's blocks
AUX_WIDTH = 1.0         # stage-1 weakening: channel multiplier of the auxiliary decoder


# -----------------------------------------------------------------------------
# The autoencoder (LDM-style): ResBlocks with GroupNorm + SiLU, stride-2 down, nearest-upsample up

def Normalize(channels):
    """GroupNorm with up to 32 groups of at least 4 channels (the largest such count that divides)."""
    groups = min(32, channels // 4)
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels)


class ResBlock(nn.Module):
    """Two 3x3 convs with GroupNorm + SiLU and a residual; dropout sits between the convs."""
    def __init__(self, in_ch, out_ch, dropout=0.0):
        super().__init__()
        self.norm1, self.conv1 = Normalize(in_ch), nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2, self.conv2 = Normalize(out_ch), nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Encoder(nn.Module):
    """(N, 3, H, W) image -> (N, latent_channels, H / 2^(levels-1), W / 2^(levels-1)) latent."""
    def __init__(self, channels=CHANNELS, ch_mult=CH_MULT, latent_channels=LATENT_CHANNELS, num_res_blocks=1):
        super().__init__()
        widths = [channels * m for m in ch_mult]
        layers, in_ch = [nn.Conv2d(3, widths[0], 3, padding=1)], widths[0]
        for level, width in enumerate(widths):
            if level > 0:
                layers.append(nn.Conv2d(in_ch, in_ch, 3, stride=2, padding=1))  # downsample x2
            for _ in range(num_res_blocks):
                layers.append(ResBlock(in_ch, width))
                in_ch = width
        layers += [ResBlock(widths[-1], widths[-1]), Normalize(widths[-1]), nn.SiLU(),
                   nn.Conv2d(widths[-1], latent_channels, 3, padding=1)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(x)


class Decoder(nn.Module):
    """(N, latent_channels, h, w) latent -> (N, 3, H, W) image; `width` < 1 and `dropout` > 0 weaken it."""
    def __init__(self, channels=CHANNELS, ch_mult=CH_MULT, latent_channels=LATENT_CHANNELS, num_res_blocks=1,
                 width=1.0, dropout=0.0):
        super().__init__()
        widths = [max(8, int(round(channels * m * width / 8)) * 8) for m in ch_mult][::-1]  # deepest first
        layers = [nn.Conv2d(latent_channels, widths[0], 3, padding=1), ResBlock(widths[0], widths[0], dropout)]
        in_ch = widths[0]
        for level, out_ch in enumerate(widths):
            if level > 0:
                layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(in_ch, in_ch, 3, padding=1)]
            for _ in range(num_res_blocks):
                layers.append(ResBlock(in_ch, out_ch, dropout))
                in_ch = out_ch
        layers += [Normalize(widths[-1]), nn.SiLU(), nn.Conv2d(widths[-1], 3, 3, padding=1)]
        self.layers = nn.Sequential(*layers)

    def forward(self, z):
        return self.layers(z)


def autoencoder_kwargs(config):
    """The Encoder/Decoder constructor arguments stored in a checkpoint's config."""
    return dict(channels=config["channels"], ch_mult=tuple(config["ch_mult"]),
                latent_channels=config["latent_channels"], num_res_blocks=config["num_res_blocks"])


def reconstruction_loss(x_hat, x, kind):
    return F.l1_loss(x_hat.float(), x) if kind == "l1" else F.mse_loss(x_hat.float(), x)


def scale_equivariance_loss(decode, z, x, kind):
    """Scale equivariance (Skorokhodov et al. 2025): the decoder must also turn the latent downsampled
    2x into the image downsampled 2x. A latent whose fine detail the decoder needs cannot pass this, so
    the encoder is pushed towards a latent with less high-frequency content."""
    return reconstruction_loss(decode(F.avg_pool2d(z, 2)), F.avg_pool2d(x, 2), kind)


# -----------------------------------------------------------------------------
# DAE stage 1 training

def train(args):
    device = pick_device(args.device)
    ckpt_path, log_path = Path(args.run) / "stage1.pt", Path(args.run) / "log_stage1.jsonl"
    if args.resume:
        ckpt = resume_checkpoint(ckpt_path, log_path, stage=1, steps=args.steps)
        config = ckpt["config"]
    else:
        config = dict(data=args.data, data_dir=str(args.data_dir), image_size=args.image_size,
                      channels=args.channels, ch_mult=list(args.ch_mult), latent_channels=args.latent_channels,
                      num_res_blocks=args.num_res_blocks, aux_dropout=args.aux_dropout,
                      aux_width=args.aux_width, loss=args.loss, lr=args.lr, batch_size=args.batch_size,
                      seed=args.seed, flip=not args.no_flip, scale_equivariance=args.scale_equivariance)
    run = prepare_run(args.run)
    train_data = load_data(config["data"], config["data_dir"], "train", config["image_size"])
    test_data = load_data(config["data"], config["data_dir"], "test", config["image_size"])

    torch.manual_seed(config["seed"])
    encoder = Encoder(**autoencoder_kwargs(config)).to(device)
    # The paper's key idea (Fig. 1): the decoder of stage 1 is deliberately weaker than the real one.
    aux_decoder = Decoder(**autoencoder_kwargs(config), width=config["aux_width"],
                          dropout=config["aux_dropout"]).to(device)
    params = list(encoder.parameters()) + list(aux_decoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=config["lr"], weight_decay=0.0, fused=device.type == "cuda")
    step = 0
    if args.resume:
        encoder.load_state_dict(ckpt["encoder"])
        aux_decoder.load_state_dict(ckpt["aux_decoder"])
        load_optimizer(optimizer, ckpt["optimizer"], device)
        step = ckpt["step"]
        set_rng_state(ckpt["rng_state"])
        print(f"resuming {ckpt_path} at step {step}", file=sys.stderr)
    else:
        log_path.unlink(missing_ok=True)
    print(f"stage 1 on {train_data.description}, device {device}, encoder {count_params(encoder)}, auxiliary "
          f"decoder {count_params(aux_decoder)} (dropout {config['aux_dropout']}, width {config['aux_width']})", file=sys.stderr)

    # torch.compile wraps the modules; the originals keep their plain state_dict names.
    encode, decode = (torch.compile(encoder), torch.compile(aux_decoder)) if args.compile else (encoder, aux_decoder)

    def checkpoint(metrics, finished=False):
        save_checkpoint({"stage": 1, "config": config, "encoder": encoder.state_dict(),
                         "aux_decoder": aux_decoder.state_dict(), "optimizer": optimizer.state_dict(),
                         "step": step, "total_steps": args.steps, "finished": finished, "rng_state": rng_state(),
                         "metrics": metrics, "data": train_data.description,
                         "class_names": train_data.class_names}, ckpt_path)

    encoder.train(), aux_decoder.train()
    progress = Progress(log_path, args.steps, step, config["batch_size"], args.log_every, "stage 1")
    try:
        while step < args.steps:
            x, _ = sample_batch(train_data, config["batch_size"], step_generator(config["seed"], step, stage=1),
                                flip=config.get("flip", True))
            x = x.to(device, non_blocking=True)
            with autocast(device):
                z = encode(x)
                loss = reconstruction_loss(decode(z), x, config["loss"])
                logs = {}
                if config.get("scale_equivariance", 0):
                    logs["se_loss"] = scale_equivariance_loss(decode, z, x, config["loss"])
                    loss = loss + config["scale_equivariance"] * logs["se_loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            progress.update(step, loss=loss, **logs)
            if step % args.ckpt_every == 0 and step < args.steps:
                progress.check_finite()
                checkpoint({})
    except KeyboardInterrupt:
        raise Interrupted(ckpt_path) from None
    finally:
        progress.close()

    metrics = {"test_psnr_aux": evaluate_reconstruction(encoder, aux_decoder, test_data, device,
                                                        run / "stage1_recon.png")}
    checkpoint(metrics, finished=True)
    print(f"wrote {ckpt_path}: test PSNR with the auxiliary decoder {metrics['test_psnr_aux']:.2f} dB",
          file=sys.stderr)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default="shapes", help="cifar10, shapes, or a folder of images")
    p.add_argument("--data-dir", default="data", help="where datasets are downloaded and cached")
    p.add_argument("--image-size", type=int, default=32, help="image side for a folder of images")
    p.add_argument("--run", default="runs/shapes", help="run folder: writes stage1.pt, log_stage1.jsonl, stage1_recon.png")
    p.add_argument("--channels", type=int, default=CHANNELS, help="base channel width of the autoencoder")
    p.add_argument("--ch-mult", type=int, nargs="+", default=list(CH_MULT), help="channel multiplier per level")
    p.add_argument("--latent-channels", type=int, default=LATENT_CHANNELS, help="channels of the latent")
    p.add_argument("--num-res-blocks", type=int, default=1, help="ResBlocks per level")
    p.add_argument("--aux-dropout", type=float, default=AUX_DROPOUT, help="dropout inside the auxiliary decoder (0: none)")
    p.add_argument("--aux-width", type=float, default=AUX_WIDTH, help="channel multiplier of the auxiliary decoder (1: full)")
    p.add_argument("--scale-equivariance", type=float, default=0.0,
                   help="weight of the scale-equivariance term (decode the 2x-downsampled latent; 0: off)")
    p.add_argument("--loss", choices=["l1", "mse"], default="l1", help="reconstruction loss")
    p.add_argument("--no-flip", action="store_true",
                   help="no random horizontal flips, here and in every later stage (digits, text, anything not mirror-symmetric)")
    add_training_flags(p, STEPS, BATCH_SIZE, LR, ckpt_every=1000, checkpoint="stage1.pt")
    args = p.parse_args(argv)
    check_training_flags(args)
    if not 0 <= args.scale_equivariance < float("inf"):
        raise UserError(f"--scale-equivariance must be a number >= 0, not {args.scale_equivariance}")
    if not 0 <= args.aux_dropout < 1 or not 0 < args.aux_width <= 1:
        raise UserError("--aux-dropout must be in [0, 1) and --aux-width in (0, 1]")
    if args.channels < 8 or args.latent_channels < 1 or args.num_res_blocks < 1 or min(args.ch_mult) < 1:
        raise UserError("--channels must be at least 8, and --latent-channels, --num-res-blocks and --ch-mult positive")
    args.image_size = 32 if args.data in ("cifar10", "shapes") else args.image_size   # their images are 32x32
    factor = 2 ** (len(args.ch_mult) - 1)
    if args.image_size < 8 or args.image_size % factor:
        raise UserError(f"--image-size {args.image_size} must be at least 8 and divisible by {factor} "
                        f"(the {len(args.ch_mult)} levels of --ch-mult)")
    train(args)


# =============================================================================
# The data sources and helpers the later stages import
# =============================================================================

class UserError(Exception):
    """A mistake the user can fix, or a fault: main() prints it as one sentence and exits non-zero."""
    exit_code = 1


class Interrupted(UserError):
    """Ctrl-C during training: say where the last checkpoint is and how to continue (exit 130)."""
    exit_code = 130

    def __init__(self, ckpt_path):
        super().__init__(f"stopped by Ctrl-C; the last checkpoint is {ckpt_path}: add --resume to the same command "
                         f"to continue" if Path(ckpt_path).is_file() else "stopped by Ctrl-C before the first "
                         "checkpoint; run the same command to start again")


def run_cli(main):
    """Run main(): a UserError, a file-system fault or Ctrl-C ends in one line on stderr and a non-zero exit."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("error: stopped by Ctrl-C; nothing half-written was left behind", file=sys.stderr)
        sys.exit(130)
    except OSError as e:   # disk full, read-only folder, a folder where a file should be, ...
        print(f"error: {e.strerror or e} ({e.filename}); check the path, free space and permissions", file=sys.stderr)
        sys.exit(1)


def add_training_flags(p, steps, batch_size, lr, ckpt_every, checkpoint):
    """The flags every training stage shares."""
    p.add_argument("--steps", type=int, default=steps, help="total training steps")
    p.add_argument("--batch-size", type=int, default=batch_size, help="images per step")
    p.add_argument("--lr", type=float, default=lr, help="peak AdamW learning rate")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where to train")
    p.add_argument("--compile", action="store_true", help="torch.compile the networks")
    p.add_argument("--resume", action="store_true", help=f"continue from RUN/{checkpoint} up to --steps")
    p.add_argument("--log-every", type=int, default=50, help="steps between log lines")
    p.add_argument("--ckpt-every", type=int, default=ckpt_every, help="steps between checkpoints")


def check_training_flags(args):
    """Refuse impossible values of the shared flags before any expensive work."""
    for flag in ("steps", "batch_size", "log_every", "ckpt_every"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be a positive integer, not {getattr(args, flag)}")
    if not 0 < args.lr < float("inf"):
        raise UserError(f"--lr must be a positive number, not {args.lr}")


# -----------------------------------------------------------------------------
# Data: uint8 images (N, H, W, 3) in memory, scaled to [-1, 1] only when batched

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_MD5 = "c58f30108f718f92721af3b95e74349a"
SHAPES_CLASSES = ("circle", "ring", "triangle", "square", "pentagon", "star", "cross", "bar", "arrow", "heart")
SHAPES_SEED = 0
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass
class ImageData:
    images: torch.Tensor    # (N, H, W, 3) uint8
    labels: torch.Tensor    # (N,) int64
    class_names: list
    description: str


def file_digest(path, algorithm):
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(url, path, expected_digest, algorithm="md5"):
    """Download url to path through a temp file; refuse a file whose digest does not start with the expected one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as f:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {path.name}") as bar:
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    bar.update(f.write(chunk))
        if not file_digest(tmp, algorithm).startswith(expected_digest):
            raise UserError(f"the download of {url} has the wrong {algorithm} (expected {expected_digest}): "
                            f"it is corrupt or truncated; try again")
        os.replace(tmp, path)
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        raise UserError(f"could not download {url} ({e}); download it by hand and put it at {path}")
    finally:
        tmp.unlink(missing_ok=True)
    return path


class BatchUnpickler(pickle.Unpickler):
    """Reads a CIFAR-10 batch and nothing else: dicts, lists, bytes, numbers and plain numpy arrays.
    Any other class (a crafted file's __reduce__ payload: os.system, eval, ...) is refused."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}   # encode: bytes in protocol 2

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR-10 batch")
        return super().find_class(module, name)


def load_cifar10(data_dir, split):
    """CIFAR-10, read straight from the md5-checked archive (downloaded once) with the safe unpickler:
    nothing extracted on disk is ever trusted."""
    archive = Path(data_dir) / "cifar-10-python.tar.gz"
    if not archive.exists():
        download(CIFAR_URL, archive, CIFAR_MD5)
    elif file_digest(archive, "md5") != CIFAR_MD5:
        raise UserError(f"{archive} has the wrong md5 (expected {CIFAR_MD5}): it is corrupt or truncated; "
                        f"delete it and run again to download it")
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    try:
        with tarfile.open(archive, "r:gz") as tar:
            read = lambda name: BatchUnpickler(tar.extractfile(f"cifar-10-batches-py/{name}"), encoding="bytes").load()
            batches, meta = [read(n) for n in names], read("batches.meta")
        images = np.concatenate([b[b"data"] for b in batches]).astype(np.uint8).reshape(-1, 3, 32, 32)
        labels = np.concatenate([b[b"labels"] for b in batches]).astype(np.int64)
        classes = [c.decode() for c in meta[b"label_names"]]
    except (tarfile.TarError, pickle.UnpicklingError, EOFError, OSError, KeyError, ValueError, TypeError,
            AttributeError) as e:
        raise UserError(f"{archive} does not hold readable CIFAR-10 batches ({e.__class__.__name__}: {e})")
    return ImageData(torch.from_numpy(np.ascontiguousarray(images.transpose(0, 2, 3, 1))), torch.from_numpy(labels),
                     classes, f"cifar10/{split}")


def _regular(n, r=1.0, phase=0.0):
    t = phase + np.arange(n) * 2 * np.pi / n
    return np.stack([r * np.cos(t), r * np.sin(t)], 1)


def _star():
    points = _regular(10, phase=-np.pi / 2)
    points[1::2] *= 0.45
    return points


def _heart():
    t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    x, y = 16 * np.sin(t) ** 3, 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
    return np.stack([x, -y - 2.5], 1) / 16.5


# Each class: polygons around (0, 0) with radius about 1, drawn in order with (points, fill 255 or 0 = hole).
SHAPE_POLYGONS = {
    "circle": [(_regular(64), 255)],
    "ring": [(_regular(64), 255), (_regular(64, 0.55), 0)],
    "triangle": [(_regular(3, phase=-np.pi / 2), 255)],
    "square": [(_regular(4, phase=np.pi / 4), 255)],
    "pentagon": [(_regular(5, phase=-np.pi / 2), 255)],
    "star": [(_star(), 255)],
    "cross": [(np.array([(-.3, -1), (.3, -1), (.3, -.3), (1, -.3), (1, .3), (.3, .3), (.3, 1), (-.3, 1),
                         (-.3, .3), (-1, .3), (-1, -.3), (-.3, -.3)]), 255)],
    "bar": [(np.array([(-1, -.28), (1, -.28), (1, .28), (-1, .28)]), 255)],
    "arrow": [(np.array([(-1, -.22), (.15, -.22), (.15, -.6), (1, 0), (.15, .6), (.15, .22), (-1, .22)]), 255)],
    "heart": [(_heart(), 255)],
}


def make_shapes(n, seed, size=32, supersample=4):
    """A deterministic, class-balanced set of n anti-aliased shapes: (images uint8 NHWC, labels)."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % len(SHAPES_CLASSES))
    big = size * supersample
    # Per image: radius, centre, rotation, foreground colour and a two-colour gradient background.
    radius = rng.uniform(0.3, 0.48, n) * big
    centre = rng.uniform(0, 1, (n, 2)) * (big - 2 * radius[:, None]) + radius[:, None]
    angle = rng.uniform(0, 2 * np.pi, n)
    bg = rng.uniform(0, 1, (n, 2, 3))
    fg = rng.uniform(0, 1, (n, 3))
    direction = rng.uniform(0, 2 * np.pi, n)
    lum = np.array([0.299, 0.587, 0.114])
    for _ in range(3):  # keep the shape visible: move a colour too close to its background
        low_contrast = np.abs(fg @ lum - bg.mean(1) @ lum) < 0.2
        fg[low_contrast] = (fg[low_contrast] + 0.5) % 1.0
    fg[low_contrast] = np.where(bg.mean(1)[low_contrast] @ lum > 0.5, 0.05, 0.95)[:, None] * np.ones(3)

    ys, xs = np.mgrid[0:size, 0:size] / (size - 1) - 0.5
    images = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        mask = Image.new("L", (big, big), 0)
        draw = ImageDraw.Draw(mask)
        c, s = np.cos(angle[i]), np.sin(angle[i])
        rotation = np.array([[c, -s], [s, c]])
        for points, fill in SHAPE_POLYGONS[SHAPES_CLASSES[labels[i]]]:
            xy = points @ rotation.T * radius[i] + centre[i]
            draw.polygon([tuple(p) for p in xy], fill=fill)
        alpha = np.asarray(mask.resize((size, size), Image.Resampling.BOX), np.float32)[..., None] / 255
        t = (np.cos(direction[i]) * xs + np.sin(direction[i]) * ys)[..., None] / np.sqrt(2) + 0.5  # (H, W, 1) in [0, 1]
        background = (1 - t) * bg[i, 0] + t * bg[i, 1]
        images[i] = np.round(255 * ((1 - alpha) * background + alpha * fg[i]))
    return images, labels.astype(np.int64)



def load_shapes(data_dir, split):
    """The embedded offline dataset: 50,000 train and 10,000 test images, built once and cached."""
    path = Path(data_dir) / f"shapes-seed{SHAPES_SEED}-v1.npz"
    if not path.exists():
        print(f"building the shapes dataset once into {path} ...", file=sys.stderr)
        path.parent.mkdir(parents=True, exist_ok=True)
        (train_x, train_y), (test_x, test_y) = make_shapes(50_000, SHAPES_SEED), make_shapes(10_000, SHAPES_SEED + 1)
        atomic_save(path, lambda tmp: np.savez(tmp, train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y))
    try:
        with np.load(path, allow_pickle=False) as f:
            images, labels = f[f"{split}_x"], f[f"{split}_y"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):   # a damaged cache: build it again
        print(f"{path} is damaged; building it again", file=sys.stderr)
        path.unlink()
        return load_shapes(data_dir, split)
    return ImageData(torch.from_numpy(images), torch.from_numpy(labels), list(SHAPES_CLASSES), f"shapes/{split}")


def load_image_file(path, image_size):
    """One image, centre-cropped to a square and resized: (H, W, 3) uint8."""
    try:
        with Image.open(path) as im:
            square = ImageOps.fit(im.convert("RGB"), (image_size, image_size), Image.Resampling.BICUBIC)
            return np.asarray(square, np.uint8)
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise UserError(f"cannot read the image {path} ({e.__class__.__name__}); remove or replace it")


def load_folder(folder, image_size):
    """A folder of images: class sub-folders give labels, a flat folder is one class."""
    folder = Path(folder)
    is_image = lambda p: p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    subdirs = sorted(d for d in folder.iterdir() if d.is_dir() and any(map(is_image, d.rglob("*"))))
    if subdirs:
        class_names = [d.name for d in subdirs]
        files = [(p, i) for i, d in enumerate(subdirs) for p in sorted(filter(is_image, d.rglob("*")))]
    else:
        class_names = [folder.name]
        files = [(p, 0) for p in sorted(filter(is_image, folder.iterdir()))]
    if not files:
        raise UserError(f"{folder} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    images = np.stack([load_image_file(p, image_size) for p, _ in tqdm(files, desc="reading images",
                                                                       disable=len(files) < 1000)])
    labels = np.array([label for _, label in files], np.int64)
    return ImageData(torch.from_numpy(images), torch.from_numpy(labels), class_names, str(folder))


def load_data(name, data_dir="data", split="train", image_size=32):
    """`cifar10`, `shapes`, or a folder of images (a folder is both its train and its test split)."""
    if split not in ("train", "test"):
        raise UserError(f"--split must be train or test, not {split}")
    if name == "cifar10":
        return load_cifar10(data_dir, split)
    if name == "shapes":
        return load_shapes(data_dir, split)
    if not Path(name).is_dir():
        raise UserError(f"--data {name} is neither cifar10, shapes nor an existing folder of images")
    return load_folder(name, image_size)


def to_model_input(images_uint8):
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float in [-1, 1]."""
    return images_uint8.permute(0, 3, 1, 2).float() / 127.5 - 1


def to_uint8_images(x):
    """(N, 3, H, W) float in [-1, 1] -> (N, H, W, 3) uint8 on the CPU."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


def sample_batch(data, batch_size, generator, flip=True):
    """A random training batch (with replacement), with random horizontal flips unless flip=False: (x, labels)."""
    idx = torch.randint(len(data.images), (batch_size,), generator=generator)
    x = to_model_input(data.images[idx])
    if flip:
        flipped = torch.rand(batch_size, generator=generator) < 0.5
        x = torch.where(flipped[:, None, None, None], x.flip(3), x)
    return x, data.labels[idx]


def spread_indices(n, num):
    """min(num, n) indices evenly spread from the first to the last (a folder is sorted by class)."""
    return torch.linspace(0, n - 1, min(num, n)).round().long()


def step_generator(seed, step, stage):
    """Each step draws its batch from its own seeded generator, so a resumed run sees the same batches;
    `stage` keeps stage 2 from replaying stage 1's sequence of batches."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 8 + stage)


# -----------------------------------------------------------------------------
# Helpers shared by every stage: device, files, checkpoints, logs, pictures, metrics

def pick_device(name):
    """`auto` takes the GPU when there is one; on CUDA, float32 matmuls and convs may use TF32."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but PyTorch sees no CUDA GPU; use --device cpu")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return device


def autocast(device):
    """bf16 autocast on CUDA, plain float32 on the CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def count_params(model):
    return f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params"


def prepare_run(run):
    """Create the run folder (or say in one sentence why not) and delete temp files of saves that were killed."""
    run = Path(run)
    if run.exists() and not run.is_dir():
        raise UserError(f"--run {run} is a file, not a folder; choose another --run")
    try:
        run.mkdir(parents=True, exist_ok=True)
        probe = run / f".write-test{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write into the run folder {run} ({e.strerror}); choose another --run") from None
    for tmp in run.glob(".*.tmp*"):   # .NAME.tmpPID: left by a save whose process was killed before its rename
        pid = re.search(r"\.tmp(\d+)", tmp.name)   # (only where /proc tells which processes still live)
        if pid and Path("/proc/self").exists() and not Path(f"/proc/{pid.group(1)}").exists():
            tmp.unlink(missing_ok=True)
    return run


def atomic_save(path, write):
    """write(temp path) in the same folder, then rename: a crash or a full disk never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:   # torch.save reports a full disk as a RuntimeError
        why = e.strerror if isinstance(e, OSError) and e.strerror else "the disk may be full"
        raise UserError(f"could not write {path} ({why}); free some space or choose a writable folder "
                        f"(any earlier {path.name} is untouched)") from None
    finally:
        tmp.unlink(missing_ok=True)


def save_checkpoint(obj, path):
    atomic_save(path, lambda tmp: torch.save(obj, tmp))


STAGE_FILES = {1: ("stage1.pt", "stage1_encoder.py"), 2: ("autoencoder.pt", "stage2_decoder.py"),
               3: ("dit.pt", "train_latent_dit.py")}


def load_checkpoint(path, stage):
    """Load a checkpoint safely (weights_only), check that it is the stage we expect and that its weights are finite."""
    path = Path(path)
    name, script = STAGE_FILES[stage]
    if not path.is_file():
        raise UserError(f"{path} does not exist: run {script} first (it writes {name})")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path} is not a checkpoint this project can read ({e.__class__.__name__})")
    if not isinstance(ckpt, dict) or ckpt.get("stage") != stage:
        got = ckpt.get("stage") if isinstance(ckpt, dict) else None
        raise UserError(f"{path} is {'a stage-%s' % got if got else 'not a'} checkpoint of this project, "
                        f"but a stage-{stage} one ({name}, written by {script}) is needed")
    for key, value in ckpt.items():   # weights and latent statistics: dicts of tensors
        if isinstance(value, dict) and not all(torch.isfinite(v).all() for v in value.values()
                                               if torch.is_tensor(v) and v.is_floating_point()):
            raise UserError(f"{path} holds NaN or infinite values in '{key}' (its training diverged); "
                            f"train it again with a lower --lr")
    return ckpt


def resume_checkpoint(ckpt_path, log_path, stage, steps):
    """--resume: the stage's own checkpoint; a finished one is refused; the log is cut back to its step."""
    ckpt = load_checkpoint(ckpt_path, stage)
    if ckpt["step"] >= steps:
        raise UserError(f"{ckpt_path} is already at step {ckpt['step']}; to train longer, "
                        f"pass a --steps above {ckpt['step']} with --resume")
    if Path(log_path).exists():   # lines logged after the checkpoint would be repeated
        kept = [line for line in Path(log_path).read_text().splitlines(keepends=True)
                if line.strip() and json.loads(line)["step"] <= ckpt["step"]]
        atomic_save(log_path, lambda tmp: Path(tmp).write_text("".join(kept)))
    return ckpt


def load_optimizer(optimizer, state, device):
    """Load a saved optimizer state; `fused` follows this run's device, not the saved one."""
    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:
        group["fused"] = device.type == "cuda"


def rng_state():
    """The global random states, of the CPU and of every GPU: what dropout draws from."""
    return [torch.get_rng_state(), *(torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])]


def set_rng_state(state):
    state = [state] if torch.is_tensor(state) else state   # older checkpoints saved the CPU state alone
    torch.set_rng_state(state[0])
    if len(state) > 1 and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state[1:])


class Progress:
    """A tqdm bar plus the JSONL log: metrics are averaged over each window of `log_every` steps."""
    def __init__(self, log_path, total, initial, images_per_step, log_every, desc):
        self.log_path, self.images_per_step, self.log_every = log_path, images_per_step, log_every
        self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)
        self.sums, self.count, self.step, self.t0 = {}, 0, initial, time.time()

    def update(self, step, **metrics):
        """Record one finished step; write a log line every log_every steps and at the last one."""
        for k, v in metrics.items():   # tensors stay on their device until a log line: no sync per step
            self.sums[k] = self.sums.get(k, 0.0) + (v.detach().float() if torch.is_tensor(v) else v)
        self.count, self.step = self.count + 1, step
        self.bar.update(1)
        if step % self.log_every == 0 or step == self.bar.total or self.sums["loss"].device.type == "cpu":
            self.check_finite()   # every step on the CPU (free), at each log line on a GPU
        if step % self.log_every == 0 or step == self.bar.total:
            record = {"step": step, **{k: float(v) / self.count for k, v in self.sums.items()},
                      "images_per_s": self.count * self.images_per_step / (time.time() - self.t0)}
            with open(self.log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_s']:.0f}")
            self.sums, self.count, self.t0 = {}, 0, time.time()

    def check_finite(self):
        """Stop at a NaN or infinite loss, before a checkpoint could store the broken weights."""
        if self.count and not math.isfinite(float(self.sums["loss"])):
            raise UserError(f"the loss became {float(self.sums['loss'])} by step {self.step}: training diverged; "
                            f"try a lower --lr (no checkpoint was written after it)")

    def close(self):
        self.bar.close()


def save_grid(images, path, nrow, scale=2):
    """Save (N, H, W, 3) uint8 images as one PNG with nrow images a row, upscaled for viewing."""
    images = np.asarray(images)
    n, h, w, _ = images.shape
    rows = -(-n // nrow)
    grid = np.full((rows * (h + 2) + 2, nrow * (w + 2) + 2, 3), 255, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, nrow)
        grid[2 + r * (h + 2): 2 + r * (h + 2) + h, 2 + c * (w + 2): 2 + c * (w + 2) + w] = im
    picture = Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.Resampling.NEAREST)
    atomic_save(path, lambda tmp: picture.save(tmp, format="PNG"))


def psnr(x_hat, x):
    """Per-image PSNR in dB of images in [-1, 1] (peak-to-peak 2, i.e. images in [0, 1] with peak 1)."""
    mse = ((x_hat.float() - x.float()) / 2).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1 / mse.clamp_min(1e-10))


@torch.no_grad()
def evaluate_reconstruction(encoder, decoder, data, device, png_path, npz_path=None, num=2000, batch_size=250):
    """Mean PSNR of `num` test images spread over the set (a folder is sorted by class); a PNG of ten of
    them, also spread, above their reconstructions; with npz_path, the reconstructions and their labels
    in sample.py's npz layout (fid.py scores them: the class accuracy no generator can beat)."""
    encoder.eval(), decoder.eval()
    idx = spread_indices(len(data.images), num)
    images = data.images[idx]
    x_hat = torch.cat([decoder(encoder(to_model_input(images[i:i + batch_size]).to(device))).float().cpu()
                       for i in range(0, len(images), batch_size)])
    shown = spread_indices(len(images), 10)
    save_grid(torch.cat([images[shown], to_uint8_images(x_hat[shown])]), png_path, nrow=len(shown))
    if npz_path:
        atomic_save(npz_path, lambda tmp: np.savez(tmp, arr_0=to_uint8_images(x_hat).numpy(),
                                                   arr_1=data.labels[idx].numpy()))
    return psnr(x_hat.clamp(-1, 1), to_model_input(images)).mean().item()


if __name__ == "__main__":
    run_cli(main)
