"""The command line on a slice of the embedded sample data with the real packaged MiniLM."""

import json
import subprocess
import sys

import pandas as pd
import torch

from conftest import ROOT

OUTPUTS = ("best_full_finetune_model.pth", "full_finetune_training_curves.png",
           "full_finetune_confusion_matrix.png", "metrics.json", "history.csv")


def test_cli_trains_the_packaged_model_and_writes_every_output(tmp_path):
    sample = pd.read_csv(ROOT / "data" / "train.csv")
    sliced = sample.groupby("label").head(50)  # 350 rows, 7 classes
    sliced.to_csv(tmp_path / "train.csv", index=False)
    out = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, str(ROOT / "full_finetune.py"), "--data", str(tmp_path / "train.csv"),
         "--output-dir", str(out), "--epochs", "4", "--max-length", "64", "--train-ratio", "0.7",
         "--val-ratio", "0.15"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env={"HF_HUB_OFFLINE": "1", "PATH": ""})
    assert run.returncode == 0, run.stderr[-2000:]
    assert "all-MiniLM-L6-v2" in run.stdout and "device: cpu" in run.stdout  # says what it used

    for name in OUTPUTS:
        assert (out / name).stat().st_size > 0, name
    metrics = json.loads((out / "metrics.json").read_text())
    chance = 1 / len(metrics["label_names"])
    assert metrics["test"]["accuracy"] > 3 * chance, metrics["test"]["accuracy"]
    state = torch.load(out / "best_full_finetune_model.pth", weights_only=True)
    assert state["classifier.weight"].shape[0] == 7

    predict = subprocess.run(
        [sys.executable, str(ROOT / "full_finetune.py"), "predict", "--model-dir", str(out / "full_finetune_model"),
         "--input", str(ROOT / "data" / "test.csv"), "--output", str(tmp_path / "submission.csv")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env={"HF_HUB_OFFLINE": "1", "PATH": ""})
    assert predict.returncode == 0, predict.stderr[-2000:]
    submission = pd.read_csv(tmp_path / "submission.csv")
    test = pd.read_csv(ROOT / "data" / "test.csv")
    assert list(submission.columns) == ["id", "label"]
    assert list(submission["id"]) == list(test["id"])
    assert set(submission["label"]) <= set(metrics["label_names"])
