"""The accuracy levers: mean pooling (linear or cosine head, the cosine one optionally started at the
class centroids), layer-wise learning-rate decay, label smoothing, class weights, re-initialised top
layers, frozen word embeddings, EMA, R-Drop, one dropout rate, token dropout, adversarial training
and soft targets."""

import json

import pytest
import torch
from test_training import config_for, splits, trained_state

import full_finetune
from conftest import tiny_bert
from full_finetune import (
    MeanPoolingClassifier,
    PadToLongest,
    Trainer,
    balanced_class_weights,
    build_optimizer,
    reinit_top_layers,
)


def mean_model(tokenizer, cosine_scale=None):
    from transformers import BertModel

    torch.manual_seed(0)
    encoder = BertModel(tiny_bert(tokenizer).config)
    encoder.config.id2label = {0: "a", 1: "b", 2: "c"}
    return MeanPoolingClassifier(encoder, 3, cosine_scale).eval()


def test_mean_pooling_ignores_padding(tokenizer):
    model = mean_model(tokenizer)
    collate = PadToLongest(tokenizer.pad_token_id)
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
    assert logits.abs().max() <= 16.0


def test_a_cosine_head_needs_mean_pooling():
    with pytest.raises(full_finetune.FinetuneError, match="COSINE_HEAD_SCALE"):
        config_for(COSINE_HEAD_SCALE=20.0).validate()  # POOLING is "cls"
    with pytest.raises(full_finetune.FinetuneError, match="COSINE_HEAD_SCALE"):
        config_for(COSINE_HEAD_SCALE=0.0, POOLING="mean").validate()
    config_for(COSINE_HEAD_SCALE=20.0, POOLING="mean").validate()


def test_the_prototype_head_starts_each_class_at_the_mean_direction_of_its_texts(tokenizer):
    train, names = splits(rows_per_class=5)
    model = mean_model(tokenizer, cosine_scale=10.0)
    model.classifier.weight.data[2] = torch.tensor(7.0)  # the third class gets no rows below
    rows = [(text, label) for text, label in zip(train.texts, train.labels, strict=True) if label < 2]
    trainer = Trainer(config_for(POOLING="mean", COSINE_HEAD_SCALE=10.0, PROTOTYPE_HEAD_INIT=True, EVAL_BATCH_SIZE=4),
                      names, model=model, tokenizer=tokenizer, progress=False)
    rng = torch.get_rng_state()
    trainer._start_head_at_class_means(trainer.dataset(full_finetune.Split(*map(list, zip(*rows, strict=True)))))
    assert torch.equal(torch.get_rng_state(), rng)  # dropout and batch order stay those of a run without it
    for label in (0, 1):
        with torch.no_grad():  # one text at a time, unpadded
            pooled = torch.cat([model.pool(**{k: torch.tensor(v) for k, v in tokenizer([text]).items()})
                                for text, y in rows if y == label])
        direction = torch.nn.functional.normalize(pooled, dim=-1).mean(0)
        torch.testing.assert_close(model.classifier.weight[label], direction / direction.norm(), atol=1e-5, rtol=1e-5)
    assert torch.equal(model.classifier.weight[2], torch.full((32,), 7.0))


def test_the_prototype_head_needs_a_cosine_head(tokenizer):
    with pytest.raises(full_finetune.FinetuneError, match="PROTOTYPE_HEAD_INIT needs the cosine head"):
        config_for(POOLING="mean", PROTOTYPE_HEAD_INIT=True).validate()
    train, names = splits(rows_per_class=2)
    # A model passed in with a linear head, though the config names a cosine one.
    trainer = Trainer(config_for(POOLING="mean", COSINE_HEAD_SCALE=10.0, PROTOTYPE_HEAD_INIT=True, EPOCHS=1),
                      names, model=mean_model(tokenizer), tokenizer=tokenizer, progress=False)
    dataset = trainer.dataset(train)
    with pytest.raises(full_finetune.FinetuneError, match="PROTOTYPE_HEAD_INIT needs the cosine head"):
        trainer.fit(dataset, dataset)


@pytest.mark.parametrize("cosine_scale", [None, 10.0])
def test_a_mean_pooling_run_saves_a_folder_that_predicts_the_same(tiny_config, tmp_path, cosine_scale):
    tiny_config.POOLING, tiny_config.COSINE_HEAD_SCALE = "mean", cosine_scale
    metrics = full_finetune.run_training(tiny_config)
    folder = full_finetune.Path(tiny_config.OUTPUT_DIR) / "full_finetune_model"
    assert (folder / "mean_pooling_head.pt").is_file()
    saved = json.loads((folder / "config.json").read_text())
    assert saved["pooling"] == "mean" and saved["cosine_scale"] == cosine_scale
    reloaded = Trainer.from_pretrained(folder, progress=False)
    assert isinstance(reloaded.model, MeanPoolingClassifier)
    assert reloaded.model.config.cosine_scale == cosine_scale
    assert reloaded.label_names == ["delivery", "price", "refund"]
    data = full_finetune.load_data(tiny_config)
    assert reloaded.evaluate(reloaded.dataset(data.test))["accuracy"] == metrics["accuracy"]


def test_layerwise_decay_scales_the_learning_rate_by_depth(tiny_model_factory):
    model = tiny_model_factory()  # 2 encoder layers
    optimizer = build_optimizer(model, config_for(LAYERWISE_LR_DECAY=0.5, LEARNING_RATE=1e-3), torch.device("cpu"))
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    params = dict(model.named_parameters())
    assert lr_of[id(params["classifier.weight"])] == pytest.approx(1e-3)
    assert lr_of[id(params["bert.encoder.layer.1.output.dense.weight"])] == pytest.approx(5e-4)
    assert lr_of[id(params["bert.encoder.layer.0.output.dense.weight"])] == pytest.approx(2.5e-4)
    assert lr_of[id(params["bert.embeddings.word_embeddings.weight"])] == pytest.approx(1.25e-4)
    decay_of = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    assert decay_of[id(params["bert.encoder.layer.0.output.dense.bias"])] == 0.0


def test_label_smoothing_and_class_weights_change_the_training_loss(tiny_model_factory, tokenizer):
    train, names = splits()
    losses = {}
    for name, overrides in {"plain": {}, "smoothed": {"LABEL_SMOOTHING": 0.2},
                            "weighted": {"CLASS_WEIGHTS": "balanced"}}.items():
        trainer = Trainer(config_for(EPOCHS=1, **overrides), names, model=tiny_model_factory(),
                          tokenizer=tokenizer, progress=False)
        dataset = trainer.dataset(train)
        losses[name] = trainer.fit(dataset, dataset)[0]["train_loss"]
    assert losses["smoothed"] != pytest.approx(losses["plain"], rel=1e-4)
    assert losses["weighted"] == pytest.approx(losses["plain"], rel=1e-6)  # balanced classes: weights all 1
    torch.testing.assert_close(balanced_class_weights([0, 0, 0, 1], 2), torch.tensor([4 / 6, 2.0]))


def test_reinit_top_layers_changes_only_the_top_layers_of_a_loaded_model(tiny_model_dir):
    # Loaded from a folder, as in a real run: transformers marks those weights as initialised.
    model, _, _ = full_finetune.load_model_and_tokenizer(str(tiny_model_dir), ["a", "b", "c"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(123)
    assert reinit_top_layers(model, 1) == 1
    after = model.state_dict()
    top = "bert.encoder.layer.1.attention.self.query.weight"
    bottom = "bert.encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(before[top], after[top])
    assert torch.equal(after["bert.encoder.layer.1.output.LayerNorm.weight"], torch.ones(32))
    assert torch.equal(before[bottom], after[bottom])


def test_frozen_word_embeddings_keep_their_values_while_the_rest_trains(tiny_model_factory, tokenizer):
    train, names = splits()
    model = tiny_model_factory()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = Trainer(config_for(EPOCHS=1, FREEZE_WORD_EMBEDDINGS=True, EMA_DECAY=0.9), names, model=model,
                      tokenizer=tokenizer, progress=False)
    dataset = trainer.dataset(train)
    trainer.fit(dataset, dataset)
    after = trainer.model.state_dict()
    table = "bert.embeddings.word_embeddings.weight"
    assert torch.equal(before[table], after[table])
    assert not torch.equal(before["bert.embeddings.position_embeddings.weight"],
                           after["bert.embeddings.position_embeddings.weight"])
    assert not torch.equal(before["classifier.weight"], after["classifier.weight"])
    assert len(trainer.trained_params) == len(list(model.parameters())) - 1


def test_freezing_a_model_without_a_word_embedding_table_is_refused_in_one_sentence():
    with pytest.raises(full_finetune.FinetuneError, match="FREEZE_WORD_EMBEDDINGS needs one"):
        full_finetune.freeze_word_embeddings(torch.nn.Sequential(torch.nn.Embedding(5, 2), torch.nn.Linear(2, 2)))


def test_mean_pooling_drops_the_unused_pooler_so_ddp_sees_no_idle_parameters(tokenizer):
    model = mean_model(tokenizer).train()
    batch = {k: torch.tensor(v) for k, v in tokenizer(["where is my parcel"]).items()}
    model(**batch).logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_reinit_more_layers_than_the_model_has_is_refused(tiny_model_factory):
    with pytest.raises(full_finetune.FinetuneError, match="has 2 encoder layers"):
        reinit_top_layers(tiny_model_factory(), 3)


def test_ema_validates_and_keeps_the_moving_average_of_every_step(monkeypatch, tiny_model_factory, tokenizer):
    train, names = splits()
    # A plain run, recording the weights after every optimizer step.
    plain = Trainer(config_for(EPOCHS=1), names, model=tiny_model_factory(), tokenizer=tokenizer, progress=False)
    expected = [p.detach().clone() for p in plain.model.parameters()]
    original_step = Trainer._optimizer_step

    def step_and_average(self):
        original_step(self)
        weight = 1 - full_finetune.ema_decay(self.scheduler.last_epoch, 0.9)
        for average, param in zip(expected, self.model.parameters(), strict=True):
            average.lerp_(param.detach(), weight)

    monkeypatch.setattr(Trainer, "_optimizer_step", step_and_average)
    dataset = plain.dataset(train)
    plain.fit(dataset, dataset)
    monkeypatch.undo()

    averaged = Trainer(config_for(EPOCHS=1, EMA_DECAY=0.9), names, model=tiny_model_factory(),
                       tokenizer=tokenizer, progress=False)
    history = averaged.fit(dataset, dataset)
    for average, param in zip(expected, averaged.model.parameters(), strict=True):
        torch.testing.assert_close(param.detach(), average)
    pairs = zip(averaged.model.parameters(), plain.model.parameters(), strict=True)
    assert not all(torch.equal(a, b) for a, b in pairs)
    # The recorded validation is that of the averaged weights.
    assert history[0]["val_accuracy"] == averaged.evaluate(dataset)["accuracy"]


def test_ema_decay_warms_up_and_is_capped():
    assert full_finetune.ema_decay(0, 0.999) == pytest.approx(0.1)
    assert full_finetune.ema_decay(90, 0.999) == pytest.approx(0.91)
    assert full_finetune.ema_decay(10**6, 0.999) == 0.999


def test_rdrop_without_dropout_trains_exactly_like_the_plain_loss(tiny_model_factory, tokenizer):
    train, names = splits()
    # No dropout: both passes agree, the KL term is 0 and the mean of two equal cross-entropies is one.
    plain_state, plain = trained_state(tiny_model_factory, tokenizer, train, names, EPOCHS=1)
    rdrop_state, rdrop = trained_state(tiny_model_factory, tokenizer, train, names, EPOCHS=1, RDROP_ALPHA=1.0)
    assert rdrop.history[0]["train_loss"] == pytest.approx(plain.history[0]["train_loss"], rel=1e-5)
    for key in plain_state:
        torch.testing.assert_close(rdrop_state[key], plain_state[key], rtol=1e-4, atol=1e-6)


def test_rdrop_loss_adds_the_symmetric_kl_between_the_two_passes(tiny_model_factory, tokenizer):
    _, names = splits()
    trainer = Trainer(config_for(RDROP_ALPHA=0.5), names, model=tiny_model_factory(), tokenizer=tokenizer,
                      progress=False)
    trainer.class_weights = None  # fit sets them from the training labels
    first, second = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([[0.0, 1.0, 0.0]])
    labels = torch.tensor([0])
    loss, counted = trainer._loss(torch.cat([first, second]), labels)
    p, q = first.softmax(-1), second.softmax(-1)
    kl_pq, kl_qp = (p * (p / q).log()).sum(), (q * (q / p).log()).sum()
    mean_ce = (torch.nn.functional.cross_entropy(first, labels) + torch.nn.functional.cross_entropy(second, labels)) / 2
    torch.testing.assert_close(loss, mean_ce + 0.5 * (kl_pq + kl_qp) / 2)
    assert torch.equal(counted, first)


def test_token_dropout_hides_only_words_and_about_the_share_asked():
    torch.manual_seed(0)
    lengths = torch.randint(3, 30, (400,))
    mask = (torch.arange(32) < lengths[:, None]).long()
    rows = torch.arange(400)
    cases = [(mask, torch.zeros_like(lengths), lengths - 1),  # right padding: each row's first and last real token
             (mask.flip(1), 32 - lengths, torch.full_like(lengths, 31))]  # left padding
    for padded, first, last in cases:
        hidden = (padded == 1) & (full_finetune.hide_random_tokens(padded, 0.3) == 0)
        assert not hidden[rows, first].any() and not hidden[rows, last].any()  # [CLS] and [SEP] stay
        words = (lengths - 2).sum().item()
        assert 0.25 < hidden.sum().item() / words < 0.35
    assert torch.equal(full_finetune.hide_random_tokens(mask, 0.0), mask)


def test_token_dropout_changes_training_but_not_prediction(tiny_model_factory, tokenizer):
    train, names = splits()
    plain_state, plain = trained_state(tiny_model_factory, tokenizer, train, names, EPOCHS=1)
    dropped_state, dropped = trained_state(tiny_model_factory, tokenizer, train, names, EPOCHS=1, TOKEN_DROPOUT=0.5)
    change = max((dropped_state[key].float() - plain_state[key].float()).abs().max().item() for key in plain_state)
    assert change > 1e-3  # the words hidden in training changed the gradients
    dropped.model.load_state_dict(plain_state)  # same weights: evaluation sees every word in both
    dataset = plain.dataset(train)
    torch.testing.assert_close(dropped.predict_logits(dataset), plain.predict_logits(dataset))


def test_the_adversarial_pass_moves_each_text_by_epsilon_along_its_loss_gradient(tiny_model_factory, tokenizer):
    train, names = splits()
    trainer = Trainer(config_for(EPOCHS=1, ADVERSARIAL_EPSILON=0.5), names, model=tiny_model_factory(),
                      tokenizer=tokenizer, progress=False)
    start = tiny_model_factory()  # the same weights as the trainer's model before its first step
    embedded, inputs, targets = [], [], []
    layer = full_finetune.embedding_layer(trainer.model)
    layer.register_forward_hook(  # runs after the trainer's hook: sees the shifted output
        lambda module, args, output: embedded.append(output.detach().clone()) if module.training else None)
    trainer.model.register_forward_pre_hook(
        lambda module, args, kwargs: inputs.append(dict(kwargs)) if module.training else None, with_kwargs=True)
    loss = trainer._loss
    trainer._loss = lambda logits, labels, soft_labels=None: targets.append(labels) or loss(logits, labels, soft_labels)
    dataset = trainer.dataset(train)
    trainer.fit(dataset, dataset)
    assert len(inputs) == len(targets) == 2 * len(trainer.sampler)  # every batch ran twice
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


def test_adversarial_training_changes_training_but_not_prediction(tiny_model_factory, tokenizer):
    train, names = splits()
    plain_state, plain = trained_state(tiny_model_factory, tokenizer, train, names, EPOCHS=1)
    robust_state, robust = trained_state(tiny_model_factory, tokenizer, train, names, EPOCHS=1,
                                         ADVERSARIAL_EPSILON=0.5)
    change = max((robust_state[key].float() - plain_state[key].float()).abs().max().item() for key in plain_state)
    assert change > 1e-3  # the adversarial pass added its gradient
    robust.model.load_state_dict(plain_state)  # same weights: prediction leaves the embeddings alone
    dataset = plain.dataset(train)
    torch.testing.assert_close(robust.predict_logits(dataset), plain.predict_logits(dataset))


def test_adversarial_training_works_when_nothing_in_the_embedding_layer_trains(tiny_model_factory, tokenizer):
    train, names = splits()
    states = []
    for epsilon in (0.0, 0.5):
        model = tiny_model_factory()
        for param in full_finetune.embedding_layer(model).parameters():
            param.requires_grad_(False)  # its output no longer needs a gradient: the hook makes it a leaf
        trainer = Trainer(config_for(EPOCHS=1, ADVERSARIAL_EPSILON=epsilon), names, model=model,
                          tokenizer=tokenizer, progress=False)
        trainer.fit(trainer.dataset(train), trainer.dataset(train))
        states.append(trainer.model.state_dict())
    assert max((states[1][key] - states[0][key]).abs().max().item() for key in states[0]) > 1e-3


def train_mode_logits_twice(trainer, texts):
    batch = {k: torch.tensor(v) for k, v in trainer.tokenizer(texts, padding=True).items()}
    trainer.model.train()
    return trainer.model(**batch).logits, trainer.model(**batch).logits


def test_dropout_sets_every_dropout_layer_and_none_keeps_the_checkpoints(tiny_model_factory, tokenizer):
    _, names = splits()
    texts = ["where is my parcel", "how much is the red one"]
    own = Trainer(config_for(), names, model=tiny_model_factory(dropout=0.3), tokenizer=tokenizer, progress=False)
    assert {m.p for m in own.model.modules() if isinstance(m, torch.nn.Dropout)} == {0.3}
    off = Trainer(config_for(DROPOUT=0.0), names, model=tiny_model_factory(dropout=0.3), tokenizer=tokenizer,
                  progress=False)
    first, second = train_mode_logits_twice(off, texts)
    torch.testing.assert_close(first, second)  # no dropout left anywhere, attention included
    off.model.eval()
    torch.testing.assert_close(first, off.predict_logits(off.dataset(texts)), atol=1e-5, rtol=1e-5)
    on = Trainer(config_for(DROPOUT=0.5), names, model=tiny_model_factory(dropout=0.0), tokenizer=tokenizer,
                 progress=False)
    first, second = train_mode_logits_twice(on, texts)
    assert (first - second).abs().max() > 1e-3


def test_soft_targets_equal_to_the_labels_train_exactly_like_the_labels(tiny_model_factory, tokenizer):
    train, names = splits()
    plain = Trainer(config_for(EPOCHS=1), names, model=tiny_model_factory(), tokenizer=tokenizer, progress=False)
    plain.fit(plain.dataset(train), plain.dataset(train))
    one_hot = torch.nn.functional.one_hot(torch.tensor(train.labels), len(names)).float().tolist()
    distilled = Trainer(config_for(EPOCHS=1, SOFT_TARGET_WEIGHT=0.7), names, model=tiny_model_factory(),
                        tokenizer=tokenizer, progress=False)
    distilled.fit(distilled.dataset(train, one_hot), distilled.dataset(train))
    assert distilled.history[0]["train_loss"] == pytest.approx(plain.history[0]["train_loss"], rel=1e-5)
    for ours, theirs in zip(distilled.model.parameters(), plain.model.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)
    # Other targets pull the model elsewhere.
    uniform = [[1 / len(names)] * len(names)] * len(train.labels)
    smoothed = Trainer(config_for(EPOCHS=1, SOFT_TARGET_WEIGHT=0.7), names, model=tiny_model_factory(),
                       tokenizer=tokenizer, progress=False)
    smoothed.fit(smoothed.dataset(train, uniform), smoothed.dataset(train))
    assert smoothed.history[0]["train_loss"] != pytest.approx(plain.history[0]["train_loss"], rel=1e-3)
