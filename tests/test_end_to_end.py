"""The command line, end to end, with the real packaged MiniLM and the default (tuned) recipe, on a
slice of the embedded sample data: training, the test file's submission in the same process, every
output, and a reloaded model that predicts the same."""

import json
import subprocess
import sys

import pandas as pd

from conftest import ROOT, subprocess_env
from full_finetune import Trainer

OUTPUTS = ("best_full_finetune_model.pth", "full_finetune_training_curves.png", "full_finetune_confusion_matrix.png",
           "metrics.json", "history.csv", "errors.csv", "report.html", "submission.csv", "data_report.json")


def test_the_default_recipe_trains_the_packaged_model_and_writes_the_submission(tmp_path):
    sample = pd.read_csv(ROOT / "data" / "train.csv")
    sample.groupby("label").head(50).to_csv(tmp_path / "train.csv", index=False)  # 350 rows, 7 classes
    out = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, str(ROOT / "full_finetune.py"), "--data", str(tmp_path / "train.csv"), "--output-dir",
         str(out), "--epochs", "4", "--max-length", "64", "--train-ratio", "0.7", "--val-ratio", "0.15",
         "--test", str(ROOT / "data" / "test.csv")],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env=subprocess_env())
    assert run.returncode == 0, run.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "train.csv"]  # nothing written beside the outputs
    assert "all-MiniLM-L6-v2" in run.stdout and "device: cpu" in run.stdout and "precision: " in run.stdout
    for name in OUTPUTS:
        assert (out / name).stat().st_size > 0, name
    metrics = json.loads((out / "metrics.json").read_text())
    config = metrics["config"]
    assert (config["POOLING"], config["COSINE_HEAD_SCALE"], config["EMA_DECAY"], config["FREEZE_WORD_EMBEDDINGS"]) == (
        "mean", 20.0, 0.999, True)
    chance = 1 / len(metrics["label_names"])
    assert metrics["test"]["accuracy"] > 3 * chance, metrics["test"]["accuracy"]

    submission = pd.read_csv(out / "submission.csv")
    test = pd.read_csv(ROOT / "data" / "test.csv")
    assert list(submission.columns) == ["id", "label"] and list(submission["id"]) == list(test["id"])
    assert set(submission["label"]) <= set(metrics["label_names"])
    reloaded = Trainer.from_pretrained(out / "full_finetune_model", progress=False)
    assert reloaded.predict(test["text"].tolist())[0] == submission["label"].tolist()
