"""Checkpoints, resuming, interrupts and non-finite losses."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from test_training import config_for

import full_finetune
from config import FinetuneError
from conftest import ROOT, make_rows
from full_finetune import Split, Trainer, TrainingInterrupted, encode_labels, load_checkpoint

TIMING = ("seconds", "samples_per_second")


def resume_config(tmp_path, **overrides):
    defaults = {"OUTPUT_DIR": str(tmp_path), "BATCH_SIZE": 8, "EPOCHS": 3, "SAVE_EVERY_STEPS": None}
    return config_for(**{**defaults, **overrides})


def new_trainer(config, tiny_model_factory, tokenizer):
    frame = make_rows(24)
    names, ids = encode_labels(frame["label"])
    trainer = Trainer(config, names, model=tiny_model_factory(dropout=0.1), tokenizer=tokenizer, progress=False)
    train = trainer.dataset(Split(frame["text"].tolist(), ids))
    val = trainer.dataset(Split(frame["text"].tolist()[:30], ids[:30]))
    return trainer, train, val


def without_timing(history):
    return [{k: v for k, v in row.items() if k not in TIMING} for row in history]


# 9 optimizer steps per epoch: stops mid-epoch 1 and mid-epoch 2, the latter also with a weight average
@pytest.mark.parametrize("stop_after_step, ema_decay", [(7, None), (12, None), (12, 0.9)])
def test_an_interrupted_and_resumed_run_ends_like_an_uninterrupted_one(
        monkeypatch, tmp_path, tiny_model_factory, tokenizer, stop_after_step, ema_decay):
    straight, train, val = new_trainer(resume_config(tmp_path / "a", EMA_DECAY=ema_decay), tiny_model_factory,
                                       tokenizer)
    straight.fit(train, val)

    config = resume_config(tmp_path / "b", EMA_DECAY=ema_decay)
    interrupted, train, val = new_trainer(config, tiny_model_factory, tokenizer)
    original_step = Trainer._optimizer_step

    def step_then_stop(self):  # what a SIGINT does: ask to stop after this step
        original_step(self)
        if self.scheduler.last_epoch == stop_after_step:
            self.request_stop()

    monkeypatch.setattr(Trainer, "_optimizer_step", step_then_stop)
    with pytest.raises(TrainingInterrupted, match="--resume"):
        interrupted.fit(train, val)
    monkeypatch.undo()
    checkpoint = load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    assert checkpoint["scheduler"]["last_epoch"] == stop_after_step

    resumed, train, val = new_trainer(config, tiny_model_factory, tokenizer)
    history = resumed.fit(train, val, checkpoint)
    assert without_timing(history) == without_timing(straight.history)
    assert resumed.best_epoch == straight.best_epoch
    final, expected = resumed.model.state_dict(), straight.model.state_dict()
    for key in expected:
        torch.testing.assert_close(final[key], expected[key], rtol=1e-6, atol=1e-7)


def test_a_checkpoint_is_written_every_save_every_steps_and_loads_weights_only(tmp_path, tiny_model_factory,
                                                                               tokenizer, monkeypatch):
    trainer, train, val = new_trainer(resume_config(tmp_path, EPOCHS=1, SAVE_EVERY_STEPS=4),
                                      tiny_model_factory, tokenizer)
    saved_at = []
    original = Trainer.save_checkpoint
    monkeypatch.setattr(Trainer, "save_checkpoint",
                        lambda self: (saved_at.append((self.epoch, self.scheduler.last_epoch)), original(self)))
    trainer.fit(train, val)
    assert saved_at == [(1, 4), (1, 8), (2, 9)]  # steps 4 and 8, then the end of epoch 1
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "scaler", "ranks", "epoch", "batches_done", "best_score",
            "epochs_without_gain", "history", "label_names", "config", "best_model"} <= set(checkpoint)
    assert {"rng", "epoch_sums"} <= set(checkpoint["ranks"][0]) and checkpoint["world_size"] == 1


def test_resuming_with_a_changed_setting_is_refused_naming_it(tmp_path, tiny_model_factory, tokenizer):
    trainer, train, val = new_trainer(resume_config(tmp_path, EPOCHS=1), tiny_model_factory, tokenizer)
    trainer.fit(train, val)
    checkpoint = load_checkpoint(tmp_path / "checkpoint.pt")
    changed = resume_config(tmp_path, EPOCHS=1, BATCH_SIZE=16)
    with pytest.raises(FinetuneError, match="BATCH_SIZE is 16 now but was 8"):
        full_finetune.check_resumable(checkpoint, changed, trainer.label_names)
    with pytest.raises(FinetuneError, match="labels in the data differ"):
        full_finetune.check_resumable(checkpoint, resume_config(tmp_path, EPOCHS=1), ["x", "y"])
    full_finetune.check_resumable(checkpoint, resume_config(tmp_path, EPOCHS=1), trainer.label_names)


def test_missing_or_foreign_checkpoints_are_refused(tmp_path):
    with pytest.raises(FinetuneError, match="no checkpoint"):
        load_checkpoint(tmp_path / "checkpoint.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(FinetuneError, match="cannot be read as a checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, tiny_model_factory,
                                                                            tokenizer):
    trainer, train, val = new_trainer(resume_config(tmp_path, EPOCHS=3), tiny_model_factory, tokenizer)
    forward = trainer.model.forward
    calls = {"n": 0}

    def nan_after_first_epoch(*args, **kwargs):
        output = forward(*args, **kwargs)
        calls["n"] += trainer.model.training
        if trainer.epoch == 2 and trainer.model.training:
            output.logits = output.logits * float("nan")
        return output

    trainer.model.forward = nan_after_first_epoch
    with pytest.raises(FinetuneError, match="loss became nan.*last good checkpoint"):
        trainer.fit(train, val)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 2  # written after epoch 1, untouched


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(FinetuneError):
        full_finetune.main(["--data", str(tmp_path / "missing.csv"), "--output-dir", str(tmp_path), "--debug"])


def test_a_second_ctrl_c_quits_at_once(monkeypatch, tmp_path, tiny_model_factory, tokenizer):
    trainer, train, val = new_trainer(resume_config(tmp_path), tiny_model_factory, tokenizer)
    original_step = Trainer._optimizer_step

    def step_interrupted_twice(self):
        original_step(self)
        if self.scheduler.last_epoch == 3:
            signal.raise_signal(signal.SIGINT)  # first: finish the step, then save and stop
            assert self._stop_requested
            signal.raise_signal(signal.SIGINT)  # second: out at once

    monkeypatch.setattr(Trainer, "_optimizer_step", step_interrupted_twice)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(train, val)
    assert not (tmp_path / "checkpoint.pt").exists()  # it did not wait to write one
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_writes_a_checkpoint_and_resume_finishes_the_run(tmp_path, tiny_model_dir, stop_signal):
    data = tmp_path / "train.csv"
    make_rows(60).to_csv(data, index=False)
    args = [sys.executable, str(ROOT / "full_finetune.py"), "--model", str(tiny_model_dir), "--data", str(data),
            "--output-dir", str(tmp_path / "out"), "--epochs", "15", "--patience", "15", "--max-length", "32",
            "--batch-size", "8"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    for line in run.stdout:  # training starts right after this line
        if line.startswith("Training "):
            break
    time.sleep(0.5)
    run.send_signal(stop_signal)
    out, err = run.communicate(timeout=120)
    assert run.returncode == 130, err
    assert f"{stop_signal.name}: finishing this step" in err and "--resume" in err and "Traceback" not in err
    assert (tmp_path / "out" / "checkpoint.pt").is_file()
    assert not (tmp_path / "out" / "metrics.json").exists()

    resumed = subprocess.run(args + ["--resume"], capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "Resuming at epoch" in resumed.stdout
    assert (tmp_path / "out" / "metrics.json").is_file()
    assert not (tmp_path / "out" / "checkpoint.pt").exists()  # the finished outputs replace it
