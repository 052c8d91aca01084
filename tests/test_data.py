import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

import full_finetune
from config import FinetuneError, FullFinetuneConfig
from conftest import make_rows
from full_finetune import BuyerIntentDataset, PadToLongest, ShuffledBatches, encode_labels, load_data, stratified_split

TEXTS = ["hi", "where is my parcel, it should have arrived on monday", "price of the blue sofa?"]


def test_dataset_tokenises_once_and_pads_each_batch_to_its_longest(tokenizer):
    dataset = BuyerIntentDataset(TEXTS, [0, 1, 2], tokenizer, max_length=64)
    assert dataset.lengths == [len(tokenizer(t)["input_ids"]) for t in TEXTS]
    loader = DataLoader(dataset, batch_size=2, collate_fn=PadToLongest(tokenizer.pad_token_id))
    first, second = list(loader)
    assert first["input_ids"].shape == (2, max(dataset.lengths[:2]))  # not 64
    assert second["input_ids"].shape == (1, dataset.lengths[2])
    assert first["attention_mask"][0].sum() == dataset.lengths[0]
    assert (first["input_ids"][0, dataset.lengths[0]:] == tokenizer.pad_token_id).all()
    assert first["labels"].tolist() == [0, 1]


def test_dataset_truncates_to_max_length(tokenizer):
    dataset = BuyerIntentDataset(["word " * 100, "short"], [0, 1], tokenizer, max_length=16)
    assert dataset.lengths == [16, 3]


def test_dataset_can_be_subclassed_as_in_the_design_document(tokenizer):
    class WithLength(BuyerIntentDataset):
        def __init__(self, texts, labels, tokenizer, max_length=512):
            super().__init__(texts, labels, tokenizer, max_length)

        def __getitem__(self, idx):
            item = super().__getitem__(idx)
            item["n_chars"] = len(self.texts[idx])
            return item

    item = WithLength(TEXTS, [0, 1, 2], tokenizer)[1]
    assert item["n_chars"] == len(TEXTS[1]) and item["labels"] == 1


def test_dataset_without_labels_yields_no_labels(tokenizer):
    assert "labels" not in BuyerIntentDataset(TEXTS, None, tokenizer)[0]


def test_labels_are_encoded_in_sorted_order():
    names, ids = encode_labels(["b", "a", "c", "a"])
    assert names == ["a", "b", "c"] and ids == [1, 0, 2, 0]
    names, ids = encode_labels(["10", "2", "2", "b"])  # labels are text, sorted as text
    assert names == ["10", "2", "b"] and ids == [0, 1, 1, 2]


def test_stratified_split_is_disjoint_complete_and_keeps_proportions():
    labels = np.repeat([0, 1, 2], [100, 50, 30])
    train, val, test = stratified_split(labels, 0.8, 0.1, seed=1, label_names=["a", "b", "c"])
    assert sorted(np.concatenate([train, val, test]).tolist()) == list(range(len(labels)))
    assert (len(train), len(val), len(test)) == (144, 18, 18)
    for part, size in ((train, 144), (val, 18), (test, 18)):
        shares = np.bincount(labels[part], minlength=3) / size
        assert np.allclose(shares, [100 / 180, 50 / 180, 30 / 180], atol=0.06)
    again = stratified_split(labels, 0.8, 0.1, seed=1, label_names=["a", "b", "c"])
    assert all((x == y).all() for x, y in zip((train, val, test), again, strict=True))


def test_ten_rows_per_class_are_enough_for_an_80_10_10_split():
    labels = np.repeat([0, 1], [50, 10])
    train, val, test = stratified_split(labels, 0.8, 0.1, seed=0, label_names=["common", "rare"])
    assert all(1 in labels[part] for part in (train, val, test))


def test_a_class_too_small_to_split_is_named():
    labels = np.repeat([0, 1], [50, 4])
    with pytest.raises(FinetuneError, match="'rare' \\(4\\)"):
        stratified_split(labels, 0.8, 0.1, seed=0, label_names=["common", "rare"])


@pytest.mark.parametrize("grouped", [True, False])
def test_batches_cover_every_row_exactly_once_per_epoch(grouped):
    lengths = list(np.random.default_rng(0).integers(3, 60, size=1001))
    sampler = ShuffledBatches(lengths, batch_size=32, seed=0, group_by_length=grouped, pool_batches=4)
    epochs = []
    for epoch in (1, 2):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler) == 32
        assert sum(len(b) == 32 for b in batches) == 31
        rows = [i for batch in batches for i in batch]
        assert sorted(rows) == list(range(1001))
        epochs.append(rows)
    assert epochs[0] != epochs[1]


def test_each_seed_and_epoch_has_its_own_batch_order():
    lengths = list(range(3, 67))

    def batches(seed, epoch):
        sampler = ShuffledBatches(lengths, 8, seed=seed, group_by_length=False)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert batches(42, 2) != batches(43, 1)  # not seed + epoch
    assert batches(42, 1) == batches(42, 1) and batches(42, 1) != batches(42, 2)


@pytest.mark.parametrize("world_size, accumulation, skip, expected", [
    # 61 rows in batches of 8, not grouped by length: seven batches of 8, then one of 5
    (1, 1, 0, [8, 8, 8, 8, 8, 8, 8, 5]),
    (1, 3, 0, [24, 24, 13]),  # windows of 3, 3 and 2 batches
    (2, 1, 0, [16, 16, 16, 13]),  # each round: one batch per process
    (2, 2, 0, [32, 29]),
    (2, 2, 1, [32, 13]),  # after a resume that skips the first round: rounds 2 and 3, then round 4
    (3, 1, 0, [24, 24, 21]),  # 8 batches for 3 processes: round 3 takes the first batch again (8 + 5 + 8)
])
def test_samples_per_window_sum_every_ranks_rows_of_each_optimizer_step(world_size, accumulation, skip, expected):
    samplers = [ShuffledBatches([5] * 61, 8, seed=1, group_by_length=False, rank=r, world_size=world_size)
                for r in range(world_size)]
    for sampler in samplers:
        sampler.set_epoch(1, skip=skip)
    assert all(sampler.samples_per_window(accumulation) == expected for sampler in samplers)


def test_grouped_batches_pad_far_less_than_random_ones():
    lengths = list(np.random.default_rng(0).integers(3, 120, size=2000))

    def padded_tokens(grouped):
        sampler = ShuffledBatches(lengths, 32, seed=0, group_by_length=grouped)
        return sum(max(lengths[i] for i in b) * len(b) for b in sampler)

    assert padded_tokens(True) < 0.7 * padded_tokens(False)


def test_load_data_reads_splits_and_drops_rows_without_text(tmp_path, capsys):
    frame = make_rows(30)
    frame.loc[0, "text"] = "   "
    frame.loc[1, "text"] = None
    path = tmp_path / "train.csv"
    frame.to_csv(path, index=False)
    config = FullFinetuneConfig()
    config.DATA_PATH = str(path)
    data = load_data(config)
    assert data.label_names == ["delivery", "price", "refund"]
    assert len(data.train.texts) + len(data.val.texts) + len(data.test.texts) == 88
    assert "dropped 2 rows with empty text" in capsys.readouterr().out


def write(path, content, encoding="utf-8"):
    path.write_bytes(content.encode(encoding) if isinstance(content, str) else content)
    return path


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    ("folder", "is a folder; give the path of a CSV file"),
    ("text;label\nhello, and welcome;a\nbye, bye;b\nagain;a\n", "separated by ';'"),
    ("text|label\nhello|a\n", "separated by '\\|'"),
    ("", "is empty"),
    ("text,label\n", "no data rows"),
    ("review,sentiment\nnice,pos\n", "'text' or 'label'.*'review', 'sentiment'.*TEXT_COLUMN"),
    ("text;label\nhello;a\n", "separated by ';'"),
    ("text\tlabel\nhello\ta\n", "separated by '\\\\t'"),
    ("text,label\n  ,a\n,b\n", "no row with both a text and a label"),
    (b"text,label\ncaf\xe9 ok,a\n", "not UTF-8"),
    ("text,label\nhello,a\nbye,a\nagain,a\n", "single label"),
])
def test_bad_training_files_fail_with_one_sentence(tmp_path, content, message):
    path = tmp_path / "train.csv"
    if content == "folder":
        path.mkdir()
    elif content is not None:
        write(path, content)
    config = FullFinetuneConfig()
    config.DATA_PATH = str(path)
    with pytest.raises(FinetuneError, match=message):
        load_data(config)


def test_a_byte_order_mark_from_excel_is_not_part_of_the_first_column(tmp_path):
    path = tmp_path / "train.csv"
    make_rows(30).to_csv(path, index=False, encoding="utf-8-sig")
    config = FullFinetuneConfig()
    config.DATA_PATH = str(path)
    assert load_data(config).label_names == ["delivery", "price", "refund"]


def test_many_small_classes_are_named_on_one_short_line():
    labels = np.repeat(np.arange(176), [50] + [2] * 175)
    names = [f"intent_{i}" for i in range(176)]
    with pytest.raises(FinetuneError) as err:
        stratified_split(labels, 0.8, 0.1, seed=0, label_names=names)
    message = str(err.value)
    assert "'intent_1' (2)" in message and "and 165 more" in message and "intent_175" not in message
    assert len(message) < 400


def test_a_test_file_with_repeated_ids_and_empty_texts_is_read_with_warnings(tmp_path, capsys):
    path = tmp_path / "test.csv"
    pd.DataFrame({"id": [1, 2, 2, 3, 1], "text": ["a", "", "b", None, "c"]}).to_csv(path, index=False)
    ids, texts = full_finetune.read_test_file(path, "text")
    assert list(ids) == ["1", "2", "2", "3", "1"] and texts == ["a", "", "b", "", "c"]
    out = capsys.readouterr().out
    assert "warning: 2 rows of" in out and "empty text" in out
    assert "warning: 2 rows of" in out and "repeat an id" in out


def test_bad_file_on_the_command_line_exits_2_without_traceback(tmp_path, capsys):
    code = full_finetune.main(["--data", str(tmp_path / "nope.csv"), "--output-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "does not exist" in err


def test_collator_pads_roberta_style_ids_with_the_tokenizers_pad_id():
    batch = PadToLongest(pad_token_id=1)([{"input_ids": [0, 5, 2], "attention_mask": [1, 1, 1]},
                                          {"input_ids": [0, 2], "attention_mask": [1, 1]}])
    assert batch["input_ids"].tolist() == [[0, 5, 2], [0, 2, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["input_ids"].dtype == torch.long and "labels" not in batch


def test_every_cell_is_read_as_written(tmp_path, capsys):
    """Labels and ids are the text in the file: 007 and 7, 3.0 and 3, 02 and 2 are different
    classes; None, NA, null and nan are class names and texts like any other; only an empty
    cell is missing. A label column mixing numbers and words is sorted as text."""
    names = ["007", "7", "3.0", "3", "02", "2", "None", "NA", "null", "nan", "buy", "10"]
    rows = [{"text": f"message {i} for {name}", "label": name} for name in names for i in range(10)]
    rows += [{"text": "None", "label": "buy"}, {"text": "NA", "label": "7"}, {"text": "", "label": "buy"},
             {"text": "a text without a label", "label": ""}]
    path = tmp_path / "train.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    config = FullFinetuneConfig()
    config.DATA_PATH = str(path)
    data = load_data(config)
    assert data.label_names == sorted(names) and len(data.label_names) == 12
    texts = data.train.texts + data.val.texts + data.test.texts
    assert "None" in texts and "NA" in texts and len(texts) == 122
    assert "dropped 1 rows with empty text and 1 more with an empty label" in capsys.readouterr().out


def test_test_ids_are_kept_as_written(tmp_path):
    path = tmp_path / "test.csv"
    path.write_text("id,text\n00017,hello\n0017,hi\n1e3,what\nNA,none\n", encoding="utf-8")
    ids, texts = full_finetune.read_test_file(path, "text")
    assert list(ids) == ["00017", "0017", "1e3", "NA"] and texts == ["hello", "hi", "what", "none"]


@pytest.mark.parametrize("header, columns, message", [
    ("text,text,label", ("text", "label"), "has 2 columns named 'text'"),
    ("text,label,label", ("text", "label"), "has 2 columns named 'label'"),
    ("text,label", ("text", "text"), "text column and the label column are both 'text'"),
])
def test_columns_that_make_no_sense_together_are_refused(tmp_path, header, columns, message):
    path = tmp_path / "train.csv"
    width = len(header.split(","))
    path.write_text(header + "\n" + "\n".join(",".join(f"cell {i}" for _ in range(width)) for i in range(3)))
    with pytest.raises(FinetuneError, match=message):
        full_finetune.read_training_data(path, *columns)


def test_the_audit_reports_balance_lengths_duplicates_conflicts_and_test_overlap(tokenizer, capsys):
    texts = ["Where is my parcel?", "where is my parcel", "Where is my parcel?", "price of the sofa",
             "price of the sofa", "refund " * 40, "hi"]
    label_ids = [0, 0, 0, 1, 2, 2, 2]
    lengths = BuyerIntentDataset(texts, None, tokenizer, 16).full_lengths
    report = full_finetune.audit_data(texts, label_ids, ["delivery", "price", "refund"], lengths, 16, "head",
                                      test_texts=["PRICE of the sofa!", "hi", "brand new text"])
    assert report["class_counts"] == {"delivery": 3, "price": 1, "refund": 3}
    assert report["imbalance_ratio"] == 3.0
    assert report["over_max_length"] == 1
    assert report["tokens"]["max"] == len(tokenizer("refund " * 40)["input_ids"])
    assert report["exact_duplicate_rows"] == 1  # the second "Where is my parcel?" (same label)
    assert report["near_duplicate_rows"] == 1  # "where is my parcel" differs only in case and "?"
    assert report["conflicting_texts"] == 1 and report["conflict_examples"] == ["price of the sofa"]
    assert report["test_texts_in_train"] == 1 and report["test_texts_in_train_normalised"] == 2
    out = capsys.readouterr().out
    assert "warning: 1 texts are longer than MAX_LENGTH (16 tokens); they keep their first tokens (so many: " \
        "--truncation head_tail" in out and "appear with different labels" in out
    assert "2 test texts also appear in the training file (1 exactly)" in out


def test_a_clean_file_gets_no_warnings(tokenizer, capsys):
    report = full_finetune.audit_data(["a b", "c d", "e f"], [0, 1, 1], ["x", "y"], [4, 4, 4], 64, "head")
    assert report["warnings"] == [] and "warning" not in capsys.readouterr().out


def test_rows_without_a_label_are_dropped_and_counted(tmp_path, capsys):
    frame = make_rows(30)
    frame.loc[[3, 4, 5], "label"] = None
    path = tmp_path / "train.csv"
    frame.to_csv(path, index=False)
    config = FullFinetuneConfig()
    config.DATA_PATH = str(path)
    data = load_data(config)
    assert sum(len(s.texts) for s in (data.train, data.val, data.test)) == 87
    assert "3 more with an empty label" in capsys.readouterr().out
