"""
The CIFAR-10 recipe on one GPU, measured in a few minutes: every stage at the recipe's default
sizes (stage 1 and 2: a 64-channel autoencoder at batch 128; DiT-S/1 at batch 256, EMA, bf16 or
float16) with --compile, on `shapes` (the same 32x32 images, offline), for a bounded number of
steps; then 1,000 samples and their class accuracy. It prints per stage: ms/step, images/s, peak
GPU memory, compile time (the first log window's extra time), whether the loss fell; and the whole
recipe's wall time extrapolated from them. No test imports it; it needs a CUDA GPU.

    python tests/gpu_check.py                      # about 5 minutes on one H200
    python tests/gpu_check.py --steps-scale 0.5    # fewer steps everywhere
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import sample                                                  # noqa: E402
import stage1_encoder                                          # noqa: E402
import stage2_decoder                                          # noqa: E402
import train_latent_dit                                        # noqa: E402
from runs import UserError, precision_name, run_cli            # noqa: E402

# stage: (module, steps measured here, the recipe's steps, batch size, log every)
STAGES = {"stage1": (stage1_encoder, 600, stage1_encoder.STEPS, stage1_encoder.BATCH_SIZE, 100),
          "stage2": (stage2_decoder, 600, stage2_decoder.STEPS, stage2_decoder.BATCH_SIZE, 100),
          "dit": (train_latent_dit, 1500, train_latent_dit.STEPS, train_latent_dit.BATCH_SIZE, 250)}


def measure(name, argv, log_path, log_every, cuda):
    """Run one stage's main() in this process: its log windows, wall time and peak memory."""
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    STAGES[name][0].main(argv)
    seconds = time.time() - t0
    log = [json.loads(line) for line in log_path.read_text().splitlines()]
    log = [record for record in log if "loss" in record]   # not the DiT's end-of-run warning
    steady = log[-1]["images_per_s"]               # the last window: compiled and warm
    batch = STAGES[name][3]
    ms_step = 1000 * batch / steady
    first_window = log_every * batch / log[0]["images_per_s"]   # includes the compile
    return {"ms_step": ms_step, "images_s": steady, "seconds": seconds,
            "compile_s": first_window - log_every * ms_step / 1000,
            "peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else float("nan"),
            "loss": (log[0]["loss"], log[-1]["loss"])}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps-scale", type=float, default=1.0, help="multiply every stage's steps")
    p.add_argument("--data-dir", default=str(ROOT / "data"), help="where shapes is built")
    p.add_argument("--run", help="run folder (default: a temporary one)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cpu: a smoke run of this script (with --steps-scale 0.02)")
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise UserError("gpu_check.py measures the GPU recipe: PyTorch sees no CUDA GPU here")
    run = Path(args.run or tempfile.mkdtemp(prefix="gpu_check_"))
    device = torch.device(args.device)
    gpu = torch.cuda.get_device_name() if cuda else "CPU"
    print(f"{gpu}, {precision_name(device)}, torch {torch.__version__}, run folder {run}",
          file=sys.stderr)
    results = {}
    for name, (module, steps, _, _, log_every) in STAGES.items():
        log_every = max(1, int(log_every * min(1.0, args.steps_scale)))
        steps = max(2 * log_every, int(steps * args.steps_scale) // log_every * log_every)
        common = ["--run", str(run), "--steps", str(steps), "--log-every", str(log_every),
                  "--ckpt-every", str(10 * steps), "--compile", "--device", args.device]
        extra = {"stage1": ["--data", "shapes", "--data-dir", args.data_dir, "--no-flip"],
                 "stage2": [], "dit": ["--model", "DiT-S"]}[name]
        log = run / {"stage1": "log_stage1.jsonl", "stage2": "log_stage2.jsonl",
                     "dit": "log_dit.jsonl"}[name]
        results[name] = dict(measure(name, common + extra, log, log_every, cuda), steps=steps)

    num = max(50, min(1000, int(1000 * args.steps_scale)))
    t0 = time.time()
    sample.main(["--run", str(run), "--num", str(num), "--cfg-scale", "1.5", "--compile",
                 "--device", args.device])
    sampling_s = time.time() - t0
    scored = subprocess.run([sys.executable, str(ROOT / "fid.py"), str(run / "samples.npz"),
                             "shapes", "--features", "classifier", "--data-dir", args.data_dir],
                            capture_output=True, text=True, cwd=ROOT)
    score = [line for line in scored.stdout.splitlines() if "accuracy" in line]

    print("\n| stage | steps here | ms/step | images/s | peak GiB | compile s | loss first -> last "
          "| fell |\n| --- | --- | --- | --- | --- | --- | --- | --- |")
    total = 0.0
    for name, r in results.items():
        first, last = r["loss"]
        print(f"| {name} | {r['steps']} | {r['ms_step']:.1f} | "
              f"{r['images_s']:,.0f} | {r['peak_gib']:.2f} | {r['compile_s']:.0f} | "
              f"{first:.4f} -> {last:.4f} | {'yes' if last < first else 'NO'} |")
        total += STAGES[name][2] * r["ms_step"] / 1000 + r["compile_s"]
    per_image = sampling_s / num   # includes the compile of the sampler: an upper bound
    print(f"\nsampling: {num:,} images (DDPM 50 steps, guidance 1.5) in {sampling_s:.0f} s; "
          f"{' '.join(score) or scored.stderr.strip()[-300:]}")
    print(f"the whole recipe, extrapolated (steps x ms/step + compile, 50,000 samples): "
          f"{(total + 50_000 * per_image) / 60:.0f} minutes, without the Inception FID")


if __name__ == "__main__":
    run_cli(main)
