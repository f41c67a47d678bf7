"""
Benchmark the DiT's training step: images per second for SDPA and the hand-written attention, each
eager and under torch.compile, on random latents (no data, no run folder). On CUDA it also prints
the achieved TFLOP/s, from a count of the model's matmuls (tests/test_dit.py checks the count).

    python tests/benchmark_dit.py --model DiT-T --patch 4 --batch-size 128
    python tests/benchmark_dit.py --model DiT-S --patch 2 --batch-size 256 --device cuda
"""
import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from runs import UserError, autocast, pick_device, run_cli   # noqa: E402
from train_latent_dit import DIT_SIZES, build_dit               # noqa: E402

def dit_flops_per_image(config):
    """Forward FLOPs of one image, every matmul and conv counted (2 per multiply-add); training
    is about 3x this."""
    depth, d, _ = DIT_SIZES[config["model"]]
    tokens = (config["input_size"] // config["patch"]) ** 2
    patch_values = config["patch"] ** 2 * config["in_channels"]
    linear = 2 * tokens * d * (3 * d + d + 4 * d + 4 * d)    # qkv, proj, the MLP's two layers
    attention = 2 * 2 * tokens * tokens * d                  # q k^T and the weights times v
    block = linear + attention + 2 * d * 6 * d               # + adaLN
    embed = 2 * tokens * patch_values * d + 2 * (256 * d + d * d)   # patchify, timestep MLP
    final = 2 * d * 2 * d + 2 * tokens * d * patch_values    # adaLN, linear
    return depth * block + embed + final

def benchmark(args, warmup=5, steps=20):
    """Time training steps of every attention / compile variant; exit non-zero if none ran."""
    device = pick_device(args.device)
    config = dict(model=args.model, patch=args.patch, input_size=args.latent_size,
                  in_channels=args.latent_channels, num_classes=10)
    B = args.batch_size
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU ({torch.get_num_threads()} threads)"
    size = args.latent_size
    print(f"{config['model']}/{config['patch']}, latent {args.latent_channels}x{size}x{size}, "
          f"batch {B}, {'bf16' if device.type == 'cuda' else 'fp32'} on {name}")
    ran = 0
    for attn, compiled in ((a, c) for a in ("sdpa", "manual") for c in (False, True)):
        model = build_dit(dict(config, attn=attn)).to(device)
        net = torch.compile(model) if compiled else model
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
        x = torch.randn(B, args.latent_channels, size, size, device=device)
        t = torch.randint(0, 1000, (B,), device=device)
        y = torch.randint(0, 10, (B,), device=device)
        variant = f"  attn={attn:6s} compile={str(compiled):5s}"
        try:   # the first steps compile; a machine without a C++ compiler fails here
            for i in range(warmup + steps):
                if i == warmup:
                    sync()
                    t0 = time.perf_counter()
                with autocast(device):
                    loss = F.mse_loss(net(x, t, y).float(), x)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        except Exception as e:
            print(f"{variant}  failed: {e.__class__.__name__}: {str(e)[:80]}")
            continue
        sync()
        ran += 1
        seconds = (time.perf_counter() - t0) / steps
        line = f"{variant}  {B / seconds:9.1f} images/s  {1000 * seconds:8.1f} ms/step"
        if device.type == "cuda":
            line += f"  {3 * dit_flops_per_image(config) * B / seconds / 1e12:6.1f} TFLOP/s"
        print(line)
    if not ran:
        raise UserError("no variant of the benchmark ran (see the lines above)")

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", choices=list(DIT_SIZES), default="DiT-T", help="DiT size")
    p.add_argument("--patch", type=int, default=4, help="patch size on the latent")
    p.add_argument("--batch-size", type=int, default=128, help="latents per step")
    p.add_argument("--latent-size", type=int, default=8, help="latent side")
    p.add_argument("--latent-channels", type=int, default=4, help="latent channels")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where to run")
    args = p.parse_args(argv)
    if min(args.patch, args.batch_size, args.latent_size, args.latent_channels) < 1:
        raise UserError("--patch, --batch-size, --latent-size and --latent-channels must be "
                        "positive")
    if args.latent_size % args.patch:
        raise UserError(f"--patch {args.patch} does not divide --latent-size {args.latent_size}")
    benchmark(args)


if __name__ == "__main__":
    run_cli(main)
