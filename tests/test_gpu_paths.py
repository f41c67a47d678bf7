"""The GPU recipe's paths, run on a CPU: --compile through every stage (stage 2 with its GAN),
resume bit-exact when the compiled graph draws the dropout masks, bf16 and float16 autocast in
every stage, a CPU optimizer state loaded for fused AdamW on CUDA, the training GPU's random
state, a failed compile and torchrun on an autoencoder stage ending in one sentence."""
import json

import numpy as np
import pytest
import torch

import runs
import stage1_encoder as s1
import stage2_decoder as s2
from conftest import copy_run, run_main

TINY = ["--channels", "8", "--ch-mult", "1", "2", "--batch-size", "8", "--log-every", "1"]


def losses(path):
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]   # not the DiT's end-of-run warning


def weights(path, key):
    return torch.load(path, weights_only=True)[key]


# --- torch.compile (gcc compiles inductor's C++ kernels on the CPU) ------------------------------

@pytest.fixture(scope="module")
def compiled_run(shapes_folder, tmp_path_factory):
    """Stage 1 compiled for 2 steps and resumed to 4, a straight compiled 4-step run beside it."""
    resumed, straight = (tmp_path_factory.mktemp(name) for name in ("resumed", "straight"))
    stage1 = ["stage1_encoder.py", "--data", shapes_folder, *TINY, "--compile"]
    run_main(*stage1, "--run", resumed, "--steps", "2")
    run_main(*stage1, "--run", resumed, "--steps", "4", "--resume")
    run_main(*stage1, "--run", straight, "--steps", "4")
    return resumed, straight


def test_compiled_stage1_resumes_bit_exact(compiled_run):
    # The compiled graph draws the dropout masks (aux dropout 0.3) from the global generator,
    # whose state the checkpoint carries: the resumed run repeats the straight one exactly.
    resumed, straight = compiled_run
    assert losses(resumed / "log_stage1.jsonl") == losses(straight / "log_stage1.jsonl")
    for key in ("encoder", "aux_decoder"):
        a, b = weights(resumed / "stage1.pt", key), weights(straight / "stage1.pt", key)
        assert all(torch.equal(a[name], b[name]) for name in a)


def test_compiled_stage2_with_the_gan_then_dit_and_sampling(compiled_run, tmp_path):
    # The GAN's balance takes two gradients at the decoder's last layer: that layer stays eager.
    run = copy_run(compiled_run[1], tmp_path / "run", "stage1.pt")
    run_main("stage2_decoder.py", "--run", run, "--steps", "4", "--batch-size", "8",
             "--gan-weight", "0.1", "--gan-start", "2", "--log-every", "1", "--compile")
    log = [json.loads(line) for line in (run / "log_stage2.jsonl").read_text().splitlines()]
    assert ["d_loss" in line for line in log] == [False, False, True, True]
    assert all(torch.isfinite(torch.tensor(line["loss"])) for line in log)
    frozen = weights(run / "autoencoder.pt", "encoder")
    assert all(torch.equal(frozen[k], v) for k, v in weights(run / "stage1.pt", "encoder").items())
    run_main("train_latent_dit.py", "--run", run, "--model", "DiT-N", "--patch", "4", "--steps",
             "3", "--batch-size", "8", "--compile")
    run_main("sample.py", "--run", run, "--per-class", "1", "--steps", "2", "--num", "4",
             "--compile")
    assert np.load(run / "samples.npz")["arr_0"].shape == (4, 32, 32, 3)


def test_a_failed_compile_ends_in_one_sentence(shapes_folder, tmp_path, monkeypatch, capsys):
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()   # nothing compiled before in this process may be reused
    monkeypatch.setattr(inductor_config, "force_disable_caches", True)
    monkeypatch.setattr(inductor_config.cpp, "cxx", ("no-such-compiler",))
    with pytest.raises(SystemExit) as e:
        runs.run_cli(lambda: s1.main(["--data", str(shapes_folder), "--run", str(tmp_path / "r"),
                                      *TINY, "--steps", "2", "--compile"]))
    torch._dynamo.reset()
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and "torch.compile failed" in err[-1]
    assert err[-1].endswith("run the same command without --compile")
    assert not (tmp_path / "r" / "stage1.pt").exists()


# --- mixed precision: bf16 (CUDA's default) and the float16 fallback, on the CPU ------------------

def run_pipeline(folder, run, steps=3):
    run_main("stage1_encoder.py", "--data", folder, "--run", run, *TINY, "--steps", steps)
    run_main("stage2_decoder.py", "--run", run, "--steps", steps, "--batch-size", "8",
             "--log-every", "1")
    run_main("train_latent_dit.py", "--run", run, "--model", "DiT-N", "--patch", "4", "--steps",
             steps, "--batch-size", "8", "--log-every", "1")
    run_main("sample.py", "--run", run, "--per-class", "1", "--steps", "2")


@pytest.fixture(scope="module")
def float32_run(shapes_folder, tmp_path_factory):
    run = tmp_path_factory.mktemp("float32")
    run_pipeline(shapes_folder, run)
    return run


def test_bf16_autocast_in_every_stage_is_close_to_float32(shapes_folder, float32_run, tmp_path,
                                                          monkeypatch, capsys):
    monkeypatch.setattr(runs, "precision", lambda device: torch.bfloat16)
    run_pipeline(shapes_folder, tmp_path)
    assert "bf16 autocast" in capsys.readouterr().err
    # The first step's loss comes from the same initial weights and batch. bf16 keeps 8 bits of
    # mantissa (0.4% per rounding) and the CPU runs even GroupNorm in bf16, but the roundings
    # average out over a batch's pixels: measured 0.007%, 0.06% and 0.002% for the three stages.
    # 1% leaves room for other CPUs' kernels and still catches wrong weights or a wrong loss.
    for log in ("log_stage1.jsonl", "log_stage2.jsonl", "log_dit.jsonl"):
        bf16, fp32 = losses(tmp_path / log)[0], losses(float32_run / log)[0]
        assert bf16 == pytest.approx(fp32, rel=0.01), log
        assert bf16 != fp32   # autocast really ran in bf16


def test_the_latent_passes_run_in_float32_under_autocast(autoencoder_run, tmp_path, monkeypatch):
    # The latent statistics, the cache and the decode of samples give the same numbers with
    # bf16 autocast on (around them too) as without: a CPU-built cache serves a GPU run.
    import sample

    cpu = torch.device("cpu")
    ae, digest = s2.load_autoencoder(autoencoder_run / "autoencoder.pt")
    encoder = s1.Encoder(**s1.autoencoder_kwargs(ae["config"]))
    encoder.load_state_dict(ae["encoder"])
    decoder = s1.Decoder(**s1.autoencoder_kwargs(ae["config"])).eval()
    decoder.load_state_dict(ae["decoder"])
    data = s2.load_data(ae["config"]["data"], split="train")
    z = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def passes(cache_path):
        return (s2.build_latent_cache(ae, digest, cache_path, cpu)["latents"],
                s2.latent_statistics(encoder, data, cpu, num=50)["std"],
                sample.decode_latents(decoder, z, ae["latent_stats"]))

    plain = passes(tmp_path / "a.pt")
    monkeypatch.setattr(runs, "precision", lambda device: torch.bfloat16)
    with runs.autocast(cpu):
        under_autocast = passes(tmp_path / "b.pt")
    assert all(torch.equal(a, b) for a, b in zip(plain, under_autocast))


def test_float16_falls_back_with_a_grad_scaler(shapes_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert runs.precision(torch.device("cuda")) == torch.float16   # a T4 or a V100
    assert runs.precision(torch.device("cpu")) is None
    scalers = []

    class CountingScaler(torch.amp.GradScaler):
        def step(self, optimizer):
            self.steps += 1
            return super().step(optimizer)

    def recording_scaler(device):
        scalers.append(CountingScaler(device.type, enabled=True))
        scalers[-1].steps = 0
        return scalers[-1]

    monkeypatch.setattr(runs, "precision", lambda device: torch.float16)
    for module in (runs, s1, s2):
        monkeypatch.setattr(module, "grad_scaler", recording_scaler)
    run_main("stage1_encoder.py", "--data", shapes_folder, "--run", tmp_path, *TINY, "--steps",
             "3")
    run_main("stage2_decoder.py", "--run", tmp_path, "--steps", "3", "--batch-size", "8",
             "--gan-weight", "0.1", "--gan-start", "1")
    assert "float16 autocast with a GradScaler" in capsys.readouterr().err
    # stage 1: 3 steps; stage 2: 3 decoder steps and 2 discriminator steps (from step 1)
    assert [s.steps for s in scalers] == [3, 5] and all(s.is_enabled() for s in scalers)
    assert all(s.get_scale() <= 2.0 ** 16 for s in scalers)   # halved on an overflow, if any
    assert all(np.isfinite(losses(tmp_path / log)).all()
               for log in ("log_stage1.jsonl", "log_stage2.jsonl"))


# --- devices: fused AdamW's state, the training GPU's random state -------------------------------

def test_a_cpu_optimizer_state_is_loaded_for_fused_adamw_on_cuda(monkeypatch):
    param = torch.nn.Parameter(torch.ones(3))
    cpu = torch.optim.AdamW([param], lr=0.1)
    param.grad = torch.ones(3)
    cpu.step()
    state = cpu.state_dict()
    assert state["param_groups"][0]["fused"] is None   # a CPU run saves no fused flag
    target = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))], lr=0.1)
    received = []
    monkeypatch.setattr(target, "load_state_dict", received.append)
    runs.load_optimizer(target, state, torch.device("cuda"))
    # load_state_dict places each step counter by the flag it receives: it must already say fused
    assert [group["fused"] for group in received[0]["param_groups"]] == [True]
    assert state["param_groups"][0]["fused"] is None   # the caller's dict is left alone
    runs.load_optimizer(target, state, torch.device("cpu"))
    assert received[1]["param_groups"][0]["fused"] is False


def test_the_training_gpus_random_state_is_saved_and_restored(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: f"state of {device}")
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device: calls.append((s, device)))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: calls.append(("seed", seed)))
    gpu = torch.device("cuda", 1)
    saved = runs.rng_state(gpu)
    assert len(saved) == 2 and saved[1] == "state of cuda:1"   # this run's GPU, not every GPU
    assert len(runs.rng_state(torch.device("cpu"))) == 1
    runs.set_rng_state(saved, torch.device("cuda", 0), seed=3, step=40)   # a machine with 1 GPU
    assert calls == [("state of cuda:1", torch.device("cuda", 0))]
    runs.set_rng_state([torch.get_rng_state()], torch.device("cuda", 0), seed=3, step=40)
    assert calls[-1] == ("seed", runs.seeded_generator(3, 40).initial_seed())   # CPU -> GPU


# --- torchrun is for the DiT ---------------------------------------------------------------------

@pytest.mark.parametrize("script", [s1, s2])
def test_torchrun_on_an_autoencoder_stage_is_refused(script, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(runs.UserError, match="torchrun is for train_latent_dit.py only"):
        script.main(["--run", str(tmp_path)])
    assert list(tmp_path.iterdir()) == []
