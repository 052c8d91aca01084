"""K-fold cross-validation, fold skipping, and fold-ensemble prediction, with the tiny model."""

import json

import numpy as np
import pandas as pd
import pytest

import full_finetune
from conftest import make_rows
from full_finetune import Trainer


@pytest.fixture
def cv_run(tmp_path, tiny_config):
    pd.DataFrame({"id": [7, 8, 9], "text": ["parcel tracking", "refund money", "price cost"]}).to_csv(
        tmp_path / "test.csv", index=False)
    args = ["cv", "--folds", "3", "--model", tiny_config.MODEL_NAME, "--data", tiny_config.DATA_PATH,
            "--output-dir", str(tmp_path / "cv"), "--epochs", "2", "--max-length", "32", "--lr", "1e-3",
            "--test", str(tmp_path / "test.csv")]
    assert full_finetune.main(args) == 0
    return tmp_path / "cv", args


def test_cv_writes_fold_models_oof_scores_and_the_averaged_submission(cv_run, tiny_config):
    out, _ = cv_run
    for fold in (1, 2, 3):
        assert (out / f"fold_{fold}" / "full_finetune_model" / "config.json").is_file()
        assert not (out / f"fold_{fold}" / "checkpoint.pt").exists()
    oof = pd.read_csv(out / "oof.csv")
    train = pd.read_csv(tiny_config.DATA_PATH)
    assert len(oof) == len(train) and list(oof["text"]) == list(train["text"])
    assert sorted(oof["fold"].unique()) == [1, 2, 3]
    assert oof.groupby("fold")["label"].value_counts().unstack().min().min() >= 13  # stratified: 40 per class
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
    assert np.allclose(probabilities[["prob_delivery", "prob_price", "prob_refund"]].sum(axis=1), 1, atol=1e-5)

    # The submission is the average of the fold models: the same as predict with all three folders.
    folders = [str(out / f"fold_{f}" / "full_finetune_model") for f in (1, 2, 3)]
    assert full_finetune.main(["predict", "--model-dir", *folders, "--input", str(out.parent / "test.csv"),
                               "--output", str(out.parent / "ens.csv"), "--probabilities"]) == 0
    ensemble = pd.read_csv(out.parent / "ens.csv")
    assert np.allclose(ensemble.filter(like="prob_"), probabilities.filter(like="prob_"), atol=1e-5)
    single = Trainer.from_pretrained(folders[0], progress=False).predict(["parcel tracking"])[1]
    assert not np.allclose(single[0], ensemble.filter(like="prob_").iloc[0], atol=1e-6)


def test_finished_folds_are_skipped_when_cv_is_run_again(cv_run, monkeypatch):
    out, args = cv_run
    (out / "fold_3" / "fold_result.pt").unlink()  # as if the run had crashed in fold 3
    before = pd.read_csv(out / "oof.csv")
    fits = []
    original_fit = Trainer.fit
    monkeypatch.setattr(Trainer, "fit", lambda self, *a, **k: (fits.append(1), original_fit(self, *a, **k))[1])
    assert full_finetune.main(args) == 0
    assert len(fits) == 1  # only fold 3 trained again
    after = pd.read_csv(out / "oof.csv")
    folds_1_2 = before["fold"] < 3
    assert np.allclose(before[folds_1_2].filter(like="prob_"), after[folds_1_2].filter(like="prob_"))


def test_a_fold_from_other_settings_is_refused(cv_run, capsys):
    _, args = cv_run
    assert full_finetune.main([*args, "--seed", "7"]) == 2
    assert "fold_1 holds a fold trained with other settings" in capsys.readouterr().err


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


def test_reused_folds_predict_a_new_test_file(cv_run, monkeypatch):
    out, args = cv_run
    test_path = out.parent / "test.csv"
    pd.DataFrame({"id": [1, 2], "text": ["money back", "how much"]}).to_csv(test_path, index=False)
    monkeypatch.setattr(Trainer, "fit", lambda *a, **k: pytest.fail("no fold should train again"))
    assert full_finetune.main(args) == 0
    assert list(pd.read_csv(out / "submission.csv")["id"]) == [1, 2]


def test_a_single_model_distils_the_fold_ensemble_from_oof_csv(cv_run, tiny_config, tmp_path, capsys):
    out, _ = cv_run
    args = ["--model", tiny_config.MODEL_NAME, "--data", tiny_config.DATA_PATH, "--epochs", "1",
            "--max-length", "32", "--lr", "1e-3", "--soft-targets", str(out / "oof.csv")]
    assert full_finetune.main([*args, "--output-dir", str(tmp_path / "student")]) == 0
    assert json.loads((tmp_path / "student" / "metrics.json").read_text())["config"]["SOFT_TARGETS"] == str(
        out / "oof.csv")
    pd.read_csv(out / "oof.csv").iloc[5:].to_csv(tmp_path / "partial.csv", index=False)
    args[-1] = str(tmp_path / "partial.csv")
    capsys.readouterr()
    assert full_finetune.main([*args, "--output-dir", str(tmp_path / "student2")]) == 2
    assert "training texts have no soft targets" in capsys.readouterr().err


def test_soup_writes_one_model_whose_weights_are_the_mean_of_the_fold_models(cv_run, tmp_path):
    import torch

    folders = sorted(str(path) for path in cv_run[0].glob("fold_*/full_finetune_model"))
    assert len(folders) == 3
    assert full_finetune.main(["soup", "--model-dir", *folders, "--output", str(tmp_path / "soup")]) == 0
    soup = Trainer.from_pretrained(tmp_path / "soup", progress=False)
    members = [Trainer.from_pretrained(folder, progress=False) for folder in folders]
    states = [member.model.state_dict() for member in members]
    averaged = 0
    for key, value in soup.model.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(value, sum(state[key] for state in states) / 3)
            averaged += not torch.equal(value, states[0][key])
    assert averaged > 0  # the folds' weights differ, so the soup is none of them
    assert soup.label_names == members[0].label_names
    assert soup.config.MAX_LENGTH == 32
    assert len(soup.predict(["where is my parcel"])[0]) == 1


def test_soup_refuses_one_folder_its_own_input_and_other_labels_or_heads(tmp_path, tiny_model_factory, tokenizer,
                                                                      capsys):
    from transformers import BertModel

    folders = {}
    for name, labels in (("a", ["x", "y", "z"]), ("b", ["x", "y", "w"]), ("mean", ["x", "y", "z"])):
        model = tiny_model_factory()
        if name == "mean":
            model = full_finetune.MeanPoolingClassifier(BertModel(model.config), 3)
        model.config.id2label = dict(enumerate(labels))
        model.config.label2id = {label: i for i, label in enumerate(labels)}
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
        folders[name] = str(tmp_path / name)
    for model_dirs, output, message in (
            ([folders["a"]], "s", "at least two"),
            ([folders["a"], folders["a"]], "a", "new folder"),
            ([folders["a"], folders["b"]], "s", "other labels"),
            ([folders["a"], folders["mean"]], "s", "another architecture")):
        code = full_finetune.main(["soup", "--model-dir", *model_dirs, "--output", str(tmp_path / output)])
        assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
