"""Measure the accuracy levers of config.py on CLINC150 with the default offline MiniLM.

Each variant trains on train.csv, selects its best epoch on val.csv (early stopping) and is
scored once on test.csv (in-scope intents only, as in the data set's paper). One JSON line per
variant, then a Markdown table.

    python bench/levers_clinc150.py                       # every variant, 5 epochs each
    python bench/levers_clinc150.py --variants base mean --epochs 3
    python bench/levers_clinc150.py --quick               # 2,000 training rows, 1 epoch: a smoke test
    python bench/levers_clinc150.py --variants mean_llrd_smoothing --set EMA_DECAY=0.999   # any setting
    python bench/levers_clinc150.py --variants mean_llrd_smoothing --probs-out /tmp/probs/seed42
                                            # also keep test.csv's probabilities, for bench/ensemble_clinc150.py
    python bench/levers_clinc150.py --variants mean_llrd_smoothing --weights-out /tmp/weights/seed42
                                            # and the kept weights, for bench/soup_clinc150.py
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from config import FullFinetuneConfig  # noqa: E402
from full_finetune import Split, Trainer, classification_metrics, encode_labels, read_soft_targets  # noqa: E402

# Each variant changes the base settings (the config.py defaults) by these values only.
VARIANTS = {
    "base": {},
    "mean": {"POOLING": "mean"},
    "llrd": {"LAYERWISE_LR_DECAY": 0.8},
    "smoothing": {"LABEL_SMOOTHING": 0.1},
    "class_weights": {"CLASS_WEIGHTS": "balanced"},
    "reinit": {"REINIT_TOP_LAYERS": 1},
    "mean_llrd_smoothing": {"POOLING": "mean", "LAYERWISE_LR_DECAY": 0.8, "LABEL_SMOOTHING": 0.1},
}


def read(path, limit=None, seed=0):
    frame = pd.read_csv(path)
    if limit:
        frame = frame.groupby("intent").sample(frac=limit / len(frame), random_state=seed)
    return frame["text"].tolist(), frame["intent"].tolist()


def parse_setting(text):
    """KEY=VALUE with VALUE a Python literal (3e-4, None, "cosine") or a bare word."""
    import ast

    key, _, value = text.partition("=")
    if not key.isupper() or not hasattr(FullFinetuneConfig, key):
        raise argparse.ArgumentTypeError(f"{key!r} is not a FullFinetuneConfig setting")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def run_variant(name, overrides, data, epochs, output_dir, probs_out=None, weights_out=None):
    config = FullFinetuneConfig()
    config.EPOCHS = epochs
    config.OUTPUT_DIR = str(output_dir / name)  # checkpoints only
    config.MAX_LENGTH = 64
    for key, value in overrides.items():
        setattr(config, key, value)
    (train_texts, train_raw), (val_texts, val_raw), (test_texts, test_raw) = data
    label_names, train_ids = encode_labels(train_raw)
    ids = {label: i for i, label in enumerate(label_names)}
    trainer = Trainer(config, label_names, progress=False)
    soft_labels = None
    if config.SOFT_TARGETS:  # e.g. the oof.csv of bench/cv_clinc150.py: distil the fold ensemble
        soft_labels = read_soft_targets(config.SOFT_TARGETS, label_names, train_texts)
    started = time.perf_counter()
    trainer.fit(trainer.dataset(Split(train_texts, train_ids), soft_labels),
                trainer.dataset(Split(val_texts, [ids[label] for label in val_raw])))
    seconds = time.perf_counter() - started
    test_labels = [ids[label] for label in test_raw]
    logits = trainer.predict_logits(trainer.dataset(Split(test_texts, test_labels)))
    test = classification_metrics(np.array(test_labels), logits.argmax(-1).numpy(), label_names)
    if probs_out:  # rows in test.csv's order, columns the sorted intent names
        Path(probs_out).parent.mkdir(parents=True, exist_ok=True)
        np.save(f"{probs_out}.npy", logits.softmax(-1).numpy())
    if weights_out:  # the kept (best-epoch) weights, for bench/soup_clinc150.py
        Path(weights_out).parent.mkdir(parents=True, exist_ok=True)
        trainer.save_state_dict(f"{weights_out}.pt")
    trainer.checkpoint_path.unlink(missing_ok=True)
    return {"variant": name, "settings": overrides, "epochs_run": len(trainer.history),
            "best_epoch": trainer.best_epoch, "val_accuracy": trainer.history[trainer.best_epoch - 1]["val_accuracy"],
            "test_accuracy": round(test["accuracy"], 4), "test_macro_f1": round(test["macro_f1"], 4),
            "first_epoch_val_accuracy": trainer.history[0]["val_accuracy"], "train_seconds": round(seconds, 1),
            "precision": trainer.precision}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "datasets" / "clinc150"),
                        help="folder with train.csv, val.csv, test.csv (columns text,intent)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="2,000 training rows and 1 epoch")
    parser.add_argument("--set", type=parse_setting, action="append", default=[], metavar="KEY=VALUE",
                        help="change a config.py setting in every variant, e.g. --set LEARNING_RATE=3e-4")
    parser.add_argument("--output-dir", default="/tmp/levers_clinc150", help="scratch folder for checkpoints")
    parser.add_argument("--probs-out", metavar="PATH",
                        help="save test.csv's probabilities to PATH.npy (PATH-VARIANT.npy with several variants)")
    parser.add_argument("--weights-out", metavar="PATH",
                        help="save the kept weights to PATH.pt (PATH-VARIANT.pt with several variants)")
    args = parser.parse_args()
    folder = Path(args.data)
    limit, epochs = (2000, 1) if args.quick else (None, args.epochs)
    data = (read(folder / "train.csv", limit), read(folder / "val.csv"), read(folder / "test.csv"))
    rows = []
    for name in args.variants:
        probs_out, weights_out = (path and (path if len(args.variants) == 1 else f"{path}-{name}")
                                  for path in (args.probs_out, args.weights_out))
        rows.append(run_variant(name, {**VARIANTS[name], **dict(args.set)}, data, epochs, Path(args.output_dir),
                                probs_out, weights_out))
        print(json.dumps(rows[-1]), flush=True)
    print("\n| variant | settings | epochs run (best) | val acc | test acc | test macro F1 | train s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        settings = ", ".join(f"{k}={v}" for k, v in r["settings"].items()) or "config.py defaults"
        print(f"| {r['variant']} | {settings} | {r['epochs_run']} ({r['best_epoch']}) | {r['val_accuracy']:.4f} "
              f"| {r['test_accuracy']:.4f} | {r['test_macro_f1']:.4f} | {r['train_seconds']:.0f} |")


if __name__ == "__main__":
    main()
