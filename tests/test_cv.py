"""K-fold cross-validation: fold models, out-of-fold probabilities, label issues (seeded flipped
labels must come back flagged), fold reuse, the fold-ensemble submission, and its report."""

import json

import numpy as np
import pandas as pd
import pytest

import full_finetune
from conftest import make_rows
from full_finetune import Trainer

FLIPPED = [3, 17, 40, 66, 95, 121, 150, 177]  # rows of the cv data given another class's label


@pytest.fixture(scope="module")
def cv_data(tmp_path_factory):
    """60 rows per class, eight of them relabelled to another class (seeded)."""
    folder = tmp_path_factory.mktemp("cv_data")
    frame = make_rows(60, seed=3)
    frame["true_label"] = frame["label"]
    classes = sorted(frame["label"].unique())
    rng = np.random.default_rng(0)
    for row in FLIPPED:
        others = [c for c in classes if c != frame.loc[row, "label"]]
        frame.loc[row, "label"] = others[rng.integers(len(others))]
    frame[["text", "label"]].to_csv(folder / "train.csv", index=False)
    pd.DataFrame({"id": [7, 8, 9], "text": ["parcel tracking", "refund money", "price cost"]}).to_csv(
        folder / "test.csv", index=False)
    return folder


@pytest.fixture(scope="module")
def cv_run(tmp_path_factory, cv_data, tiny_model_dir):
    out = tmp_path_factory.mktemp("cv") / "cv"
    args = ["cv", "--folds", "3", "--model", str(tiny_model_dir), "--data", str(cv_data / "train.csv"),
            "--output-dir", str(out), "--epochs", "10", "--max-length", "32", "--lr", "3e-3", "--batch-size", "16",
            "--no-freeze-word-embeddings",  # the tiny model's word embeddings are random, not pre-trained
            "--test", str(cv_data / "test.csv"), "--cv-submission", "folds"]
    assert full_finetune.main(args) == 0
    return out, args


def test_cv_writes_fold_models_oof_scores_and_the_averaged_submission(cv_run, cv_data):
    out, _ = cv_run
    for fold in (1, 2, 3):
        assert (out / f"fold_{fold}" / "full_finetune_model" / "config.json").is_file()
        assert not (out / f"fold_{fold}" / "checkpoint.pt").exists()
    oof = pd.read_csv(out / "oof.csv")
    train = pd.read_csv(cv_data / "train.csv")
    assert len(oof) == len(train) and list(oof["text"]) == list(train["text"])
    assert sorted(oof["fold"].unique()) == [1, 2, 3]
    probs = oof[["prob_delivery", "prob_price", "prob_refund"]]
    assert np.allclose(probs.sum(axis=1), 1, atol=1e-5)
    assert list(oof["prediction"]) == [c.removeprefix("prob_") for c in probs.idxmax(axis=1)]

    metrics = json.loads((out / "cv_metrics.json").read_text())
    per_fold = [f["accuracy"] for f in metrics["folds"]]
    assert len(per_fold) == 3 and metrics["mean"]["accuracy"] == pytest.approx(np.mean(per_fold))
    assert metrics["std"]["accuracy"] == pytest.approx(np.std(per_fold))
    assert metrics["out_of_fold"]["accuracy"] == pytest.approx((oof["label"] == oof["prediction"]).mean())
    assert json.loads((out / "data_report.json").read_text())["rows"] == len(train)

    submission = pd.read_csv(out / "submission.csv")
    probabilities = pd.read_csv(out / "submission_probs.csv")
    assert list(submission.columns) == ["id", "label"] and list(submission["id"]) == [7, 8, 9]
    # The submission is the average of the fold models: the same as predict with all three folders.
    folders = [str(out / f"fold_{f}" / "full_finetune_model") for f in (1, 2, 3)]
    assert full_finetune.main(["predict", "--model-dir", *folders, "--input", str(cv_data / "test.csv"),
                               "--output", str(out.parent / "ens.csv"), "--probabilities"]) == 0
    ensemble = pd.read_csv(out.parent / "ens.csv")
    assert np.allclose(ensemble.filter(like="prob_"), probabilities.filter(like="prob_"), atol=1e-5)
    single = Trainer.from_pretrained(folders[0], progress=False).predict(["parcel tracking"])[1]
    assert not np.allclose(single[0], ensemble.filter(like="prob_").iloc[0], atol=1e-6)


def test_label_issues_flag_the_flipped_rows_first_with_their_suggested_labels(cv_run, cv_data):
    out, _ = cv_run
    issues = pd.read_csv(out / "label_issues.csv")
    assert list(issues.columns) == ["row", "text", "given_label", "suggested_label", "given_probability",
                                    "suggested_probability", "label_quality", "fold"]
    top = issues.head(len(FLIPPED))
    found = set(top["row"]) & set(FLIPPED)
    assert len(found) >= 6, (sorted(top["row"]), FLIPPED)  # >= 75% of the flips within the top 8
    truth = pd.read_csv(cv_data / "train.csv")
    original = make_rows(60, seed=3)
    for _, issue in top[top["row"].isin(FLIPPED)].iterrows():
        assert issue["given_label"] == truth.loc[issue["row"], "label"] != original.loc[issue["row"], "label"]
        assert issue["suggested_label"] == original.loc[issue["row"], "label"]
    assert list(issues["label_quality"]) == sorted(issues["label_quality"])  # most likely wrong first
    oof = pd.read_csv(out / "oof.csv")
    first = issues.iloc[0]
    assert first["given_probability"] == pytest.approx(oof.loc[first["row"], f"prob_{first['given_label']}"])
    assert json.loads((out / "cv_metrics.json").read_text())["label_issues"] == len(issues)


def test_label_issues_are_found_from_python_too():
    rng = np.random.default_rng(1)
    labels = np.repeat([0, 1, 2], 30)
    probabilities = np.full((90, 3), 0.05)
    probabilities[np.arange(90), labels] = 0.9
    probabilities[[4, 50], :] = [[0.02, 0.03, 0.95], [0.9, 0.05, 0.05]]  # rows 4 and 50 look mislabelled
    probabilities += rng.uniform(0, 0.01, probabilities.shape)
    probabilities /= probabilities.sum(1, keepdims=True)
    issues = full_finetune.find_label_issues(labels, probabilities, [f"t{i}" for i in range(90)], ["a", "b", "c"])
    assert sorted(issues["row"]) == [4, 50]
    assert issues.set_index("row").loc[4, "suggested_label"] == "c"


def test_the_cv_report_lists_folds_pairs_and_label_issues(cv_run):
    page = (cv_run[0] / "report.html").read_text()
    for heading in ("Cross-validation report", "Folds", "Most confused pairs (out of fold)",
                    "Likely label issues (top 20)", "Confusion matrix (out of fold)"):
        assert heading in page
    assert "data:image/png;base64," in page


def test_finished_folds_are_skipped_when_cv_is_run_again(cv_run, monkeypatch):
    out, args = cv_run
    result = out / "fold_3" / "fold_result.pt"
    saved = result.read_bytes()
    result.unlink()  # as if the run had crashed in fold 3
    before = pd.read_csv(out / "oof.csv")
    fits = []
    original_fit = Trainer.fit
    monkeypatch.setattr(Trainer, "fit", lambda self, *a, **k: (fits.append(1), original_fit(self, *a, **k))[1])
    try:
        assert full_finetune.main(args) == 0
        assert len(fits) == 1  # only fold 3 trained again
        after = pd.read_csv(out / "oof.csv")
        folds_1_2 = before["fold"] < 3
        assert np.allclose(before[folds_1_2].filter(like="prob_"), after[folds_1_2].filter(like="prob_"))
    finally:
        result.write_bytes(saved)


def test_a_fold_from_other_settings_is_refused(cv_run, capsys):
    _, args = cv_run
    assert full_finetune.main([*args, "--seed", "7"]) == 2
    assert "fold_1 holds a model trained with other settings, data or starting model" in capsys.readouterr().err


def test_folds_trained_before_the_labels_were_fixed_are_refused(cv_run, cv_data, monkeypatch, capsys):
    """README's workflow: read label_issues.csv, fix the labels in the file, run cv again. The same
    file, the same number of rows, other labels: the old folds must not be reused."""
    _, args = cv_run
    original = (cv_data / "train.csv").read_bytes()
    fixed = pd.read_csv(cv_data / "train.csv")
    fixed.loc[FLIPPED[0], "label"] = make_rows(60, seed=3).loc[FLIPPED[0], "label"]  # one label set right
    monkeypatch.setattr(Trainer, "fit", lambda *a, **k: pytest.fail("no fold may train into the old folder"))
    try:
        fixed.to_csv(cv_data / "train.csv", index=False)
        assert full_finetune.main(args) == 2
    finally:
        (cv_data / "train.csv").write_bytes(original)
    assert "fold_1 holds a model trained with other settings, data or starting model" in capsys.readouterr().err


def test_a_damaged_fold_result_is_trained_again(cv_run, monkeypatch, capsys):
    out, args = cv_run
    result = out / "fold_2" / "fold_result.pt"
    saved = result.read_bytes()
    result.write_bytes(saved[:100])  # truncated by a crash of the disk, say
    fits = []
    original_fit = Trainer.fit
    monkeypatch.setattr(Trainer, "fit", lambda self, *a, **k: (fits.append(1), original_fit(self, *a, **k))[1])
    try:
        assert full_finetune.main(args) == 0
        assert len(fits) == 1 and "fold_result.pt cannot be read; training that fold again" in capsys.readouterr().out
    finally:
        result.write_bytes(saved)


def test_reused_folds_predict_a_new_test_file(cv_run, monkeypatch, tmp_path):
    out, args = cv_run
    test_path = tmp_path / "other_test.csv"
    pd.DataFrame({"id": [1, 2], "text": ["money back", "how much"]}).to_csv(test_path, index=False)
    monkeypatch.setattr(Trainer, "fit", lambda *a, **k: pytest.fail("no fold should train again"))
    test_at = args.index("--test") + 1
    assert full_finetune.main([*args[:test_at], str(test_path), *args[test_at + 1:]]) == 0
    assert list(pd.read_csv(out / "submission.csv")["id"]) == [1, 2]


def test_too_many_folds_for_a_class_is_refused(tmp_path, tiny_config, capsys):
    make_rows(4).to_csv(tmp_path / "small.csv", index=False)
    code = full_finetune.main(["cv", "--folds", "5", "--data", str(tmp_path / "small.csv"),
                               "--model", tiny_config.MODEL_NAME, "--output-dir", str(tmp_path / "o")])
    assert code == 2 and "5 folds need at least 5 rows per class" in capsys.readouterr().err


def test_predict_refuses_to_average_models_with_different_labels(tmp_path, tiny_model_factory, tokenizer, capsys):
    folders = []
    for name, labels in (("a", ["x", "y", "z"]), ("b", ["x", "y", "w"])):
        model = tiny_model_factory()
        model.config.id2label = dict(enumerate(labels))
        model.config.label2id = {label: i for i, label in enumerate(labels)}
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
        folders.append(str(tmp_path / name))
    pd.DataFrame({"text": ["hello"]}).to_csv(tmp_path / "t.csv", index=False)
    code = full_finetune.main(["predict", "--model-dir", *folders, "--input", str(tmp_path / "t.csv"),
                               "--output", str(tmp_path / "s.csv")])
    assert code == 2 and "other labels" in capsys.readouterr().err
