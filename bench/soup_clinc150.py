"""Average the weights of several CLINC150 models into one ("model soup") and score it.

Each file is what `bench/levers_clinc150.py --weights-out PATH` saved (PATH.pt: the kept weights of
one run). Runs that differ only in their seed, and that started from the same weights, can often
be averaged into a single model of the same size and speed. The cosine head started at the class
centroids (PROTOTYPE_HEAD_INIT) makes every run start from the same head, not a random one per
seed, so the runs' heads stay comparable.

    python bench/soup_clinc150.py /tmp/weights/*.pt

Prints, as JSON lines: every member's validation and test accuracy; the uniform soup (the mean of
all members' weights); the greedy soup (members taken in order of validation accuracy, each kept
only if the soup's validation accuracy does not drop: chosen on val.csv, never on test.csv); and,
for comparison, the ensemble that averages the members' probabilities (as many forward passes as
members). Built with the `minilm` preset's head (mean pooling, cosine scale 20) and max length 64,
as the levers runs; `--set` changes any setting, as in levers_clinc150.py.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from levers_clinc150 import ROOT, parse_setting, read  # noqa: E402

from config import ModelConfigs  # noqa: E402
from full_finetune import Split, Trainer, average_weights, encode_labels  # noqa: E402


def weights_holder(label_names, settings):
    """A Trainer whose model has the shape of the levers runs' (the minilm preset, max length 64,
    then `settings`), to load their saved weights into."""
    config = ModelConfigs.get_config("minilm")
    config.MAX_LENGTH = 64
    for key, value in settings:
        setattr(config, key, value)
    return Trainer(config, label_names, progress=False)


def weights_parser(description):
    """The arguments of a script that loads saved runs' weights: the files, --data and --set."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("weights", nargs="+", help=".pt files saved by levers_clinc150.py --weights-out")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "datasets" / "clinc150"),
                        help="folder with train.csv, val.csv, test.csv (columns text,intent)")
    parser.add_argument("--set", type=parse_setting, action="append", default=[], metavar="KEY=VALUE",
                        help="change a config.py setting of the model built to hold the weights")
    return parser


def main():
    args = weights_parser(__doc__.splitlines()[0]).parse_args()
    folder = Path(args.data)
    label_names, _ = encode_labels(read(folder / "train.csv")[1])  # sorted intents, as in the runs
    trainer = weights_holder(label_names, args.set)
    ids = {label: i for i, label in enumerate(label_names)}
    splits = {name: trainer.dataset(Split(texts, [ids[label] for label in raw]))
              for name, (texts, raw) in (("val", read(folder / "val.csv")), ("test", read(folder / "test.csv")))}

    def score(state):
        """Validation and test accuracy of `state`, and its test probabilities."""
        trainer.model.load_state_dict(state)
        result = {}
        for name, dataset in splits.items():
            logits = trainer.predict_logits(dataset)
            result[f"{name}_accuracy"] = round(float((logits.argmax(-1).numpy() == np.array(dataset.labels)).mean()), 4)
            result[f"{name}_probs"] = logits.softmax(-1).numpy()
        return result

    def report(kind, names, result):
        print(json.dumps({"kind": kind, "members": names,
                          **{k: v for k, v in result.items() if k.endswith("accuracy")}}), flush=True)

    states = {Path(path).stem: torch.load(path, map_location="cpu", weights_only=True) for path in args.weights}
    members = {}
    for name, state in states.items():
        members[name] = score(state)
        report("member", [name], members[name])
    test_labels = np.array(splits["test"].labels)
    ensemble = np.mean([result["test_probs"] for result in members.values()], axis=0)
    print(json.dumps({"kind": "probability ensemble", "members": list(members),
                      "test_accuracy": round(float((ensemble.argmax(1) == test_labels).mean()), 4)}), flush=True)
    report("uniform soup", list(states), score(average_weights(list(states.values()))))

    by_val = sorted(members, key=lambda name: members[name]["val_accuracy"], reverse=True)
    chosen, best = [by_val[0]], members[by_val[0]]
    for name in by_val[1:]:
        candidate = score(average_weights([states[member] for member in [*chosen, name]]))
        if candidate["val_accuracy"] >= best["val_accuracy"]:
            chosen, best = [*chosen, name], candidate
    report("greedy soup (chosen on val.csv)", chosen, best)


if __name__ == "__main__":
    main()
