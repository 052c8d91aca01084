"""Checkpoints, resuming (and the settings a resume refuses to change), interrupts, non-finite losses."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from test_training import config_for

import full_finetune
from config import SETTINGS, FinetuneError
from conftest import ROOT, make_rows, subprocess_env, tiny_run_args
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


def interrupt_after(monkeypatch, step):
    """What a SIGINT does: ask to stop; the step finishes first."""
    original_step = Trainer._optimizer_step

    def step_then_stop(self):
        original_step(self)
        if self._run.step == step:
            self.request_stop()

    monkeypatch.setattr(Trainer, "_optimizer_step", step_then_stop)


# 9 windows per epoch (5 optimizer steps with accumulation 2): stops mid-epoch 1 and mid-epoch 2,
# with the weight average, with accumulation, with adversarial training.
@pytest.mark.parametrize("stop_after_step, overrides", [
    (7, {}), (12, {"EMA_DECAY": 0.9}), (7, {"GRADIENT_ACCUMULATION_STEPS": 2}),
    (4, {"ADVERSARIAL_EPSILON": 0.5, "GRADIENT_ACCUMULATION_STEPS": 2})])
def test_an_interrupted_and_resumed_run_ends_like_an_uninterrupted_one(
        monkeypatch, tmp_path, tiny_model_factory, tokenizer, stop_after_step, overrides):
    straight, train, val = new_trainer(resume_config(tmp_path / "a", **overrides), tiny_model_factory, tokenizer)
    straight.fit(train, val)

    config = resume_config(tmp_path / "b", **overrides)
    interrupted, train, val = new_trainer(config, tiny_model_factory, tokenizer)
    with monkeypatch.context() as patch:
        interrupt_after(patch, stop_after_step)
        with pytest.raises(TrainingInterrupted, match="--resume"):
            interrupted.fit(train, val)
    assert load_checkpoint(tmp_path / "b" / "checkpoint.pt")["step"] == stop_after_step

    resumed, train, val = new_trainer(config, tiny_model_factory, tokenizer)
    history = resumed.fit(train, val, resume=tmp_path / "b" / "checkpoint.pt")
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
                        lambda self: (saved_at.append((self._run.epoch, self._run.step)), original(self)))
    trainer.fit(train, val)
    assert saved_at == [(1, 4), (1, 8), (2, 9)]  # steps 4 and 8, then the end of epoch 1
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert {"model", "optimizer", "scaler", "ema", "ranks", "step", "epoch", "batches_done", "best_score",
            "epochs_without_gain", "history", "label_names", "config", "best_model", "precision"} <= set(checkpoint)
    assert {"rng", "sums"} <= set(checkpoint["ranks"][0]) and checkpoint["world_size"] == 1


@pytest.fixture(scope="module")
def finished_checkpoint(tmp_path_factory, tokenizer):
    from conftest import tiny_bert

    folder = tmp_path_factory.mktemp("finished")
    trainer, train, val = new_trainer(resume_config(folder, EPOCHS=1), lambda **k: tiny_bert(tokenizer, **k),
                                      tokenizer)
    trainer.fit(train, val)
    return load_checkpoint(folder / "checkpoint.pt"), trainer.label_names, trainer.config


def changed_value(setting, current):
    """A valid value other than `current`, for every setting."""
    for candidate in (not current if isinstance(current, bool) else None, 0.5, 0.3, 2, 7, 0.05, "cosine", "cls",
                      "fp16", "val_loss", "balanced", "other.csv"):
        if candidate != current and setting.kind.accepts(candidate):
            return candidate
    raise AssertionError(setting.name)


MUST_MATCH = [s for s in SETTINGS if not s.may_change_on_resume]


@pytest.mark.parametrize("setting", MUST_MATCH, ids=[s.name for s in MUST_MATCH])
def test_resuming_with_any_setting_that_changes_training_is_refused_naming_it(finished_checkpoint, setting):
    checkpoint, names, config = finished_checkpoint
    changed = config.copy()
    setattr(changed, setting.name, changed_value(setting, getattr(config, setting.name)))
    with pytest.raises(FinetuneError, match=f"Cannot resume: {setting.name} is .* now but was"):
        full_finetune.check_resumable(checkpoint, changed, names, 1, "fp32")


def test_the_settings_named_in_the_table_may_change_on_resume(finished_checkpoint):
    checkpoint, names, config = finished_checkpoint
    changed = config.copy()
    for setting in SETTINGS:
        if setting.may_change_on_resume:
            setattr(changed, setting.name, changed_value(setting, getattr(config, setting.name)))
    assert {s.name for s in SETTINGS if s.may_change_on_resume} >= {"OUTPUT_DIR", "DEVICE", "EVAL_BATCH_SIZE",
                                                                    "SAVE_EVERY_STEPS"}
    full_finetune.check_resumable(checkpoint, changed, names, 1, "fp32")


def test_one_sentence_names_every_changed_setting_and_labels_precision_and_processes_are_checked(
        finished_checkpoint):
    checkpoint, names, config = finished_checkpoint
    changed = config.copy()
    changed.WEIGHT_DECAY, changed.MAX_GRAD_NORM = 0.0, None
    with pytest.raises(FinetuneError) as err:
        full_finetune.check_resumable(checkpoint, changed, names, 1, "fp32")
    message = str(err.value)
    assert "WEIGHT_DECAY is 0.0 now but was 0.01" in message and "MAX_GRAD_NORM is None now but was 1.0" in message
    assert "\n" not in message
    with pytest.raises(FinetuneError, match="labels in the data differ"):
        full_finetune.check_resumable(checkpoint, config, ["x", "y"], 1, "fp32")
    with pytest.raises(FinetuneError, match="trained in fp32 and this one would train in fp16"):
        full_finetune.check_resumable(checkpoint, config, names, 1, "fp16")
    with pytest.raises(FinetuneError, match="had 1 processes and this one has 2"):
        full_finetune.check_resumable(checkpoint, config, names, 2, "fp32")


def test_a_changed_weight_decay_is_refused_by_the_command_line_and_metrics_record_what_was_used(tmp_path, capsys,
                                                                                                tiny_model_dir):
    data = tmp_path / "train.csv"
    make_rows(40).to_csv(data, index=False)
    args = tiny_run_args(tiny_model_dir, data, tmp_path / "out", "--epochs", "3", "--weight-decay", "0.05")
    original_step = Trainer._optimizer_step

    def stop_at_step_4(self):
        original_step(self)
        if self._run.step == 4:
            self.request_stop()

    Trainer._optimizer_step = stop_at_step_4
    try:
        assert full_finetune.main(args) == 130
    finally:
        Trainer._optimizer_step = original_step
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


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, tiny_model_factory, tokenizer):
    trainer, train, val = new_trainer(resume_config(tmp_path, EPOCHS=3), tiny_model_factory, tokenizer)
    forward = trainer.model.forward

    def nan_in_epoch_2(*args, **kwargs):
        output = forward(*args, **kwargs)
        if trainer._run.epoch == 2 and trainer.model.training:
            output.logits = output.logits * float("nan")
        return output

    trainer.model.forward = nan_in_epoch_2
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
        if self._run.step == 3:
            signal.raise_signal(signal.SIGINT)  # first: finish the step, then save and stop
            assert self._stop_requested
            signal.raise_signal(signal.SIGINT)  # second: out at once

    monkeypatch.setattr(Trainer, "_optimizer_step", step_interrupted_twice)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(train, val)
    assert not (tmp_path / "checkpoint.pt").exists()  # it did not wait to write one
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

    def terminated_while_writing(output_dir, write):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)

    monkeypatch.setattr(full_finetune, "publish_outputs", terminated_while_writing)
    try:
        assert full_finetune.main(tiny_run_args(tiny_model_dir, small_csv, own_run, "--epochs", "1")) == 130
        assert signal.getsignal(signal.SIGTERM) is not_handled_by_main  # main restored the handler it found
    finally:
        signal.signal(signal.SIGTERM, previous)
    err = capsys.readouterr().err
    assert "Interrupted" in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in own_run.iterdir() if p.is_file() and p.name in before} == before
