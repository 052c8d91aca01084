"""The price of each way to make a submission, on CLINC150: accuracy on the test file and time.

Run as a competitor would: the labelled rows are train.csv and val.csv together (18,000 rows, 150
intents), the test file is test.csv (4,500 in-scope rows) with its labels held back; each run is
the command-line job itself (run_training, or run_cv for the folds), and its predictions are
scored against test.csv's labels afterwards. One JSON line per run:

- recipe "default" or "fgm" (--preset minilm_adversarial): one `--test` run with REFIT. It scores
  both models of the run on the test file: the validated model (trained on 80% of the rows, its
  epoch chosen on 10%: the submission without refit) and the refit on all 18,000 rows (the
  submission with refit), with each one's training seconds, and the validated model's test-file
  log loss before and after temperature scaling. Their test-file probabilities are saved
  (--probs-out) for the ensembles of seeds.
- recipe "cv": `cv --folds 5 --cv-submission both`: the fold models' average, the refit on every
  row, and both averaged, with the folds' and the refit's training seconds.

    python bench/refit_clinc150.py --recipe default --seeds 42 1 2 --probs-out /tmp/refit/probs
    python bench/refit_clinc150.py --recipe fgm --seeds 42 --probs-out /tmp/refit/probs
    python bench/refit_clinc150.py --recipe cv --seeds 42
    python bench/refit_clinc150.py --table runs.jsonl --probs-out /tmp/refit/probs   # the price table
    python bench/refit_clinc150.py --quick --recipe default   # 3,000 rows, 1 epoch: a smoke test
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def competition_files(data_dir, folder, quick):
    """train.csv + val.csv as the labelled file, test.csv without its labels (ids 0..n-1) as the
    test file; returns their paths and the test file's labels."""
    labelled = pd.concat([pd.read_csv(data_dir / name, dtype=str, keep_default_na=False)
                          for name in ("train.csv", "val.csv")], ignore_index=True)
    test = pd.read_csv(data_dir / "test.csv", dtype=str, keep_default_na=False)
    if quick:
        labelled = labelled.groupby("intent").head(20)
        test = test.groupby("intent").head(2)
    labelled[["text", "intent"]].to_csv(folder / "labelled.csv", index=False)
    pd.DataFrame({"id": range(len(test)), "text": test["text"]}).to_csv(folder / "test_file.csv", index=False)
    return folder / "labelled.csv", folder / "test_file.csv", test["intent"].tolist()


def config_for(recipe, seed, data_path, test_path, output_dir, quick, overrides):
    from config import ModelConfigs

    config = ModelConfigs.get_config("minilm_adversarial" if recipe == "fgm" else "minilm")
    config.DATA_PATH, config.TEST_PATH, config.LABEL_COLUMN = str(data_path), str(test_path), "intent"
    config.OUTPUT_DIR, config.SEED = str(output_dir), seed
    if quick:
        config.EPOCHS = 1
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def accuracy(probabilities, label_names, truth):
    return float(np.mean(np.asarray(label_names)[np.asarray(probabilities).argmax(1)] == np.asarray(truth)))


def run_train(args, seed, files, overrides):
    """One `--test` run with refit: both of its models scored on the test file."""
    import torch

    import full_finetune
    from full_finetune import Trainer, metric_value, read_test_file

    data_path, test_path, truth = files
    output_dir = Path(args.output_dir) / f"{args.recipe}-s{seed}"
    config = config_for(args.recipe, seed, data_path, test_path, output_dir, args.quick, overrides)
    started = time.perf_counter()
    full_finetune.run_training(config)
    wall = time.perf_counter() - started
    metrics = json.loads((output_dir / full_finetune.METRICS_FILE).read_text())
    names = metrics["label_names"]
    texts = read_test_file(test_path, "text")[1]
    refit = Trainer.from_pretrained(output_dir / full_finetune.MODEL_DIR_NAME, progress=False)
    refit_probabilities = refit.predict(texts)[1]
    # The validated model: its weights in the refit's folder (which carries the same temperature).
    refit.model.load_state_dict(torch.load(output_dir / full_finetune.BEST_WEIGHTS_FILE, weights_only=True))
    validated_probabilities = refit.predict(texts)[1]
    temperature = refit.model.config.calibration_temperature
    refit.model.config.calibration_temperature = 1.0
    uncalibrated = refit.predict(texts)[1]
    ids = [names.index(label) for label in truth]
    if args.probs_out:
        Path(args.probs_out).parent.mkdir(parents=True, exist_ok=True)
        np.save(f"{args.probs_out}-{args.recipe}-validated-s{seed}.npy", validated_probabilities)
        np.save(f"{args.probs_out}-{args.recipe}-refit-s{seed}.npy", refit_probabilities)
    return {"recipe": args.recipe, "seed": seed, "best_epoch": metrics["best_epoch"],
            "validated_test_accuracy": accuracy(validated_probabilities, names, truth),
            "refit_test_accuracy": accuracy(refit_probabilities, names, truth),
            "validated_train_seconds": metrics["train_seconds"],
            "refit_train_seconds": metrics["submission_model"].get("train_seconds"), "wall_seconds": round(wall, 1),
            "temperature": temperature,
            "test_log_loss_before_calibration": metric_value("log_loss", ids, uncalibrated, None),
            "test_log_loss_after_calibration": metric_value("log_loss", ids, validated_probabilities, None),
            "validation_log_loss_before": metrics["calibration"]["log_loss_before"],
            "validation_log_loss_after": metrics["calibration"]["log_loss_after"],
            "test_split_accuracy": metrics["test"]["accuracy"], "precision": metrics["precision"]}


def run_cv(args, seed, files, overrides):
    """cv --folds 5 with both submissions: the folds' average, the refit, and both averaged."""
    import torch

    import full_finetune

    data_path, test_path, truth = files
    output_dir = Path(args.output_dir) / f"cv-s{seed}"
    config = config_for("default", seed, data_path, test_path, output_dir, args.quick,
                        {"N_FOLDS": 5, "CV_SUBMISSION": "both", **overrides})
    started = time.perf_counter()
    cv_metrics = full_finetune.run_cv(config)
    wall = time.perf_counter() - started
    names = cv_metrics["label_names"]

    def result(folder):
        return torch.load(output_dir / folder / full_finetune.FOLD_RESULT_FILE, weights_only=True)

    def seconds(folder):
        return float(pd.read_csv(output_dir / folder / full_finetune.HISTORY_FILE)["seconds"].sum())

    folds = [f"fold_{k + 1}" for k in range(5)]
    fold_average = np.mean([result(f)["test_probabilities"].numpy() for f in folds], axis=0)
    refit = result(full_finetune.REFIT_DIR)["test_probabilities"].numpy()
    if args.probs_out:
        np.save(f"{args.probs_out}-cv-folds-s{seed}.npy", fold_average)
        np.save(f"{args.probs_out}-cv-refit-s{seed}.npy", refit)
    return {"recipe": "cv", "seed": seed, "folds_test_accuracy": accuracy(fold_average, names, truth),
            "refit_test_accuracy": accuracy(refit, names, truth),
            "both_test_accuracy": accuracy((fold_average + refit) / 2, names, truth),
            "folds_train_seconds": round(sum(seconds(f) for f in folds), 1),
            "refit_train_seconds": round(seconds(full_finetune.REFIT_DIR), 1), "wall_seconds": round(wall, 1),
            "out_of_fold_accuracy": cv_metrics["out_of_fold"]["accuracy"]}


def table(path, probs_out, truth, names):
    """The price table: each option's mean test accuracy (and spread over seeds) and time."""
    runs = [json.loads(line) for line in Path(path).read_text().splitlines() if line.startswith("{")]
    rows = []

    def add(option, accuracies, seconds):
        accuracies, seconds = np.asarray(accuracies), np.asarray(seconds)
        spread = f" +- {accuracies.std(ddof=1) * 100:.2f}" if len(accuracies) > 1 else ""
        rows.append((option, f"{accuracies.mean() * 100:.2f}%{spread} ({len(accuracies)})", seconds.mean()))

    default = [r for r in runs if r["recipe"] == "default"]
    fgm = [r for r in runs if r["recipe"] == "fgm"]
    cv = [r for r in runs if r["recipe"] == "cv"]
    if default:
        add("default, no refit", [r["validated_test_accuracy"] for r in default],
            [r["validated_train_seconds"] for r in default])
        add("default with refit", [r["refit_test_accuracy"] for r in default],
            [r["validated_train_seconds"] + r["refit_train_seconds"] for r in default])
    if len(default) >= 2 and probs_out:
        pairs = list(zip(default, default[1:] + default[:1], strict=True))[:len(default) if len(default) > 2 else 1]
        for kind in ("validated", "refit"):
            accuracies = [accuracy((np.load(f"{probs_out}-default-{kind}-s{a['seed']}.npy")
                                    + np.load(f"{probs_out}-default-{kind}-s{b['seed']}.npy")) / 2, names, truth)
                          for a, b in pairs]
            seconds = [a["validated_train_seconds"] + b["validated_train_seconds"]
                       + (a["refit_train_seconds"] + b["refit_train_seconds"] if kind == "refit" else 0)
                       for a, b in pairs]
            add(f"two seeds' ensemble ({'with' if kind == 'refit' else 'no'} refit)", accuracies, seconds)
    if fgm:
        add("FGM, no refit", [r["validated_test_accuracy"] for r in fgm], [r["validated_train_seconds"] for r in fgm])
        add("FGM with refit", [r["refit_test_accuracy"] for r in fgm],
            [r["validated_train_seconds"] + r["refit_train_seconds"] for r in fgm])
    if cv:
        add("5-fold ensemble", [r["folds_test_accuracy"] for r in cv], [r["folds_train_seconds"] for r in cv])
        add("5 folds' median epochs, refit", [r["refit_test_accuracy"] for r in cv],
            [r["folds_train_seconds"] + r["refit_train_seconds"] for r in cv])
        add("5-fold ensemble and refit, averaged", [r["both_test_accuracy"] for r in cv],
            [r["folds_train_seconds"] + r["refit_train_seconds"] for r in cv])
    base = rows[0][2] if rows else 1.0
    print("| option | test accuracy (runs) | training time | x default |")
    print("| --- | --- | --- | --- |")
    for option, accuracy_text, seconds in rows:
        print(f"| {option} | {accuracy_text} | {seconds / 60:.0f} min | {seconds / base:.2f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "datasets" / "clinc150"),
                        help="folder with train.csv, val.csv, test.csv (columns text,intent)")
    parser.add_argument("--recipe", choices=["default", "fgm", "cv"], default="default")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42])
    parser.add_argument("--threads", type=int, default=1, help="torch threads of this process")
    parser.add_argument("--quick", action="store_true", help="20 rows per intent, 1 epoch: a smoke test")
    parser.add_argument("--output-dir", default="/tmp/refit_clinc150", help="scratch folder for the runs")
    parser.add_argument("--probs-out", metavar="PREFIX", help="save test-file probabilities to PREFIX-...npy")
    parser.add_argument("--table", metavar="JSONL", help="print the price table of runs (their JSON lines)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        files = competition_files(Path(args.data), Path(scratch), args.quick)
        if args.table:
            names = sorted(set(pd.read_csv(files[0], dtype=str)["intent"]))
            table(args.table, args.probs_out, files[2], names)
            return
        for seed in args.seeds:
            run = run_cv if args.recipe == "cv" else run_train
            print(json.dumps(run(args, seed, files, {})), flush=True)


if __name__ == "__main__":
    main()
