"""Checkpoints, resuming (and the settings a resume refuses to change), interrupts, non-finite losses."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import full_finetune
from config import SETTING_BY_NAME, FinetuneError
from conftest import ROOT, config_for, labelled, make_rows, subprocess_env, tiny_run_args
from full_finetune import Trainer, TrainingInterrupted, load_checkpoint

TIMING = ("seconds", "samples_per_second", "tokens_per_second", "val_seconds")


def resumable(new_trainer, output_dir, **overrides):
    """A trainer of the tiny model with dropout (so that the random streams matter), its training
    rows and its validation rows; 9 batches of 8 per epoch."""
    settings = {"OUTPUT_DIR": str(output_dir), "BATCH_SIZE": 8, "EPOCHS": 3, "SAVE_EVERY_STEPS": None,
                "LOG_EVERY_STEPS": 2, **overrides}
    trainer = new_trainer(model_kwargs={"dropout": 0.1}, **settings)
    rows = labelled()
    train = trainer.dataset(rows)
    val = trainer.dataset(full_finetune.Split(rows.texts[:30], rows.labels[:30]))
    return trainer, train, val


def without_timing(history):
    return [{k: v for k, v in row.items() if k not in TIMING} for row in history]


def stop_at_step(trainer, step):
    """What a SIGINT does, at a chosen step: ask to stop; the step finishes first."""
    trainer.step_hooks.append(lambda run: run.step == step and run.stepped and trainer.request_stop())


class StoppedAtStep4(Trainer):
    """The Trainer of the command line, asked to stop after optimizer step 4 (as by Ctrl-C)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        stop_at_step(self, 4)


# 9 windows per epoch (5 optimizer steps with accumulation 2): stops mid-epoch 1 and mid-epoch 2,
# with the weight average, with accumulation, with adversarial training.
@pytest.mark.parametrize("stop_after_step, overrides", [
    (7, {}), (12, {"EMA_DECAY": 0.9}), (7, {"GRADIENT_ACCUMULATION_STEPS": 2}),
    (4, {"ADVERSARIAL_EPSILON": 0.5, "GRADIENT_ACCUMULATION_STEPS": 2})])
def test_an_interrupted_and_resumed_run_ends_like_an_uninterrupted_one(tmp_path, new_trainer, stop_after_step,
                                                                       overrides):
    straight, train, val = resumable(new_trainer, tmp_path / "a", **overrides)
    straight.fit(train, val)

    interrupted, train, val = resumable(new_trainer, tmp_path / "b", **overrides)
    stop_at_step(interrupted, stop_after_step)
    with pytest.raises(TrainingInterrupted, match="--resume"):
        interrupted.fit(train, val)
    assert load_checkpoint(tmp_path / "b" / "checkpoint.pt")["step"] == stop_after_step

    resumed, train, val = resumable(new_trainer, tmp_path / "b", **overrides)
    history = resumed.fit(train, val, resume=tmp_path / "b" / "checkpoint.pt")
    assert without_timing(history) == without_timing(straight.history)
    assert without_timing(resumed.step_log) == without_timing(straight.step_log)
    assert resumed.best_epoch == straight.best_epoch
    final, expected = resumed.model.state_dict(), straight.model.state_dict()
    for key in expected:
        torch.testing.assert_close(final[key], expected[key], rtol=1e-6, atol=1e-7)


def test_a_checkpoint_is_written_every_save_every_steps_and_loads_weights_only(tmp_path, new_trainer):
    trainer, train, val = resumable(new_trainer, tmp_path / "out", EPOCHS=1, SAVE_EVERY_STEPS=4)
    saved_at = []
    save = trainer.save_checkpoint
    trainer.save_checkpoint = lambda run: (saved_at.append((run.epoch, run.step)), save(run))
    trainer.fit(train, val)
    assert saved_at == [(1, 4), (1, 8), (2, 9)]  # steps 4 and 8, then the end of epoch 1
    checkpoint = torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=True)
    assert {"model", "optimizer", "scaler", "ema", "ranks", "step", "epoch", "batches_done", "early_stopping",
            "history", "step_log", "label_names", "config", "precision"} <= set(checkpoint)
    assert {"best_score", "best_epoch", "best_state", "epochs_without_gain"} == set(checkpoint["early_stopping"])
    assert {"rng", "sums"} <= set(checkpoint["ranks"][0]) and checkpoint["world_size"] == 1


@pytest.fixture(scope="module")
def finished_checkpoint(tmp_path_factory, tokenizer):
    from conftest import NAMES, tiny_bert

    folder = tmp_path_factory.mktemp("finished") / "out"
    trainer = Trainer(config_for(OUTPUT_DIR=str(folder), EPOCHS=1, BATCH_SIZE=8), NAMES, model=tiny_bert(tokenizer),
                      tokenizer=tokenizer, progress=False)
    dataset = trainer.dataset(labelled())
    trainer.fit(dataset, dataset)
    return load_checkpoint(folder / "checkpoint.pt"), trainer.label_names, trainer.config


# Written out by hand, not derived from the table's flag: what a resume must refuse to change
# (it changes what is trained), with another valid value for each...
MUST_MATCH = {
    "MODEL_NAME": "other-model", "NUM_LABELS": 3, "MAX_LENGTH": 24, "POOLING": "cls", "COSINE_HEAD_SCALE": 10.0,
    "DROPOUT": 0.2, "FREEZE_WORD_EMBEDDINGS": False, "EPOCHS": 5, "BATCH_SIZE": 16, "GRADIENT_ACCUMULATION_STEPS": 2,
    "LEARNING_RATE": 3e-4, "WEIGHT_DECAY": 0.1, "WARMUP_RATIO": 0.2, "SCHEDULER": "cosine", "LAYERWISE_LR_DECAY": 0.9,
    "MAX_GRAD_NORM": None, "LABEL_SMOOTHING": 0.0, "CLASS_WEIGHTS": "balanced", "EMA_DECAY": None,
    "ADVERSARIAL_EPSILON": 0.5, "GROUP_BY_LENGTH": False, "FUSED_ADAMW": False, "EARLY_STOPPING_PATIENCE": 2,
    "METRIC": "log_loss", "LABEL_ORDER": ["refund", "price", "delivery"], "TRUNCATION": "head_tail",
    "REFIT": False, "DATA_PATH": "other.csv", "TEXT_COLUMN": "body", "LABEL_COLUMN": "intent",
    "TRAIN_RATIO": 0.7, "VAL_RATIO": 0.15, "SEED": 7,
}
# ... and what it may change, since it cannot change what is trained.
MAY_CHANGE = {
    "EVAL_BATCH_SIZE": 7, "MIXED_PRECISION": "auto", "SAVE_EVERY_STEPS": 3, "LOG_EVERY_STEPS": 2,
    "REPORT_TO": "tensorboard", "TEST_PATH": "test.csv", "N_FOLDS": 3, "CV_SUBMISSION": "refit",
    "SAMPLE_SUBMISSION": "sample_submission.csv", "OUTPUT_DIR": "elsewhere", "DEVICE": "cpu",
}


def test_the_two_lists_name_every_setting_once():
    assert set(MUST_MATCH) | set(MAY_CHANGE) == set(SETTING_BY_NAME) and not set(MUST_MATCH) & set(MAY_CHANGE)


@pytest.mark.parametrize("name", MUST_MATCH)
def test_resuming_with_any_setting_that_changes_training_is_refused_naming_it(finished_checkpoint, name):
    checkpoint, names, config = finished_checkpoint
    changed = config.copy()
    setattr(changed, name, MUST_MATCH[name])
    assert getattr(changed, name) != getattr(config, name)
    with pytest.raises(FinetuneError, match=f"Cannot resume: {name} is .* now but was"):
        full_finetune.check_resumable(checkpoint, changed, names, 1, "fp32", checkpoint["fingerprint"])


def test_the_settings_that_cannot_change_training_may_change_on_resume(finished_checkpoint):
    checkpoint, names, config = finished_checkpoint
    changed = config.copy()
    for name, value in MAY_CHANGE.items():
        setattr(changed, name, value)
    assert all(getattr(changed, name) != getattr(config, name) for name in MAY_CHANGE)
    full_finetune.check_resumable(checkpoint, changed.validate(), names, 1, "fp32", checkpoint["fingerprint"])


def test_one_sentence_names_every_changed_setting_and_labels_precision_and_processes_are_checked(
        finished_checkpoint):
    checkpoint, names, config = finished_checkpoint
    changed = config.copy()
    changed.WEIGHT_DECAY, changed.MAX_GRAD_NORM = 0.0, None
    with pytest.raises(FinetuneError) as err:
        full_finetune.check_resumable(checkpoint, changed, names, 1, "fp32", checkpoint["fingerprint"])
    message = str(err.value)
    assert "WEIGHT_DECAY is 0.0 now but was 0.01" in message and "MAX_GRAD_NORM is None now but was 1.0" in message
    assert "\n" not in message
    with pytest.raises(FinetuneError, match="labels in the data differ"):
        full_finetune.check_resumable(checkpoint, config, ["x", "y"], 1, "fp32", checkpoint["fingerprint"])
    with pytest.raises(FinetuneError, match="trained in fp32 and this one would train in fp16"):
        full_finetune.check_resumable(checkpoint, config, names, 1, "fp16", checkpoint["fingerprint"])
    with pytest.raises(FinetuneError, match="had 1 processes and this one has 2"):
        full_finetune.check_resumable(checkpoint, config, names, 2, "fp32", checkpoint["fingerprint"])


def test_a_changed_weight_decay_is_refused_by_the_command_line_and_metrics_record_what_was_used(
        monkeypatch, tmp_path, capsys, tiny_model_dir):
    data = tmp_path / "train.csv"
    make_rows(40).to_csv(data, index=False)
    args = tiny_run_args(tiny_model_dir, data, tmp_path / "out", "--epochs", "3", "--weight-decay", "0.05")
    with monkeypatch.context() as patch:
        patch.setattr(full_finetune, "Trainer", StoppedAtStep4)
        assert full_finetune.main(args) == 130
    assert full_finetune.main([*args, "--resume", "--weight-decay", "0.1"]) == 2
    assert "WEIGHT_DECAY is 0.1 now but was 0.05" in capsys.readouterr().err
    checkpoint = tmp_path / "out" / "checkpoint.pt"
    assert full_finetune.main([*args, "--resume", str(checkpoint), "--eval-batch-size", "7"]) == 0
    used = json.loads((tmp_path / "out" / "metrics.json").read_text())["config"]
    assert used["WEIGHT_DECAY"] == 0.05 and used["EVAL_BATCH_SIZE"] == 7
    assert not checkpoint.exists()


def test_missing_foreign_or_old_checkpoints_are_refused(tmp_path, tiny_config, capsys):
    assert full_finetune.main(["--resume", "--output-dir", str(tmp_path), "--data", tiny_config.DATA_PATH]) == 2
    assert "There is no checkpoint at" in capsys.readouterr().err
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(FinetuneError, match="cannot be read as a checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"format": 1}, tmp_path / "old.pt")
    with pytest.raises(FinetuneError, match="not a checkpoint of this version"):
        load_checkpoint(tmp_path / "old.pt")


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, new_trainer):
    trainer, train, val = resumable(new_trainer, tmp_path / "out", EPOCHS=3)
    forward, epoch = trainer.model.forward, {"now": 1}
    trainer.step_hooks.append(lambda run: epoch.update(now=run.epoch + (run.batches_done == 9)))

    def nan_in_epoch_2(*args, **kwargs):
        output = forward(*args, **kwargs)
        if epoch["now"] == 2 and trainer.model.training:
            output.logits = output.logits * float("nan")
        return output

    trainer.model.forward = nan_in_epoch_2
    with pytest.raises(FinetuneError, match="loss became nan.*last good checkpoint"):
        trainer.fit(train, val)
    assert load_checkpoint(tmp_path / "out" / "checkpoint.pt")["epoch"] == 2  # written after epoch 1, untouched


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(FinetuneError):
        full_finetune.main(["--data", str(tmp_path / "missing.csv"), "--output-dir", str(tmp_path / "out"), "--debug"])


def test_a_second_ctrl_c_quits_at_once(tmp_path, new_trainer):
    trainer, train, val = resumable(new_trainer, tmp_path / "out")

    def interrupted_twice(run):
        if run.step == 3:
            signal.raise_signal(signal.SIGINT)  # first: finish the step, then save and stop
            assert run.stop.requested
            signal.raise_signal(signal.SIGINT)  # second: out at once

    trainer.step_hooks.append(interrupted_twice)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(train, val)
    assert not (tmp_path / "out" / "checkpoint.pt").exists()  # it did not wait to write one
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_writes_a_checkpoint_and_resume_finishes_the_run(tmp_path, tiny_model_dir, stop_signal, capsys):
    data = tmp_path / "train.csv"
    make_rows(60).to_csv(data, index=False)
    args = tiny_run_args(tiny_model_dir, data, tmp_path / "out", "--epochs", "15", "--patience", "15",
                         "--batch-size", "8")
    run = subprocess.Popen([sys.executable, str(ROOT / "full_finetune.py"), *args], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env=subprocess_env())
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
    assert full_finetune.main([*args, "--resume"]) == 0  # in this process: one start-up less
    assert "Resuming at epoch" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["epochs_run"] == 15
    assert not (tmp_path / "out" / "checkpoint.pt").exists()  # the finished outputs replace it


def test_sigterm_outside_the_training_loop_stops_like_ctrl_c(monkeypatch, own_run, tiny_model_dir, small_csv, capsys):
    before = {p.name: p.read_bytes() for p in own_run.iterdir() if p.is_file()}

    def not_handled_by_main(signum, frame):
        raise AssertionError("SIGTERM reached the handler main() should have replaced")

    previous = signal.signal(signal.SIGTERM, not_handled_by_main)

    def terminated_while_writing(folder, write):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)

    monkeypatch.setattr(full_finetune.OutputFolder, "publish", terminated_while_writing)
    try:
        assert full_finetune.main(tiny_run_args(tiny_model_dir, small_csv, own_run, "--epochs", "1")) == 130
        assert signal.getsignal(signal.SIGTERM) is not_handled_by_main  # main restored the handler it found
    finally:
        signal.signal(signal.SIGTERM, previous)
    err = capsys.readouterr().err
    assert "Interrupted" in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in own_run.iterdir() if p.is_file() and p.name in before} == before
