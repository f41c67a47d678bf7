"""
The run every stage shares: what a training script needs around its own idea. Read from the top:
errors and the command line; devices; random streams; files and checkpoints; run folders (one
writer at a time, a finished run never started over by mistake, a resumed run continued as it was
configured); the progress bar and its log. The data lives in data.py.
"""
import argparse
import hashlib
import json
import os
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

# -----------------------------------------------------------------------------
# Errors and the command line

class UserError(Exception):
    """A mistake the user can fix, or a fault: printed as one sentence, with a non-zero exit."""
    exit_code = 1

class Interrupted(UserError):
    """Ctrl-C during training: say where the last checkpoint is and how to continue (exit 130)."""
    exit_code = 130

    def __init__(self, ckpt_path):
        how = (f"; the last checkpoint is {ckpt_path}: add --resume to the same command (without "
               f"--overwrite) to continue" if Path(ckpt_path).is_file()
               else " before the first checkpoint; run the same command to start again")
        super().__init__("stopped by Ctrl-C" + how)

def run_cli(main, memory_flags="--batch-size"):
    """Run main(): a UserError, a file-system fault, out of memory or Ctrl-C end in one line."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("error: stopped by Ctrl-C; nothing half-written was left behind", file=sys.stderr)
        sys.exit(130)
    except OSError as e:   # disk full, read-only folder, a folder where a file should be, ...
        print(f"error: {e.strerror or e} ({e.filename}); check the path, free space and "
              f"permissions", file=sys.stderr)
        sys.exit(1)
    except (MemoryError, RuntimeError) as e:   # torch.OutOfMemoryError is a RuntimeError
        words = ("out of memory", "can't allocate", "allocate memory")
        if isinstance(e, MemoryError) or any(w in str(e) for w in words):
            where = "on the GPU" if "CUDA" in str(e) else "in main memory"
            print(f"error: out of memory {where}; lower {memory_flags}", file=sys.stderr)
        elif type(e).__module__.startswith(("torch._dynamo", "torch._inductor")):
            why = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            print(f"error: torch.compile failed ({why}); run the same command without --compile",
                  file=sys.stderr)
        else:
            raise
        sys.exit(1)

def add_training_flags(p, steps, batch_size, lr, ckpt_every, checkpoint):
    """The flags every training stage shares."""
    p.add_argument("--steps", type=int, default=steps, help="total training steps")
    p.add_argument("--batch-size", type=int, default=batch_size, help="images per step")
    p.add_argument("--lr", type=float, default=lr, help="peak AdamW learning rate")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where to run")
    p.add_argument("--compile", action="store_true", help="torch.compile the networks")
    p.add_argument("--resume", action="store_true", help=f"continue RUN/{checkpoint} to --steps")
    p.add_argument("--overwrite", action="store_true", help=f"start over in a run folder that has "
                   f"{checkpoint}: delete it, its log and pictures and the later stages' files")
    p.add_argument("--log-every", type=int, default=50, help="steps between log lines")
    p.add_argument("--ckpt-every", type=int, default=ckpt_every, help="steps between checkpoints")

def parse_training_args(parser, argv, gpu_steps):
    """Parse argv (`args.given`: the flags typed, which a resumed run checks against its
    checkpoint); refuse impossible values of the shared flags before any expensive work."""
    unset = object()   # argparse leaves a preset attribute alone unless its flag is typed
    typed = parser.parse_args(argv, argparse.Namespace(**{a.dest: unset for a in parser._actions}))
    args = parser.parse_args(argv)
    args.given = {dest for dest, value in vars(typed).items() if value is not unset}
    for flag in ("steps", "batch_size", "log_every", "ckpt_every"):
        value = getattr(args, flag)
        if value < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be a positive integer, not {value}")
    if not 0 < args.lr < float("inf"):
        raise UserError(f"--lr must be a positive number, not {args.lr}")
    if not 0 <= args.seed < 2 ** 32:   # every random stream's seed then fits in 64 bits
        raise UserError(f"--seed must be an integer from 0 to {2 ** 32 - 1}, not {args.seed}")
    if args.steps == gpu_steps and not torch.cuda.is_available():
        print(f"note: --steps {gpu_steps} is the GPU recipe; without a GPU it takes hours (the "
              f"bar shows how many): the README's CPU quick start uses far fewer", file=sys.stderr)
    return args


# -----------------------------------------------------------------------------
# Devices

def pick_device(name):
    """`auto` takes the GPU when there is one; on CUDA, float32 matmuls and convs may use TF32."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but PyTorch sees no CUDA GPU; "
                        "use --device cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device

def precision(device):
    """The autocast dtype of a device: bf16 on a GPU that has it (A100, H100, ...), float16 on one
    that does not (T4, V100: nanoGPT's fallback, with a GradScaler), None (float32) on the CPU."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

def precision_name(device):
    """The precision in words, for a stage's first log line."""
    names = {None: "float32", torch.bfloat16: "bf16 autocast",
             torch.float16: "float16 autocast with a GradScaler (this GPU has no bf16)"}
    return names[precision(device)]

def autocast(device):
    """Mixed precision where the device has it (see `precision`), plain float32 elsewhere."""
    dtype = precision(device)
    return torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()

def grad_scaler(device):
    """Loss scaling for float16 (its gradients would underflow); a pass-through otherwise:
    scale(loss) is the loss and step(optimizer) is optimizer.step()."""
    return torch.amp.GradScaler(device.type, enabled=precision(device) == torch.float16)

@contextmanager
def exact_float32(device):
    """Neither autocast nor TF32 inside: for the one-off passes that measure, cache or decode
    latents, which then agree between a CPU and a GPU up to float32 rounding."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.autocast(device.type, enabled=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved

def setup_distributed(device_name):
    """(rank, world_size, device): torchrun sets RANK and WORLD_SIZE and starts one process per
    GPU; a plain `python` run is process 0 of 1. Only process 0 (`is_main`) writes files."""
    if "RANK" not in os.environ:
        return 0, 1, pick_device(device_name)
    cuda = torch.cuda.is_available() and device_name != "cpu"
    dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    device = pick_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    return dist.get_rank(), dist.get_world_size(), device

def refuse_torchrun(script):
    """The autoencoder stages train on one device: N torchrun copies would be N identical runs."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError(f"{script} trains on one device: torchrun is for train_latent_dit.py "
                        f"only; run python {script} without torchrun")

def count_params(model):
    return f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params"


# -----------------------------------------------------------------------------
# Random streams

def seeded_generator(seed, index, stream=0, num_streams=1):
    """A generator of its own for draw `index` (a step, a batch) of a run seeded `seed`: a resumed
    run repeats its numbers exactly; `stream` (< num_streams) keeps sequences apart."""
    return torch.Generator().manual_seed((seed * 1_000_003 + index) * num_streams + stream)

def rng_state(device):
    """The global random states that dropout draws from: the CPU's, and the training GPU's."""
    state = [torch.get_rng_state()]
    if device.type == "cuda":
        state.append(torch.cuda.get_rng_state(device))
    return state

def set_rng_state(state, device, seed, step):
    """Restore rng_state() on this run's device. A checkpoint without a GPU's state (written on a
    CPU) seeds this GPU from the run's seed and step: fresh masks, the same on every resume."""
    torch.set_rng_state(state[0])
    if device.type == "cuda" and len(state) > 1:
        torch.cuda.set_rng_state(state[1], device)
    elif device.type == "cuda":
        torch.cuda.manual_seed(seeded_generator(seed, step).initial_seed())

# -----------------------------------------------------------------------------
# Files and checkpoints (what each stage writes into the run folder)

def file_digest(path, algorithm):
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()

CHECKPOINT_FORMAT = 2   # raised whenever a checkpoint's contents change; older files are refused
# Per stage: its checkpoint, its script, and the other files it leaves in the run folder.
STAGES = {1: ("stage1.pt", "stage1_encoder.py",
              ("log_stage1.jsonl", "stage1_recon.png", "stage1_loss.png")),
          2: ("autoencoder.pt", "stage2_decoder.py", ("log_stage2.jsonl", "stage2_recon.png",
              "stage2_loss.png", "latents.png", "reconstructions.npz")),
          3: ("dit.pt", "train_latent_dit.py",   # samples.*: written by sample.py from dit.pt
              ("log_dit.jsonl", "dit_samples.png", "dit_loss.png", "dit_step*.pt", "samples.png",
               "samples.npz"))}

def atomic_save(path, write):
    """write(temp path) in the same folder, then rename: a crash never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:   # torch.save reports a full disk as a RuntimeError
        why = e.strerror if isinstance(e, OSError) and e.strerror else "the disk may be full"
        raise UserError(f"could not write {path} ({why}); free some space or choose a writable "
                        f"folder (any earlier {path.name} is untouched)") from None
    finally:
        tmp.unlink(missing_ok=True)

def save_checkpoint(obj, path):
    atomic_save(path, lambda tmp: torch.save({**obj, "format": CHECKPOINT_FORMAT}, tmp))

def load_checkpoint(path, stage):
    """Load a checkpoint safely (weights_only); check its stage, format and finite weights."""
    path = Path(path)
    name, script = STAGES[stage][:2]
    if not path.is_file():
        raise UserError(f"{path} does not exist: run {script} first (it writes {name})")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path} is not a checkpoint this project can read "
                        f"({e.__class__.__name__})")
    got = ckpt.get("stage") if isinstance(ckpt, dict) else None
    if got != stage:
        raise UserError(f"{path} is {f'a stage-{got}' if got else 'not a'} checkpoint of this "
                        f"project, but a stage-{stage} one ({name}, written by {script}) is needed")
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} was written by an older version of this project; "
                        f"train it again with {script}")
    for key, value in ckpt.items():   # weights and latent statistics: dicts of tensors
        if isinstance(value, dict) and not all(torch.isfinite(v).all() for v in value.values()
                                               if torch.is_tensor(v) and v.is_floating_point()):
            raise UserError(f"{path} holds NaN or infinite values in '{key}' (its training "
                            f"diverged); train it again with a lower --lr")
    return ckpt

def load_optimizer(optimizer, state, device):
    """Load a saved optimizer state for this run's device: `fused` (on CUDA) is set in the saved
    groups *before* loading, since load_state_dict places each `step` counter by that flag (on the
    GPU for fused AdamW, else it stays on the CPU, which fused AdamW refuses)."""
    groups = [dict(group, fused=device.type == "cuda") for group in state["param_groups"]]
    optimizer.load_state_dict({**state, "param_groups": groups})

# -----------------------------------------------------------------------------
# Run folders, shared by every stage: one writer at a time, a finished run never started over by
# mistake, a resumed run continued as it was configured

@contextmanager
def open_run(run, stage, resume, overwrite, lock=True):
    """The run folder of one stage, created and locked while the stage runs. A fresh run never
    lands on a finished one: its checkpoint (or a later stage's) asks for --resume, --overwrite."""
    run, before = Path(run), STAGES.get(stage - 1)
    if run.exists() and not run.is_dir():
        raise UserError(f"--run {run} is a file, not a folder; choose another --run")
    if before and not (run / before[0]).is_file():
        raise UserError(f"{run / before[0]} does not exist: run {before[1]} --run {run} first")
    if resume and overwrite:
        raise UserError("--resume continues a run and --overwrite starts it over: pass only one")
    try:
        run.mkdir(parents=True, exist_ok=True)
        if lock:   # creating the lock file also proves the folder is writable
            take_lock(run / ".lock")
    except OSError as e:
        raise UserError(f"cannot write into the run folder {run} ({e.strerror}); "
                        f"choose another --run") from None
    try:
        for tmp in run.glob(".*.tmp*"):   # .NAME.tmpPID: left by a killed save
            pid = tmp.name.rsplit(".tmp", 1)[1].split(".")[0]
            if pid.isdigit() and not process_alive(pid):
                tmp.unlink(missing_ok=True)
        done = [STAGES[s][0] for s in STAGES if s >= stage and (run / STAGES[s][0]).exists()]
        if done and not resume and not overwrite:
            raise UserError(f"{run} already holds {' and '.join(done)}: add --resume to continue, "
                            f"choose another --run, or add --overwrite to start stage {stage} over "
                            f"(it deletes {' and '.join(done)} and the logs and pictures that go "
                            f"with it)")
        yield run
    finally:
        if lock:
            (run / ".lock").unlink(missing_ok=True)

def take_lock(path):
    """Create RUN/.lock holding this process's PID, atomically; take over one whose PID is gone."""
    owner = path.read_text().strip() if path.exists() else ""
    if owner.isdigit() and not process_alive(owner):
        print(f"note: taking over {path}, left by a process that is gone (PID {owner})",
              file=sys.stderr)
        path.unlink(missing_ok=True)
    try:
        with open(path, "x") as f:   # "x": create the file, or fail if it exists
            f.write(str(os.getpid()))
    except FileExistsError:
        raise UserError(f"another process (PID {owner or '?'}) is writing to {path.parent}: wait "
                        f"for it or choose another --run (if none is, delete {path})") from None

def process_alive(pid):
    """Whether a process runs; assumed so where /proc cannot tell (macOS, Windows)."""
    return not Path("/proc/self").exists() or Path(f"/proc/{pid}").exists()

def clear_stage(run, stage):
    """A fresh run, before it trains: delete what this stage and later ones wrote here before."""
    for s in range(stage, len(STAGES) + 1):
        for name in (STAGES[s][0], *STAGES[s][2]):   # a name or a pattern (dit_step*.pt)
            for path in Path(run).glob(name):
                path.unlink()

def resume_checkpoint(ckpt_path, log_path, stage, args, fresh_config, flags):
    """--resume: the stage's own checkpoint, unless finished or asked to change its configuration
    (`flags`: config key -> flag); the log is cut back to the checkpoint's step."""
    ckpt = load_checkpoint(ckpt_path, stage)
    if ckpt["step"] >= args.steps:
        raise UserError(f"{ckpt_path} is already at step {ckpt['step']}; to train longer, "
                        f"pass a --steps above {ckpt['step']} with --resume")
    saved = ckpt["config"]
    changed = [f"--{flag.replace('_', '-')} ({fresh_config[key]}, the checkpoint has "
               f"{saved.get(key)})" for key, flag in flags.items()
               if flag in args.given and fresh_config[key] != saved.get(key)]
    if changed:
        raise UserError(f"--resume continues {ckpt_path} as it was configured, but "
                        f"{'; '.join(changed)}: drop these flags, or start a new run with another "
                        f"--run (--steps may be raised)")
    if Path(log_path).exists():   # lines logged after the checkpoint would be repeated; a
        lines = Path(log_path).read_text().splitlines(keepends=True)   # warning of the old end goes
        records = [(line, json.loads(line)) for line in lines if line.strip()]
        kept = [line for line, r in records if r["step"] <= ckpt["step"] and "warning" not in r]
        atomic_save(log_path, lambda tmp: Path(tmp).write_text("".join(kept)))
    return ckpt


# -----------------------------------------------------------------------------
# Progress: a tqdm bar and the JSONL log

class Progress:
    """A tqdm bar plus the JSONL log: metrics are averaged over each window of `log_every` steps.
    It stops a run whose loss is not finite, or 1,000 times its running median (a divergence)."""
    def __init__(self, log_path, total, initial, images_per_step, log_every, desc, hint="--lr"):
        self.log_path = log_path
        self.images_per_step = images_per_step
        self.log_every = log_every
        self.hint = hint   # the flag to lower when training diverges
        self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)
        self.step = initial
        self.sums, self.count, self.t0 = {}, 0, time.time()   # the window since the last log line
        self.losses = []   # the first step's loss and every logged window's: the running median

    def update(self, step, **metrics):
        """Record one finished step; write a log line every log_every steps and at the last one."""
        for k, v in metrics.items():   # tensors stay on their device until a log line: no sync
            self.sums[k] = self.sums.get(k, 0.0) + (v.detach().float() if torch.is_tensor(v) else v)
        self.count += 1
        self.step = step
        self.bar.update(1)
        if not self.losses:
            self.losses.append(abs(float(self.sums["loss"])))
        last = step % self.log_every == 0 or step == self.bar.total
        if last or self.sums["loss"].device.type == "cpu":
            self.stop_if_diverged()   # every step on the CPU (free), at each log line on a GPU
        if last:
            seconds = time.time() - self.t0
            record = {"step": step, **{k: float(v) / self.count for k, v in self.sums.items()},
                      "images_per_s": self.count * self.images_per_step / seconds}
            with open(self.log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            self.bar.set_postfix(loss=f"{record['loss']:.4f}",
                                 img_s=f"{record['images_per_s']:.0f}")
            self.losses.append(abs(record["loss"]))
            self.sums, self.count, self.t0 = {}, 0, time.time()

    def stop_if_diverged(self, loss=None, what="the loss"):
        """Stop before a checkpoint stores broken weights: at a loss (this window's, or `loss`)
        that is NaN, infinite or over 1,000 times the running median of the losses so far."""
        if loss is None and self.count:
            loss = float(self.sums["loss"]) / self.count
        if loss is not None and not abs(loss) <= 1000 * max(np.median(self.losses), 1e-6):
            raise UserError(f"{what} became {loss:.4g} by step {self.step}: training diverged; "
                            f"try a lower {self.hint} (no checkpoint was written after it)")

    def close(self):
        self.bar.close()
