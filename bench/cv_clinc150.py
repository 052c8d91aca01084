"""A K-fold ensemble on CLINC150 with the default offline MiniLM: `full_finetune.run_cv` on
train.csv (each fold early-stops on a slice of its own training folds), then every fold model and
the average of their probabilities scored on test.csv (in-scope intents).

    python bench/cv_clinc150.py                          # the default recipe, 5 folds
    python bench/cv_clinc150.py --folds 3 --set EPOCHS=4 --output-dir /tmp/cv3
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from levers_clinc150 import parse_setting  # noqa: E402

from config import ModelConfigs  # noqa: E402
from full_finetune import FOLD_RESULT_FILE, run_cv  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "datasets" / "clinc150"),
                        help="folder with train.csv and test.csv (columns text,intent)")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--set", type=parse_setting, action="append", default=[], metavar="KEY=VALUE",
                        help="change a setting of the default recipe, e.g. --set EPOCHS=6")
    parser.add_argument("--output-dir", default="/tmp/cv_clinc150", help="the cv folder (fold models, oof.csv)")
    args = parser.parse_args()
    folder = Path(args.data)
    config = ModelConfigs.get_config("minilm")
    config.DATA_PATH, config.LABEL_COLUMN, config.MAX_LENGTH = str(folder / "train.csv"), "intent", 64
    config.TEST_PATH = str(folder / "test.csv")
    config.N_FOLDS, config.OUTPUT_DIR = args.folds, args.output_dir
    for key, value in args.set:
        setattr(config, key, value)

    started = time.perf_counter()
    cv = run_cv(config)
    seconds = time.perf_counter() - started
    truth = pd.read_csv(folder / "test.csv")["intent"].to_numpy()
    names = np.array(cv["label_names"])
    probabilities = [torch.load(Path(args.output_dir) / f"fold_{k + 1}" / FOLD_RESULT_FILE,
                                weights_only=True)["test_probabilities"].numpy() for k in range(args.folds)]
    fold_accuracy = [float((names[p.argmax(1)] == truth).mean()) for p in probabilities]
    ensemble = float((names[np.mean(probabilities, axis=0).argmax(1)] == truth).mean())
    print(json.dumps({"folds": args.folds, "settings": dict(args.set), "cv_accuracy": cv["mean"]["accuracy"],
                      "out_of_fold_accuracy": cv["out_of_fold"]["accuracy"],
                      "test_accuracy_per_fold": [round(a, 4) for a in fold_accuracy],
                      "test_accuracy_ensemble": round(ensemble, 4), "seconds": round(seconds, 1)}))


if __name__ == "__main__":
    main()
