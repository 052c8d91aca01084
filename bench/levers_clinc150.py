"""Measure a recipe (a preset of config.py, plus any settings) on CLINC150, seed by seed.

Each run trains on train.csv, selects its best epoch on val.csv (early stopping) and is scored
once on test.csv (in-scope intents only, as in the data set's paper). One JSON line per run, then
a Markdown table with the mean and standard deviation over the seeds.

    python bench/levers_clinc150.py                                  # the default recipe, seed 42
    python bench/levers_clinc150.py --preset minilm_adversarial --seeds 42 1 2
    python bench/levers_clinc150.py --preset hf_cls --set LEARNING_RATE=1e-4
    python bench/levers_clinc150.py --quick                          # 2,000 training rows, 1 epoch: a smoke test
    python bench/levers_clinc150.py --seeds 42 1 --probs-out /tmp/probs/default
                              # also keep test.csv's probabilities (PATH-sSEED.npy), for ensemble_clinc150.py
"""

import argparse
import ast
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from config import SETTING_BY_NAME, ModelConfigs  # noqa: E402
from full_finetune import Split, Trainer, encode_labels, score_logits  # noqa: E402


def read(path, limit=None, seed=0):
    frame = pd.read_csv(path)
    if limit:
        frame = frame.groupby("intent").sample(frac=limit / len(frame), random_state=seed)
    return frame["text"].tolist(), frame["intent"].tolist()


def parse_setting(text):
    """KEY=VALUE with VALUE a Python literal (3e-4, None, "cosine") or a bare word."""
    key, _, value = text.partition("=")
    if key not in SETTING_BY_NAME:
        raise argparse.ArgumentTypeError(f"{key!r} is not a setting of config.py")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def run_recipe(preset, overrides, seed, data, output_dir, probs_out=None):
    config = ModelConfigs.get_config(preset)
    config.OUTPUT_DIR = str(output_dir / f"{preset}-s{seed}")  # checkpoints only
    for key, value in {**overrides, "SEED": seed}.items():
        setattr(config, key, value)
    (train_texts, train_raw), (val_texts, val_raw), (test_texts, test_raw) = data
    label_names, train_ids = encode_labels(train_raw)
    ids = {label: i for i, label in enumerate(label_names)}
    trainer = Trainer(config, label_names, progress=False)
    started = time.perf_counter()
    trainer.fit(trainer.dataset(Split(train_texts, train_ids)),
                trainer.dataset(Split(val_texts, [ids[label] for label in val_raw])))
    seconds = time.perf_counter() - started
    test_labels = [ids[label] for label in test_raw]
    logits = trainer.predict_logits(trainer.dataset(Split(test_texts, test_labels)))
    test = score_logits(logits, test_labels, label_names)
    if probs_out:  # rows in test.csv's order, columns the sorted intent names
        Path(probs_out).parent.mkdir(parents=True, exist_ok=True)
        np.save(f"{probs_out}-s{seed}.npy", logits.softmax(-1).numpy())
    trainer.checkpoint_path.unlink(missing_ok=True)
    best = trainer.history[trainer.best_epoch - 1]
    return {"preset": preset, "settings": overrides, "seed": seed, "epochs_run": len(trainer.history),
            "best_epoch": trainer.best_epoch, "val_accuracy": round(best["val_accuracy"], 4),
            "test_accuracy": round(test["accuracy"], 4), "test_macro_f1": round(test["macro_f1"], 4),
            "train_seconds": round(seconds, 1), "seconds_per_epoch": round(seconds / len(trainer.history), 1),
            "precision": trainer.precision}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "datasets" / "clinc150"),
                        help="folder with train.csv, val.csv, test.csv (columns text,intent)")
    parser.add_argument("--preset", default="minilm", choices=list(ModelConfigs.PRESETS),
                        help="the recipe to measure (default: minilm, the default of config.py)")
    parser.add_argument("--set", type=parse_setting, action="append", default=[], metavar="KEY=VALUE",
                        help="change a setting on top of the preset, e.g. --set LEARNING_RATE=3e-4")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42])
    parser.add_argument("--quick", action="store_true", help="2,000 training rows and 1 epoch")
    parser.add_argument("--output-dir", default="/tmp/levers_clinc150", help="scratch folder for checkpoints")
    parser.add_argument("--probs-out", metavar="PATH", help="save test.csv's probabilities to PATH-sSEED.npy")
    args = parser.parse_args()
    folder = Path(args.data)
    overrides = dict(args.set)
    limit = None
    if args.quick:
        limit, overrides["EPOCHS"] = 2000, 1
    data = (read(folder / "train.csv", limit), read(folder / "val.csv"), read(folder / "test.csv"))
    rows = []
    for seed in args.seeds:
        rows.append(run_recipe(args.preset, overrides, seed, data, Path(args.output_dir), args.probs_out))
        print(json.dumps(rows[-1]), flush=True)
    print("\n| preset | settings | seed | epochs run (best) | val acc | test acc | test macro F1 | train s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        settings = ", ".join(f"{k}={v}" for k, v in r["settings"].items()) or "-"
        print(f"| {r['preset']} | {settings} | {r['seed']} | {r['epochs_run']} ({r['best_epoch']}) | "
              f"{r['val_accuracy']:.4f} | {r['test_accuracy']:.4f} | {r['test_macro_f1']:.4f} | "
              f"{r['train_seconds']:.0f} |")
    test = np.array([r["test_accuracy"] for r in rows])
    spread = test.std(ddof=1) if len(rows) > 1 else 0.0
    print(f"\ntest accuracy over {len(rows)} seeds: mean {test.mean():.4f}, std {spread:.4f}")


if __name__ == "__main__":
    main()
