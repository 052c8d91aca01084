"""Two CPU processes with gloo, launched by torch.distributed.run (torchrun), on a tiny model."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from config import FullFinetuneConfig
from conftest import ROOT, make_rows
from full_finetune import ShuffledBatches, Trainer, load_data


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


def test_two_process_gloo_run_matches_a_single_process_evaluation(tmp_path, tiny_model_dir):
    data = tmp_path / "train.csv"
    make_rows(60).to_csv(data, index=False)
    out = tmp_path / "out"
    flags = ["--model", str(tiny_model_dir), "--data", str(data), "--output-dir", str(out), "--epochs", "8",
             "--patience", "1", "--max-length", "32", "--batch-size", "8", "--lr", "1e-3"]
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(ROOT / "full_finetune.py"), *flags],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("Test (") == 1  # only rank 0 reports
    assert "effective batch 16 (8 x 1 accumulated x 2 processes)" in run.stdout
    assert sorted(p.name for p in out.iterdir()) == sorted([
        "best_full_finetune_model.pth", "full_finetune_model", "full_finetune_training_curves.png",
        "full_finetune_confusion_matrix.png", "metrics.json", "history.csv", "data_report.json"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs_run"] < 8  # early stopping ended the run on both ranks together

    config = FullFinetuneConfig()
    config.DATA_PATH, config.MAX_LENGTH = str(data), 32
    split = load_data(config)
    single = Trainer.from_pretrained(out / "full_finetune_model", config, progress=False)
    expected = single.evaluate(single.dataset(split.test))
    assert metrics["test"]["accuracy"] == expected["accuracy"]
    assert metrics["test"]["macro_f1"] == pytest.approx(expected["macro_f1"], abs=1e-12)
    assert metrics["test"]["confusion_matrix"] == expected["confusion_matrix"]
    assert metrics["test"]["loss"] == pytest.approx(expected["loss"], rel=1e-4)


def test_an_interrupted_two_process_run_resumes(tmp_path, tiny_model_dir):
    import signal
    import time

    make_rows(60).to_csv(tmp_path / "train.csv", index=False)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(ROOT / "full_finetune.py"), "--model", str(tiny_model_dir), "--data", "train.csv",
               "--output-dir", "out", "--epochs", "15", "--patience", "15", "--max-length", "32",
               "--batch-size", "8"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env)
    for line in run.stdout:
        if line.startswith("Training "):
            break
    time.sleep(1)
    run.send_signal(signal.SIGINT)  # torchrun passes it on to both workers
    _, err = run.communicate(timeout=120)
    assert run.returncode != 0
    assert err.count("Stopped in epoch") == 1 and "--resume" in err
    checkpoint = __import__("torch").load(tmp_path / "out" / "checkpoint.pt", weights_only=True)
    assert checkpoint["world_size"] == 2 and len(checkpoint["ranks"]) == 2

    resumed = subprocess.run(command + ["--resume"], capture_output=True, text=True, cwd=tmp_path, env=env,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming at epoch" in resumed.stdout
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["epochs_run"] == 15
