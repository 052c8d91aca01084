"""The model-side settings (the head, dropout, frozen word embeddings) applied to loaded and passed
models alike, and the levers of the loss and the loop: label smoothing, class weights, the weight
average (EMA) and adversarial training (FGM). Also the presets' architectures (DeBERTa-v3,
ModernBERT) as tiny random models."""

import pytest
import torch

import full_finetune
from conftest import NAMES, config_for, fit, labelled, tiny_bert
from full_finetune import Trainer, balanced_class_weights, prepare_model
from modeling_mean_pooling import MeanPoolingConfig, MeanPoolingForSequenceClassification


def mean_model(tokenizer, cosine_scale=None):
    return prepare_model(tiny_bert(tokenizer), config_for(COSINE_HEAD_SCALE=cosine_scale, FREEZE_WORD_EMBEDDINGS=False),
                         ["a", "b", "c"]).eval()


def test_mean_pooling_ignores_padding(tokenizer):
    model = mean_model(tokenizer)
    collate = full_finetune.PadToLongest(tokenizer.pad_token_id)
    short = tokenizer(["hi there"])
    both = collate([{k: v[0] for k, v in short.items()},
                    {k: v[0] for k, v in tokenizer(["a much longer message about a parcel"]).items()}])
    alone = model(**{k: torch.tensor(v) for k, v in short.items()}).logits
    padded = model(**both).logits[:1]
    torch.testing.assert_close(alone, padded, atol=1e-5, rtol=1e-5)


def test_the_cosine_head_is_the_scaled_cosine_of_the_pooled_vector_and_each_class_weight(tokenizer):
    model = mean_model(tokenizer, cosine_scale=16.0)
    assert model.classifier.bias is None
    batch = {k: torch.tensor(v) for k, v in tokenizer(["where is my parcel", "how much"], padding=True).items()}
    pooled = []
    model.dropout.register_forward_hook(lambda module, args, output: pooled.append(output.float()))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the encoder runs in bf16, the head must not
        logits = model(**batch).logits
    weight = model.classifier.weight
    by_hand = 16.0 * torch.stack([torch.stack([torch.dot(p, w) / (p.norm() * w.norm()) for w in weight])
                                  for p in pooled[0]])
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, by_hand, atol=1e-4, rtol=1e-4)


def test_a_passed_model_gets_the_head_dropout_and_freezing_a_loaded_one_gets(tiny_model_dir, tokenizer):
    names = ["delivery", "price", "refund"]
    config = config_for(DROPOUT=0.2)
    passed = Trainer(config, names, model=tiny_bert(tokenizer), tokenizer=tokenizer, progress=False).model
    loaded = Trainer(config_for(DROPOUT=0.2, MODEL_NAME=str(tiny_model_dir)), names, progress=False).model
    for model in (passed, loaded):
        assert isinstance(model, MeanPoolingForSequenceClassification) and model.config.cosine_scale == 20.0
        assert model.encoder.pooler is None  # unused: under DDP a parameter without gradient is an error
        assert model.config.id2label == dict(enumerate(names))
        assert {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)} == {0.2}
        assert not model.get_input_embeddings().weight.requires_grad
        assert all(p.requires_grad for n, p in model.named_parameters() if "word_embeddings" not in n)
    plain = Trainer(config_for(POOLING="cls", COSINE_HEAD_SCALE=None, FREEZE_WORD_EMBEDDINGS=False), names,
                    model=tiny_bert(tokenizer), tokenizer=tokenizer, progress=False).model
    assert type(plain).__name__ == "BertForSequenceClassification"
    assert plain.get_input_embeddings().weight.requires_grad


def test_a_model_whose_head_differs_from_the_settings_is_refused_in_one_sentence(tokenizer):
    with pytest.raises(full_finetune.FinetuneError, match="model's head is POOLING 'mean' .*ask for 'cls'"):
        prepare_model(mean_model(tokenizer), config_for(POOLING="cls", COSINE_HEAD_SCALE=None), ["a", "b", "c"])


def test_the_mean_pooling_model_reloads_from_its_folder_with_the_same_outputs(tokenizer, tmp_path):
    model = mean_model(tokenizer, cosine_scale=12.0)
    full_finetune.register_mean_pooling_head()
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    reloaded, _ = full_finetune.load_saved_model(tmp_path / "m")
    assert isinstance(reloaded.config, MeanPoolingConfig) and reloaded.config.cosine_scale == 12.0
    batch = {k: torch.tensor(v) for k, v in tokenizer(["where is my parcel"]).items()}
    torch.testing.assert_close(reloaded.eval()(**batch).logits, model(**batch).logits)


def test_the_unused_pooler_is_gone_so_every_parameter_gets_a_gradient(tokenizer):
    model = mean_model(tokenizer).train()
    batch = {k: torch.tensor(v) for k, v in tokenizer(["where is my parcel"]).items()}
    model(**batch).logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_label_smoothing_and_balanced_class_weights_are_the_loss(new_trainer):
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0], [0.0, 0.0, 3.0], [1.0, 1.0, 1.0]])
    labels = torch.tensor([0, 0, 0, 2])  # imbalanced: class 1 absent, class 2 rare
    trainer = new_trainer(LABEL_SMOOTHING=0.2)
    trainer.class_weights = balanced_class_weights(labels.tolist(), 3)
    torch.testing.assert_close(trainer.class_weights, torch.tensor([4 / 9, 4 / 3, 4 / 3]))
    log_p = logits.log_softmax(-1)
    target = torch.nn.functional.one_hot(labels, 3) * 0.8 + 0.2 / 3
    # Each term of the smoothed target is weighted by its class's weight.
    torch.testing.assert_close(trainer.loss(logits, labels), -(target * log_p * trainer.class_weights).sum())
    trainer.class_weights = None
    plain = torch.nn.functional.cross_entropy(logits, labels, reduction="sum", label_smoothing=0.2)
    torch.testing.assert_close(trainer.loss(logits, labels), plain)


def test_balanced_class_weights_change_what_is_learned_from_imbalanced_data(new_trainer):
    train = labelled()
    keep = [i for i, label in enumerate(train.labels) if label != 2 or i % 6 == 0]  # class 2 made rare
    train = full_finetune.Split([train.texts[i] for i in keep], [train.labels[i] for i in keep])
    plain = fit(new_trainer(EPOCHS=1), train).model.state_dict()
    trainer = fit(new_trainer(EPOCHS=1, CLASS_WEIGHTS="balanced"), train)
    weighted = trainer.model.state_dict()
    assert trainer.class_weights[2] > 2 * trainer.class_weights[0]
    assert max((weighted[k] - plain[k]).abs().max().item() for k in plain) > 1e-4


def test_frozen_word_embeddings_keep_their_values_while_the_rest_trains(new_trainer, tiny_model_factory):
    state = fit(new_trainer(EPOCHS=1), labelled()).model.state_dict()
    before = prepare_model(tiny_model_factory(), config_for(), NAMES).state_dict()
    table = "encoder.embeddings.word_embeddings.weight"
    assert torch.equal(before[table], state[table])
    for moved in ("encoder.embeddings.position_embeddings.weight", "classifier.weight"):
        assert not torch.equal(before[moved], state[moved])


def test_freezing_a_model_without_a_word_embedding_table_is_refused_in_one_sentence():
    class NoTable(torch.nn.Module):
        config = None

        def get_input_embeddings(self):
            return None

    with pytest.raises(full_finetune.FinetuneError, match="FREEZE_WORD_EMBEDDINGS needs the model's word-embedding"):
        full_finetune.input_embeddings(NoTable(), "FREEZE_WORD_EMBEDDINGS")


def test_ema_validates_and_keeps_the_moving_average_of_every_step(new_trainer):
    # A run without the average, recording what the average of its weights would be after every step.
    plain = new_trainer(EPOCHS=1, EMA_DECAY=None)
    expected = [p.detach().clone() for p in plain.model.parameters() if p.requires_grad]

    def average(run):
        weight = 1 - full_finetune.ema_decay(run.step, 0.9)
        for mean, param in zip(expected, [p for p in plain.model.parameters() if p.requires_grad], strict=True):
            mean.lerp_(param.detach(), weight)

    plain.step_hooks.append(average)
    dataset = plain.dataset(labelled())
    plain.fit(dataset, dataset)

    averaged = new_trainer(EPOCHS=1, EMA_DECAY=0.9)
    history = averaged.fit(dataset, dataset)
    trained = [p for p in averaged.model.parameters() if p.requires_grad]
    for mean, param in zip(expected, trained, strict=True):
        torch.testing.assert_close(param.detach(), mean)
    assert not all(torch.equal(a, b) for a, b in zip(trained, plain.model.parameters(), strict=False))
    # The recorded validation is that of the averaged weights.
    assert history[0]["val_accuracy"] == averaged.evaluate(dataset)["accuracy"]


def test_ema_decay_warms_up_and_is_capped():
    assert full_finetune.ema_decay(0, 0.999) == pytest.approx(0.1)
    assert full_finetune.ema_decay(90, 0.999) == pytest.approx(0.91)
    assert full_finetune.ema_decay(10**6, 0.999) == 0.999


def test_the_adversarial_pass_moves_each_text_by_epsilon_along_its_loss_gradient(monkeypatch, tiny_model_factory,
                                                                                 tokenizer):
    train, names = labelled(), NAMES
    config = config_for(EPOCHS=1, ADVERSARIAL_EPSILON=0.5, LABEL_SMOOTHING=0.0)
    trainer = Trainer(config, names, model=tiny_model_factory(), tokenizer=tokenizer, progress=False)
    start = tiny_model_factory()
    torch.manual_seed(config.SEED)  # as Trainer does before it builds the head
    start = prepare_model(start, config, names)  # the trainer's weights before the first step
    embedded, inputs, targets = [], [], []
    model = trainer.model
    model.register_forward_pre_hook(
        lambda module, args, kwargs: inputs.append(dict(kwargs)) if module.training else None, with_kwargs=True)
    original_loss = Trainer.loss
    monkeypatch.setattr(Trainer, "loss", lambda self, logits, labels: targets.append(labels) or
                        original_loss(self, logits, labels))
    original_fgm = full_finetune.FGM

    def fgm_then_record(layer, epsilon):  # a hook after the FGM's own: it sees the shifted output
        fgm = original_fgm(layer, epsilon)
        layer.register_forward_hook(lambda m, a, output: embedded.append(output.detach().clone()) if m.training
                                    else None)
        return fgm

    monkeypatch.setattr(full_finetune, "FGM", fgm_then_record)
    dataset = trainer.dataset(train)
    trainer.fit(dataset, dataset)
    assert len(inputs) == len(targets) == 2 * 3  # 72 rows in batches of 32: every batch ran twice
    torch.testing.assert_close(inputs[1]["input_ids"], inputs[0]["input_ids"])
    shift = embedded[1] - embedded[0]
    # The gradient of the first batch's loss with respect to the embedding layer's output, by hand.
    clean = []
    full_finetune.embedding_layer(start).register_forward_hook(
        lambda module, args, output: clean.append(output.detach().requires_grad_()) or clean[0])
    start.train()
    torch.nn.functional.cross_entropy(start(**inputs[0]).logits, targets[0], reduction="sum").backward()
    gradient = clean[0].grad
    expected = 0.5 * gradient / gradient.flatten(1).norm(dim=1)[:, None, None]
    torch.testing.assert_close(shift, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(shift.flatten(1).norm(dim=1), torch.full((len(shift),), 0.5))


def test_adversarial_training_changes_training_but_not_prediction(new_trainer):
    train = labelled()
    plain = fit(new_trainer(EPOCHS=1), train)
    robust = fit(new_trainer(EPOCHS=1, ADVERSARIAL_EPSILON=0.5), train)
    plain_state, robust_state = plain.model.state_dict(), robust.model.state_dict()
    change = max((robust_state[key].float() - plain_state[key].float()).abs().max().item() for key in plain_state)
    assert change > 1e-3  # the adversarial pass added its gradient
    robust.model.load_state_dict(plain_state)  # same weights: prediction leaves the embeddings alone
    dataset = plain.dataset(train)
    torch.testing.assert_close(robust.predict_logits(dataset), plain.predict_logits(dataset))
    assert not robust.model.encoder.embeddings._forward_hooks  # the hook is gone once fit returns


def test_adversarial_training_works_when_nothing_in_the_embedding_layer_trains(tiny_model_factory, tokenizer):
    train, names = labelled(), NAMES
    states = []
    for epsilon in (0.0, 0.5):
        trainer = Trainer(config_for(EPOCHS=1, ADVERSARIAL_EPSILON=epsilon), names, model=tiny_model_factory(),
                          tokenizer=tokenizer, progress=False)
        for param in full_finetune.embedding_layer(trainer.model).parameters():
            param.requires_grad_(False)  # its output no longer needs a gradient: the hook makes it a leaf
        trainer.fit(trainer.dataset(train), trainer.dataset(train))
        states.append(trainer.model.state_dict())
    assert max((states[1][key] - states[0][key]).abs().max().item() for key in states[0]) > 1e-3


def test_dropout_sets_every_dropout_layer_and_none_keeps_the_checkpoints(tiny_model_factory, tokenizer):
    names = NAMES
    texts = ["where is my parcel", "how much is the red one"]

    def twice_in_train_mode(trainer):
        batch = {k: torch.tensor(v) for k, v in trainer.tokenizer(texts, padding=True).items()}
        trainer.model.train()
        return trainer.model(**batch).logits, trainer.model(**batch).logits

    own = Trainer(config_for(), names, model=tiny_model_factory(dropout=0.3), tokenizer=tokenizer, progress=False)
    assert {m.p for m in own.model.modules() if isinstance(m, torch.nn.Dropout)} == {0.3}
    off = Trainer(config_for(DROPOUT=0.0), names, model=tiny_model_factory(dropout=0.3), tokenizer=tokenizer,
                  progress=False)
    first, second = twice_in_train_mode(off)
    torch.testing.assert_close(first, second)  # no dropout left anywhere, attention included
    on = Trainer(config_for(DROPOUT=0.5), names, model=tiny_model_factory(dropout=0.0), tokenizer=tokenizer,
                 progress=False)
    first, second = twice_in_train_mode(on)
    assert (first - second).abs().max() > 1e-3


def tiny_deberta_v3(tokenizer):
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    torch.manual_seed(0)
    return DebertaV2ForSequenceClassification(DebertaV2Config(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128, relative_attention=True, position_buckets=32,
        position_biased_input=False, pos_att_type=["p2c", "c2p"], norm_rel_ebd="layer_norm", share_att_key=True,
        pad_token_id=tokenizer.pad_token_id, num_labels=3))


def tiny_modernbert(tokenizer):
    from transformers import ModernBertConfig, ModernBertForSequenceClassification

    torch.manual_seed(0)
    ids = dict(pad_token_id=tokenizer.pad_token_id, cls_token_id=tokenizer.cls_token_id,
               sep_token_id=tokenizer.sep_token_id, bos_token_id=tokenizer.cls_token_id,
               eos_token_id=tokenizer.sep_token_id)
    return ModernBertForSequenceClassification(ModernBertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128, global_attn_every_n_layers=2, local_attention=16,
        num_labels=3, **ids))


@pytest.mark.parametrize("build, preset", [(tiny_deberta_v3, "deberta_v3_base"), (tiny_modernbert, "modernbert_base")])
@pytest.mark.parametrize("recipe", ["preset", "default recipe with adversarial training"])
def test_the_newer_architectures_train_save_and_reload_offline(build, preset, recipe, tokenizer, tmp_path):
    train, names = labelled(rows_per_class=8), NAMES
    config = full_finetune.ModelConfigs.get_config(preset) if recipe == "preset" else config_for(
        ADVERSARIAL_EPSILON=0.5)
    config.MAX_LENGTH, config.EPOCHS, config.LEARNING_RATE, config.OUTPUT_DIR = 32, 1, 1e-3, str(tmp_path / "ck")
    config.MIXED_PRECISION = "no" if recipe == "preset" else "bf16"
    trainer = Trainer(config, names, model=build(tokenizer), tokenizer=tokenizer, progress=False)
    dataset = trainer.dataset(train)
    trainer.fit(dataset, dataset)
    assert all(torch.isfinite(torch.tensor(row["train_loss"])) for row in trainer.history)
    groups = {group["lr_scale"] for group in trainer_optimizer_groups(trainer)}
    assert len(groups) == (1 if config.LAYERWISE_LR_DECAY == 1 else 4)  # head, 2 layers, embeddings
    trainer.save_pretrained(tmp_path / "saved")
    reloaded = Trainer.from_pretrained(tmp_path / "saved", config, progress=False)  # same precision
    assert type(reloaded.model) is type(trainer.model)
    torch.testing.assert_close(reloaded.predict_logits(dataset), trainer.predict_logits(dataset))


def trainer_optimizer_groups(trainer):
    return full_finetune.build_optimizer(trainer.model, trainer.config, torch.device("cpu")).param_groups


def test_deberta_v3_trains_in_fp16_with_the_scaler(monkeypatch, tokenizer, tmp_path):
    from test_training import fp16_on_the_cpu

    fp16_on_the_cpu(monkeypatch)
    config = full_finetune.ModelConfigs.get_config("deberta_v3_base")
    config.MAX_LENGTH, config.EPOCHS, config.LEARNING_RATE, config.OUTPUT_DIR = 32, 3, 1e-3, str(tmp_path / "out")
    trainer = Trainer(config, NAMES, model=tiny_deberta_v3(tokenizer), tokenizer=tokenizer, progress=False)
    steps = []
    trainer.step_hooks.append(lambda run: steps.append(run.step))
    fit(trainer, labelled(rows_per_class=8))
    assert trainer.precision == "fp16" and steps[-1] == len(steps) == 6  # no step skipped
    assert all(torch.isfinite(torch.tensor(row["train_loss"])) for row in trainer.history)
