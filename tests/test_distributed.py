"""Several processes: the sampler's shards, the DDP arithmetic (two gloo processes train exactly as
one process with the same effective batch, short last step included), one all-reduce per step with
adversarial training, resuming a two-process run, and bad input reported once under torchrun."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from test_training import new_trainer, splits

import full_finetune
from conftest import ROOT, make_rows, subprocess_env, tiny_run_args
from full_finetune import ShuffledBatches, Trainer

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


@pytest.mark.parametrize("grouped", [True, False])
def test_ranks_get_disjoint_shards_of_the_same_epoch(grouped):
    lengths = list(np.random.default_rng(0).integers(3, 60, size=320))  # 20 batches of 16
    shards = []
    for rank in (0, 1):
        sampler = ShuffledBatches(lengths, 16, seed=3, group_by_length=grouped, rank=rank, world_size=2)
        sampler.set_epoch(5)
        shards.append([i for batch in sampler for i in batch])
        assert len(sampler) == 10
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == list(range(320))


def test_uneven_batches_are_padded_so_every_rank_takes_the_same_steps():
    sampler = [ShuffledBatches([5] * 50, 16, seed=0, rank=r, world_size=2) for r in (0, 1)]
    batches = [list(s) for s in sampler]
    assert len(batches[0]) == len(batches[1]) == len(sampler[0]) == 2  # 4 batches of 16,16,16,2
    assert {i for b in batches[0] + batches[1] for i in b} == set(range(50))


def test_with_adversarial_training_each_window_all_reduces_once_on_its_last_backward(monkeypatch, tiny_model_factory,
                                                                                    tokenizer, tmp_path):
    train, names = splits()  # 72 rows, batches of 8, 2 per window: 5 windows, the last of one batch
    trainer = new_trainer(tiny_model_factory, tokenizer, names, EPOCHS=1, BATCH_SIZE=8, GRADIENT_ACCUMULATION_STEPS=2,
                          ADVERSARIAL_EPSILON=0.5, OUTPUT_DIR=str(tmp_path))
    syncs, windows = [], []
    original_backward, original_step = Trainer._forward_backward, Trainer._optimizer_step
    monkeypatch.setattr(Trainer, "_forward_backward", lambda self, batch, labels, samples, sync=True: (
        syncs.append(sync), original_backward(self, batch, labels, samples, sync))[1])
    monkeypatch.setattr(Trainer, "_optimizer_step", lambda self: (windows.append(list(syncs)), syncs.clear(),
                                                                  original_step(self)))
    dataset = trainer.dataset(train)
    trainer.fit(dataset, dataset)
    assert windows == [[False, False, False, True]] * 4 + [[False, True]]  # clean, adversarial per batch


def test_processes_agree_on_a_stop_every_10_steps_and_at_the_end_of_an_epoch(monkeypatch, tiny_model_factory,
                                                                           tokenizer):
    """Each agreement is an all-reduce and a sync with the host: not one per step."""
    import torch.distributed as dist

    _, names = splits(rows_per_class=2)
    trainer = new_trainer(tiny_model_factory, tokenizer, names)
    trainer.world_size, trainer._run = 2, type("Run", (), {"step": 0})()
    reduced = []
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, op=None: reduced.append(trainer._run.step))
    for step in range(1, 26):
        trainer._run.step = step
        assert trainer._stop_agreed(end_of_epoch=step == 25) is False
    assert reduced == [10, 20, 25]


def test_two_gloo_processes_train_exactly_like_one_with_the_same_effective_batch(tmp_path, tiny_model_dir):
    """2 processes x batch 8 and 1 process x 8 x 2 accumulated take the same batches in the same
    windows; every row must weigh the same in both, also in the last window, whose two batches (8
    and 4 rows) land on different processes."""
    data = tmp_path / "train.csv"
    make_rows(25).to_csv(data, index=False)  # 75 rows: 60 train = 8 batches of 8, the last of 4
    common = ["--epochs", "2", "--batch-size", "8", "--dropout", "0", "--precision", "no", "--save-every", "None"]
    run = subprocess.run([*TORCHRUN, str(ROOT / "full_finetune.py"),
                          *tiny_run_args(tiny_model_dir, data, tmp_path / "two", *common)],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path, env=subprocess_env(threads=1))
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("Test (") == 1  # only rank 0 reports
    assert "effective batch 16 (8 x 1 accumulated x 2 processes)" in run.stdout
    assert full_finetune.main(tiny_run_args(tiny_model_dir, data, tmp_path / "one", *common, "--grad-accum", "2")) == 0
    two = torch.load(tmp_path / "two" / "best_full_finetune_model.pth", weights_only=True)
    one = torch.load(tmp_path / "one" / "best_full_finetune_model.pth", weights_only=True)
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=1e-5, rtol=1e-4)
    metrics = [json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("two", "one")]
    assert metrics[0]["test"]["confusion_matrix"] == metrics[1]["test"]["confusion_matrix"]
    assert metrics[0]["test"]["loss"] == pytest.approx(metrics[1]["test"]["loss"], rel=1e-4)


def test_an_interrupted_two_process_run_with_adversarial_training_resumes(tmp_path, tiny_model_dir):
    make_rows(60).to_csv(tmp_path / "train.csv", index=False)
    command = [*TORCHRUN, str(ROOT / "full_finetune.py"),
               *tiny_run_args(tiny_model_dir, "train.csv", "out", "--epochs", "12", "--patience", "12",
                              "--batch-size", "8", "--adversarial", "0.5")]
    env = subprocess_env(threads=1)
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env)
    for line in run.stdout:
        if line.startswith("Training "):
            break
    time.sleep(1)
    run.send_signal(signal.SIGINT)  # torchrun passes it on to both workers
    _, err = run.communicate(timeout=120)
    assert run.returncode != 0
    assert err.count("Stopped in epoch") == 1 and "--resume" in err
    checkpoint = torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=True)
    assert checkpoint["world_size"] == 2 and len(checkpoint["ranks"]) == 2
    # Each process draws its dropout masks from its own seed (the tiny model has dropout 0.1).
    seeds = []
    for rank in checkpoint["ranks"]:
        generator = torch.Generator()
        generator.set_state(rank["rng"]["torch"])
        seeds.append(generator.initial_seed())
    assert seeds[0] != seeds[1]

    resumed = subprocess.run(command + ["--resume"], capture_output=True, text=True, cwd=tmp_path, env=env,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming at epoch" in resumed.stdout
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["epochs_run"] == 12


def test_bad_input_under_torchrun_is_reported_once_and_every_process_exits_2(tmp_path, tiny_model_dir):
    run = subprocess.run([*TORCHRUN, "--redirects", "0", str(ROOT / "full_finetune.py"),
                          *tiny_run_args(tiny_model_dir, tmp_path / "missing.csv", tmp_path / "out")],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path, env=subprocess_env(threads=1))
    assert run.returncode != 0
    assert run.stderr.count("error: The file") == 1, run.stderr[-3000:]
    assert run.stderr.count("exitcode  : 2") == 2  # torchrun's report: both processes exited with status 2
    assert f'File "{ROOT}' not in run.stderr  # torchrun's own traceback only, none from full_finetune.py
    assert not os.path.exists(tmp_path / "out" / "metrics.json")
