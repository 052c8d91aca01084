"""What a competition scores: its metric (each agreeing with scikit-learn, driving early stopping and
every output), its sample submission's format, calibrated probabilities, a tuned two-class
threshold, long texts cut as asked; and the refit on every labelled row that writes the
submission."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn import metrics as skm

import full_finetune
from config import FinetuneError
from conftest import ROOT, fit, labelled, make_rows, tiny_run_args
from full_finetune import BuyerIntentDataset, Trainer

# -- the metric ----------------------------------------------------------------------------------


def random_predictions(classes, rows=300, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, rows)
    logits = rng.normal(size=(rows, classes)) + 2.0 * np.eye(classes)[labels] * rng.random((rows, 1))
    probabilities = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return labels, probabilities


@pytest.mark.parametrize("classes", [2, 5])
def test_every_metric_agrees_with_scikit_learn(classes):
    labels, probabilities = random_predictions(classes)
    predicted = probabilities.argmax(1)
    names = [str(k) for k in range(classes)]
    scores = full_finetune.score(labels, probabilities, names, ranks=list(range(classes)))
    expected = {
        "accuracy": skm.accuracy_score(labels, predicted),
        "macro_f1": skm.f1_score(labels, predicted, average="macro"),
        "micro_f1": skm.f1_score(labels, predicted, average="micro"),
        "weighted_f1": skm.f1_score(labels, predicted, average="weighted"),
        "log_loss": skm.log_loss(labels, probabilities),
        "roc_auc": (skm.roc_auc_score(labels, probabilities[:, 1]) if classes == 2
                    else skm.roc_auc_score(labels, probabilities, multi_class="ovr", average="macro")),
        "qwk": skm.cohen_kappa_score(labels, predicted, weights="quadratic"),
        "mcc": skm.matthews_corrcoef(labels, predicted),
    }
    assert set(expected) == set(full_finetune.HIGHER_IS_BETTER)
    for name, value in expected.items():
        assert scores[name] == pytest.approx(value, abs=1e-9), name


def test_qwk_orders_the_labels_by_number_or_as_the_user_says():
    names = ["1", "10", "2"]  # sorted as text; as numbers 1 < 2 < 10
    assert full_finetune.label_ranks(names, None) == [0, 2, 1]
    assert full_finetune.label_ranks(["low", "high", "mid"], ["low", "mid", "high"]) == [0, 2, 1]
    assert full_finetune.label_ranks(["a", "b"], None) is None
    with pytest.raises(FinetuneError, match="qwk needs ordered labels.*--label-order"):
        full_finetune.check_metric("qwk", ["buy", "browse", "leave"], None)
    with pytest.raises(FinetuneError, match="LABEL_ORDER .* must name each label of the data once"):
        full_finetune.label_ranks(["a", "b", "c"], ["a", "b"])
    labels, probabilities = random_predictions(3, seed=1)
    ranks = full_finetune.label_ranks(names, None)  # label id k has rank ranks[k]
    expected = skm.cohen_kappa_score(np.take(ranks, labels), np.take(ranks, probabilities.argmax(1)),
                                     weights="quadratic")
    assert full_finetune.score(labels, probabilities, names, ranks)["qwk"] == pytest.approx(expected)


def test_the_best_epoch_is_the_metrics_best_and_its_weights_are_kept(monkeypatch, new_trainer):
    """Accuracy is best at epoch 3, log loss at epoch 2: with METRIC log_loss the run keeps epoch 2."""
    trainer = new_trainer(EPOCHS=4, METRIC="log_loss")
    scripted = iter([(0.60, 0.9), (0.70, 0.4), (0.80, 0.5), (0.75, 0.6)])  # (accuracy, log loss) per epoch
    snapshots = []

    def evaluate(dataset):
        snapshots.append({k: v.clone() for k, v in trainer.model.state_dict().items()})
        accuracy, log_loss = next(scripted)
        return {"accuracy": accuracy, "log_loss": log_loss, "loss": log_loss, "macro_f1": accuracy}

    monkeypatch.setattr(trainer, "evaluate", evaluate)
    fit(trainer, labelled())
    assert trainer.best_epoch == 2
    assert all(torch.equal(v, snapshots[1][k]) for k, v in trainer.model.state_dict().items())


def test_the_metric_heads_the_console_metrics_and_the_report(tmp_path, tiny_model_dir, small_csv, capsys):
    out = tmp_path / "out"
    assert full_finetune.main(tiny_run_args(tiny_model_dir, small_csv, out, "--metric", "mcc")) == 0
    console = capsys.readouterr().out
    assert "MCC" in console.split("Test split")[1].split("\n")[0] and "val loss" in console
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["metric"] == "mcc" and "mcc" in metrics["test"]
    assert "test MCC (METRIC)" in (out / "report.html").read_text()
    history = pd.read_csv(out / "history.csv")
    assert "val_mcc" in history and metrics["best_epoch"] == int(history["epoch"][history["val_mcc"].idxmax()])


# -- calibration and the decision threshold -----------------------------------------------------

def test_temperature_scaling_fits_overconfident_logits_and_travels_with_the_model(new_trainer, tmp_path):
    labels, probabilities = random_predictions(3, rows=400, seed=2)
    logits = torch.tensor(np.log(probabilities) * 4.0, dtype=torch.float32)  # four times too confident
    temperature = full_finetune.fit_temperature(logits, labels)
    assert 3.0 < temperature < 5.0
    trainer = new_trainer()
    found = trainer.calibrate(logits, labels)
    assert found["temperature"] == pytest.approx(temperature)
    assert found["log_loss_after"] < found["log_loss_before"] and found["ece_after"] < found["ece_before"]
    texts = ["where is my parcel", "how much is it", "refund my money"]
    before = trainer.predict(texts)[1]
    trainer.save_pretrained(tmp_path / "model")
    reloaded = Trainer.from_pretrained(tmp_path / "model", trainer.config, progress=False)  # fp32, as trainer
    assert reloaded.model.config.calibration_temperature == pytest.approx(temperature)
    np.testing.assert_allclose(reloaded.predict(texts)[1], before, atol=1e-5)  # the temperature travelled


def test_a_plain_head_is_calibrated_in_its_output_layer(tokenizer):
    from conftest import config_for, tiny_bert

    trainer = Trainer(config_for(POOLING="cls", COSINE_HEAD_SCALE=None), ["a", "b", "c"], model=tiny_bert(tokenizer),
                      tokenizer=tokenizer, progress=False)
    dataset = trainer.dataset(["where is my parcel", "how much"])
    logits = trainer.predict_logits(dataset)
    full_finetune.apply_temperature(trainer.model, 2.5)
    torch.testing.assert_close(trainer.predict_logits(dataset), logits / 2.5)


def test_two_classes_get_the_threshold_that_maximises_the_metric(new_trainer, tmp_path):
    rng = np.random.default_rng(3)
    labels = (rng.random(500) < 0.2).astype(int)  # a rare positive class
    positive = 0.15 * labels + rng.random(500) * 0.3  # positives score higher, but all below 0.5
    probabilities = np.stack([1 - positive, positive], 1)
    threshold = full_finetune.tune_threshold(probabilities, labels, "macro_f1")
    f1 = [skm.f1_score(labels, (positive >= t).astype(int), average="macro") for t in np.linspace(0, 1, 1001)]
    assert skm.f1_score(labels, (positive >= threshold).astype(int), average="macro") >= max(f1) - 1e-9
    assert threshold != 0.5 and (full_finetune.decide(probabilities, threshold) == (positive >= threshold)).all()


def test_predict_and_evaluate_decide_two_classes_by_the_threshold(tokenizer):
    from conftest import config_for, tiny_bert

    trainer = Trainer(config_for(), ["no", "yes"], model=tiny_bert(tokenizer, num_labels=2), tokenizer=tokenizer,
                      progress=False)
    texts = ["where is my parcel", "how much is it", "refund my money", "hi"]
    dataset = trainer.dataset(full_finetune.Split(texts, [1, 1, 1, 0]))
    for threshold, expected in ((0.0, "yes"), (1.0 + 1e-9, "no")):  # every row, or no row, reaches it
        trainer.threshold = threshold
        assert trainer.predict(texts)[0] == [expected] * 4
        assert trainer.evaluate(dataset)["accuracy"] == (0.75 if expected == "yes" else 0.25)


def test_a_binary_run_tunes_its_threshold_and_every_prediction_uses_it(tmp_path, tiny_model_dir):
    frame = make_rows(40)
    frame["label"] = np.where(frame["label"] == "refund", "refund", "other")  # one class against the rest
    frame.to_csv(tmp_path / "train.csv", index=False)
    test = tmp_path / "test.csv"
    pd.DataFrame({"id": range(30), "text": frame["text"][:30]}).to_csv(test, index=False)
    out = tmp_path / "out"
    assert full_finetune.main(tiny_run_args(tiny_model_dir, tmp_path / "train.csv", out, "--metric", "macro_f1",
                                            "--test", str(test), "--no-refit")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    threshold = metrics["calibration"]["decision_threshold"]
    assert threshold is not None and 0 <= threshold <= 1 and "macro_f1_at_threshold_0.5" in metrics["test"]
    folder = out / "full_finetune_model"
    assert json.loads((folder / "config.json").read_text())["decision_threshold"] == threshold
    reloaded = Trainer.from_pretrained(folder, progress=False)
    labels, probabilities = reloaded.predict(frame["text"][:30].tolist())
    assert labels == [reloaded.label_names[k] for k in (probabilities[:, 1] >= threshold).astype(int)]
    assert pd.read_csv(out / "submission.csv")["label"].tolist() == labels
    frame[:30].to_csv(tmp_path / "labelled.csv", index=False)
    assert full_finetune.main(["evaluate", "--model-dir", str(folder), "--input", str(tmp_path / "labelled.csv"),
                               "--output", str(tmp_path / "m.json")]) == 0
    expected = np.mean(np.asarray(labels) == frame["label"][:30].to_numpy())  # evaluate decides as predict does
    assert json.loads((tmp_path / "m.json").read_text())["accuracy"] == pytest.approx(expected)


def test_a_saved_model_keeps_how_it_cut_texts_and_the_metric_it_was_chosen_by(new_trainer, tmp_path, tokenizer):
    order = ["refund", "price", "delivery"]
    trainer = new_trainer(TRUNCATION="tail", METRIC="qwk", LABEL_ORDER=order)
    trainer.save_pretrained(tmp_path / "model")
    reloaded = Trainer.from_pretrained(tmp_path / "model", progress=False)
    assert (reloaded.config.TRUNCATION, reloaded.config.METRIC, reloaded.config.LABEL_ORDER) == ("tail", "qwk", order)
    assert reloaded.ranks == [2, 1, 0] and reloaded.tokenizer.truncation_side == "left"  # pipeline() keeps the tail
    text = " ".join(f"w{i}" for i in range(100))
    assert reloaded.dataset([text]).encodings["input_ids"] == BuyerIntentDataset(
        [text], None, tokenizer, 32, "tail").encodings["input_ids"]


# -- the sample submission's format ---------------------------------------------------------------

@pytest.fixture
def competition(tmp_path):
    """A test file with zero-padded string ids, and two sample submissions: probability columns in
    a shuffled class order with the rows in another order, and one label column."""
    texts = ["where is my parcel", "price of it?", "send it back", "refund please", "shipping cost"]
    ids = ["00017", "00003", "00120", "00009", "00001"]
    pd.DataFrame({"id": ids, "text": texts}).to_csv(tmp_path / "test.csv", index=False)
    order = ["00120", "00001", "00017", "00009", "00003"]
    pd.DataFrame({"ID": order, "refund": 0.0, "delivery": 0.0, "price": 0.0}).to_csv(tmp_path / "probs.csv",
                                                                                     index=False)
    pd.DataFrame({"ID": order, "intent": "delivery"}).to_csv(tmp_path / "labels.csv", index=False)
    return tmp_path, dict(zip(ids, texts, strict=True)), order


def check_submission(path, kind, texts, order, predict):
    """The written file: the sample's columns, its rows' order and ids as written, and the
    model's probabilities (or labels) for each id's text."""
    submission = pd.read_csv(path, dtype=str, keep_default_na=False)
    expected = ["ID", "refund", "delivery", "price"] if kind == "probs" else ["ID", "intent"]
    assert list(submission.columns) == expected and submission["ID"].tolist() == order
    labels, probabilities = predict([texts[i] for i in order])
    if kind == "probs":
        names = ["delivery", "price", "refund"]
        for column in ("refund", "delivery", "price"):
            np.testing.assert_allclose(submission[column].astype(float), probabilities[:, names.index(column)],
                                       atol=1e-5)
    else:
        assert submission["intent"].tolist() == labels


@pytest.mark.parametrize("kind", ["probs", "labels"])
def test_train_predict_and_cv_copy_the_sample_submission_exactly(competition, tiny_model_dir, small_csv, kind):
    folder, texts, order = competition
    sample = folder / f"{kind}.csv"
    out = folder / "run"
    assert full_finetune.main(tiny_run_args(tiny_model_dir, small_csv, out, "--test", str(folder / "test.csv"),
                                            "--sample-submission", str(sample), "--epochs", "1")) == 0
    model = Trainer.from_pretrained(out / "full_finetune_model", progress=False)
    check_submission(out / "submission.csv", kind, texts, order, model.predict)
    assert full_finetune.main(["predict", "--model-dir", str(out / "full_finetune_model"), "--input",
                               str(folder / "test.csv"), "--output", str(folder / "p.csv"),
                               "--sample-submission", str(sample)]) == 0
    check_submission(folder / "p.csv", kind, texts, order, model.predict)
    cv = folder / "cv"
    assert full_finetune.main(["cv", "--folds", "2", *tiny_run_args(tiny_model_dir, small_csv, cv, "--epochs", "1"),
                               "--test", str(folder / "test.csv"), "--sample-submission", str(sample),
                               "--cv-submission", "folds"]) == 0
    folds = [Trainer.from_pretrained(cv / f"fold_{k}" / "full_finetune_model", progress=False) for k in (1, 2)]

    def ensemble(batch):
        probabilities = np.mean([fold.predict(batch)[1] for fold in folds], axis=0)
        return [folds[0].label_names[k] for k in probabilities.argmax(1)], probabilities

    check_submission(cv / "submission.csv", kind, texts, order, ensemble)


def test_a_sample_submission_that_does_not_fit_is_refused_before_training(competition, tiny_model_dir, small_csv,
                                                                           capsys, monkeypatch):
    folder, _, order = competition
    monkeypatch.setattr(Trainer, "fit", lambda *a, **k: pytest.fail("training started"))
    cases = {"an unknown class column": (pd.DataFrame({"ID": order, "refund": 0, "shipping": 0, "price": 0}),
                                         "columns 'shipping' name no label"),
             "other ids": (pd.DataFrame({"ID": [o.lstrip("0") for o in order], "intent": "x"}),
                           "ids are not those of")}
    for frame, message in cases.values():
        frame.to_csv(folder / "bad.csv", index=False)
        args = tiny_run_args(tiny_model_dir, small_csv, folder / "out", "--test", str(folder / "test.csv"),
                             "--sample-submission", str(folder / "bad.csv"))
        assert full_finetune.main(args) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1


# -- long texts ---------------------------------------------------------------------------------

def test_long_texts_keep_their_head_their_tail_or_both(tokenizer):
    text = " ".join(f"w{i}" for i in range(200))
    words = tokenizer(text, add_special_tokens=False)["input_ids"]
    kept = {}
    for truncation in ("head", "tail", "head_tail"):
        ids = BuyerIntentDataset([text], None, tokenizer, 34, truncation).encodings["input_ids"][0]
        assert len(ids) == 34 and ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
        kept[truncation] = ids[1:-1]
    assert kept["head"] == words[:32] and kept["tail"] == words[-32:]
    assert kept["head_tail"] == words[:8] + words[-24:]
    short = BuyerIntentDataset(["hi there"], None, tokenizer, 34, "head_tail")
    assert short.encodings["input_ids"][0] == tokenizer("hi there")["input_ids"]
    assert short.full_lengths == short.lengths == [len(tokenizer("hi there")["input_ids"])]


def test_head_truncation_is_the_tokenizers_own(tokenizer):
    texts = pd.read_csv(ROOT / "data" / "train.csv")["text"].tolist()[:300] + ["", "word " * 100]
    dataset = BuyerIntentDataset(texts, None, tokenizer, 16)
    expected = tokenizer(texts, truncation=True, max_length=16)
    assert all(dataset.encodings[key] == expected[key] for key in expected)


# -- the refit on every labelled row --------------------------------------------------------------

class Recording(Trainer):
    """The command line's Trainer, recording each fit: rows trained on, validated or not, epochs."""

    fits = []

    def fit(self, train_dataset, val_dataset=None, resume=None, stop_after=None):
        history = super().fit(train_dataset, val_dataset, resume, stop_after)
        Recording.fits.append({"rows": len(train_dataset), "validated": val_dataset is not None,
                               "epochs": len(history)})
        return history


def test_the_refit_trains_on_every_labelled_row_for_the_chosen_epochs_and_writes_the_submission(
        monkeypatch, tmp_path, tiny_model_dir, small_csv, test_csv):
    monkeypatch.setattr(full_finetune, "Trainer", Recording)
    Recording.fits = []
    out = tmp_path / "out"
    assert full_finetune.main(tiny_run_args(tiny_model_dir, small_csv, out, "--test", str(test_csv), "--epochs", "3",
                                            "--patience", "1")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    labelled_rows = len(pd.read_csv(small_csv))
    validated, refit = Recording.fits
    assert validated["validated"] and validated["rows"] < labelled_rows
    assert refit == {"rows": labelled_rows, "validated": False, "epochs": metrics["best_epoch"]}
    assert metrics["submission_model"]["rows"] == labelled_rows and "cannot be measured" in \
        metrics["submission_model"]["score"]
    model = Trainer.from_pretrained(out / "full_finetune_model", progress=False)
    texts = pd.read_csv(test_csv)["text"].tolist()
    assert pd.read_csv(out / "submission.csv")["label"].tolist() == model.predict(texts)[0]
    assert not (out / full_finetune.VALIDATED_FILE).exists()


def test_no_refit_is_the_validated_model_writing_the_submission(monkeypatch, tmp_path, tiny_model_dir, small_csv,
                                                                test_csv):
    monkeypatch.setattr(full_finetune, "Trainer", Recording)
    Recording.fits = []
    out = tmp_path / "out"
    assert full_finetune.main(tiny_run_args(tiny_model_dir, small_csv, out, "--test", str(test_csv),
                                            "--no-refit")) == 0
    assert len(Recording.fits) == 1 and Recording.fits[0]["validated"]
    assert json.loads((out / "metrics.json").read_text())["submission_model"]["trained_on"] == "the training split"


class StoppedInTheRefit(Trainer):
    """Asked to stop (as by Ctrl-C) after its second step of the refit."""

    def fit(self, train_dataset, val_dataset=None, resume=None, stop_after=None):
        if val_dataset is None and resume is None:
            self.step_hooks.append(lambda run: run.step == 2 and self.request_stop())
        return super().fit(train_dataset, val_dataset, resume, stop_after)


def test_a_run_stopped_in_its_refit_resumes_there_and_ends_as_an_uninterrupted_one(monkeypatch, tmp_path,
                                                                                    tiny_model_dir, small_csv,
                                                                                    test_csv, capsys, trained_run):
    straight = trained_run  # the same command, uninterrupted
    out = tmp_path / "out"
    args = tiny_run_args(tiny_model_dir, small_csv, out, "--test", str(test_csv))
    with monkeypatch.context() as patch:
        patch.setattr(full_finetune, "Trainer", StoppedInTheRefit)
        assert full_finetune.main(args) == 130
    assert (out / full_finetune.VALIDATED_FILE).is_file() and (out / "checkpoint.pt").is_file()
    monkeypatch.setattr(full_finetune, "Trainer", Recording)
    Recording.fits = []
    capsys.readouterr()
    assert full_finetune.main([*args, "--resume"]) == 0
    assert "Resuming the refit" in capsys.readouterr().out
    assert len(Recording.fits) == 1 and not Recording.fits[0]["validated"]  # the validated run was not repeated
    assert (out / "submission.csv").read_bytes() == (straight / "submission.csv").read_bytes()
    for name in ("best_full_finetune_model.pth", "full_finetune_model/model.safetensors"):
        assert (out / name).read_bytes() == (straight / name).read_bytes(), name


def test_cv_submits_the_folds_a_refit_or_both(tmp_path, tiny_model_dir, small_csv, test_csv):
    out = tmp_path / "cv"
    args = ["cv", "--folds", "2", *tiny_run_args(tiny_model_dir, small_csv, out, "--epochs", "1"), "--test",
            str(test_csv)]
    probabilities = {}
    for choice in ("folds", "refit", "both"):
        assert full_finetune.main([*args, "--cv-submission", choice]) == 0
        frame = pd.read_csv(out / "submission_probs.csv")
        probabilities[choice] = frame.filter(like="prob_").to_numpy()
        assert json.loads((out / "cv_metrics.json").read_text())["submission_from"]
    assert (out / "refit" / "full_finetune_model" / "config.json").is_file()
    np.testing.assert_allclose(probabilities["both"], (probabilities["folds"] + probabilities["refit"]) / 2,
                               atol=1e-6)
    assert not np.allclose(probabilities["folds"], probabilities["refit"])
