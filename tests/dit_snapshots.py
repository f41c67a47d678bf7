"""
Look back at a DiT run: for each snapshot that `train_latent_dit.py --snapshot-every N` kept (and
the final dit.pt), the held-out x0 error at fixed timesteps (the training weights and the EMA's),
the largest attention logit of every block, and a grid of samples. Not imported by the tests.

    python train_latent_dit.py --run R ... --snapshot-every 500 --log-every 10
    python tests/dit_snapshots.py --run R     # -> R/snapshots.json, R/snapshot_stepNNNNNN.png,
                                              #    R/snapshots.png (every grid's first rows)
"""
import argparse
import json
import math
import sys
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from runs import load_checkpoint, run_cli                                    # noqa: E402
from sample import save_sample_grid, to_x0_eps                               # noqa: E402
from stage2_decoder import load_autoencoder                                  # noqa: E402
from train_latent_dit import build_dit, make_schedule, q_sample              # noqa: E402

TIMESTEPS = list(range(50, 1000, 100))   # 50, 150, ..., 950


@torch.no_grad()
def x0_error_by_timestep(model, latents, labels, config):
    """{t: mean squared error of the predicted x0} on the held-out latents, fixed noise."""
    alphas_cumprod = make_schedule(config["schedule"])
    errors = {}
    for t_value in TIMESTEPS:
        g = torch.Generator().manual_seed(t_value)
        noise = torch.randn(latents.shape, generator=g)
        t = torch.full((len(latents),), t_value, dtype=torch.long)
        x_t = q_sample(latents, t, noise, alphas_cumprod)
        x0, _ = to_x0_eps(model(x_t, t, labels), x_t, alphas_cumprod[t_value].item(),
                          config["target"])
        errors[t_value] = (x0 - latents).pow(2).mean().item()
    return errors


@torch.no_grad()
def attention_logits_by_block(model, latents, labels, config, t_value):
    """[largest q.k / sqrt(d) of each block] on the held-out latents noised to step t_value."""
    alphas_cumprod = make_schedule(config["schedule"])
    t = torch.full((len(latents),), t_value, dtype=torch.long)
    x_t = q_sample(latents, t, torch.randn(latents.shape, generator=torch.Generator().manual_seed(1)),
                   alphas_cumprod)
    largest = []
    def record(attn, inputs, output):
        q, k, _ = attn.queries_keys_values(inputs[0])
        largest.append(((q @ k.transpose(-2, -1)).amax() / math.sqrt(q.shape[-1])).item())
    hooks = [block.attn.register_forward_hook(record) for block in model.blocks]
    model(x_t, t, labels)
    for hook in hooks:
        hook.remove()
    return largest


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="a run folder with dit_step*.pt and dit.pt")
    p.add_argument("--num", type=int, default=500, help="held-out latents to measure on")
    p.add_argument("--rows", type=int, default=4, help="class rows of each grid in snapshots.png")
    args = p.parse_args(argv)
    run = Path(args.run)
    cache = torch.load(run / "latents.pt", weights_only=True)
    latents = cache["heldout_latents"][:args.num].float()
    labels = cache["heldout_labels"][:args.num]
    ae, _ = load_autoencoder(run / "autoencoder.pt")
    report = []
    snapshots = sorted(run.glob("dit_step*.pt"))
    final = load_checkpoint(run / "dit.pt", stage=3)
    if not snapshots or torch.load(snapshots[-1], weights_only=True)["step"] != final["step"]:
        snapshots.append(run / "dit.pt")   # the last snapshot is dit.pt when the steps match
    for path in snapshots:
        ckpt = load_checkpoint(path, stage=3)
        entry = {"step": ckpt["step"], "file": path.name}
        for weights in ("model", "ema"):
            net = build_dit(ckpt["config"]).eval()
            net.load_state_dict(ckpt[weights])
            entry[f"x0_error_{weights}"] = x0_error_by_timestep(net, latents, labels,
                                                                ckpt["config"])
            entry[f"attn_logit_{weights}"] = {t: attention_logits_by_block(
                net, latents, labels, ckpt["config"], t) for t in (50, 500, 950)}
        save_sample_grid(net, ae, ckpt["config"], run / f"snapshot_step{ckpt['step']:06d}.png",
                         torch.device("cpu"))
        report.append(entry)
        print(json.dumps({"step": entry["step"], "x0_error_ema": {
            t: round(e, 4) for t, e in entry["x0_error_ema"].items()}}), file=sys.stderr)
    (run / "snapshots.json").write_text(json.dumps(report, indent=1))
    strip(run, [entry["step"] for entry in report], args.rows)


def strip(run, steps, rows):
    """R/snapshots.png: the first `rows` class rows of every snapshot's grid, side by side."""
    grids = [Image.open(run / f"snapshot_step{step:06d}.png") for step in dict.fromkeys(steps)]
    width, height = grids[0].size
    tile = (width // 2 - 2) // 8   # a grid row: 8 images with 2-pixel borders, shown at 2x
    cut = 2 * (2 + rows * tile)
    picture = Image.new("RGB", (len(grids) * (width + 8) - 8, cut), "white")
    for i, grid in enumerate(grids):
        picture.paste(grid.crop((0, 0, width, cut)), (i * (width + 8), 0))
    picture.save(run / "snapshots.png")


if __name__ == "__main__":
    run_cli(main)
