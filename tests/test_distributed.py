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

import full_finetune
from conftest import ROOT, make_rows, subprocess_env, tiny_run_args
from full_finetune import ShuffledBatches
from runtime import StopAgreement

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


class FakeCollectives:
    """torch.distributed.all_reduce for several StopAgreement objects in one process: the n-th
    all-reduce of every rank shares one slot, and its result (the maximum) is written into each
    rank's tensor when that rank waits for it, by which time every rank has sent its value."""

    def __init__(self, monkeypatch):
        import torch.distributed as dist

        self.slots, self.calls, self.waited_own_step = {}, {}, False
        monkeypatch.setattr(dist, "all_reduce", self.all_reduce)

    def begin(self, rank):
        """Rank `rank` starts a step: all-reduces it starts from now on are this step's own."""
        self.current_rank, self.step_starts_at = rank, self.calls.get(rank, -1) + 1

    def all_reduce(self, tensor, op=None, async_op=False):
        rank = self.current_rank
        index = self.calls[rank] = self.calls.get(rank, -1) + 1
        self.slots.setdefault(index, []).append(tensor)
        fake = self

        class Work:
            def wait(self):
                fake.waited_own_step |= index >= fake.step_starts_at
                tensor.fill_(max(t.item() for t in fake.slots[index]))

        if not async_op:
            Work().wait()
        return Work() if async_op else None


def test_a_stop_request_is_agreed_by_every_process_one_step_later_without_waiting_on_its_own_step(monkeypatch):
    collectives = FakeCollectives(monkeypatch)
    ranks = [StopAgreement(torch.device("cpu"), world_size=2) for _ in range(2)]
    agreed = {0: [], 1: []}
    for step in range(1, 8):
        if step == 3:
            ranks[1].requested = True  # Ctrl-C reached rank 1 during step 3
        for rank, agreement in enumerate(ranks):
            collectives.begin(rank)
            agreed[rank].append(agreement.after_step())
    assert agreed[0] == agreed[1] == [False, False, False, True, True, True, True]
    assert not collectives.waited_own_step  # a step never waits for the all-reduce it started
    assert all(len(slot) == 2 for slot in collectives.slots.values())  # one all-reduce per step and rank


def test_at_the_end_of_an_epoch_the_processes_agree_at_once(monkeypatch):
    collectives = FakeCollectives(monkeypatch)
    collectives.begin(0)
    agreement = StopAgreement(torch.device("cpu"), world_size=2)
    assert agreement.after_step() is False
    agreement.requested = True
    assert agreement.end_of_epoch() is True  # no step later: the next epoch must not start
    single = StopAgreement(torch.device("cpu"), world_size=1)
    single.requested = True
    assert single.after_step() is True and collectives.calls == {0: 1}  # one process: no collective


# Run under torchrun: full_finetune.main with DDP built here (one bucket) and a communication hook
# counting the gradient all-reduces; after every optimizer step rank 0 writes the count of its window.
COUNTING_ALL_REDUCES = """
import os, sys
import torch
import full_finetune
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

counts = [0]

def counting_ddp(model, device, world_size):
    ddp = DistributedDataParallel(model, bucket_cap_mb=1024)

    def hook(state, bucket):
        counts[-1] += 1
        return allreduce_hook(None, bucket)

    ddp.register_comm_hook(None, hook)
    return ddp

class Counting(full_finetune.Trainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        log = open(sys.argv[1], "a") if os.environ["RANK"] == "0" else None
        def write(run):
            if log:
                log.write(f"{counts[-1]}\\n")
                log.flush()
            counts.append(0)
        self.step_hooks.append(write)

full_finetune.for_processes = counting_ddp
full_finetune.Trainer = Counting
sys.exit(full_finetune.main(sys.argv[2:]))
"""


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
    assert run.stdout.count("Test split (") == 1  # only rank 0 reports
    assert "effective batch 16 (8 x 1 accumulated x 2 processes)" in run.stdout
    assert full_finetune.main(tiny_run_args(tiny_model_dir, data, tmp_path / "one", *common, "--grad-accum", "2")) == 0
    two = torch.load(tmp_path / "two" / "best_full_finetune_model.pth", weights_only=True)
    one = torch.load(tmp_path / "one" / "best_full_finetune_model.pth", weights_only=True)
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=1e-5, rtol=1e-4)
    metrics = [json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("two", "one")]
    assert metrics[0]["test"]["confusion_matrix"] == metrics[1]["test"]["confusion_matrix"]
    assert metrics[0]["test"]["loss"] == pytest.approx(metrics[1]["test"]["loss"], rel=1e-4)


def test_an_interrupted_two_process_run_with_adversarial_training_resumes_and_reduces_once_per_step(tmp_path,
                                                                                                  tiny_model_dir):
    """Ctrl-C under torchrun: both processes stop after the same step with one checkpoint; with
    adversarial training and accumulation (4 backward passes per window) the gradients are still
    all-reduced once per optimizer step, on the window's last backward pass."""
    make_rows(60).to_csv(tmp_path / "train.csv", index=False)
    (tmp_path / "counting.py").write_text(COUNTING_ALL_REDUCES)
    args = tiny_run_args(tiny_model_dir, "train.csv", "out", "--epochs", "12", "--patience", "12", "--batch-size", "4",
                         "--grad-accum", "2", "--adversarial", "0.5")
    env = subprocess_env(threads=1)
    run = subprocess.Popen([*TORCHRUN, "counting.py", str(tmp_path / "counts.txt"), *args], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env)
    for line in run.stdout:
        if line.startswith("Training "):
            break
    time.sleep(1)
    run.send_signal(signal.SIGINT)  # torchrun passes it on to both workers
    _, err = run.communicate(timeout=120)
    assert run.returncode != 0
    assert err.count("Stopped in epoch") == 1 and "--resume" in err
    counts = (tmp_path / "counts.txt").read_text().split()
    assert len(counts) > 5 and set(counts) == {"1"}, counts  # one all-reduce per window of 4 backward passes
    checkpoint = torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=True)
    assert checkpoint["world_size"] == 2 and len(checkpoint["ranks"]) == 2
    # Each process draws its dropout masks from its own seed (the tiny model has dropout 0.1).
    seeds = []
    for rank in checkpoint["ranks"]:
        generator = torch.Generator()
        generator.set_state(rank["rng"]["torch"])
        seeds.append(generator.initial_seed())
    assert seeds[0] != seeds[1]

    resumed = subprocess.run([*TORCHRUN, str(ROOT / "full_finetune.py"), *args, "--resume"], capture_output=True,
                             text=True, cwd=tmp_path, env=env, timeout=600)
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
