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
from config import FinetuneError, FullFinetuneConfig
from conftest import make_rows
from full_finetune import Split, Trainer, build_optimizer, encode_labels, lr_multiplier


def config_for(**overrides):
    """The default recipe at tiny scale, in fp32, without early stopping."""
    config = FullFinetuneConfig()
    config.MAX_LENGTH = 32
    config.LEARNING_RATE = 1e-3
    config.MIXED_PRECISION = "no"
    config.EARLY_STOPPING_PATIENCE = None
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def splits(rows_per_class=24, seed=0):
    frame = make_rows(rows_per_class, seed)
    names, ids = encode_labels(frame["label"])
    return Split(frame["text"].tolist(), ids), names


def new_trainer(tiny_model_factory, tokenizer, names, model_kwargs=None, **overrides):
    return Trainer(config_for(**overrides), names, model=tiny_model_factory(**(model_kwargs or {})),
                   tokenizer=tokenizer, progress=False)


def trained_state(tiny_model_factory, tokenizer, train, names, **overrides):
    trainer = new_trainer(tiny_model_factory, tokenizer, names, **overrides)
    dataset = trainer.dataset(train)
    trainer.fit(dataset, dataset)
    return trainer.model.state_dict(), trainer


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


def test_the_trainer_steps_the_schedule_once_per_optimizer_step(tiny_model_factory, tokenizer):
    train, names = splits()  # 72 rows: 9 micro-batches of 8, 3 optimizer steps of 4 + 4 + 1
    _, trainer = trained_state(tiny_model_factory, tokenizer, train, names, BATCH_SIZE=8,
                               GRADIENT_ACCUMULATION_STEPS=4, EPOCHS=2, WARMUP_RATIO=0.5)
    # 6 optimizer steps, 3 of warm-up: after epoch 1 the rate is at its peak, after 2 at zero.
    assert [row["lr"] for row in trainer.history] == pytest.approx([1e-3, 0.0])


def test_accumulating_4_x_8_is_the_same_update_as_1_x_32_short_last_step_included(tiny_model_factory, tokenizer):
    train, names = splits(rows_per_class=26)  # 78 rows: the last step has 14 rows (8 + 6), not 32
    common = dict(EPOCHS=1, GROUP_BY_LENGTH=False, WEIGHT_DECAY=0.01, MAX_GRAD_NORM=1.0)
    accumulated, _ = trained_state(tiny_model_factory, tokenizer, train, names, BATCH_SIZE=8,
                                   GRADIENT_ACCUMULATION_STEPS=4, **common)
    large, _ = trained_state(tiny_model_factory, tokenizer, train, names, BATCH_SIZE=32,
                             GRADIENT_ACCUMULATION_STEPS=1, **common)
    untrained = full_finetune.prepare_model(tiny_model_factory(), config_for(), names).state_dict()
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


def test_gradients_are_clipped_to_max_grad_norm_before_each_step(tiny_model_factory, tokenizer):
    train, names = splits()
    norms = []

    def record_norm(optimizer, args, kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())

    handle = register_optimizer_step_pre_hook(record_norm)
    try:
        trained_state(tiny_model_factory, tokenizer, train, names, EPOCHS=1, BATCH_SIZE=8, MAX_GRAD_NORM=0.01)
        clipped, norms[:] = list(norms), []
        trained_state(tiny_model_factory, tokenizer, train, names, EPOCHS=1, BATCH_SIZE=8, MAX_GRAD_NORM=None)
    finally:
        handle.remove()
    assert len(clipped) == 9 and max(clipped) <= 0.01 + 1e-6
    assert min(norms) > 0.01  # unclipped, every step's gradient is larger


def test_early_stopping_stops_and_restores_the_best_epoch(monkeypatch, tiny_model_factory, tokenizer):
    train, names = splits()
    trainer = new_trainer(tiny_model_factory, tokenizer, names, EPOCHS=10, EARLY_STOPPING_PATIENCE=2)
    scores = iter([0.50, 0.80, 0.70, 0.79, 0.95])
    snapshots = []

    def scripted_evaluate(dataset):
        snapshots.append({k: v.clone() for k, v in trainer.model.state_dict().items()})
        return {"loss": 1.0, "accuracy": 0.5, "macro_f1": next(scores)}

    monkeypatch.setattr(trainer, "evaluate", scripted_evaluate)
    dataset = trainer.dataset(train)
    history = trainer.fit(dataset, dataset)
    assert [row["epoch"] for row in history] == [1, 2, 3, 4]  # two epochs without gain after 2
    assert trainer.best_epoch == 2
    final = trainer.model.state_dict()
    assert all(torch.equal(final[k], snapshots[1][k]) for k in final)
    assert not all(torch.equal(final[k], snapshots[3][k]) for k in final)


def test_early_stopping_on_loss_prefers_lower(monkeypatch, tiny_model_factory, tokenizer):
    train, names = splits()
    trainer = new_trainer(tiny_model_factory, tokenizer, names, EPOCHS=5, EARLY_STOPPING_PATIENCE=1,
                          EARLY_STOPPING_METRIC="val_loss")
    losses = iter([0.9, 0.4, 0.6])
    monkeypatch.setattr(trainer, "evaluate", lambda dataset: {"loss": next(losses), "accuracy": 0.5, "macro_f1": 0.5})
    dataset = trainer.dataset(train)
    assert len(trainer.fit(dataset, dataset)) == 3 and trainer.best_epoch == 2


def test_bf16_autocast_gives_losses_close_to_fp32(tiny_model_factory, tokenizer):
    train, names = splits()
    losses = {}
    for precision in ("no", "bf16"):
        _, trainer = trained_state(tiny_model_factory, tokenizer, train, names, EPOCHS=2, MIXED_PRECISION=precision)
        assert trainer.precision == {"no": "fp32"}.get(precision, precision)
        losses[precision] = [row["train_loss"] for row in trainer.history]
    assert losses["bf16"] == pytest.approx(losses["no"], rel=0.03)


def test_fp16_on_cpu_falls_back_with_a_note(capsys):
    precision, _ = full_finetune.choose_precision("fp16", torch.device("cpu"))
    assert precision in ("bf16", "fp32")
    assert "fp16 needs a CUDA GPU" in capsys.readouterr().out


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


def test_steps_the_fp16_scaler_skips_move_neither_the_schedule_nor_the_average(monkeypatch, tiny_model_factory,
                                                                               tokenizer):
    fp16_on_the_cpu(monkeypatch)
    train, names = splits()  # 9 windows of 8 rows
    trainer = new_trainer(tiny_model_factory, tokenizer, names, EPOCHS=1, BATCH_SIZE=8, EMA_DECAY=0.9,
                          MIXED_PRECISION="fp16")
    steps, learning_rates, averages = [], [], []
    original_step = Trainer._optimizer_step
    window = itertools.count(1)
    current = {"window": next(window)}
    overflowing = {2, 3, 6}  # these windows' gradients are inf (their loss is not): the scaler skips them
    trainer.model.classifier.weight.register_hook(
        lambda grad: grad * float("inf") if current["window"] in overflowing else grad)

    def optimizer_step(self):
        original_step(self)
        current["window"] = next(window)
        steps.append(self._run.step)
        learning_rates.append(self._current_lr())
        averages.append(self._run.ema.average[0].clone())

    monkeypatch.setattr(Trainer, "_optimizer_step", optimizer_step)
    dataset = trainer.dataset(train)
    trainer.fit(dataset, dataset)
    assert trainer.precision == "fp16"
    assert steps == [1, 1, 1, 2, 3, 3, 4, 5, 6]  # windows 2, 3 and 6 took no optimizer step
    for skipped in (1, 2, 5):  # the schedule and the average stand still on a skipped step
        assert learning_rates[skipped] == learning_rates[skipped - 1]
        assert torch.equal(averages[skipped], averages[skipped - 1])
    assert learning_rates[3] != learning_rates[2] and not torch.equal(averages[3], averages[2])


def test_fp16_steps_that_keep_being_skipped_stop_the_run_with_one_sentence(monkeypatch, tiny_model_factory, tokenizer):
    fp16_on_the_cpu(monkeypatch)
    train, names = splits(rows_per_class=40)  # 120 rows, batch 4: 30 steps in the first epoch
    trainer = new_trainer(tiny_model_factory, tokenizer, names, EPOCHS=2, BATCH_SIZE=4, MIXED_PRECISION="fp16")
    trainer.model.classifier.weight.register_hook(lambda grad: grad * float("inf"))
    dataset = trainer.dataset(train)
    with pytest.raises(FinetuneError, match="last 30 optimizer steps were all skipped .* diverged"):
        trainer.fit(dataset, dataset)


def test_training_learns_the_tiny_task(tiny_model_factory, tokenizer):
    train, names = splits(rows_per_class=40)
    _, trainer = trained_state(tiny_model_factory, tokenizer, train, names, EPOCHS=6, LEARNING_RATE=3e-3)
    assert trainer.history[-1]["train_loss"] < trainer.history[0]["train_loss"]
    metrics = trainer.evaluate(trainer.dataset(train))
    assert metrics["accuracy"] > 0.6
    assert len(metrics["confusion_matrix"]) == 3 and set(metrics["report"]) >= set(names)
    assert 0 < metrics["macro_f1"] <= 1 and metrics["loss"] > 0


def test_same_seed_same_result_and_another_seed_another(tiny_model_factory, tokenizer):
    train, names = splits()
    a, _ = trained_state(tiny_model_factory, tokenizer, train, names, EPOCHS=1, SEED=1)
    b, _ = trained_state(tiny_model_factory, tokenizer, train, names, EPOCHS=1, SEED=1)
    c, _ = trained_state(tiny_model_factory, tokenizer, train, names, EPOCHS=1, SEED=2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_fit_can_run_again_on_the_same_trainer_with_fresh_history_after_an_interrupt(tmp_path, tiny_model_factory,
                                                                                   tokenizer):
    train, names = splits()
    trainer = new_trainer(tiny_model_factory, tokenizer, names, EPOCHS=2, BATCH_SIZE=8, OUTPUT_DIR=str(tmp_path))
    dataset = trainer.dataset(train)
    trainer.request_stop()  # as after Ctrl-C in a notebook: the next fit must not stop after one step
    assert len(trainer.fit(dataset, dataset)) == 2
    assert [row["epoch"] for row in trainer.fit(dataset, dataset)] == [1, 2]


def test_a_finished_trainer_is_freed_without_the_cycle_collector(tiny_model_factory, tokenizer, tmp_path):
    train, names = splits()
    trainer = new_trainer(tiny_model_factory, tokenizer, names, EPOCHS=1, BATCH_SIZE=8, ADVERSARIAL_EPSILON=0.5,
                          OUTPUT_DIR=str(tmp_path))
    dataset = trainer.dataset(train)
    trainer.fit(dataset, dataset)
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


def test_fit_drops_the_optimizer_and_the_loaded_checkpoint_when_it_returns(monkeypatch, tiny_model_factory,
                                                                          tokenizer, tmp_path):
    train, names = splits()
    trainer = new_trainer(tiny_model_factory, tokenizer, names, EPOCHS=2, BATCH_SIZE=8, OUTPUT_DIR=str(tmp_path))
    dataset = trainer.dataset(train)
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


def test_loaders_pin_memory_only_for_a_gpu(monkeypatch, tiny_model_factory, tokenizer):
    train, names = splits(rows_per_class=4)
    trainer = new_trainer(tiny_model_factory, tokenizer, names, EPOCHS=1)
    pinned = []
    original = full_finetune.DataLoader
    monkeypatch.setattr(full_finetune, "DataLoader", lambda *a, **k: (pinned.append(k["pin_memory"]),
                                                                      original(*a, **k))[1])
    dataset = trainer.dataset(train)
    trainer.fit(dataset, dataset)
    assert trainer.pin_memory is False and pinned and set(pinned) == {False}
