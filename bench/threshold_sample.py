"""What the tuned decision threshold buys on a two-class task: the sample data, one class against
the rest (by default `ready_to_buy`: will this visitor buy?).

Each seed is one training run of the default recipe (the command-line job, without refit) with
METRIC macro_f1: the threshold is tuned on the validation split, and the test split is scored with
it and with 0.5 (the likeliest class). One JSON line per seed, then the mean difference.

    python bench/threshold_sample.py --seeds 42 1 2
    python bench/threshold_sample.py --positive price_question --metric mcc
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT / "data" / "train.csv"), help="a text,label CSV")
    parser.add_argument("--positive", default="ready_to_buy", help="the class against the rest")
    parser.add_argument("--metric", default="macro_f1", choices=("accuracy", "macro_f1", "micro_f1", "weighted_f1",
                                                                 "mcc"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[42])
    args = parser.parse_args()

    import full_finetune
    from config import FullFinetuneConfig

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        frame = pd.read_csv(args.data, dtype=str, keep_default_na=False)
        frame["label"] = frame["label"].where(frame["label"] == args.positive, "other")
        frame.to_csv(Path(scratch) / "binary.csv", index=False)
        for seed in args.seeds:
            config = FullFinetuneConfig()
            config.DATA_PATH, config.METRIC, config.SEED = str(Path(scratch) / "binary.csv"), args.metric, seed
            config.OUTPUT_DIR = str(Path(scratch) / f"run-{seed}")
            full_finetune.run_training(config)
            metrics = json.loads((Path(config.OUTPUT_DIR) / full_finetune.METRICS_FILE).read_text())
            test = metrics["test"]
            rows.append({"seed": seed, "positive": args.positive, "metric": args.metric,
                         "threshold": metrics["calibration"]["decision_threshold"],
                         "tuned": test[args.metric], "at_0.5": test.get(f"{args.metric}_at_threshold_0.5",
                                                                        test[args.metric])})
            print(json.dumps(rows[-1]), flush=True)
    gain = [row["tuned"] - row["at_0.5"] for row in rows]
    print(f"{args.metric} of the test split, tuned threshold minus 0.5: mean {sum(gain) / len(gain):+.4f} over "
          f"{len(rows)} seeds ({', '.join(f'{g:+.4f}' for g in gain)})")


if __name__ == "__main__":
    main()
