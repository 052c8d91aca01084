"""Soft targets for CLINC150's training texts from several saved runs: their mean probabilities.

Each file is what `bench/levers_clinc150.py --weights-out PATH` saved (PATH.pt). The CSV written
has a `text` column and one `prob_<intent>` column per intent, the format SOFT_TARGETS reads, so a
new run can learn from the runs' averaged predictions as well as from the labels (distillation of
an ensemble into one model of the same size):

    python bench/distill_targets_clinc150.py /tmp/weights/*.pt --output /tmp/soft_targets.csv
    python bench/levers_clinc150.py --variants mean_llrd_smoothing --set SOFT_TARGETS=/tmp/soft_targets.csv ...

The teachers trained on these same texts, so their targets put nearly all the mass on the label
(training accuracy ~99.9%); what they add is how the rest is spread over the other intents. Unlike
the out-of-fold targets of `cv`, making them needs no extra training beyond the runs themselves.
"""

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from levers_clinc150 import read  # noqa: E402
from soup_clinc150 import weights_holder, weights_parser  # noqa: E402

from full_finetune import Split, encode_labels, with_probability_columns, write_csv  # noqa: E402


def main():
    parser = weights_parser(__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="CSV to write (text and prob_<intent> columns)")
    args = parser.parse_args()
    folder = Path(args.data)
    texts, raw = read(folder / "train.csv")
    label_names, label_ids = encode_labels(raw)  # sorted intents, as in the runs
    trainer = weights_holder(label_names, args.set)
    dataset = trainer.dataset(Split(texts, label_ids))
    labels = np.array(label_ids)
    probabilities = 0.0
    for path in args.weights:
        trainer.model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        member = trainer.predict_logits(dataset).softmax(-1).numpy()
        print(json.dumps({"member": Path(path).stem,
                          "train_accuracy": round(float((member.argmax(1) == labels).mean()), 4)}), flush=True)
        probabilities = probabilities + member / len(args.weights)
    write_csv(args.output, with_probability_columns(pd.DataFrame({"text": texts}), label_names, probabilities))
    on_label = probabilities[np.arange(len(labels)), labels]
    print(json.dumps({"written": args.output, "rows": len(texts),
                      "train_accuracy": round(float((probabilities.argmax(1) == labels).mean()), 4),
                      "mean_probability_of_the_label": round(float(on_label.mean()), 4)}), flush=True)


if __name__ == "__main__":
    main()
