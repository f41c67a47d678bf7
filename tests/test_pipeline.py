"""End to end: the five scripts, run as a user runs them, on the real shapes data with tiny settings."""
import json

import numpy as np
import torch
from PIL import Image

from conftest import run_script


def test_five_stages_hand_each_file_on(shapes_dir, tmp_path):
    run, data = tmp_path / "runs" / "shapes", ["--data-dir", shapes_dir]
    tiny_ae = ["--channels", "16", "--batch-size", "32", "--log-every", "10"]

    run_script("stage1_encoder.py", "--data", "shapes", *data, "--run", run, "--steps", "30", *tiny_ae)
    stage1 = torch.load(run / "stage1.pt", weights_only=True)
    assert stage1["stage"] == 1 and stage1["data"] == "shapes/train"

    run_script("stage2_decoder.py", "--run", run, "--steps", "30", "--batch-size", "32", "--log-every", "10")
    ae = torch.load(run / "autoencoder.pt", weights_only=True)
    assert ae["stage"] == 2 and ae["stage1_path"] == str((run / "stage1.pt").resolve())
    assert ae["latent_stats"]["std"].shape == (4,)

    run_script("train_latent_dit.py", "--run", run, "--model", "DiT-T", "--patch", "4", "--steps", "20",
               "--batch-size", "32", "--log-every", "10")
    dit = torch.load(run / "dit.pt", weights_only=True)
    assert dit["stage"] == 3 and dit["autoencoder_path"] == str((run / "autoencoder.pt").resolve())
    assert dit["config"]["class_names"][:2] == ["circle", "ring"]
    cache = torch.load(run / "latents.pt", weights_only=True)
    assert cache["heldout_latents"].shape[1:] == cache["latents"].shape[1:] == (4, 8, 8)
    assert 0 < dit["metrics"]["heldout_loss"] < 10

    run_script("sample.py", "--run", run, "--num", "40", "--steps", "4", "--per-class", "3")
    samples = np.load(run / "samples.npz")
    assert samples["arr_0"].shape == (40, 32, 32, 3) and samples["arr_1"].shape == (40,)
    assert Image.open(run / "samples.png").size == ((3 * 34 + 2) * 2, (10 * 34 + 2) * 2)

    result = run_script("fid.py", run / "samples.npz", "shapes", *data, "--split", "test", "--features", "classifier",
                        "--classifier-steps", "100")
    lines = result.stdout.strip().splitlines()
    assert lines[-1].startswith("classifier-feature distance (NOT the standard FID")
    assert float(lines[-1].split()[-1]) > 0
    assert "class accuracy" in lines[-2]

    for name in ("log_stage1.jsonl", "log_stage2.jsonl", "log_dit.jsonl"):
        records = [json.loads(line) for line in (run / name).read_text().splitlines()]
        assert records and all({"step", "loss"} <= set(r) for r in records)
    for name in ("stage1_recon.png", "stage2_recon.png", "dit_samples.png", "samples.png"):
        assert Image.open(run / name).size[0] > 0
