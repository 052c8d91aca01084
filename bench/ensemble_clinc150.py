"""Score saved test.csv probabilities of CLINC150 models, alone and averaged.

Each file is what `bench/levers_clinc150.py --probs-out PATH` saved (PATH.npy: one row per line of
test.csv, one column per intent in sorted order), so models trained in separate runs, with other
seeds or levers, can be ensembled without training again:

    python bench/ensemble_clinc150.py /tmp/probs/*.npy
"""

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent


def accuracy(probabilities, names, truth):
    return float((names[probabilities.argmax(1)] == truth).mean())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("probs", nargs="+", help=".npy files saved by levers_clinc150.py --probs-out")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "datasets" / "clinc150"),
                        help="folder with train.csv and test.csv (columns text,intent)")
    args = parser.parse_args()
    folder = Path(args.data)
    names = np.array(sorted(pd.read_csv(folder / "train.csv")["intent"].unique()))
    truth = pd.read_csv(folder / "test.csv")["intent"].to_numpy()
    members = {Path(path).stem: np.load(path) for path in args.probs}
    for name, probabilities in members.items():
        if probabilities.shape != (len(truth), len(names)):
            raise SystemExit(f"{name}: shape {probabilities.shape}, expected {(len(truth), len(names))}.")
        print(json.dumps({"members": [name], "test_accuracy": round(accuracy(probabilities, names, truth), 4)}))
    # Only the average of all the members given: choosing a subset by its test score would tune on test.
    average = np.mean(list(members.values()), axis=0)
    print(json.dumps({"members": list(members), "test_accuracy": round(accuracy(average, names, truth), 4)}))


if __name__ == "__main__":
    main()
