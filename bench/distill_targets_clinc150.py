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

`--augment FOLDER` gives the student texts the teachers have not seen: `--copies` perturbed copies
of every training text (each word dropped, or replaced by a random training word, with
probability `--edit-rate` / 2 each), labelled with the teachers' most likely intent. FOLDER gets a
train.csv of the original and perturbed rows and copies of val.csv and test.csv, for
`levers_clinc150.py --data FOLDER`; the --output CSV then covers every row of that train.csv.
"""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from levers_clinc150 import read  # noqa: E402
from soup_clinc150 import weights_holder, weights_parser  # noqa: E402

from full_finetune import encode_labels, with_probability_columns, write_csv  # noqa: E402


def perturbed(words, rng, vocabulary, edit_rate):
    """`words` with each one replaced by a random word of `vocabulary` (probability edit_rate / 2)
    or dropped (probability edit_rate / 2), joined into a text."""
    kept = []
    for word, draw in zip(words, rng.random(len(words)), strict=True):
        if draw < edit_rate / 2:
            kept.append(vocabulary[rng.integers(len(vocabulary))])
        elif draw >= edit_rate:
            kept.append(word)
    return " ".join(kept)


def perturbed_copies(texts, copies, edit_rate, seed=0):
    """`copies` perturbed versions of each text, as (index of the source text, new text) pairs; an
    empty copy or one equal to a text already there is drawn again, up to 10 times (so some very
    short texts get fewer copies)."""
    rng = np.random.default_rng(seed)
    vocabulary = [word for text in texts for word in text.split()]  # drawn by frequency
    seen, result = set(texts), []
    for index, text in enumerate(texts):
        for _ in range(copies):
            drawn = (perturbed(text.split(), rng, vocabulary, edit_rate) for _attempt in range(10))
            candidate = next((new for new in drawn if new and new not in seen), None)
            if candidate is not None:
                seen.add(candidate)
                result.append((index, candidate))
    return result


def main():
    parser = weights_parser(__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="CSV to write (text and prob_<intent> columns)")
    parser.add_argument("--augment", metavar="FOLDER", help="also write perturbed, teacher-labelled copies "
                                                            "of the training texts into FOLDER (see above)")
    parser.add_argument("--copies", type=int, default=1, help="perturbed copies per training text (--augment)")
    parser.add_argument("--edit-rate", type=float, default=0.3, help="share of words dropped or replaced (--augment)")
    args = parser.parse_args()
    folder = Path(args.data)
    texts, raw = read(folder / "train.csv")
    label_names, label_ids = encode_labels(raw)  # sorted intents, as in the runs
    pairs = perturbed_copies(texts, args.copies, args.edit_rate) if args.augment else []
    sources, new_texts = [index for index, _ in pairs], [text for _, text in pairs]
    all_texts = texts + new_texts  # the originals first: rows :len(texts) have their labels
    trainer = weights_holder(label_names, args.set)
    dataset = trainer.dataset(all_texts)
    labels = np.array(label_ids)

    def train_accuracy(probabilities):
        return round(float((probabilities[:len(texts)].argmax(1) == labels).mean()), 4)

    probabilities = 0.0
    for path in args.weights:
        trainer.model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        member = trainer.predict_logits(dataset).softmax(-1).numpy()
        print(json.dumps({"member": Path(path).stem, "train_accuracy": train_accuracy(member)}), flush=True)
        probabilities = probabilities + member / len(args.weights)
    write_csv(args.output, with_probability_columns(pd.DataFrame({"text": all_texts}), label_names, probabilities))
    on_label = probabilities[np.arange(len(labels)), labels]
    report = {"written": args.output, "rows": len(all_texts), "train_accuracy": train_accuracy(probabilities),
              "mean_probability_of_the_label": round(float(on_label.mean()), 4)}
    if args.augment:
        out = Path(args.augment)
        out.mkdir(parents=True, exist_ok=True)
        copies = probabilities[len(texts):]
        teacher_labels = [label_names[i] for i in copies.argmax(1)]
        write_csv(out / "train.csv", pd.DataFrame({"text": all_texts, "intent": raw + teacher_labels}))
        for name in ("val.csv", "test.csv"):
            shutil.copyfile(folder / name, out / name)
        report.update({"augmented_rows": len(new_texts), "augmented_folder": str(out),
                       "augmented_mean_top_probability": round(float(copies.max(1).mean()), 4),
                       "augmented_label_kept": round(float((copies.argmax(1) == labels[sources]).mean()), 4)})
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
