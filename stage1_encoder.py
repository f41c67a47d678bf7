"""
Stage 1 of the Decoupled Autoencoder (DAE): train the encoder with a *weaker* auxiliary decoder.

The paper ("Complexity Matters: Rethinking the Latent Space for Generative Modeling", Hu et al.,
NeurIPS 2023, Fig. 1) argues that an encoder trained with a strong decoder has no reason to make its
latent simple: the strong decoder can undo an awkward latent. Training the encoder against a decoder
of limited capacity (here: dropout inside its blocks and/or fewer channels) pushes the encoder
towards a latent that is easy to decode, and so easy to generate. Stage 2 (stage2_decoder.py) then
freezes this encoder and trains the real decoder.

Read from the top: the defaults, the autoencoder and its weakening, stage-1 training, main(), and
the reconstruction measure (PSNR) that stage 2 uses too. The data lives in data.py; run folders,
checkpoints, devices and the progress log in runs.py.

    python stage1_encoder.py --data shapes                                # -> runs/shapes/stage1.pt
    python stage1_encoder.py --run runs/joint --aux-dropout 0 --aux-width 1   # the joint baseline
    python stage1_encoder.py --data data/digits --no-flip   # digits, text: no mirror images
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from data import (load_data, sample_batch, save_grid, save_loss_curve, spread_indices, to_model_input,
                  to_uint8_images)
from runs import (Interrupted, Progress, UserError, add_training_flags, atomic_save, autocast,
                  clear_stage, count_params, exact_float32, grad_scaler, load_optimizer, open_run,
                  parse_training_args, pick_device, precision_name, refuse_torchrun,
                  resume_checkpoint, rng_state, run_cli, save_checkpoint, seeded_generator,
                  set_rng_state)

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

def group_norm(channels):
    """GroupNorm with up to 32 groups of at least 4 channels (the largest count that divides)."""
    groups = min(32, channels // 4)
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels)

class ResBlock(nn.Module):
    """Two 3x3 convs with GroupNorm + SiLU and a residual; dropout sits between the convs."""
    def __init__(self, in_ch, out_ch, dropout=0.0):
        super().__init__()
        self.norm1 = group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = group_norm(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h

class Encoder(nn.Module):
    """(N, 3, H, W) image -> (N, latent_channels, H / 2^(levels-1), W / 2^(levels-1)) latent."""
    def __init__(self, channels=CHANNELS, ch_mult=CH_MULT, latent_channels=LATENT_CHANNELS,
                 num_res_blocks=1):
        super().__init__()
        widths = [channels * m for m in ch_mult]
        layers = [nn.Conv2d(3, widths[0], 3, padding=1)]
        in_ch = widths[0]
        for level, width in enumerate(widths):
            if level > 0:
                layers.append(nn.Conv2d(in_ch, in_ch, 3, stride=2, padding=1))  # downsample x2
            for _ in range(num_res_blocks):
                layers.append(ResBlock(in_ch, width))
                in_ch = width
        layers += [ResBlock(widths[-1], widths[-1]), group_norm(widths[-1]), nn.SiLU(),
                   nn.Conv2d(widths[-1], latent_channels, 3, padding=1)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(x)

class Decoder(nn.Module):
    """(N, latent_channels, h, w) latent -> (N, 3, H, W) image; `width` < 1 and `dropout` > 0 weaken
    it: that weakened decoder is stage 1's auxiliary decoder."""
    def __init__(self, channels=CHANNELS, ch_mult=CH_MULT, latent_channels=LATENT_CHANNELS,
                 num_res_blocks=1, width=1.0, dropout=0.0):
        super().__init__()
        # Fewer channels per level (a multiple of 8), deepest level first.
        widths = [max(8, int(round(channels * m * width / 8)) * 8) for m in ch_mult][::-1]
        layers = [nn.Conv2d(latent_channels, widths[0], 3, padding=1),
                  ResBlock(widths[0], widths[0], dropout)]
        in_ch = widths[0]
        for level, out_ch in enumerate(widths):
            if level > 0:
                layers += [nn.Upsample(scale_factor=2, mode="nearest"),
                           nn.Conv2d(in_ch, in_ch, 3, padding=1)]
            for _ in range(num_res_blocks):
                layers.append(ResBlock(in_ch, out_ch, dropout))
                in_ch = out_ch
        layers += [group_norm(widths[-1]), nn.SiLU(), nn.Conv2d(widths[-1], 3, 3, padding=1)]
        self.layers = nn.Sequential(*layers)

    def forward(self, z):
        return self.layers(z)

def autoencoder_kwargs(config):
    """The Encoder/Decoder constructor arguments stored in a checkpoint's config."""
    return dict(channels=config["channels"], ch_mult=tuple(config["ch_mult"]),
                latent_channels=config["latent_channels"], num_res_blocks=config["num_res_blocks"])

def reconstruction_loss(x_hat, x, kind):
    """Mean L1 (the default) or squared error between a reconstruction and its image, in float32."""
    return F.l1_loss(x_hat.float(), x) if kind == "l1" else F.mse_loss(x_hat.float(), x)

def scale_equivariance_loss(decode, z, x, kind):
    """Scale equivariance (Skorokhodov et al. 2025): the decoder must also turn the latent
    downsampled 2x into the image downsampled 2x. A latent whose fine detail the decoder needs
    cannot pass this, so the encoder is pushed towards a latent with less high-frequency content."""
    return reconstruction_loss(decode(F.avg_pool2d(z, 2)), F.avg_pool2d(x, 2), kind)


# -----------------------------------------------------------------------------
# DAE stage 1 training

def train(args):
    """Train the encoder with the weak auxiliary decoder; write RUN/stage1.pt, stage1_recon.png."""
    device = pick_device(args.device)
    run = Path(args.run)
    ckpt_path = run / "stage1.pt"
    log_path = run / "log_stage1.jsonl"
    config = dict(data=args.data, data_dir=str(args.data_dir), image_size=args.image_size,
                  channels=args.channels, ch_mult=list(args.ch_mult),
                  latent_channels=args.latent_channels, num_res_blocks=args.num_res_blocks,
                  aux_dropout=args.aux_dropout, aux_width=args.aux_width,
                  scale_equivariance=args.scale_equivariance, loss=args.loss, lr=args.lr,
                  batch_size=args.batch_size, seed=args.seed, flip=not args.no_flip)
    if args.resume:   # the checkpoint's configuration; a typed flag may not change it
        flags = {key: "no_flip" if key == "flip" else key for key in config}
        ckpt = resume_checkpoint(ckpt_path, log_path, 1, args, config, flags)
        config = ckpt["config"]
    train_data = load_data(config["data"], config["data_dir"], "train", config["image_size"])
    test_data = load_data(config["data"], config["data_dir"], "test", config["image_size"])

    torch.manual_seed(config["seed"])
    encoder = Encoder(**autoencoder_kwargs(config)).to(device)
    # The paper's key idea (Fig. 1): the decoder of stage 1 is deliberately weaker than the real.
    aux_decoder = Decoder(**autoencoder_kwargs(config), width=config["aux_width"],
                          dropout=config["aux_dropout"]).to(device)
    params = list(encoder.parameters()) + list(aux_decoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=config["lr"], weight_decay=0.0,
                                  fused=device.type == "cuda")
    step = 0
    if args.resume:
        encoder.load_state_dict(ckpt["encoder"])
        aux_decoder.load_state_dict(ckpt["aux_decoder"])
        load_optimizer(optimizer, ckpt["optimizer"], device)
        step = ckpt["step"]
        set_rng_state(ckpt["rng_state"], device, config["seed"], step)
        print(f"resuming {ckpt_path} at step {step}", file=sys.stderr)
    else:
        clear_stage(run, stage=1)
    print(f"stage 1 on {train_data.description}, device {device}, {precision_name(device)}, "
          f"encoder {count_params(encoder)}, auxiliary decoder {count_params(aux_decoder)} "
          f"(dropout {config['aux_dropout']}, width {config['aux_width']})", file=sys.stderr)

    # torch.compile wraps the modules; the originals keep their plain state_dict names.
    encode = torch.compile(encoder) if args.compile else encoder
    decode = torch.compile(aux_decoder) if args.compile else aux_decoder
    scaler = grad_scaler(device)   # float16 only; a pass-through in bf16 and float32

    def checkpoint(metrics, finished=False):
        save_checkpoint({"stage": 1, "config": config, "encoder": encoder.state_dict(),
                         "aux_decoder": aux_decoder.state_dict(),
                         "optimizer": optimizer.state_dict(), "step": step,
                         "total_steps": args.steps, "finished": finished,
                         "rng_state": rng_state(device),
                         "metrics": metrics, "data": train_data.description,
                         "class_names": train_data.class_names}, ckpt_path)

    encoder.train()
    aux_decoder.train()
    progress = Progress(log_path, args.steps, step, config["batch_size"], args.log_every, "stage 1")
    try:
        while step < args.steps:
            batch_generator = seeded_generator(config["seed"], step, stream=1, num_streams=8)
            x, _ = sample_batch(train_data, config["batch_size"], batch_generator, config["flip"])
            x = x.to(device, non_blocking=True)
            with autocast(device):
                z = encode(x)                                             # (N, C, h, w)
                loss = reconstruction_loss(decode(z), x, config["loss"])
                logs = {}
                if config["scale_equivariance"]:   # off by default: the 2025 regulariser
                    logs["se_loss"] = scale_equivariance_loss(decode, z, x, config["loss"])
                    loss = loss + config["scale_equivariance"] * logs["se_loss"]
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            step += 1
            progress.update(step, loss=loss, **logs)
            if step % args.ckpt_every == 0 and step < args.steps:
                progress.stop_if_diverged()
                checkpoint({})
    except KeyboardInterrupt:
        raise Interrupted(ckpt_path) from None
    finally:
        progress.close()

    test_psnr = evaluate_reconstruction(encoder, aux_decoder, test_data, device,
                                        run / "stage1_recon.png")
    checkpoint({"test_psnr_aux": test_psnr}, finished=True)
    save_loss_curve(log_path, run / "stage1_loss.png", "stage 1")
    print(f"wrote {ckpt_path}: test PSNR with the auxiliary decoder {test_psnr:.2f} dB",
          file=sys.stderr)

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default="shapes", help="cifar10, shapes, or a folder of images")
    p.add_argument("--data-dir", default="data", help="where datasets are downloaded and cached")
    p.add_argument("--image-size", type=int, default=32, help="image side for a folder of images")
    p.add_argument("--run", help="run folder (default: runs/<data name>): writes stage1.pt, "
                   "log_stage1.jsonl, stage1_recon.png")
    p.add_argument("--channels", type=int, default=CHANNELS,
                   help="base channel width of the autoencoder")
    p.add_argument("--ch-mult", type=int, nargs="+", default=list(CH_MULT),
                   help="channel multiplier per level")
    p.add_argument("--latent-channels", type=int, default=LATENT_CHANNELS,
                   help="channels of the latent")
    p.add_argument("--num-res-blocks", type=int, default=1, help="ResBlocks per level")
    p.add_argument("--aux-dropout", type=float, default=AUX_DROPOUT,
                   help="dropout inside the auxiliary decoder (0: none)")
    p.add_argument("--aux-width", type=float, default=AUX_WIDTH,
                   help="channel multiplier of the auxiliary decoder (1: full)")
    p.add_argument("--scale-equivariance", type=float, default=0.0,
                   help="weight of the scale-equivariance term: decode the 2x-downsampled latent "
                   "into the 2x-downsampled image (0: off)")
    p.add_argument("--loss", choices=["l1", "mse"], default="l1", help="reconstruction loss")
    p.add_argument("--no-flip", action="store_true",
                   help="no random horizontal flips, here and in every later stage (digits, text, "
                   "anything not mirror-symmetric)")
    add_training_flags(p, STEPS, BATCH_SIZE, LR, ckpt_every=1000, checkpoint="stage1.pt")
    refuse_torchrun("stage1_encoder.py")
    args = parse_training_args(p, argv, STEPS)
    if args.run is None:
        args.run = str(Path("runs") / Path(args.data).name)
    if not 0 <= args.scale_equivariance < float("inf"):
        raise UserError(f"--scale-equivariance must be >= 0, not {args.scale_equivariance}")
    if not 0 <= args.aux_dropout < 1 or not 0 < args.aux_width <= 1:
        raise UserError("--aux-dropout must be in [0, 1) and --aux-width in (0, 1]")
    if (args.channels < 8 or args.latent_channels < 1 or args.num_res_blocks < 1
            or min(args.ch_mult) < 1):
        raise UserError("--channels must be at least 8, and --latent-channels, --num-res-blocks "
                        "and --ch-mult positive")
    if args.data in ("cifar10", "shapes"):   # their images are 32x32
        args.image_size = 32
    factor = 2 ** (len(args.ch_mult) - 1)
    if not 8 <= args.image_size <= 1024 or args.image_size % factor:
        raise UserError(f"--image-size {args.image_size} must be from 8 to 1024 and divisible by "
                        f"{factor} (the {len(args.ch_mult)} levels of --ch-mult)")
    with open_run(args.run, 1, args.resume, args.overwrite):
        train(args)

def psnr(x_hat, x):
    """Per-image PSNR in dB of images in [-1, 1] (peak-to-peak 2: images in [0, 1] with peak 1)."""
    mse = ((x_hat.float() - x.float()) / 2).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1 / mse.clamp_min(1e-10))

@torch.no_grad()
def evaluate_reconstruction(encoder, decoder, data, device, png_path, npz_path=None, num=2000,
                            batch_size=250):
    """Mean PSNR of `num` test images spread over the set (a folder is sorted by class); a PNG of
    ten of them, also spread, above their reconstructions; with npz_path, the reconstructions and
    their labels in sample.py's npz layout (fid.py scores them: the class accuracy no generator on
    this latent can beat)."""
    encoder.eval()
    decoder.eval()
    idx = spread_indices(len(data.images), num)
    images = data.images[idx]
    with exact_float32(device):   # no autocast, no TF32: the same PSNR on a CPU and a GPU
        x_hat = torch.cat([decoder(encoder(to_model_input(images[i:i + batch_size]).to(device)))
                           .float().cpu() for i in range(0, len(images), batch_size)])  # (N,3,H,W)
    shown = spread_indices(len(images), 10)
    save_grid(torch.cat([images[shown], to_uint8_images(x_hat[shown])]), png_path, nrow=len(shown))
    if npz_path:
        atomic_save(npz_path, lambda tmp: np.savez(tmp, arr_0=to_uint8_images(x_hat).numpy(),
                                                   arr_1=data.labels[idx].numpy()))
    return psnr(x_hat.clamp(-1, 1), to_model_input(images)).mean().item()


if __name__ == "__main__":
    run_cli(main, "--batch-size, --channels or --latent-channels")
