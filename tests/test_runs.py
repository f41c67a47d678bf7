"""runs.py: random streams, checkpoints, the progress log (run folders: test_faults.py)."""

import pytest
import torch

import runs


# --- random streams ------------------------------------------------------------------------------

def test_each_step_has_its_own_repeatable_stream_and_the_stages_differ():
    draw = lambda g: torch.randint(1000, (16,), generator=g)
    same = draw(runs.seeded_generator(0, 5, stream=1, num_streams=8))
    assert torch.equal(same, draw(runs.seeded_generator(0, 5, stream=1, num_streams=8)))
    # step 5 of stage 2 (stream 2) and step 6 of stage 1 are other batches than step 5 of stage 1
    for other in (runs.seeded_generator(0, 5, stream=2, num_streams=8),
                  runs.seeded_generator(0, 6, stream=1, num_streams=8),
                  runs.seeded_generator(1, 5, stream=1, num_streams=8)):
        assert not torch.equal(same, draw(other))
    # the seeds of stage 1's steps and stage 2's steps never collide (8 streams, 2 used)
    seeds = lambda stream: {runs.seeded_generator(0, step, stream, num_streams=8).initial_seed()
                            for step in range(10_000)}
    assert len(seeds(1)) == 10_000 and not seeds(1) & seeds(2)


# --- checkpoints ---------------------------------------------------------------------------------

def test_a_checkpoint_of_another_format_is_refused_in_one_sentence(tmp_path):
    path = tmp_path / "stage1.pt"
    runs.save_checkpoint({"stage": 1, "encoder": {"w": torch.ones(2)}}, path)
    assert runs.load_checkpoint(path, stage=1)["format"] == runs.CHECKPOINT_FORMAT
    torch.save({"stage": 1, "encoder": {"w": torch.ones(2)}}, path)   # no format: an older file
    with pytest.raises(runs.UserError, match="older version of this project; train it again"):
        runs.load_checkpoint(path, stage=1)


# --- the progress log's divergence stop -----------------------------------------------------------

def test_a_loss_1000_times_its_running_median_stops_training(tmp_path):
    progress = runs.Progress(tmp_path / "log.jsonl", 100, 0, 1, log_every=2, desc="test")
    for step, loss in enumerate([1.0, 0.5, 0.4, 0.3, 200.0], start=1):   # 200: far, but < 1000x
        progress.update(step, loss=torch.tensor(loss))
    with pytest.raises(runs.UserError, match="diverged; try a lower --lr"):
        progress.update(6, loss=torch.tensor(1e6))   # this window's mean 5e5 > 1000 x median
    with pytest.raises(runs.UserError, match="held-out loss became nan"):
        progress.stop_if_diverged(float("nan"), "the held-out loss")
    progress.close()
