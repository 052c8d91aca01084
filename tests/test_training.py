import itertools
import math

import pytest
import torch

import full_finetune
from config import FullFinetuneConfig
from conftest import make_rows
from full_finetune import Split, Trainer, build_optimizer, encode_labels, lr_multiplier


def config_for(**overrides):
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


def trained_state(tiny_model_factory, tokenizer, train, names, **overrides):
    trainer = Trainer(config_for(**overrides), names, model=tiny_model_factory(),
                      tokenizer=tokenizer, progress=False)
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


def test_accumulating_4_x_8_is_the_same_update_as_1_x_32(tiny_model_factory, tokenizer):
    train, names = splits(rows_per_class=26)  # 78 rows: the last window is short (14 rows)
    common = dict(EPOCHS=1, GROUP_BY_LENGTH=False, WEIGHT_DECAY=0.01, MAX_GRAD_NORM=1.0)
    accumulated, _ = trained_state(tiny_model_factory, tokenizer, train, names, BATCH_SIZE=8,
                                   GRADIENT_ACCUMULATION_STEPS=4, **common)
    large, _ = trained_state(tiny_model_factory, tokenizer, train, names, BATCH_SIZE=32,
                             GRADIENT_ACCUMULATION_STEPS=1, **common)
    untrained = tiny_model_factory().state_dict()
    for key in large:
        assert not torch.equal(large[key], untrained[key]) or "position_ids" in key or "token_type" in key
        torch.testing.assert_close(accumulated[key], large[key], atol=2e-6, rtol=1e-4)


def test_accumulation_that_scaled_per_micro_batch_would_differ(tiny_model_factory, tokenizer):
    # Guards the test above: a different effective batch gives visibly different weights.
    train, names = splits(rows_per_class=26)
    common = dict(EPOCHS=1, GROUP_BY_LENGTH=False)
    a, _ = trained_state(tiny_model_factory, tokenizer, train, names, BATCH_SIZE=8,
                         GRADIENT_ACCUMULATION_STEPS=2, **common)
    b, _ = trained_state(tiny_model_factory, tokenizer, train, names, BATCH_SIZE=32, **common)
    assert max((a[k] - b[k]).abs().max().item() for k in a) > 1e-4


def test_biases_and_layernorm_weights_get_no_weight_decay(tiny_model_factory):
    model = tiny_model_factory()
    decayed, plain = build_optimizer(model, config_for(WEIGHT_DECAY=0.05), torch.device("cpu")).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert decayed["weight_decay"] == 0.05 and plain["weight_decay"] == 0.0
    assert all("bias" in names[id(p)] or "LayerNorm" in names[id(p)] for p in plain["params"])
    assert any("LayerNorm.weight" in names[id(p)] for p in plain["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(names)


def test_early_stopping_stops_and_restores_the_best_epoch(monkeypatch, tiny_model_factory, tokenizer):
    train, names = splits()
    trainer = Trainer(config_for(EPOCHS=10, EARLY_STOPPING_PATIENCE=2), names,
                      model=tiny_model_factory(), tokenizer=tokenizer, progress=False)
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
    trainer = Trainer(config_for(EPOCHS=5, EARLY_STOPPING_PATIENCE=1, EARLY_STOPPING_METRIC="val_loss"),
                      names, model=tiny_model_factory(), tokenizer=tokenizer, progress=False)
    losses = iter([0.9, 0.4, 0.6])
    monkeypatch.setattr(trainer, "evaluate",
                        lambda dataset: {"loss": next(losses), "accuracy": 0.5, "macro_f1": 0.5})
    dataset = trainer.dataset(train)
    assert len(trainer.fit(dataset, dataset)) == 3 and trainer.best_epoch == 2


def test_bf16_autocast_gives_losses_close_to_fp32(tiny_model_factory, tokenizer):
    train, names = splits()
    losses = {}
    for precision in ("no", "bf16"):
        _, trainer = trained_state(tiny_model_factory, tokenizer, train, names, EPOCHS=2,
                                   MIXED_PRECISION=precision)
        assert trainer.precision == {"no": "fp32"}.get(precision, precision)
        losses[precision] = [row["train_loss"] for row in trainer.history]
    assert losses["bf16"] == pytest.approx(losses["no"], rel=0.03)


def test_fp16_on_cpu_falls_back_with_a_note(capsys):
    precision = full_finetune.choose_precision("fp16", torch.device("cpu"))
    assert precision in ("bf16", "fp32")
    assert "fp16 needs a CUDA GPU" in capsys.readouterr().out


def test_training_learns_the_tiny_task(tiny_model_factory, tokenizer):
    train, names = splits(rows_per_class=40)
    _, trainer = trained_state(tiny_model_factory, tokenizer, train, names, EPOCHS=6, LEARNING_RATE=3e-3)
    assert trainer.history[-1]["train_loss"] < trainer.history[0]["train_loss"]
    metrics = trainer.evaluate(trainer.dataset(train))
    assert metrics["accuracy"] > 0.6
    assert len(metrics["confusion_matrix"]) == 3 and set(metrics["report"]) >= set(names)
    for key in ("macro_f1", "weighted_f1", "macro_precision", "macro_recall",
                "weighted_precision", "weighted_recall"):
        assert 0 < metrics[key] <= 1
    assert metrics["loss"] > 0


def test_same_seed_same_result(tiny_model_factory, tokenizer):
    train, names = splits()
    a, _ = trained_state(tiny_model_factory, tokenizer, train, names, EPOCHS=1)
    b, _ = trained_state(tiny_model_factory, tokenizer, train, names, EPOCHS=1)
    assert all(torch.equal(a[k], b[k]) for k in a)
