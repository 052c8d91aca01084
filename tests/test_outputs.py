import json

import pandas as pd
import pytest
import torch

import full_finetune
from config import FinetuneError
from full_finetune import Trainer

OUTPUT_FILES = ("best_full_finetune_model.pth", "full_finetune_training_curves.png",
                "full_finetune_confusion_matrix.png", "metrics.json", "history.csv", "data_report.json")


@pytest.fixture
def trained_run(tiny_config):
    """One full run of the command line with the tiny model; returns its output folder."""
    args = ["--model", tiny_config.MODEL_NAME, "--data", tiny_config.DATA_PATH,
            "--output-dir", tiny_config.OUTPUT_DIR, "--epochs", "2", "--max-length", "32",
            "--lr", "1e-3", "--batch-size", "16"]
    assert full_finetune.main(args) == 0
    return tiny_config


def test_a_run_writes_every_output(trained_run):
    out = full_finetune.Path(trained_run.OUTPUT_DIR)
    for name in OUTPUT_FILES:
        assert (out / name).stat().st_size > 0, name
    assert (out / "full_finetune_model" / "config.json").is_file()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary leftovers
    state = torch.load(out / "best_full_finetune_model.pth", weights_only=True)
    assert state["classifier.weight"].shape == (3, 32)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["label_names"] == ["delivery", "price", "refund"]
    assert set(metrics["test"]) >= {"accuracy", "macro_f1", "weighted_f1", "report", "confusion_matrix"}
    assert metrics["device"] == "cpu" and metrics["precision"] in ("bf16", "fp32")
    history = pd.read_csv(out / "history.csv")
    assert list(history["epoch"]) == [1, 2]
    assert {"train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_macro_f1"} <= set(history)


def test_label_names_survive_save_reload_and_pipeline(trained_run):
    from transformers import pipeline

    folder = full_finetune.Path(trained_run.OUTPUT_DIR) / "full_finetune_model"
    reloaded = Trainer.from_pretrained(folder, progress=False)
    assert reloaded.label_names == ["delivery", "price", "refund"]
    assert reloaded.config.MAX_LENGTH == 32  # predicts with the length it was trained with
    names, probabilities = reloaded.predict(["where is my parcel", "refund my money"])
    assert set(names) <= {"delivery", "price", "refund"}
    assert probabilities.shape == (2, 3) and probabilities.sum(1) == pytest.approx([1, 1], abs=1e-5)
    classify = pipeline("text-classification", model=str(folder))
    result = classify(["where is my parcel", "refund my money"])
    assert [r["label"] for r in result] == names


def test_best_weights_file_matches_the_saved_model(trained_run):
    out = full_finetune.Path(trained_run.OUTPUT_DIR)
    state = torch.load(out / "best_full_finetune_model.pth", weights_only=True)
    model = Trainer.from_pretrained(out / "full_finetune_model", progress=False).model
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_predict_writes_id_label_with_original_names(trained_run, tmp_path):
    folder = full_finetune.Path(trained_run.OUTPUT_DIR) / "full_finetune_model"
    pd.DataFrame({"id": [101, 205, 307], "text": ["price?", "", "send it back"]}).to_csv(
        tmp_path / "test.csv", index=False)
    code = full_finetune.main(["predict", "--model-dir", str(folder), "--input", str(tmp_path / "test.csv"),
                               "--output", str(tmp_path / "sub.csv"), "--probabilities"])
    assert code == 0
    submission = pd.read_csv(tmp_path / "sub.csv")
    assert list(submission.columns[:2]) == ["id", "label"] and list(submission["id"]) == [101, 205, 307]
    assert set(submission["label"]) <= {"delivery", "price", "refund"}
    probs = submission[["prob_delivery", "prob_price", "prob_refund"]].sum(axis=1)
    assert probs.to_numpy() == pytest.approx([1, 1, 1], abs=1e-4)


def test_predict_numbers_rows_when_there_is_no_id(trained_run, tmp_path):
    folder = full_finetune.Path(trained_run.OUTPUT_DIR) / "full_finetune_model"
    pd.DataFrame({"message": ["a", "b"]}).to_csv(tmp_path / "t.csv", index=False)
    assert full_finetune.main(["predict", "--model-dir", str(folder), "--input", str(tmp_path / "t.csv"),
                               "--output", str(tmp_path / "s.csv"), "--text-column", "message"]) == 0
    assert list(pd.read_csv(tmp_path / "s.csv")["id"]) == [0, 1]


def test_predict_without_a_text_column_says_so(trained_run, tmp_path, capsys):
    folder = full_finetune.Path(trained_run.OUTPUT_DIR) / "full_finetune_model"
    pd.DataFrame({"id": [1], "body": ["x"]}).to_csv(tmp_path / "t.csv", index=False)
    code = full_finetune.main(["predict", "--model-dir", str(folder), "--input", str(tmp_path / "t.csv")])
    assert code == 2 and "no column 'text'" in capsys.readouterr().err


def test_predict_to_an_unwritable_path_says_so(trained_run, tmp_path, capsys):
    folder = full_finetune.Path(trained_run.OUTPUT_DIR) / "full_finetune_model"
    pd.DataFrame({"text": ["a"]}).to_csv(tmp_path / "t.csv", index=False)
    (tmp_path / "blocker").write_text("a file, not a folder")
    code = full_finetune.main(["predict", "--model-dir", str(folder), "--input", str(tmp_path / "t.csv"),
                               "--output", str(tmp_path / "blocker" / "sub.csv")])
    err = capsys.readouterr().err
    assert code == 2 and "Cannot write" in err and "Traceback" not in err


def test_a_failed_run_leaves_the_earlier_outputs_untouched(trained_run, capsys):
    out = full_finetune.Path(trained_run.OUTPUT_DIR)
    before = {name: (out / name).read_bytes() for name in OUTPUT_FILES}
    bad = out.parent / "bad.csv"
    bad.write_text("text,label\nonly,one\n")
    assert full_finetune.main(["--data", str(bad), "--output-dir", str(out)]) == 2
    assert {name: (out / name).read_bytes() for name in OUTPUT_FILES} == before


def test_an_unwritable_output_dir_is_refused_before_training(tmp_path, tiny_config, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    code = full_finetune.main(["--data", tiny_config.DATA_PATH, "--output-dir", str(blocker / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "Cannot write to the output directory" in err and "Traceback" not in err


def test_an_unreachable_hub_model_fails_with_one_sentence(monkeypatch):
    monkeypatch.setattr(full_finetune, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(FinetuneError) as err:
        full_finetune.load_model_and_tokenizer("no-such-org/no-such-model", ["a", "b"])
    message = str(err.value)
    assert "cannot be reached" in message and "--preset minilm" in message and "\n" not in message


def test_the_packaged_model_name_resolves_to_a_local_folder():
    source = full_finetune.resolve_model_source("sentence-transformers/all-MiniLM-L6-v2")
    assert (full_finetune.Path(source) / "config.json").is_file()


def test_plots_are_written_and_the_confusion_matrix_grows_with_80_classes(tmp_path):
    from PIL import Image

    history = [{"epoch": e, "train_loss": 1 / e, "val_loss": 1.2 / e, "train_accuracy": 0.5 + e / 10,
                "val_accuracy": 0.4 + e / 10, "val_macro_f1": 0.35 + e / 10} for e in (1, 2, 3)]
    full_finetune.plot_training_curves(history, tmp_path / "curves.png", best_epoch=2)
    assert Image.open(tmp_path / "curves.png").size[0] > 600
    sizes = {}
    for n in (5, 80):
        names = [f"intent_number_{i}" for i in range(n)]
        matrix = torch.eye(n, dtype=torch.long).mul(9).add(1).tolist()
        full_finetune.plot_confusion_matrix(matrix, names, tmp_path / f"cm{n}.png")
        sizes[n] = Image.open(tmp_path / f"cm{n}.png").size
    assert sizes[80][0] > 2 * sizes[5][0]  # room for 80 legible tick labels


def test_evaluate_scores_a_labelled_file_and_refuses_unseen_labels(trained_run, tmp_path, capsys):
    folder = full_finetune.Path(trained_run.OUTPUT_DIR) / "full_finetune_model"
    labelled = pd.DataFrame({"text": ["where is my parcel", "refund please", "price?"],
                             "label": ["delivery", "refund", "price"]})
    labelled.to_csv(tmp_path / "eval.csv", index=False)
    code = full_finetune.main(["evaluate", "--model-dir", str(folder), "--input", str(tmp_path / "eval.csv"),
                               "--output", str(tmp_path / "m.json")])
    assert code == 0 and "3 rows of" in capsys.readouterr().out
    assert len(json.loads((tmp_path / "m.json").read_text())["confusion_matrix"]) == 3
    labelled.loc[3] = ["is it any good", "review"]
    labelled.to_csv(tmp_path / "eval.csv", index=False)
    code = full_finetune.main(["evaluate", "--model-dir", str(folder), "--input", str(tmp_path / "eval.csv")])
    err = capsys.readouterr().err
    assert code == 2 and "never saw ('review')" in err


def test_two_runs_with_the_same_seed_give_identical_metrics(tiny_config, tmp_path):
    results = []
    for name in ("first", "second"):
        tiny_config.OUTPUT_DIR = str(tmp_path / name)
        results.append(full_finetune.run_training(tiny_config))
    assert json.dumps(results[0], sort_keys=True) == json.dumps(results[1], sort_keys=True)
