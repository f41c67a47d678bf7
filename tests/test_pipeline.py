"""End to end: the five scripts, run as a user runs them (real command lines), on a small folder of
shapes with tiny settings; and the commands of README.md and RESULTS.md against the scripts' flags."""

import contextlib
import importlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
from conftest import ROOT, run_script


def test_five_stages_hand_each_file_on(shapes_folder, tmp_path):
    run = tmp_path / "runs" / "shapes"
    tiny_ae = ["--channels", "16", "--batch-size", "32", "--log-every", "10"]

    run_script("stage1_encoder.py", "--data", shapes_folder, "--run", run, "--steps", "30", *tiny_ae)
    stage1 = torch.load(run / "stage1.pt", weights_only=True)
    assert stage1["stage"] == 1 and stage1["data"] == str(shapes_folder)

    run_script("stage2_decoder.py", "--run", run, "--steps", "30", "--batch-size", "32",
               "--log-every", "10")
    ae = torch.load(run / "autoencoder.pt", weights_only=True)
    assert ae["stage"] == 2 and ae["stage1_path"] == str((run / "stage1.pt").resolve())
    assert ae["latent_stats"]["std"].shape == (4,)

    run_script("train_latent_dit.py", "--run", run, "--model", "DiT-T", "--patch", "4", "--steps",
               "20", "--batch-size", "32", "--log-every", "10")
    dit = torch.load(run / "dit.pt", weights_only=True)
    assert dit["stage"] == 3 and dit["autoencoder_path"] == str((run / "autoencoder.pt").resolve())
    assert dit["config"]["class_names"] == sorted(data.SHAPES_CLASSES)  # the folder's classes
    cache = torch.load(run / "latents.pt", weights_only=True)
    assert cache["heldout_latents"].shape[1:] == cache["latents"].shape[1:] == (4, 8, 8)
    assert 0 < dit["metrics"]["heldout_loss"] < 10

    run_script("sample.py", "--run", run, "--num", "40", "--steps", "4", "--per-class", "3")
    samples = np.load(run / "samples.npz")
    assert samples["arr_0"].shape == (40, 32, 32, 3) and samples["arr_1"].shape == (40,)
    assert Image.open(run / "samples.png").size == ((3 * 34 + 2) * 2, (10 * 34 + 2) * 2)

    result = run_script("fid.py", run / "samples.npz", shapes_folder, "--features", "classifier",
                        "--classifier-steps", "20", "--data-dir", tmp_path)
    lines = result.stdout.strip().splitlines()
    assert lines[-1].startswith("classifier-feature distance (NOT the standard FID")
    assert float(lines[-1].split()[-1]) > 0
    assert "class accuracy" in lines[-2]

    for name in ("log_stage1.jsonl", "log_stage2.jsonl", "log_dit.jsonl"):
        records = [json.loads(line) for line in (run / name).read_text().splitlines()]
        # a step's averages, or the DiT's end-of-training warning (20 steps may well draw seams)
        assert records and all({"step", "loss"} <= set(r) or set(r) == {"step", "warning"}
                               for r in records)
        assert "loss" in records[0]
    tile = 32 + 2  # each 32x32 image with its border; the pictures are shown at 2x
    for name in ("stage1_recon.png", "stage2_recon.png"):  # ten images above their reconstructions
        assert Image.open(run / name).size == ((10 * tile + 2) * 2, (2 * tile + 2) * 2)
    # eight samples for each of the ten classes
    assert Image.open(run / "dit_samples.png").size == ((8 * tile + 2) * 2, (10 * tile + 2) * 2)
    for name in ("stage1_loss.png", "stage2_loss.png", "dit_loss.png"):   # from each stage's log
        assert Image.open(run / name).size == (480, 300)


def docs_text():
    """README.md and RESULTS.md, the two pages a reader is shown, as one text."""
    return (ROOT / "README.md").read_text() + "\n" + (ROOT / "RESULTS.md").read_text()


def test_every_flag_in_the_readme_commands_exists():
    """Each `python <script>.py ...` of README.md and RESULTS.md, in a code block or inline, uses only
    flags that the script's --help lists: the commands of both pages run as written."""
    text = docs_text()
    commands = []
    for block in re.findall(r"```\n(.*?)```", text, re.S):
        commands += re.findall(
            r"python3? ((?:tests/)?\w+\.py)([^&|#;\n]*)", block.replace("\\\n", " ")
        )
    commands += re.findall(r"`python3? ((?:tests/)?\w+\.py)([^`]*)`", text.replace("\n", " "))
    assert len(commands) > 20   # both pages' commands were found, not a broken pattern
    helps = {}
    for script, args in commands:
        if script not in helps:   # the script's own --help, printed by its main() in this process
            module = importlib.import_module(Path(script).stem)
            with contextlib.redirect_stdout(io.StringIO()) as out, pytest.raises(SystemExit):
                module.main(["--help"])
            helps[script] = out.getvalue()
        for flag in re.findall(r"(?<!\S)(--[a-z][a-z0-9-]*)", args):
            assert flag in helps[script], f"{script} {flag}"


def test_every_picture_of_the_docs_is_committed_small_and_shown():
    """The pictures of README.md and RESULTS.md lie in assets/, each a PNG under 100 KB, and every
    file in assets/ is shown on one of the two pages."""
    text = docs_text()
    shown = set(re.findall(r"\]\((assets/[\w.-]+)\)", text))
    assert len(shown) >= 8
    for name in shown:
        path = ROOT / name
        assert path.is_file() and path.stat().st_size < 100_000, name
        assert Image.open(path).format == "PNG", name
    assert {f"assets/{p.name}" for p in (ROOT / "assets").iterdir()} == shown
