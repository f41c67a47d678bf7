"""Every user mistake and fault ends in one sentence: a non-zero exit, one `error:` line (the last
line of stderr), no traceback, and every file of the run folder byte-identical afterwards (nothing
new, nothing half-written, nothing of an earlier run lost). One table of named cases, run through
the scripts' real main() in this process (fast), plus a full disk, a real Ctrl-C, two processes on
one run folder and a crafted data file that must not run code."""
import errno
import hashlib
import io
import json
import os
import pickle
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import runs
import fid
import sample
import stage1_encoder as s1
import stage2_decoder as s2
import train_latent_dit as dit
from conftest import ROOT, copy_run, run_script

SCRIPTS = {"stage1": s1, "stage2": s2, "dit": dit, "sample": sample, "fid": fid}
TINY_S1 = ["--channels", "16", "--batch-size", "8", "--steps", "3", "--log-every", "1"]


def run_as_command(script, args, capsys):
    """Run a script's main() as its command line does; returns (exit status, stderr)."""
    capsys.readouterr()
    try:
        runs.run_cli(lambda: SCRIPTS[script].main([str(a) for a in args]))
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def files(folder):
    """{relative path: sha256} of every file under folder."""
    if not folder.exists():
        return {}
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# --- the setups: each prepares files under tmp from the suite's tiny runs (fx) ------------------

def copy(run_name, *names):
    """Copy files of a tiny run (fx["ae"] or fx["dit"]) into tmp/run."""
    return lambda tmp, fx: copy_run(fx[run_name], tmp / "run", *names)


def write(path, contents):
    """Write bytes or text to tmp/path."""
    def setup(tmp, fx):
        (tmp / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp / path).write_bytes(contents if isinstance(contents, bytes) else contents.encode())
    return setup


def rename(path, new_path):
    return lambda tmp, fx: (tmp / path).rename(tmp / new_path)


def mkdir(path):
    return lambda tmp, fx: (tmp / path).mkdir(parents=True)


def edited_checkpoint(run_name, name, **changes):
    """tmp/run/name: a copy of a tiny run's checkpoint with some entries changed."""
    def setup(tmp, fx):
        ckpt = torch.load(fx[run_name] / name, weights_only=True)
        (tmp / "run").mkdir(exist_ok=True)
        torch.save({**ckpt, **changes}, tmp / "run" / name)
    return setup


def nan_weights(run_name, name, key):
    """tmp/run/name: a copy of a checkpoint whose first tensor in `key` is NaN."""
    def setup(tmp, fx):
        ckpt = torch.load(fx[run_name] / name, weights_only=True)
        first = next(iter(ckpt[key]))
        ckpt[key][first] = torch.full_like(ckpt[key][first], float("nan"))
        (tmp / "run").mkdir(exist_ok=True)
        torch.save(ckpt, tmp / "run" / name)
    return setup


def npz(path, **arrays):
    return lambda tmp, fx: np.savez(tmp / path, **arrays)


def read_only_folders(tmp, fx):
    def refuse(*args):   # the first file a stage creates in its run folder is the lock
        raise OSError(errno.EROFS, "Read-only file system")
    fx["monkeypatch"].setattr(runs, "take_lock", refuse)


def live_lock(tmp, fx):
    """tmp/run/.lock held by a process that runs: this test's own."""
    (tmp / "run").mkdir(exist_ok=True)
    (tmp / "run" / ".lock").write_text(str(os.getpid()))


def image(path, array, mode=None):
    """An image file at tmp/path (its folder created)."""
    def setup(tmp, fx):
        (tmp / path).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array, mode).save(tmp / path)
    return setup


class Payload:
    """What a crafted pickle would run: it writes a marker file."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def crafted_cifar(tmp, fx):
    """A CIFAR-format archive (md5 made to match) whose batches run code when unpickled plainly."""
    archive = tmp / "data" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
            blob = pickle.dumps({b"data": Payload(tmp / "pwned"), b"labels": [0]}, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    fx["monkeypatch"].setattr(data, "CIFAR_MD5", hashlib.md5(archive.read_bytes()).hexdigest())


@dataclass
class Case:
    """`args` may name {tmp}, {run} (= {tmp}/run), {folder} (the shapes folder) and {data} (the
    shapes data dir); `watch` is the folder that must not change ("" for none)."""
    script: str
    args: list
    words: list
    setup: list = field(default_factory=list)
    watch: str = "{run}"


ZEROS = np.zeros((1, 32, 32, 3), np.uint8)
CLASSIFIER = ["--features", "classifier", "--classifier-data", "shapes", "--data-dir", "{data}"]

CASES = {
    # stage 1: data and flags
    "stage1 unknown data": Case(
        "stage1", ["--data", "does/not/exist", "--run", "{run}"], ["neither cifar10"]),
    "stage1 empty folder": Case(
        "stage1", ["--data", "{tmp}/empty", "--run", "{run}"], ["no images"], [mkdir("empty")]),
    "stage1 --channels 2": Case("stage1", ["--channels", "2", "--run", "{run}"], ["--channels"]),
    "stage1 --image-size 0": Case(
        "stage1", ["--data", "{folder}", "--image-size", "0", "--run", "{run}"],
        ["--image-size 0"]),
    "stage1 --log-every 0": Case("stage1", ["--log-every", "0", "--run", "{run}"], ["--log-every"]),
    "stage1 --ckpt-every 0": Case(
        "stage1", ["--ckpt-every", "0", "--run", "{run}"], ["--ckpt-every"]),
    "stage1 --lr -1": Case("stage1", ["--lr", "-1", "--run", "{run}"], ["--lr"]),
    "stage1 --aux-dropout 1.5": Case(
        "stage1", ["--aux-dropout", "1.5", "--run", "{run}"], ["--aux-dropout"]),
    "stage1 --scale-equivariance -1": Case(
        "stage1", ["--scale-equivariance", "-1", "--run", "{run}"], ["--scale-equivariance"]),
    "stage1 --run is a file": Case(
        "stage1", ["--data", "{folder}", "--run", "{tmp}/file"], ["is a file"],
        [write("file", "x")], watch="{tmp}"),
    "stage1 --run inside a file": Case(
        "stage1", ["--data", "{folder}", *TINY_S1, "--run", "{tmp}/file/run"],
        ["cannot write into the run folder"], [write("file", "x")], watch="{tmp}"),
    "stage1 read-only run folder": Case(
        "stage1", ["--data", "{folder}", *TINY_S1, "--run", "{run}"],
        ["cannot write into the run folder", "Read-only file system"], [read_only_folders]),
    "stage1 --resume without checkpoint": Case(
        "stage1", ["--resume", "--run", "{run}"], ["does not exist"]),
    "stage1 diverges (--lr 1e9)": Case(
        "stage1", ["--data", "{folder}", *TINY_S1, "--steps", "30", "--lr", "1e9", "--ckpt-every",
        "1", "--run", "{run}"], ["diverged", "lower --lr"], watch=""),
    "stage1 crafted CIFAR batch": Case(
        "stage1", ["--data", "cifar10", "--data-dir", "{tmp}/data", *TINY_S1, "--run", "{run}"],
        ["not allowed in a CIFAR-10 batch"], [crafted_cifar]),
    "stage1 corrupt CIFAR archive": Case(
        "stage1", ["--data", "cifar10", "--data-dir", "{tmp}/data", "--run", "{run}"],
        ["wrong md5"], [write("data/cifar-10-python.tar.gz", b"junk")]),
    "stage1 --resume of a finished run": Case(
        "stage1", ["--resume", "--steps", "20", "--run", "{run}"], ["already at step 20"],
        [copy("ae", "stage1.pt")]),
    "stage1 fresh run into a finished run": Case(
        "stage1", ["--data", "{folder}", *TINY_S1, "--run", "{run}"], ["already holds stage1.pt",
        "--resume", "--overwrite"], [copy("ae", "stage1.pt", "log_stage1.jsonl",
                                          "stage1_recon.png")]),
    "stage1 fresh run under later stages": Case(
        "stage1", ["--data", "{folder}", *TINY_S1, "--run", "{run}"], ["autoencoder.pt and dit.pt"],
        [copy("dit", "autoencoder.pt", "dit.pt", "log_dit.jsonl")]),
    "stage1 --resume --overwrite": Case(
        "stage1", ["--resume", "--overwrite", "--run", "{run}"], ["only one"],
        [copy("ae", "stage1.pt")]),
    "stage1 --resume with other flags": Case(
        "stage1", ["--resume", "--steps", "30", "--lr", "5", "--channels", "64", "--run", "{run}"],
        ["--channels (64", "--lr (5.0", "--steps may be raised"],
        [copy("ae", "stage1.pt", "log_stage1.jsonl")]),
    "stage1 run folder locked by a live process": Case(
        "stage1", ["--data", "{folder}", *TINY_S1, "--resume", "--steps", "30", "--run", "{run}"],
        ["another process", "PID"], [copy("ae", "stage1.pt"), live_lock]),
    "stage1 --seed 2**64": Case("stage1", ["--seed", str(2 ** 64), "--run", "{run}"], ["--seed"]),
    "stage1 out of memory (--channels 1000000)": Case(
        "stage1", ["--data", "{folder}", *TINY_S1, "--channels", "1000000", "--run", "{run}"],
        ["out of memory", "lower --batch-size"]),
    "stage1 --image-size 100000": Case(
        "stage1", ["--data", "{folder}", "--image-size", "100000", "--run", "{run}"],
        ["--image-size 100000"]),
    "stage1 float TIFF": Case(
        "stage1", ["--data", "{tmp}/float", *TINY_S1, "--run", "{run}"], ["floating-point"],
        [image("float/a.tif", np.ones((8, 8), np.float32), "F")]),
    "stage1 folder mixing images and class folders": Case(
        "stage1", ["--data", "{tmp}/mixed", *TINY_S1, "--run", "{run}"], ["mixes images"],
        [image("mixed/a.png", ZEROS[0]), image("mixed/cats/b.png", ZEROS[0])]),
    "stage1 --resume of an older checkpoint": Case(
        "stage1", ["--resume", "--steps", "30", "--run", "{run}"], ["older version",
        "train it again"], [edited_checkpoint("ae", "stage1.pt", format=None)]),
    # stage 2: the checkpoint it is handed
    "stage2 no stage1.pt": Case("stage2", ["--run", "{run}"], ["does not exist"]),
    "stage2 wrong stage": Case(
        "stage2", ["--run", "{run}"], ["stage-3"], [edited_checkpoint("dit", "dit.pt"),
                                                     rename("run/dit.pt", "run/stage1.pt")]),
    "stage2 garbage checkpoint": Case(
        "stage2", ["--run", "{run}"], ["not a checkpoint"], [write("run/stage1.pt", "junk")]),
    "stage2 unfinished stage1": Case(
        "stage2", ["--run", "{run}"], ["stopped at step 5 of 60", "--steps 60 --resume"],
        [edited_checkpoint("ae", "stage1.pt", finished=False, step=5, total_steps=60)]),
    "stage2 NaN stage1": Case(
        "stage2", ["--run", "{run}"], ["NaN or infinite", "lower --lr"],
        [nan_weights("ae", "stage1.pt", "encoder")]),
    "stage2 --joint on a weakened stage 1": Case(
        "stage2", ["--joint", "--run", "{run}"], ["--aux-dropout 0 --aux-width 1"],
        [copy("ae", "stage1.pt")]),
    "stage2 --run is a file": Case(
        "stage2", ["--run", "{tmp}/file"], ["is a file"], [write("file", "x")], watch="{tmp}"),
    "stage2 fresh run into a finished run": Case(
        "stage2", ["--steps", "3", "--run", "{run}"], ["already holds autoencoder.pt"],
        [copy("ae", "stage1.pt", "autoencoder.pt", "log_stage2.jsonl", "latents.png")]),
    "stage2 --resume with other flags": Case(
        "stage2", ["--resume", "--steps", "40", "--lr", "5", "--joint", "--run", "{run}"],
        ["--lr (5.0", "--joint (True"], [copy("ae", "stage1.pt", "autoencoder.pt")]),
    "stage2 --gan-weight inf": Case(
        "stage2", ["--gan-weight", "inf", "--run", "{run}"], ["--gan-weight"],
        [copy("ae", "stage1.pt")]),
    "stage2 --resume of a finished run": Case(
        "stage2", ["--resume", "--steps", "20", "--run", "{run}"], ["already at step 20"],
        [copy("ae", "stage1.pt", "autoencoder.pt")]),
    # the DiT
    "dit no autoencoder.pt": Case("dit", ["--run", "{run}"], ["stage2_decoder.py"]),
    "dit --patch 0": Case(
        "dit", ["--patch", "0", "--run", "{run}"], ["--patch"], [copy("ae", "autoencoder.pt")]),
    "dit --patch 3 (before the cache)": Case(
        "dit", ["--patch", "3", "--run", "{run}"], ["--patch 3"], [copy("ae", "autoencoder.pt")]),
    "dit unfinished autoencoder": Case(
        "dit", ["--run", "{run}"], ["unfinished", "--resume"],
        [edited_checkpoint("ae", "autoencoder.pt", latent_stats=None)]),
    "dit --resume after the autoencoder changed": Case(
        "dit", ["--resume", "--steps", "50", "--run", "{run}"], ["sha256"], [copy("dit", "dit.pt"),
        edited_checkpoint("ae", "autoencoder.pt", step=99)]),
    "dit --resume of a finished run": Case(
        "dit", ["--resume", "--steps", "10", "--run", "{run}"], ["already at step 10"],
        [copy("dit", "autoencoder.pt", "dit.pt")]),
    "dit --ema-decay 1.5": Case("dit", ["--ema-decay", "1.5", "--run", "{run}"], ["--ema-decay"]),
    "dit --min-snr-gamma nan": Case(
        "dit", ["--min-snr-gamma", "nan", "--run", "{run}"], ["--min-snr-gamma"]),
    "dit --run is a file": Case(
        "dit", ["--run", "{tmp}/file"], ["is a file"], [write("file", "x")], watch="{tmp}"),
    "dit fresh run into a finished run (--lr 1e10)": Case(
        "dit", ["--lr", "1e10", "--run", "{run}"], ["already holds dit.pt", "--overwrite"],
        [copy("dit", "autoencoder.pt", "dit.pt", "log_dit.jsonl", "latents.pt")]),
    "dit --resume with other flags": Case(
        "dit", ["--resume", "--steps", "50", "--lr", "5", "--patch", "2", "--run", "{run}"],
        ["--lr (5.0", "--patch (2"], [copy("dit", "autoencoder.pt", "dit.pt")]),
    "dit diverges and stays finite (--lr 1e10)": Case(
        "dit", ["--model", "DiT-N", "--patch", "4", "--batch-size", "8", "--steps", "20",
                "--lr", "1e10", "--ckpt-every", "1", "--run", "{run}"], ["diverged", "lower --lr"],
        [copy("dit", "autoencoder.pt")], watch=""),
    # sampling
    "sample no dit.pt": Case("sample", ["--run", "{run}"], ["train_latent_dit.py"]),
    "sample --eta 1.5": Case(
        "sample", ["--eta", "1.5", "--run", "{run}"], ["--eta"],
        [copy("dit", "autoencoder.pt", "dit.pt")]),
    "sample --steps 3000": Case(
        "sample", ["--steps", "3000", "--run", "{run}"], ["1000 steps"],
        [copy("dit", "autoencoder.pt", "dit.pt")]),
    "sample --cfg-scale nan": Case(
        "sample", ["--cfg-scale", "nan", "--run", "{run}"], ["--cfg-scale"],
        [copy("dit", "autoencoder.pt", "dit.pt")]),
    "sample --cfg-scale 1e30": Case(
        "sample", ["--cfg-scale", "1e30", "--run", "{run}"], ["--cfg-scale"],
        [copy("dit", "autoencoder.pt", "dit.pt")]),
    "sample --seed -1": Case("sample", ["--seed", "-1", "--run", "{run}"], ["--seed"]),
    "sample --run is a file": Case(
        "sample", ["--run", "{tmp}/file"], ["is a file"], [write("file", "x")], watch="{tmp}"),
    "sample non-finite EMA weights": Case(
        "sample", ["--run", "{run}"], ["NaN or infinite", "'ema'"],
        [copy("dit", "autoencoder.pt"), nan_weights("dit", "dit.pt", "ema")]),
    "sample --out into a missing folder": Case(
        "sample", ["--num", "4", "--out", "{tmp}/nowhere/s.npz", "--run", "{run}"],
        ["does not exist"], [copy("dit", "autoencoder.pt", "dit.pt")]),
    "sample another run's autoencoder": Case(
        "sample", ["--run", "{run}"], ["sha256"], [copy("dit", "dit.pt"),
        edited_checkpoint("ae", "autoencoder.pt", step=99)]),
    "sample wrong checkpoint": Case(
        "sample", ["--run", "{run}"], ["stage-2"], [edited_checkpoint("dit", "autoencoder.pt"),
                                                     rename("run/autoencoder.pt", "run/dit.pt")]),
    "sample unknown class": Case(
        "sample", ["--class", "unicorn", "--run", "{run}"], ["unicorn"],
        [copy("dit", "autoencoder.pt", "dit.pt")]),
    # fid
    "fid --batch-size 0": Case(
        "fid", ["a.npz", "b.npz", "--batch-size", "0"], ["--batch-size"], watch="{tmp}"),
    "fid one image": Case(
        "fid", ["{tmp}/one.npz", "{tmp}/one.npz", *CLASSIFIER], ["at least 2 images"],
        [npz("one.npz", arr_0=ZEROS)], watch="{tmp}"),
    "fid object-array npz": Case(
        "fid", ["{tmp}/obj.npz", "{tmp}/obj.npz", *CLASSIFIER], ["not a readable npz"],
        [npz("obj.npz", arr_0=np.array([{"a": 1}], dtype=object))], watch="{tmp}"),
    "fid garbage npz": Case(
        "fid", ["{tmp}/junk.npz", "{tmp}/junk.npz", *CLASSIFIER], ["not a readable npz"],
        [write("junk.npz", b"junk")], watch="{tmp}"),
    "fid --save-stats into a missing folder": Case(
        "fid", ["shapes", "{tmp}/nowhere/stats.npz", "--save-stats"], ["existing folder"],
        watch="{tmp}"),
    "fid npz without images": Case(
        "fid", ["{tmp}/bad.npz", "{tmp}/bad.npz"], ["arr_0"], [npz("bad.npz", x=np.zeros(3))],
        watch="{tmp}"),
    "fid unknown source": Case("fid", ["nowhere.npz", "shapes"], ["neither"], watch="{tmp}"),
    "fid statistics of the wrong shape": Case(
        "fid", ["{tmp}/s.npz", "{tmp}/s.npz"], ["square matrix"],
        [npz("s.npz", mu=np.zeros(4), sigma=np.zeros((3, 3)))], watch="{tmp}"),
    "fid statistics with NaN": Case(
        "fid", ["{tmp}/s.npz", "{tmp}/s.npz"], ["finite"],
        [npz("s.npz", mu=np.full(4, np.nan), sigma=np.eye(4))], watch="{tmp}"),
    "fid statistics of other features": Case(
        "fid", ["{tmp}/a.npz", "{tmp}/b.npz"], ["sizes 4 and 3"],
        [npz("a.npz", mu=np.zeros(4), sigma=np.eye(4)), npz("b.npz", mu=np.zeros(3),
                                                            sigma=np.eye(3))], watch="{tmp}"),
    "fid labels that do not match the images": Case(
        "fid", ["{tmp}/four.npz", "{tmp}/four.npz", *CLASSIFIER], ["one label per image"],
        [npz("four.npz", arr_0=np.zeros((4, 32, 32, 3), np.uint8), arr_1=np.zeros(3))],
        watch="{tmp}"),
    "fid missing weights": Case(
        "fid", ["{tmp}/four.npz", "{tmp}/four.npz", "--weights", "{tmp}/missing.pth"],
        ["does not exist"], [npz("four.npz", arr_0=np.zeros((4, 32, 32, 3), np.uint8))],
        watch="{tmp}"),
}


@pytest.fixture
def fixtures(shapes_folder, autoencoder_run, dit_run, shapes_dir, monkeypatch):
    return {"folder": shapes_folder, "ae": autoencoder_run, "dit": dit_run, "data": shapes_dir,
            "monkeypatch": monkeypatch}


@pytest.mark.parametrize("name", list(CASES))
def test_every_mistake_ends_in_one_sentence(name, fixtures, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)   # nothing may land in the working directory either
    case = CASES[name]
    for step in case.setup:
        step(tmp_path, fixtures)
    paths = dict(tmp=tmp_path, run=tmp_path / "run", folder=fixtures["folder"],
                 data=fixtures["data"])
    args = [str(a).format(**paths) for a in case.args]
    watched = case.watch.format(**paths) if case.watch else None
    before = files(Path(watched)) if watched else None
    code, err = run_as_command(case.script, args, capsys)
    assert code == 1, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), err
    assert sum(line.startswith("error:") for line in lines) == 1, err
    for word in case.words:
        assert word in lines[-1], lines[-1]
    if watched:
        assert files(Path(watched)) == before, "the run folder changed"
    diverged = "diverges" in name
    diverged_ckpts = [p for p in tmp_path.rglob("*.pt") if p.name in ("stage1.pt", "dit.pt")]
    for ckpt in diverged_ckpts if diverged else []:   # only finite weights were kept
        state = torch.load(ckpt, weights_only=True)
        weights = [v for key in ("encoder", "model", "ema") for v in state.get(key, {}).values()]
        assert weights and all(torch.isfinite(v).all() for v in weights if v.is_floating_point())
    assert not list(tmp_path.rglob(".*.tmp*")), "a temp file was left behind"
    assert not (tmp_path / "pwned").exists(), "code from a data file ran"


def test_a_full_disk_keeps_the_previous_checkpoint(shapes_folder, autoencoder_run, tmp_path, capsys,
                                                   monkeypatch):
    run = copy_run(autoencoder_run, tmp_path / "run", "stage1.pt")
    before = (run / "stage1.pt").read_bytes()

    def full_disk(obj, path):   # what torch.save does when the disk fills: part of a file, an error
        open(path, "wb").write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0")
    monkeypatch.setattr(torch, "save", full_disk)
    code, err = run_as_command("stage1", ["--resume", "--steps", "22", "--run", run], capsys)
    assert code == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: could not write")
    assert "disk may be full" in err
    assert (run / "stage1.pt").read_bytes() == before   # the earlier checkpoint is untouched
    assert not list(run.glob(".*"))                     # and no temp file is left


def test_one_writer_at_a_time_ctrl_c_and_resume(shapes_folder, tmp_path):
    run = tmp_path / "run"
    args = [sys.executable, str(ROOT / "stage1_encoder.py"), "--data", str(shapes_folder),
            "--run", str(run), "--channels", "16", "--batch-size", "8", "--steps", "100000",
            "--log-every", "1", "--ckpt-every", "5"]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="2")
    def default_ctrl_c():   # as a terminal starts a program: SIGINT at its default, not blocked
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    process = subprocess.Popen(args, env=env, stderr=subprocess.PIPE, text=True,
                               preexec_fn=default_ctrl_c)
    deadline = time.time() + 120
    def logged_steps():   # complete lines only: the writer may be half-way through one
        text = (run / "log_stage1.jsonl").read_text() if (run / "log_stage1.jsonl").exists() else ""
        return [json.loads(line)["step"] for line in text.splitlines(keepends=True)
                if line.endswith("\n")]
    try:
        while not (run / "stage1.pt").exists():
            assert time.time() < deadline and process.poll() is None
            time.sleep(0.02)
        # a second process on the same run folder (a second seed started by mistake) is refused
        second = run_script("stage1_encoder.py", "--data", shapes_folder, "--run", run, "--steps",
                            "100001", "--resume", check=False)
        assert second.returncode == 1 and "Traceback" not in second.stderr
        assert f"another process (PID {process.pid}) is writing to {run}" in second.stderr
        # interrupt a step or two after a checkpoint (every 5 steps): steps were logged after it
        while (not (run / "stage1.pt").exists() or len(logged_steps()) < 7
               or logged_steps()[-1] % 5 not in (1, 2)):
            assert time.time() < deadline and process.poll() is None
            time.sleep(0.02)
        process.send_signal(signal.SIGINT)
        err = process.communicate(timeout=60)[1]
    finally:   # a failed test must not leave a 100,000-step run behind, slowing every later test
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 130 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: stopped by Ctrl-C")
    assert "stage1.pt" in last and "--resume" in last
    saved = torch.load(run / "stage1.pt", weights_only=True)["step"]
    log_path = run / "log_stage1.jsonl"
    logged = [json.loads(line)["step"] for line in log_path.read_text().splitlines()]
    assert saved % 5 == 0 and max(logged) >= saved   # steps were logged after the last checkpoint
    assert not (run / ".lock").exists()   # released on Ctrl-C
    # what a killed process leaves: a temp file and the lock, both taken over
    (run / f".stage1.pt.tmp{2 ** 22 + 7}").write_bytes(b"left by a killed save")
    (run / ".lock").write_text(str(2 ** 22 + 7))
    resumed = run_script("stage1_encoder.py", "--data", shapes_folder, "--run", run, "--channels",
                         "16", "--batch-size", "8", "--steps", str(saved + 2), "--log-every", "1",
                         "--resume")
    assert f"taking over {run / '.lock'}" in resumed.stderr
    logged = [json.loads(line)["step"] for line in log_path.read_text().splitlines()]
    # cut back to the checkpoint, then continued: no step twice
    assert logged == list(range(1, saved + 3))
    assert not list(run.glob(".*"))
