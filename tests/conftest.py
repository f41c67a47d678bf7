"""Shared test helpers: run a script (as a command line, or its main() in this process), and
small shapes data and tiny runs built once."""

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def run_script(script, *args, check=True):
    """Run one of the project's scripts in a subprocess on the CPU; returns the CompletedProcess."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="2")
    result = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{script} {' '.join(map(str, args))} failed:\n{result.stderr[-3000:]}"
        )
    return result


def run_main(script, *args, capsys=None):
    """Run a script's main() in this process, as its command line would (no interpreter start-up:
    the tests of one stage use this; the end-to-end test runs the real command lines). Returns
    what it printed to stdout when capsys is given."""
    module = importlib.import_module(Path(script).stem)
    if capsys is not None:
        capsys.readouterr()
    try:
        module.main([str(a) for a in args])
    except SystemExit as e:
        if e.code:
            raise AssertionError(f"{script} {' '.join(map(str, args))} exited with {e.code}")
    return capsys.readouterr().out if capsys is not None else None


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory):
    """A data folder holding the cached shapes dataset (built once: about 6 s)."""
    import data

    data_dir = tmp_path_factory.mktemp("data")
    data.load_shapes(data_dir, "train")
    return data_dir


@pytest.fixture(scope="session")
def shapes_folder(tmp_path_factory):
    """A small folder of shapes (20 PNGs in each of 10 class sub-folders): fast test data."""
    from PIL import Image
    import data

    folder = tmp_path_factory.mktemp("shapes_folder")
    images, labels = data.make_shapes(200, seed=3)
    for i, (image, label) in enumerate(zip(images, labels)):
        path = folder / data.SHAPES_CLASSES[label] / f"{i:04d}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(image).save(path)
    return folder


@pytest.fixture(scope="session")
def autoencoder_run(shapes_folder, tmp_path_factory):
    """A tiny DAE (stage 1 + stage 2) on the small shapes folder: a run with autoencoder.pt."""
    run = tmp_path_factory.mktemp("ae_run")
    run_main("stage1_encoder.py", "--data", shapes_folder, "--run", run, "--steps", "20",
             "--channels", "16", "--batch-size", "16")
    run_main("stage2_decoder.py", "--run", run, "--steps", "20", "--batch-size", "16")
    return run


def copy_run(src, dst, *names):
    """A fresh run folder holding copies of some files of another one."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in names:
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


@pytest.fixture(scope="session")
def dit_run(autoencoder_run, tmp_path_factory):
    """A tiny DiT trained for a few steps on the tiny autoencoder: a run folder with dit.pt."""
    run = copy_run(autoencoder_run, tmp_path_factory.mktemp("dit_run"), "autoencoder.pt")
    run_main("train_latent_dit.py", "--run", run, "--model", "DiT-N", "--patch", "4", "--steps",
             "10", "--batch-size", "16")
    return run
