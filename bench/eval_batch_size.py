"""Prediction speed of our Trainer by EVAL_BATCH_SIZE, on CLINC150's 4,500 test texts.

    python bench/eval_batch_size.py                 # 2 threads, sizes 32 to 512
    python bench/eval_batch_size.py --threads 1 --sizes 64 128

Batches are formed in order of length (Trainer.predict_logits), in the precision MIXED_PRECISION
"auto" chooses; each size is timed three times after a warm-up pass, the best kept.
"""

import argparse
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "datasets" / "clinc150"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128, 256, 512])
    parser.add_argument("--max-length", type=int, default=64)
    args = parser.parse_args()
    import tempfile

    import torch

    from config import FullFinetuneConfig
    from full_finetune import Trainer

    torch.set_num_threads(args.threads)
    texts = pd.read_csv(Path(args.data) / "test.csv")["text"].tolist()
    names = sorted(set(pd.read_csv(Path(args.data) / "train.csv")["intent"]))
    config = FullFinetuneConfig()
    config.MAX_LENGTH, config.OUTPUT_DIR = args.max_length, tempfile.mkdtemp()
    trainer = Trainer(config, names, progress=False)
    dataset = trainer.dataset(texts)
    trainer.predict_logits(dataset)  # warm-up
    for size in args.sizes:
        trainer.config.EVAL_BATCH_SIZE = size
        seconds = []
        for _ in range(3):
            started = time.perf_counter()
            trainer.predict_logits(dataset)
            seconds.append(time.perf_counter() - started)
        print(f"EVAL_BATCH_SIZE {size}: {len(texts) / min(seconds):.0f} texts/s ({trainer.precision}, "
              f"{args.threads} threads)")


if __name__ == "__main__":
    main()
