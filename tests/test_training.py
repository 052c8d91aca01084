"""The training loop: schedule, accumulation, optimizer groups, clipping, early stopping, precision
(bf16, and fp16 with its skipped steps, simulated on the CPU), seeds, repeated fit(), memory."""

import functools
import gc
import itertools
import math
import weakref

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

import full_finetune
from conftest import NAMES, config_for, fit, labelled, overflow_and_record
from full_finetune import build_optimizer, lr_multiplier


def test_schedule_warms_up_linearly_then_decays_to_zero():
    warm, total = 10, 100
    assert lr_multiplier(0, warm, total, "linear") == 0
    assert lr_multiplier(5, warm, total, "linear") == pytest.approx(0.5)
    assert lr_multiplier(10, warm, total, "linear") == pytest.approx(1.0)
    assert lr_multiplier(55, warm, total, "linear") == pytest.approx(0.5)
    assert lr_multiplier(100, warm, total, "linear") == pytest.approx(0.0)
    assert lr_multiplier(55, warm, total, "cosine") == pytest.approx(0.5)
    assert lr_multiplier(32.5, warm, total, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    decaying = [lr_multiplier(s, warm, total, "cosine") for s in range(warm, total + 1)]
    assert all(a >= b for a, b in itertools.pairwise(decaying))


def test_the_trainer_steps_the_schedule_once_per_optimizer_step(new_trainer):
    # 72 rows: 9 micro-batches of 8, 3 optimizer steps of 4 + 4 + 1 per epoch
    trainer = new_trainer(BATCH_SIZE=8, GRADIENT_ACCUMULATION_STEPS=4, EPOCHS=2, WARMUP_RATIO=0.5)
    used = []  # the top layer's rate each optimizer step was taken with
    trainer.step_hooks.append(lambda run: used.append(max(group["lr"] for group in run.optimizer.param_groups)))
    fit(trainer, labelled())
    # 6 optimizer steps, 3 of warm-up from 0: 0, 1/3, 2/3 of the peak, then the peak decaying to 0.
    assert used == pytest.approx([0.0, 1e-3 / 3, 2e-3 / 3, 1e-3, 2e-3 / 3, 1e-3 / 3])
    # The history's rate is the next step's: at its peak after epoch 1, zero after epoch 2.
    assert [row["lr"] for row in trainer.history] == pytest.approx([1e-3, 0.0])


def test_accumulating_4_x_8_is_the_same_update_as_1_x_32_short_last_step_included(new_trainer, tiny_model_factory):
    train = labelled(rows_per_class=26)  # 78 rows: the last step has 14 rows (8 + 6), not 32
    common = dict(EPOCHS=1, GROUP_BY_LENGTH=False, WEIGHT_DECAY=0.01, MAX_GRAD_NORM=1.0)
    accumulated = fit(new_trainer(BATCH_SIZE=8, GRADIENT_ACCUMULATION_STEPS=4, **common), train).model.state_dict()
    large = fit(new_trainer(BATCH_SIZE=32, GRADIENT_ACCUMULATION_STEPS=1, **common), train).model.state_dict()
    untrained = full_finetune.prepare_model(tiny_model_factory(), config_for(), NAMES).state_dict()
    moved = 0
    for key in large:
        moved += not torch.equal(large[key], untrained[key])
        torch.testing.assert_close(accumulated[key], large[key], atol=2e-6, rtol=1e-4)
    assert moved > len(large) // 2


def test_optimizer_groups_decay_only_matrices_and_scale_the_rate_by_depth(tiny_model_factory):
    config = config_for(WEIGHT_DECAY=0.05, LAYERWISE_LR_DECAY=0.5, FREEZE_WORD_EMBEDDINGS=False)
    model = full_finetune.prepare_model(tiny_model_factory(), config, ["a", "b", "c"])
    names = {id(p): n for n, p in model.named_parameters()}
    groups = build_optimizer(model, config, torch.device("cpu")).param_groups
    for group in groups:
        for param in group["params"]:
            name = names[id(param)]
            assert group["weight_decay"] == (0.0 if param.ndim == 1 else 0.05), name
            layer = "layer.0." in name and 2 or "layer.1." in name and 1 or "embeddings" in name and 3 or 0
            assert group["lr_scale"] == 0.5 ** layer, name  # 2 layers: layer 0 at 0.25, embeddings 0.125
    assert sum(len(g["params"]) for g in groups) == len(names)


def test_gradients_are_clipped_to_max_grad_norm_before_each_step(new_trainer):
    train = labelled()
    norms = []

    def record_norm(optimizer, args, kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())

    handle = register_optimizer_step_pre_hook(record_norm)
    try:
        fit(new_trainer(EPOCHS=1, BATCH_SIZE=8, MAX_GRAD_NORM=0.01), train)
        clipped, norms[:] = list(norms), []
        fit(new_trainer(EPOCHS=1, BATCH_SIZE=8, MAX_GRAD_NORM=None), train)
    finally:
        handle.remove()
    assert len(clipped) == 9 and max(clipped) <= 0.01 + 1e-6
    assert min(norms) > 0.01  # unclipped, every step's gradient is larger


def test_early_stopping_stops_and_restores_the_best_epoch(monkeypatch, new_trainer):
    trainer = new_trainer(EPOCHS=10, EARLY_STOPPING_PATIENCE=2)
    scores = iter([0.50, 0.80, 0.70, 0.79, 0.95])
    snapshots = []

    def scripted_evaluate(dataset):
        snapshots.append({k: v.clone() for k, v in trainer.model.state_dict().items()})
        return {"loss": 1.0, "accuracy": 0.5, "macro_f1": next(scores)}

    monkeypatch.setattr(trainer, "evaluate", scripted_evaluate)
    history = fit(trainer, labelled()).history
    assert [row["epoch"] for row in history] == [1, 2, 3, 4]  # two epochs without gain after 2
    assert trainer.best_epoch == 2
    final = trainer.model.state_dict()
    assert all(torch.equal(final[k], snapshots[1][k]) for k in final)
    assert not all(torch.equal(final[k], snapshots[3][k]) for k in final)


def test_early_stopping_on_loss_prefers_lower(monkeypatch, new_trainer):
    trainer = new_trainer(EPOCHS=5, EARLY_STOPPING_PATIENCE=1, METRIC="log_loss")
    losses = iter([0.9, 0.4, 0.6])
    monkeypatch.setattr(trainer, "evaluate", lambda dataset: {"loss": (loss := next(losses)), "log_loss": loss,
                                                              "accuracy": 0.5, "macro_f1": 0.5})
    assert len(fit(trainer, labelled()).history) == 3 and trainer.best_epoch == 2


def test_bf16_autocast_gives_losses_close_to_fp32(new_trainer):
    losses = {}
    for precision in ("no", "bf16"):
        trainer = fit(new_trainer(EPOCHS=2, MIXED_PRECISION=precision), labelled())
        assert trainer.precision == {"no": "fp32"}.get(precision, precision)
        losses[precision] = [row["train_loss"] for row in trainer.history]
    assert losses["bf16"] == pytest.approx(losses["no"], rel=0.03)


def test_fp16_on_cpu_falls_back_with_a_note(capsys):
    precision, _ = full_finetune.choose_precision("fp16", torch.device("cpu"))
    assert precision in ("bf16", "fp32")
    assert "fp16 needs a GPU" in capsys.readouterr().out


@pytest.mark.parametrize("card, capability, setting, precision, why", [
    ("Tesla T4", (7, 5), "auto", "fp16", "Tesla T4 (compute capability 7.5) has no native bf16"),
    ("Tesla P100-PCIE-16GB", (6, 0), "auto", "fp16", "no native bf16"),
    ("Tesla V100-SXM2-16GB", (7, 0), "auto", "fp16", "no native bf16"),
    ("NVIDIA A100-SXM4-40GB", (8, 0), "auto", "bf16", "NVIDIA A100-SXM4-40GB has native bf16"),
    ("NVIDIA H100 80GB HBM3", (9, 0), "auto", "bf16", "has native bf16"),
    ("Tesla T4", (7, 5), "bf16", "bf16", "only emulates bf16"),
    ("Tesla T4", (7, 5), "no", "fp32", "as asked"),
])
def test_auto_precision_on_a_gpu_is_native_bf16_or_else_fp16(monkeypatch, card, capability, setting, precision, why):
    # What torch.cuda.is_bf16_supported() says does not matter: it counts emulation by default.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: card)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    chosen, reason = full_finetune.choose_precision(setting, torch.device("cuda", 0))
    assert chosen == precision and why in reason


def fp16_on_the_cpu(monkeypatch):
    """Train with the fp16 autocast and an enabled gradient scaler on the CPU (torch has both). The
    scaler starts at scale 1, so that only the steps a test makes overflow are skipped."""
    monkeypatch.setattr(full_finetune, "choose_precision", lambda setting, device: ("fp16", "simulated"))
    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, init_scale=1.0))


def test_steps_the_fp16_scaler_skips_move_neither_the_schedule_nor_the_average(monkeypatch, new_trainer):
    fp16_on_the_cpu(monkeypatch)
    trainer = new_trainer(EPOCHS=1, BATCH_SIZE=8, EMA_DECAY=0.9, MIXED_PRECISION="fp16")  # 9 windows of 8 rows
    record = overflow_and_record(trainer, overflowing={2, 3, 6})  # the scaler skips these windows' steps
    fit(trainer, labelled())
    learning_rates, averages = record["learning_rates"], record["averages"]
    assert trainer.precision == "fp16"
    assert record["steps"] == [1, 1, 1, 2, 3, 3, 4, 5, 6]  # windows 2, 3 and 6 took no optimizer step
    assert record["taken"] == [True, False, False, True, True, False, True, True, True]
    for skipped in (1, 2, 5):  # the schedule and the average stand still on a skipped step
        assert learning_rates[skipped] == learning_rates[skipped - 1]
        assert torch.equal(averages[skipped], averages[skipped - 1])
    assert learning_rates[3] != learning_rates[2] and not torch.equal(averages[3], averages[2])


def test_a_non_finite_fp16_loss_is_skipped_and_kept_out_of_the_epochs_loss(monkeypatch, new_trainer):
    """In fp16 a micro-batch whose loss overflows is skipped by the scaler; the run goes on and
    the epoch's loss is that of the finite batches."""
    fp16_on_the_cpu(monkeypatch)
    trainer = new_trainer(EPOCHS=1, BATCH_SIZE=8, MIXED_PRECISION="fp16")
    calls = itertools.count(1)
    forward = trainer.model.forward

    def overflow_on_the_second_batch(*args, **kwargs):
        output = forward(*args, **kwargs)
        if trainer.model.training and next(calls) == 2:
            output.logits = output.logits * float("inf")
        return output

    trainer.model.forward = overflow_on_the_second_batch
    taken = []
    trainer.step_hooks.append(lambda run: taken.append(run.stepped))
    history = fit(trainer, labelled()).history
    assert taken[1] is False and taken.count(False) == 1
    assert math.isfinite(history[0]["train_loss"]) and 0 < history[0]["train_loss"] < 10


def test_training_learns_the_tiny_task(new_trainer):
    train = labelled(rows_per_class=40)
    trainer = fit(new_trainer(EPOCHS=6, LEARNING_RATE=3e-3), train)
    assert trainer.history[-1]["train_loss"] < trainer.history[0]["train_loss"]
    metrics = trainer.evaluate(trainer.dataset(train))
    assert metrics["accuracy"] > 0.6
    assert len(metrics["confusion_matrix"]) == 3 and set(metrics["report"]) >= set(NAMES)
    assert 0 < metrics["macro_f1"] <= 1 and metrics["loss"] > 0


def test_same_seed_same_result_and_another_seed_another(new_trainer):
    a, b, c = (fit(new_trainer(EPOCHS=1, SEED=seed), labelled()).model.state_dict() for seed in (1, 1, 2))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_fit_can_run_again_on_the_same_trainer_with_fresh_history_after_an_interrupt(new_trainer):
    trainer = new_trainer(EPOCHS=2, BATCH_SIZE=8)
    dataset = trainer.dataset(labelled())
    trainer.step_hooks.append(lambda run: run.step == 3 and trainer.request_stop())
    with pytest.raises(full_finetune.TrainingInterrupted):
        trainer.fit(dataset, dataset)
    trainer.step_hooks.clear()  # as after Ctrl-C in a notebook: the next fit must not stop
    assert len(trainer.fit(dataset, dataset)) == 2
    assert [row["epoch"] for row in trainer.fit(dataset, dataset)] == [1, 2]


def test_a_finished_trainer_is_freed_without_the_cycle_collector(new_trainer):
    trainer = fit(new_trainer(EPOCHS=1, BATCH_SIZE=8, ADVERSARIAL_EPSILON=0.5), labelled())
    trainer.predict(["where is my parcel"])
    freed = weakref.ref(trainer)
    model = weakref.ref(trainer.model)
    gc.collect()
    gc.disable()
    try:
        del trainer
        assert freed() is None and model() is None  # reference counting alone frees it: no cycle
    finally:
        gc.enable()


def test_fit_drops_the_optimizer_and_the_loaded_checkpoint_when_it_returns(monkeypatch, new_trainer):
    trainer = new_trainer(EPOCHS=2, BATCH_SIZE=8)
    dataset = trainer.dataset(labelled())
    trainer.fit(dataset, dataset)  # leaves checkpoint.pt after epoch 2
    held = {}

    class Checkpoint(dict):  # a dict that can be weakly referenced
        pass

    original_load, original_build = full_finetune.load_checkpoint, full_finetune.build_optimizer

    def load(path):
        checkpoint = Checkpoint(original_load(path))
        held["checkpoint"] = weakref.ref(checkpoint)
        return checkpoint

    def build(*args):
        optimizer = original_build(*args)
        held["optimizer"] = weakref.ref(optimizer)
        return optimizer

    monkeypatch.setattr(full_finetune, "load_checkpoint", load)
    monkeypatch.setattr(full_finetune, "build_optimizer", build)
    gc.collect()
    gc.disable()
    try:
        trainer.fit(dataset, dataset, resume=trainer.checkpoint_path)
        assert held["checkpoint"]() is None and held["optimizer"]() is None
    finally:
        gc.enable()


def test_loaders_pin_memory_as_the_trainer_says_and_the_trainer_says_so_for_cuda_only(monkeypatch, new_trainer):
    assert full_finetune.pins_memory(torch.device("cuda", 0)) is True
    assert not full_finetune.pins_memory(torch.device("cpu")) and not full_finetune.pins_memory(torch.device("mps"))
    trainer = new_trainer(EPOCHS=1)
    assert trainer.pin_memory is False
    trainer.pin_memory = True  # as on a GPU: every loader of the run must pin
    pinned = []
    original = full_finetune.DataLoader
    monkeypatch.setattr(full_finetune, "DataLoader", lambda *a, **k: (pinned.append(k["pin_memory"]),
                                                                      original(*a, **{**k, "pin_memory": False}))[1])
    fit(trainer, labelled(rows_per_class=4))
    trainer.predict(["where is my parcel"])
    assert len(pinned) >= 3 and set(pinned) == {True}  # training, validation and prediction
