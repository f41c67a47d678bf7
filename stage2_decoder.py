"""
Stage 2 of the Decoupled Autoencoder (DAE): freeze the stage-1 encoder, train the real decoder.

Stage 1 chose the latent (its encoder was trained against a weak decoder). Stage 2 no longer moves
the encoder: a full-strength Decoder (no dropout, full width) learns to read the latent as it is
(the paper's Fig. 1, second stage). When stage 1 weakened its decoder by dropout alone, the two
decoders have the same shapes, and this one starts from the auxiliary decoder's weights
(`--fresh-decoder`: from random ones). The latent the generative model will see is therefore the
stage-1 latent, and the image quality comes from the strong decoder.

`--joint` is the paper's baseline instead: it keeps training the encoder and the (unweakened)
stage-1 decoder together for the same number of steps. The comparison is step-matched, not
compute-matched: the joint run also backpropagates through the encoder (about 25% more compute).

At the end it measures the test PSNR, the latent statistics that the diffusion model uses to
standardise its inputs (per-channel mean and std, and SD's kind of scale factor), and how simple the
latent is (latents.png and its high-frequency share).

    python stage2_decoder.py --run runs/shapes          # DAE: stage1.pt -> autoencoder.pt
    python stage2_decoder.py --run runs/joint --joint   # joint: a stage 1 run with no weakening
"""
import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from data import load_data, sample_batch, save_grid, save_loss_curve, spread_indices, to_model_input
from runs import (Interrupted, Progress, UserError, add_training_flags, atomic_save, autocast,
                  clear_stage, count_params, exact_float32, file_digest, grad_scaler,
                  load_checkpoint, load_optimizer, open_run, parse_training_args, pick_device,
                  precision_name, refuse_torchrun, resume_checkpoint, run_cli, save_checkpoint,
                  seeded_generator)
from stage1_encoder import (Decoder, Encoder, autoencoder_kwargs, evaluate_reconstruction,
                            reconstruction_loss, scale_equivariance_loss)

# -----------------------------------------------------------------------------
# Defaults: the recommended recipe (every one is a flag of main())
STEPS = 20000           # as many as stage 1: DAE and joint then take the same number of steps
BATCH_SIZE = 128
LR = 1e-3
GAN_WEIGHT = 0.0        # adversarial loss weight (0: off, the default)
GAN_START = 1000        # steps of pure reconstruction before the discriminator joins


# -----------------------------------------------------------------------------
# A small PatchGAN discriminator with the hinge loss (as in VQGAN, which the paper also modifies)

class PatchDiscriminator(nn.Module):
    """(N, 3, H, W) image -> (N, 1, h, w) realness logits, one per overlapping patch."""
    def __init__(self, channels=64):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(3, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(channels, 2 * channels, 4, stride=2, padding=1, bias=False),
            nn.GroupNorm(8, 2 * channels), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * channels, 1, 4, stride=1, padding=1))

    def forward(self, x):
        return self.layers(x)

def hinge_d_loss(logits_real, logits_fake):
    return F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean()

def adaptive_gan_weight(rec_loss, gan_loss, last_layer_weight):
    """VQGAN's balance: scale the GAN gradient to the reconstruction gradient at the last layer."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer_weight, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(gan_loss, last_layer_weight, retain_graph=True)[0]
    return (rec_grad.norm() / (gan_grad.norm() + 1e-4)).clamp(0, 1e4).detach()

class Adversary:
    """The optional GAN of stage 2: a PatchDiscriminator, its optimizer, and the two losses."""
    def __init__(self, weight, lr, device):
        self.weight = weight
        self.discriminator = PatchDiscriminator().to(device)
        self.optimizer = torch.optim.AdamW(self.discriminator.parameters(), lr=lr, betas=(0.5, 0.9),
                                           fused=device.type == "cuda")

    def generator_loss(self, x_hat, rec_loss, last_layer_weight):
        """The decoder's extra loss (weighted, with the adaptive balance) and its log entries."""
        g_loss = -self.discriminator(x_hat).float().mean()
        weight = self.weight * adaptive_gan_weight(rec_loss, g_loss, last_layer_weight)
        return weight * g_loss, {"g_loss": g_loss, "gan_weight": weight}

    def update(self, x, x_hat, device, scaler):
        """One discriminator step on real images x and the (detached) reconstructions."""
        with autocast(device):
            d_loss = hinge_d_loss(self.discriminator(x).float(),
                                  self.discriminator(x_hat.detach()).float())
        self.optimizer.zero_grad(set_to_none=True)
        scaler.scale(d_loss).backward()
        scaler.step(self.optimizer)
        return d_loss


# -----------------------------------------------------------------------------
# The latent the diffusion model sees: its statistics, its pictures, and its cache

@torch.no_grad()
def latent_statistics(encoder, data, device, num=10_000, batch_size=500):
    """Per-channel mean and std of the latents of `num` images, and SD's scale factor 1 / std."""
    encoder.eval()
    # Images evenly spread from the first to the last (a folder is sorted by class); 10,000 times
    # every latent position pins a channel's mean and std far better than standardising needs.
    images = data.images[spread_indices(len(data.images), num)]
    total, total_sq, count = 0.0, 0.0, 0
    for i in tqdm(range(0, len(images), batch_size), desc="latent statistics", leave=False):
        with exact_float32(device):
            z = encoder(to_model_input(images[i:i + batch_size]).to(device)).double()
        total = total + z.sum((0, 2, 3))
        total_sq = total_sq + z.pow(2).sum((0, 2, 3))
        count += z.shape[0] * z.shape[2] * z.shape[3]
    mean = total / count
    std = (total_sq / count - mean.pow(2)).clamp_min(1e-12).sqrt()
    n = count * len(mean)   # every value of every channel
    overall_std = (total_sq.sum() / n - (total.sum() / n) ** 2).sqrt()
    return {"mean": mean.float().cpu(), "std": std.float().cpu(),
            "scale_factor": float(1 / overall_std)}

@torch.no_grad()
def standardised_latents(encoder, data, stats, device, num=1000, batch_size=250):
    """`num` images spread over the set and their latents, standardised per channel:
    ((num, H, W, 3) uint8, (num, C, h, w))."""
    images = data.images[spread_indices(len(data.images), num)]
    with exact_float32(device):
        z = torch.cat([encoder(to_model_input(images[i:i + batch_size]).to(device)).float().cpu()
                       for i in range(0, len(images), batch_size)])
    return images, (z - stats["mean"][None, :, None, None]) / stats["std"][None, :, None, None]

def show_latents(images, z, path, num=8):
    """How simple is the latent, as a picture: `num` images, each beside every channel of its
    standardised latent z in grey (-3 std black .. +3 std white)."""
    shown = spread_indices(len(z), num)
    scale = images.shape[1] // z.shape[2]
    grey = ((z[shown].clamp(-3, 3) + 3) * 42.5).round().to(torch.uint8)     # (n, C, h, w) in 0..255
    grey = grey.repeat_interleave(scale, 2).repeat_interleave(scale, 3)     # (n, C, H, W), nearest
    tiles = torch.cat([images[shown][:, None],
                       grey[..., None].expand(-1, -1, -1, -1, 3)], 1)       # (n, 1 + C, H, W, 3)
    save_grid(tiles.flatten(0, 1), path, nrow=1 + z.shape[1], scale=3)

def high_frequency_share(z):
    """How simple is the latent, as a number: the share of the spatial spectral energy of
    (N, C, h, w) latents above half the Nyquist frequency (mean per image and channel removed).
    Smooth latents, which diffuse more easily, have a small share; white noise about 0.81 at 8x8."""
    power = torch.fft.fft2(z - z.mean((2, 3), keepdim=True)).abs().pow(2)     # (N, C, h, w)
    fy = torch.fft.fftfreq(z.shape[2])                    # cycles per latent pixel, up to 0.5
    fx = torch.fft.fftfreq(z.shape[3])
    high = (fy[:, None] ** 2 + fx[None, :] ** 2).sqrt() > 0.25
    return float(power[..., high].sum() / power.sum())


@torch.no_grad()
def build_latent_cache(ae, digest, cache_path, device, batch_size=500, num_heldout=1000):
    """Encode the training set once (and its horizontal flips, unless stage 1 turned flips off)
    and num_heldout test images; standardise; reuse while autoencoder.pt is unchanged. A damaged
    cache is built again."""
    if cache_path.exists():
        try:
            cache = torch.load(cache_path, weights_only=True)
            if cache.get("autoencoder_sha256") == digest:
                return cache
        except Exception:
            print(f"{cache_path} is damaged; encoding the latents again", file=sys.stderr)
    config = ae["config"]
    encoder = Encoder(**autoencoder_kwargs(config)).to(device).eval()
    encoder.load_state_dict(ae["encoder"])
    # channels_last: faster convolutions (about 25% on a CPU), the same latents up to rounding
    encoder.to(memory_format=torch.channels_last)
    mean, std = (ae["latent_stats"][k][None, :, None, None] for k in ("mean", "std"))

    def encode(images, flip, desc):   # (N, H, W, 3) uint8 -> (N, C, h, w) standardised latents
        latents = []
        for i in tqdm(range(0, len(images), batch_size), desc=desc):
            x = to_model_input(images[i:i + batch_size]).to(device)
            x = (x.flip(3) if flip else x).contiguous(memory_format=torch.channels_last)
            with exact_float32(device):   # float32 everywhere: a CPU-built cache serves a GPU
                z = encoder(x).float().cpu()
            latents.append((z - mean) / std)
        return torch.cat(latents)

    data = load_data(config["data"], config["data_dir"], "train", config["image_size"])
    flips = (False, True) if config["flip"] else (False,)
    latents = torch.cat([encode(data.images, flip, "encoding flipped latents" if flip
                                else "encoding latents") for flip in flips])
    test = load_data(config["data"], config["data_dir"], "test", config["image_size"])
    idx = spread_indices(len(test.images), num_heldout)
    cache = {"autoencoder_sha256": digest, "latents": latents,
             "labels": data.labels.repeat(len(flips)), "class_names": data.class_names,
             "flip": len(flips) == 2,
             "heldout_latents": encode(test.images[idx], False, "encoding held-out test latents"),
             "heldout_labels": test.labels[idx]}
    save_checkpoint(cache, cache_path)
    return cache


# -----------------------------------------------------------------------------
# Training

def stage2_config(args, stage1, stage1_path):
    """Stage 1's configuration plus this stage's, or, with --resume, the checkpoint's."""
    if not stage1["finished"]:
        raise UserError(f"{stage1_path} stopped at step {stage1['step']} of "
                        f"{stage1['total_steps']}: finish it first (python stage1_encoder.py "
                        f"--run {args.run} --steps {stage1['total_steps']} --resume)")
    config = dict(stage1["config"], stage2_lr=args.lr, stage2_batch_size=args.batch_size,
                  stage2_seed=args.seed, joint=args.joint, gan_weight=args.gan_weight,
                  gan_start=args.gan_start, stage1_steps=stage1["step"], decoder_init="aux")
    if args.fresh_decoder or config["aux_width"] != 1:   # a narrower aux decoder: other shapes
        config["decoder_init"] = "fresh"
    ckpt = None
    if args.resume:   # the checkpoint's configuration; a typed flag may not change it
        flags = dict(stage2_lr="lr", stage2_batch_size="batch_size", stage2_seed="seed",
                     joint="joint", gan_weight="gan_weight", gan_start="gan_start",
                     decoder_init="fresh_decoder")
        run = Path(args.run)
        ckpt = resume_checkpoint(run / "autoencoder.pt", run / "log_stage2.jsonl", 2, args,
                                 config, flags)
        config = ckpt["config"]
    if config["joint"] and (config["aux_dropout"] != 0 or config["aux_width"] != 1):
        raise UserError(f"--joint continues an unweakened stage 1, but {stage1_path} was trained "
                        f"with --aux-dropout {config['aux_dropout']} --aux-width "
                        f"{config['aux_width']}; rerun stage 1 with --aux-dropout 0 --aux-width 1")
    return config, ckpt

def compile_decoder(decoder):
    """torch.compile the decoder but its last conv, which stays eager: the GAN's balance takes
    two gradients at that conv's weight per step, which a compiled backward cannot give (its
    buffers are freed after one use), and so only that one conv's backward is run for them."""
    body, last = torch.compile(decoder.layers[:-1]), decoder.layers[-1]
    return lambda z: last(body(z))

def train(args):
    """Train the full decoder on the frozen stage-1 encoder (or, with --joint, both together);
    write RUN/autoencoder.pt with the latent statistics, stage2_recon.png and latents.png."""
    device = pick_device(args.device)
    run = Path(args.run)
    stage1_path = (run / "stage1.pt").resolve()
    ckpt_path = run / "autoencoder.pt"
    stage1 = load_checkpoint(stage1_path, stage=1)
    config, ckpt = stage2_config(args, stage1, stage1_path)
    joint = config["joint"]
    train_data = load_data(config["data"], config["data_dir"], "train", config["image_size"])

    torch.manual_seed(config["stage2_seed"])
    encoder = Encoder(**autoencoder_kwargs(config)).to(device)
    encoder.load_state_dict(stage1["encoder"])
    decoder = Decoder(**autoencoder_kwargs(config)).to(device)   # full strength: no dropout
    if joint or config["decoder_init"] == "aux":   # dropout-only weakening: the same shapes
        decoder.load_state_dict(stage1["aux_decoder"])
    # The paper's second stage: the encoder is frozen, only the decoder learns. The joint
    # baseline instead keeps training the encoder and decoder together.
    encoder.requires_grad_(joint)
    params = [*encoder.parameters(), *decoder.parameters()] if joint else [*decoder.parameters()]
    optimizer = torch.optim.AdamW(params, lr=config["stage2_lr"], weight_decay=0.0,
                                  fused=device.type == "cuda")
    if joint and ckpt is None:   # a true continuation of stage 1's optimizer
        load_optimizer(optimizer, stage1["optimizer"], device)
        for group in optimizer.param_groups:
            group["lr"] = config["stage2_lr"]
    gan = (Adversary(config["gan_weight"], config["stage2_lr"], device)
           if config["gan_weight"] > 0 else None)
    step = 0
    if ckpt is not None:
        encoder.load_state_dict(ckpt["encoder"])
        decoder.load_state_dict(ckpt["decoder"])
        load_optimizer(optimizer, ckpt["optimizer"], device)
        if gan:
            gan.discriminator.load_state_dict(ckpt["discriminator"])
            load_optimizer(gan.optimizer, ckpt["d_optimizer"], device)
        step = ckpt["step"]
        print(f"resuming {ckpt_path} at step {step}", file=sys.stderr)
    else:
        clear_stage(run, stage=2)
    encoder.train(joint)   # a frozen encoder stays in eval mode
    decoder.train()
    gan_words = f", GAN weight {gan.weight} from step {config['gan_start']}" if gan else ""
    print(f"stage 2 ({'joint baseline' if joint else 'DAE, frozen encoder'}) on "
          f"{train_data.description}, device {device}, {precision_name(device)}, decoder "
          f"{count_params(decoder)}{gan_words}", file=sys.stderr)

    encode = torch.compile(encoder) if args.compile else encoder
    decode = compile_decoder(decoder) if args.compile else decoder
    scaler = grad_scaler(device)

    def checkpoint(metrics, stats=None):   # stats (and so a usable autoencoder.pt) once finished
        save_checkpoint({"stage": 2, "config": config, "encoder": encoder.state_dict(),
                         "decoder": decoder.state_dict(), "optimizer": optimizer.state_dict(),
                         "discriminator": gan.discriminator.state_dict() if gan else None,
                         "d_optimizer": gan.optimizer.state_dict() if gan else None,
                         "step": step, "latent_stats": stats, "stage1_path": str(stage1_path),
                         "metrics": metrics}, ckpt_path)

    progress = Progress(run / "log_stage2.jsonl", args.steps, step, config["stage2_batch_size"],
                        args.log_every, "stage 2", hint="--lr or --gan-weight" if gan else "--lr")
    try:
        while step < args.steps:
            batch_generator = seeded_generator(config["stage2_seed"], step, stream=2, num_streams=8)
            x, _ = sample_batch(train_data, config["stage2_batch_size"], batch_generator,
                                config["flip"])
            x = x.to(device, non_blocking=True)
            use_gan = gan is not None and step >= config["gan_start"]
            with autocast(device):
                with torch.set_grad_enabled(joint):
                    z = encode(x)   # (N, C, h, w); without gradients when the encoder is frozen
                x_hat = decode(z)
                rec_loss = reconstruction_loss(x_hat, x, config["loss"])
                loss, logs = rec_loss, {}
                if joint and config["scale_equivariance"]:   # the encoder learns: keep its term
                    logs["se_loss"] = scale_equivariance_loss(decode, z, x, config["loss"])
                    loss = loss + config["scale_equivariance"] * logs["se_loss"]
                if use_gan:
                    g_loss, gan_logs = gan.generator_loss(x_hat, rec_loss,
                                                          decoder.layers[-1].weight)
                    loss = loss + g_loss
                    logs.update(gan_logs)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            if use_gan:
                logs["d_loss"] = gan.update(x, x_hat, device, scaler)
            scaler.update()
            step += 1
            progress.update(step, loss=loss, rec_loss=rec_loss, **logs)
            if step % args.ckpt_every == 0 and step < args.steps:
                progress.stop_if_diverged()
                checkpoint({})
    except KeyboardInterrupt:
        raise Interrupted(ckpt_path) from None
    finally:
        progress.close()
    stats, metrics = measure_latent(encoder, decoder, train_data, config, device, run)
    metrics["stage1_test_psnr_aux"] = stage1["metrics"]["test_psnr_aux"]
    checkpoint(metrics, stats)
    save_loss_curve(run / "log_stage2.jsonl", run / "stage2_loss.png", "stage 2")
    print(f"wrote {ckpt_path}: test PSNR {metrics['test_psnr']:.2f} dB, latent std per channel "
          f"{[round(v, 3) for v in stats['std'].tolist()]}, high-frequency share of the latent "
          f"{metrics['latent_high_freq']:.3f} (picture: {run / 'latents.png'})", file=sys.stderr)

def measure_latent(encoder, decoder, train_data, config, device, run):
    """The finished autoencoder, measured: the latent statistics the DiT standardises with, the
    test PSNR (with stage2_recon.png and reconstructions.npz), latents.png and the latent's
    high-frequency share."""
    stats = latent_statistics(encoder, train_data, device)
    finite = all(torch.isfinite(stats[k]).all() for k in ("mean", "std"))
    if not finite or not stats["std"].min() > 0:
        raise UserError(f"the latents of {(run / 'stage1.pt').resolve()} are not finite or "
                        f"constant (std {stats['std'].tolist()}): train stage 1 again with a "
                        f"lower --lr; "
                        f"{run / 'autoencoder.pt'} was not written")
    test_data = load_data(config["data"], config["data_dir"], "test", config["image_size"])
    test_psnr = evaluate_reconstruction(encoder, decoder, test_data, device,
                                        run / "stage2_recon.png", run / "reconstructions.npz")
    images, z = standardised_latents(encoder, test_data, stats, device)
    show_latents(images, z, run / "latents.png")
    return stats, {"test_psnr": test_psnr, "latent_high_freq": high_frequency_share(z)}

# -----------------------------------------------------------------------------
# The paper's own measure of a latent: how well a decoder of limited capacity maps it onto the data

def probe(args):
    """Train a weakened decoder (--probe-width, --probe-dropout) from scratch on the frozen stage-1
    encoder and measure its test PSNR: a latent is close to the data, in the paper's sense, when a
    generator of limited capacity can map it there. Writes RUN/probe_w<W>_d<P>.json, its log and
    its picture; autoencoder.pt, if any, is left alone."""
    device = pick_device(args.device)
    run = Path(args.run)
    stage1 = load_checkpoint(run / "stage1.pt", stage=1)
    if not stage1["finished"]:
        raise UserError(f"{run / 'stage1.pt'} stopped at step {stage1['step']}: finish stage 1 "
                        f"first (python stage1_encoder.py --run {run} --resume)")
    config = stage1["config"]
    train_data = load_data(config["data"], config["data_dir"], "train", config["image_size"])
    torch.manual_seed(args.seed)
    encoder = Encoder(**autoencoder_kwargs(config)).to(device).eval().requires_grad_(False)
    encoder.load_state_dict(stage1["encoder"])
    decoder = Decoder(**autoencoder_kwargs(config), width=args.probe_width,
                      dropout=args.probe_dropout).to(device).train()
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=args.lr, weight_decay=0.0,
                                  fused=device.type == "cuda")
    scaler = grad_scaler(device)
    name = f"probe_w{args.probe_width:g}_d{args.probe_dropout:g}"
    print(f"probe of {run / 'stage1.pt'}: a fresh decoder of width {args.probe_width:g} and "
          f"dropout {args.probe_dropout:g} ({count_params(decoder)}), device {device}, "
          f"{precision_name(device)}", file=sys.stderr)
    (run / f"log_{name}.jsonl").unlink(missing_ok=True)
    progress = Progress(run / f"log_{name}.jsonl", args.steps, 0, args.batch_size,
                        args.log_every, "probe")
    for step in range(args.steps):
        batch_generator = seeded_generator(args.seed, step, stream=3, num_streams=8)
        x, _ = sample_batch(train_data, args.batch_size, batch_generator, config["flip"])
        x = x.to(device, non_blocking=True)
        with autocast(device):
            with torch.no_grad():
                z = encoder(x)                                            # (N, C, h, w)
            loss = reconstruction_loss(decoder(z), x, config["loss"])
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        progress.update(step + 1, loss=loss)
    progress.close()
    test_data = load_data(config["data"], config["data_dir"], "test", config["image_size"])
    test_psnr = evaluate_reconstruction(encoder, decoder, test_data, device,
                                        run / f"{name}_recon.png")
    result = dict(test_psnr=test_psnr, width=args.probe_width, dropout=args.probe_dropout,
                  steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    atomic_save(run / f"{name}.json", lambda tmp: Path(tmp).write_text(json.dumps(result) + "\n"))
    print(f"wrote {run / name}.json: test PSNR of the weak decoder {test_psnr:.2f} dB",
          file=sys.stderr)

def load_autoencoder(path):
    """A finished autoencoder.pt (with its latent statistics) and its sha256, which ties a DiT
    to it."""
    ae = load_checkpoint(path, stage=2)
    if ae["latent_stats"] is None:
        raise UserError(f"{path} is unfinished (stopped at step {ae['step']}, no latent statistics "
                        f"yet): finish it with stage2_decoder.py --resume")
    return ae, file_digest(path, "sha256")

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--run", required=True,
                   help="run folder of stage 1: reads stage1.pt, writes autoencoder.pt")
    p.add_argument("--joint", action="store_true", help="the baseline: keep training encoder and "
                   "stage-1 decoder together instead of freezing the encoder")
    p.add_argument("--fresh-decoder", action="store_true", help="DAE: start the decoder from "
                   "random weights, not from the auxiliary decoder (when its width is full)")
    p.add_argument("--gan-weight", type=float, default=GAN_WEIGHT,
                   help="weight of the PatchGAN hinge loss (0: off)")
    p.add_argument("--gan-start", type=int, default=GAN_START,
                   help="step at which the adversarial loss starts")
    p.add_argument("--probe-width", type=float, help="instead of training autoencoder.pt: the "
                   "paper's measure of the latent, the test PSNR of a fresh decoder this wide "
                   "(e.g. 0.25) trained for --steps on the frozen encoder")
    p.add_argument("--probe-dropout", type=float, default=0.0,
                   help="dropout inside the --probe-width decoder")
    add_training_flags(p, STEPS, BATCH_SIZE, LR, ckpt_every=1000, checkpoint="autoencoder.pt")
    refuse_torchrun("stage2_decoder.py")
    args = parse_training_args(p, argv, STEPS)
    if not 0 <= args.gan_weight < float("inf") or args.gan_start < 0:
        raise UserError("--gan-weight must be a finite number >= 0 and --gan-start >= 0")
    if args.probe_width is not None:
        if not 0 < args.probe_width <= 1 or not 0 <= args.probe_dropout < 1:
            raise UserError("--probe-width must be in (0, 1] and --probe-dropout in [0, 1)")
        if args.resume or args.overwrite or args.joint or args.gan_weight or args.compile:
            raise UserError("--probe-width trains a throwaway decoder: --resume, --overwrite, "
                            "--joint, --gan-weight and --compile do not apply to it")
        # resume=True: the probe writes only its own files, so a finished autoencoder.pt is fine
        with open_run(args.run, 2, resume=True, overwrite=False):
            return probe(args)
    with open_run(args.run, 2, args.resume, args.overwrite):
        train(args)


if __name__ == "__main__":
    run_cli(main, "--batch-size")
