"""Every user mistake and fault ends in one sentence: a non-zero exit, one `error:` line (the last line of
stderr), no traceback, and no new or half-written file in the run folder. One table, run through the
scripts' real main() in this process (fast), plus a real Ctrl-C and the checks that must *not* fail."""
import errno
import json
import os
import pickle
import signal
import subprocess
import sys
import tarfile
import time
import io
import hashlib

import numpy as np
import pytest
import torch

import fid
import sample
import stage1_encoder as s1
import stage2_decoder as s2
import train_latent_dit as dit
from conftest import ROOT, copy_run, run_script

SCRIPTS = {"stage1": s1, "stage2": s2, "dit": dit, "sample": sample, "fid": fid}
TINY_S1 = ["--channels", "16", "--batch-size", "8", "--steps", "3", "--log-every", "1"]
TINY_DIT = ["--model", "DiT-T", "--patch", "2", "--batch-size", "8", "--steps", "3", "--log-every", "1"]


def run_main(script, args, capsys):
    """Run a script's main() as its command line does; returns (exit status, stderr)."""
    capsys.readouterr()
    try:
        s1.run_cli(lambda: SCRIPTS[script].main([str(a) for a in args]))
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def files(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")) if folder.exists() else []


class Payload:
    """What a crafted pickle would run: it writes a marker file."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def crafted_cifar(tmp_path, monkeypatch):
    """A CIFAR-format archive (md5 made to match) whose batches run code when unpickled plainly."""
    archive = tmp_path / "data" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
            blob = pickle.dumps({b"data": Payload(tmp_path / "pwned"), b"labels": [0]}, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    monkeypatch.setattr(s1, "CIFAR_MD5", hashlib.md5(archive.read_bytes()).hexdigest())
    return archive


def nan_checkpoint(src, dst, key):
    ckpt = torch.load(src, weights_only=True)
    name = next(iter(ckpt[key]))
    ckpt[key][name] = torch.full_like(ckpt[key][name], float("nan"))
    torch.save(ckpt, dst)


# Each case: setup(tmp_path, fixtures) -> (script, args, folder that must not change); words in the error line.
CASES = {
    # stage 1: data and flags
    "stage1 unknown data": (lambda t, f: ("stage1", ["--data", "does/not/exist", "--run", t / "run"], t / "run"),
                            ["neither cifar10"]),
    "stage1 empty folder": (lambda t, f: ((t / "empty").mkdir(), ("stage1", ["--data", t / "empty", "--run", t / "run"],
                                                                  t / "run"))[1], ["no images"]),
    "stage1 --channels 2": (lambda t, f: ("stage1", ["--channels", "2", "--run", t / "run"], t / "run"), ["--channels"]),
    "stage1 --image-size 0": (lambda t, f: ("stage1", ["--data", f["folder"], "--image-size", "0", "--run", t / "run"],
                                            t / "run"), ["--image-size 0"]),
    "stage1 --log-every 0": (lambda t, f: ("stage1", ["--log-every", "0", "--run", t / "run"], t / "run"),
                             ["--log-every"]),
    "stage1 --ckpt-every 0": (lambda t, f: ("stage1", ["--ckpt-every", "0", "--run", t / "run"], t / "run"),
                              ["--ckpt-every"]),
    "stage1 --lr -1": (lambda t, f: ("stage1", ["--lr", "-1", "--run", t / "run"], t / "run"), ["--lr"]),
    "stage1 --aux-dropout 1.5": (lambda t, f: ("stage1", ["--aux-dropout", "1.5", "--run", t / "run"], t / "run"),
                                 ["--aux-dropout"]),
    "stage1 --run is a file": (lambda t, f: ((t / "file").write_text("x"), ("stage1", ["--data", f["folder"],
                                                                                       "--run", t / "file"], t))[1],
                               ["is a file"]),
    "stage1 --run inside a file": (lambda t, f: ((t / "file").write_text("x"), ("stage1", [
        "--data", f["folder"], *TINY_S1, "--run", t / "file" / "run"], t))[1], ["cannot write into the run folder"]),
    "stage1 read-only run folder": (lambda t, f: (f["monkeypatch"].setattr(
        s1.Path, "write_bytes", lambda *a: (_ for _ in ()).throw(OSError(errno.EROFS, "Read-only file system"))),
        ("stage1", ["--data", f["folder"], *TINY_S1, "--run", t / "run"], t / "run"))[1],
        ["cannot write into the run folder", "Read-only file system"]),
    "stage1 --resume without checkpoint": (lambda t, f: ("stage1", ["--resume", "--run", t / "run"], t / "run"),
                                           ["does not exist"]),
    "stage1 diverges (--lr 1e9)": (lambda t, f: ("stage1", ["--data", f["folder"], *TINY_S1, "--steps", "30",
                                                            "--lr", "1e9", "--ckpt-every", "1", "--run", t / "run"],
                                                 None), ["diverged", "lower --lr"]),
    "stage1 crafted CIFAR batch": (lambda t, f: (crafted_cifar(t, f["monkeypatch"]), ("stage1", [
        "--data", "cifar10", "--data-dir", t / "data", *TINY_S1, "--run", t / "run"], t / "run"))[1],
        ["not allowed in a CIFAR-10 batch"]),
    "stage1 corrupt CIFAR archive": (lambda t, f: ((t / "data").mkdir(), (t / "data" / "cifar-10-python.tar.gz")
                                                   .write_bytes(b"junk"), ("stage1", [
        "--data", "cifar10", "--data-dir", t / "data", "--run", t / "run"], t / "run"))[2], ["wrong md5"]),
    "stage1 --resume of a finished run": (lambda t, f: (copy_run(f["ae"], t / "run", "stage1.pt"), (
        "stage1", ["--resume", "--steps", "20", "--run", t / "run"], t / "run"))[1], ["already at step 20"]),
    # stage 2: the checkpoint it is handed
    "stage2 no stage1.pt": (lambda t, f: ("stage2", ["--run", t / "run"], t / "run"), ["does not exist"]),
    "stage2 wrong stage": (lambda t, f: ((t / "run").mkdir(), torch.save({"stage": 3}, t / "run" / "stage1.pt"),
                                         ("stage2", ["--run", t / "run"], t / "run"))[2], ["stage-3"]),
    "stage2 garbage checkpoint": (lambda t, f: ((t / "run").mkdir(), (t / "run" / "stage1.pt").write_text("junk"),
                                                ("stage2", ["--run", t / "run"], t / "run"))[2], ["not a checkpoint"]),
    "stage2 unfinished stage1": (lambda t, f: (copy_run(f["ae"], t / "run"), torch.save(
        dict(torch.load(f["ae"] / "stage1.pt", weights_only=True), finished=False, step=5, total_steps=60),
        t / "run" / "stage1.pt"), ("stage2", ["--run", t / "run"], t / "run"))[2], ["stopped at step 5 of 60"]),
    "stage2 NaN stage1": (lambda t, f: (copy_run(f["ae"], t / "run"), nan_checkpoint(
        f["ae"] / "stage1.pt", t / "run" / "stage1.pt", "encoder"), ("stage2", ["--run", t / "run"], t / "run"))[2],
        ["NaN or infinite", "lower --lr"]),
    "stage2 --joint on a weakened stage 1": (lambda t, f: (copy_run(f["ae"], t / "run", "stage1.pt"), (
        "stage2", ["--joint", "--run", t / "run"], t / "run"))[1], ["--aux-dropout 0 --aux-width 1"]),
    "stage2 --resume of a finished run": (lambda t, f: (copy_run(f["ae"], t / "run", "stage1.pt", "autoencoder.pt"), (
        "stage2", ["--resume", "--steps", "20", "--run", t / "run"], t / "run"))[1], ["already at step 20"]),
    # the DiT
    "dit no autoencoder.pt": (lambda t, f: ("dit", ["--run", t / "run"], t / "run"), ["stage2_decoder.py"]),
    "dit --patch 0": (lambda t, f: (copy_run(f["ae"], t / "run", "autoencoder.pt"), (
        "dit", ["--patch", "0", "--run", t / "run"], t / "run"))[1], ["--patch"]),
    "dit --patch 3 (before the cache)": (lambda t, f: (copy_run(f["ae"], t / "run", "autoencoder.pt"), (
        "dit", ["--patch", "3", "--run", t / "run"], t / "run"))[1], ["--patch 3"]),
    "dit unfinished autoencoder": (lambda t, f: (copy_run(f["ae"], t / "run"), torch.save(
        dict(torch.load(f["ae"] / "autoencoder.pt", weights_only=True), latent_stats=None),
        t / "run" / "autoencoder.pt"), ("dit", ["--run", t / "run"], t / "run"))[2], ["unfinished", "--resume"]),
    "dit --resume after the autoencoder changed": (lambda t, f: (copy_run(f["dit"], t / "run", "dit.pt"), torch.save(
        dict(torch.load(f["ae"] / "autoencoder.pt", weights_only=True), step=99), t / "run" / "autoencoder.pt"),
        ("dit", ["--resume", "--steps", "50", "--run", t / "run"], t / "run"))[2], ["sha256"]),
    "dit --resume of a finished run": (lambda t, f: (copy_run(f["dit"], t / "run", "autoencoder.pt", "dit.pt"), (
        "dit", ["--resume", "--steps", "10", "--run", t / "run"], t / "run"))[1], ["already at step 10"]),
    "dit --ema-decay 1.5": (lambda t, f: ("dit", ["--ema-decay", "1.5", "--run", t / "run"], t / "run"),
                            ["--ema-decay"]),
    # sampling
    "sample no dit.pt": (lambda t, f: ("sample", ["--run", t / "run"], t / "run"), ["train_latent_dit.py"]),
    "sample --eta 1.5": (lambda t, f: (copy_run(f["dit"], t / "run", "autoencoder.pt", "dit.pt"), (
        "sample", ["--eta", "1.5", "--run", t / "run"], t / "run"))[1], ["--eta"]),
    "sample --out into a missing folder": (lambda t, f: (copy_run(f["dit"], t / "run", "autoencoder.pt", "dit.pt"), (
        "sample", ["--num", "4", "--out", t / "nowhere" / "s.npz", "--run", t / "run"], t / "run"))[1],
        ["does not exist"]),
    "sample another run's autoencoder": (lambda t, f: (copy_run(f["dit"], t / "run", "dit.pt"), torch.save(
        dict(torch.load(f["ae"] / "autoencoder.pt", weights_only=True), step=99), t / "run" / "autoencoder.pt"),
        ("sample", ["--run", t / "run"], t / "run"))[2], ["sha256"]),
    "sample wrong checkpoint": (lambda t, f: (copy_run(f["dit"], t / "run", "autoencoder.pt"), (t / "run" / "dit.pt")
                                              .write_bytes((f["dit"] / "autoencoder.pt").read_bytes()),
                                              ("sample", ["--run", t / "run"], t / "run"))[2], ["stage-2"]),
    "sample unknown class": (lambda t, f: (copy_run(f["dit"], t / "run", "autoencoder.pt", "dit.pt"), (
        "sample", ["--class", "unicorn", "--run", t / "run"], t / "run"))[1], ["unicorn"]),
    # fid
    "fid --batch-size 0": (lambda t, f: ("fid", ["a.npz", "b.npz", "--batch-size", "0"], t), ["--batch-size"]),
    "fid one image": (lambda t, f: (np.savez(t / "one.npz", arr_0=np.zeros((1, 32, 32, 3), np.uint8)), (
        "fid", [t / "one.npz", t / "one.npz", "--features", "classifier", "--classifier-data", "shapes",
                "--data-dir", f["data"]], t))[1], ["at least 2 images"]),
    "fid object-array npz": (lambda t, f: (np.savez(t / "obj.npz", arr_0=np.array([{"a": 1}], dtype=object)), (
        "fid", [t / "obj.npz", t / "obj.npz", "--features", "classifier", "--classifier-data", "shapes",
                "--data-dir", f["data"]], t))[1], ["not a readable npz"]),
    "fid garbage npz": (lambda t, f: ((t / "junk.npz").write_bytes(b"junk"), (
        "fid", [t / "junk.npz", t / "junk.npz", "--features", "classifier", "--classifier-data", "shapes",
                "--data-dir", f["data"]], t))[1], ["not a readable npz"]),
    "fid --save-stats into a missing folder": (lambda t, f: ("fid", ["shapes", t / "nowhere" / "stats.npz",
                                                                     "--save-stats"], t), ["existing folder"]),
    "fid npz without images": (lambda t, f: (np.savez(t / "bad.npz", x=np.zeros(3)), (
        "fid", [t / "bad.npz", t / "bad.npz"], t))[1], ["arr_0"]),
    "fid unknown source": (lambda t, f: ("fid", ["nowhere.npz", "shapes"], t), ["neither"]),
    "fid missing weights": (lambda t, f: (np.savez(t / "four.npz", arr_0=np.zeros((4, 32, 32, 3), np.uint8)), (
        "fid", [t / "four.npz", t / "four.npz", "--weights", t / "missing.pth"], t))[1], ["does not exist"]),
}


@pytest.fixture
def fixtures(shapes_folder, autoencoder_run, dit_run, shapes_dir, monkeypatch):
    return {"folder": shapes_folder, "ae": autoencoder_run, "dit": dit_run, "data": shapes_dir,
            "monkeypatch": monkeypatch}


@pytest.mark.parametrize("name", list(CASES))
def test_every_mistake_ends_in_one_sentence(name, fixtures, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)   # nothing may land in the working directory either
    setup, words = CASES[name]
    script, args, folder = setup(tmp_path, fixtures)
    before = files(folder) if folder else None
    code, err = run_main(script, args, capsys)
    assert code == 1, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: ") and sum(line.startswith("error:") for line in lines) == 1, err
    for word in words:
        assert word in lines[-1], lines[-1]
    if folder:
        assert files(folder) == before, "the run folder changed"
    for ckpt in tmp_path.rglob("stage1.pt") if "diverges" in name else []:   # only finite checkpoints were kept
        state = torch.load(ckpt, weights_only=True)
        assert all(torch.isfinite(v).all() for v in state.get("encoder", {}).values() if v.is_floating_point())
    assert not list(tmp_path.rglob(".*.tmp*")), "a temp file was left behind"
    assert not (tmp_path / "pwned").exists(), "code from a data file ran"


def test_a_full_disk_keeps_the_previous_checkpoint(shapes_folder, autoencoder_run, tmp_path, capsys, monkeypatch):
    run = copy_run(autoencoder_run, tmp_path / "run", "stage1.pt")
    before = (run / "stage1.pt").read_bytes()

    def full_disk(obj, path):   # what torch.save does when the disk fills: a partial file, then an error
        open(path, "wb").write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0")
    monkeypatch.setattr(torch, "save", full_disk)
    code, err = run_main("stage1", ["--data", shapes_folder, *TINY_S1, "--run", run], capsys)
    assert code == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: could not write") and "disk may be full" in err
    assert (run / "stage1.pt").read_bytes() == before   # the earlier checkpoint is untouched
    assert not list(run.glob(".*"))                     # and no temp file is left


def test_ctrl_c_says_how_to_continue_and_resume_cuts_the_log(shapes_folder, tmp_path):
    run = tmp_path / "run"
    args = [sys.executable, str(ROOT / "stage1_encoder.py"), "--data", str(shapes_folder), "--run", str(run),
            "--channels", "16", "--batch-size", "8", "--steps", "100000", "--log-every", "1", "--ckpt-every", "5"]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="2")
    def default_ctrl_c():   # as a terminal starts a program: SIGINT handled and not blocked, whatever the suite inherited
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    process = subprocess.Popen(args, env=env, stderr=subprocess.PIPE, text=True, preexec_fn=default_ctrl_c)
    deadline = time.time() + 120
    def logged_steps():   # complete lines only: the writer may be half-way through one
        text = (run / "log_stage1.jsonl").read_text() if (run / "log_stage1.jsonl").exists() else ""
        return [json.loads(line)["step"] for line in text.splitlines(keepends=True) if line.endswith("\n")]
    try:
        # interrupt a step or two after a checkpoint (every 5 steps), so that steps were logged after it
        while not (run / "stage1.pt").exists() or len(logged_steps()) < 7 or logged_steps()[-1] % 5 not in (1, 2):
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
    assert last.startswith("error: stopped by Ctrl-C") and "stage1.pt" in last and "--resume" in last
    saved = torch.load(run / "stage1.pt", weights_only=True)["step"]
    logged = [json.loads(line)["step"] for line in (run / "log_stage1.jsonl").read_text().splitlines()]
    assert saved % 5 == 0 and max(logged) >= saved   # usually steps were logged after the last checkpoint
    (run / f".stage1.pt.tmp{2 ** 22 + 7}").write_bytes(b"left by a killed save")   # a dead process's temp file
    run_script("stage1_encoder.py", "--data", shapes_folder, "--run", run, "--channels", "16", "--batch-size", "8",
               "--steps", str(saved + 2), "--log-every", "1", "--resume")
    logged = [json.loads(line)["step"] for line in (run / "log_stage1.jsonl").read_text().splitlines()]
    assert logged == list(range(1, saved + 3))   # cut back to the checkpoint, then continued: no step twice
    assert not list(run.glob(".*.tmp*"))


def test_without_flips_no_batch_and_no_cached_latent_is_mirrored(shapes_folder, tmp_path, monkeypatch):
    seen = []
    real = s1.sample_batch
    spy = lambda *a, **k: (seen.append(k.get("flip", True)), real(*a, **k))[1]
    monkeypatch.setattr(s1, "sample_batch", spy)
    monkeypatch.setattr(s2, "sample_batch", spy)
    run = tmp_path / "run"
    s1.main(["--data", str(shapes_folder), *TINY_S1, "--run", str(run), "--no-flip"])
    s2.main(["--run", str(run), "--steps", "3", "--batch-size", "8"])
    assert seen == [False] * 6   # every batch of stage 1 and stage 2 was drawn without flips
    dit.main(["--run", str(run), *TINY_DIT])
    cache = torch.load(run / "latents.pt", weights_only=True)
    data = s1.load_data(str(shapes_folder))
    assert cache["flip"] is False and len(cache["latents"]) == len(data.images)   # no mirrored copies
    x = torch.arange(2 * 4 * 4 * 3, dtype=torch.uint8).reshape(2, 4, 4, 3)
    batch, _ = real(s1.ImageData(x, torch.zeros(2, dtype=torch.long), ["a"], "toy"), 64,
                    torch.Generator().manual_seed(0), flip=False)
    assert all(any(torch.equal(b, o) for o in s1.to_model_input(x)) for b in batch)   # only originals


def test_damaged_caches_are_built_again(autoencoder_run, shapes_dir, tmp_path, capsys):
    run = copy_run(autoencoder_run, tmp_path / "run", "autoencoder.pt")
    dit.main(["--run", str(run), *TINY_DIT])
    good = torch.load(run / "latents.pt", weights_only=True)["latents"]
    (run / "latents.pt").write_bytes(b"damaged")
    dit.main(["--run", str(run), *TINY_DIT])
    assert "damaged" in capsys.readouterr().err
    assert torch.equal(torch.load(run / "latents.pt", weights_only=True)["latents"], good)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / f"shapes-seed{s1.SHAPES_SEED}-v1.npz").write_bytes(b"damaged")
    original = (shapes_dir / f"shapes-seed{s1.SHAPES_SEED}-v1.npz")
    rebuilt = s1.load_shapes(data_dir, "test")
    with np.load(original) as f:
        assert np.array_equal(rebuilt.images.numpy(), f["test_x"])


def test_stage2_draws_other_batches_than_stage1():
    a = s1.step_generator(0, 5, stage=1)
    b = s1.step_generator(0, 5, stage=2)
    assert not torch.equal(torch.randint(1000, (16,), generator=a), torch.randint(1000, (16,), generator=b))
