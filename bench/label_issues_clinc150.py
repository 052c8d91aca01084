"""How well `cv`'s label_issues.csv finds wrong labels: CLINC150's train.csv with a share of its
labels flipped at random to another intent (seeded), cross-validated with the default recipe;
precision and recall of the flagged rows against the flipped ones, overall and within the top k
(k = rows flipped). With --flip 0 it reports what it flags on the unmodified file.

    python bench/label_issues_clinc150.py                      # 2% flipped, 5 folds, 3 epochs per fold
    python bench/label_issues_clinc150.py --flip 0 --output-dir /tmp/issues_clean
    python bench/label_issues_clinc150.py --set EPOCHS=10      # any setting of config.py
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

from levers_clinc150 import parse_setting  # noqa: E402

from config import FullFinetuneConfig  # noqa: E402
from full_finetune import LABEL_ISSUES_FILE, run_cv  # noqa: E402


def flip_labels(frame, share, seed):
    """A copy of `frame` with `share` of its rows given another intent, and those rows' numbers."""
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(frame), size=round(share * len(frame)), replace=False))
    intents = np.array(sorted(frame["intent"].unique()))
    flipped = frame.copy()
    for row in rows:
        others = intents[intents != frame.at[row, "intent"]]
        flipped.at[row, "intent"] = others[rng.integers(len(others))]
    return flipped, rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "datasets" / "clinc150"),
                        help="folder with train.csv (columns text,intent)")
    parser.add_argument("--flip", type=float, default=0.02, help="share of labels to flip (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the flips (default: %(default)s)")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--set", type=parse_setting, action="append", default=[], metavar="KEY=VALUE",
                        help="change a setting of the default recipe (default here: EPOCHS=3)")
    parser.add_argument("--output-dir", default="/tmp/label_issues_clinc150", help="the cv folder")
    args = parser.parse_args()
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    original = pd.read_csv(Path(args.data) / "train.csv")
    frame, flipped_rows = flip_labels(original, args.flip, args.seed)
    frame.to_csv(output_dir / "train_flipped.csv", index=False)

    config = FullFinetuneConfig()
    config.DATA_PATH, config.LABEL_COLUMN = str(output_dir / "train_flipped.csv"), "intent"
    config.N_FOLDS, config.OUTPUT_DIR, config.EPOCHS = args.folds, str(output_dir), 3
    for key, value in args.set:
        setattr(config, key, value)
    started = time.perf_counter()
    cv = run_cv(config)
    seconds = time.perf_counter() - started

    issues = pd.read_csv(output_dir / LABEL_ISSUES_FILE)
    flagged, flipped = set(issues["row"]), set(flipped_rows.tolist())
    k = len(flipped)
    top_k = set(issues["row"].head(k))
    result = {"rows": len(frame), "flipped": k, "folds": args.folds, "epochs": config.EPOCHS,
              "settings": dict(args.set), "cv_accuracy": round(cv["mean"]["accuracy"], 4),
              "out_of_fold_accuracy": round(cv["out_of_fold"]["accuracy"], 4), "flagged": len(flagged),
              "seconds": round(seconds, 1)}
    if k:
        found = issues[issues["row"].isin(flipped)]
        result.update({
            "precision": round(len(flagged & flipped) / max(len(flagged), 1), 4),
            "recall": round(len(flagged & flipped) / k, 4),
            "precision_at_k": round(len(top_k & flipped) / k, 4),  # = recall at k: both divide by k
            # of the flipped rows found, how often the suggested label is the true (unflipped) one
            "suggested_label_right": round(float((found["suggested_label"].to_numpy()
                                                  == original.loc[found["row"], "intent"].to_numpy()).mean()), 4)})
    print(json.dumps(result))
    top = issues.head(10)[["row", "text", "given_label", "suggested_label", "given_probability"]]
    print(top.to_string(index=False))


if __name__ == "__main__":
    main()
