"""What a run writes (and never loses): the outputs and their set being replaced as one, the model
folder in the Hugging Face ecosystem, predict and evaluate, the error analysis, the plots and the
report, and bad inputs and faults: a full disk, a kill during the save, stale temporaries."""

import errno
import json
import os
import shutil
import subprocess
import sys

import matplotlib.figure
import numpy as np
import pandas as pd
import pytest
import torch

import full_finetune
from config import FinetuneError
from conftest import ROOT, make_rows, subprocess_env, tiny_run_args
from full_finetune import Trainer
from runtime import LOCK_FILE, OWNER_FILE, OutputFolder

RUN_FILES = ("best_full_finetune_model.pth", "full_finetune_training_curves.png", "full_finetune_confusion_matrix.png",
             "metrics.json", "history.csv", "steps.csv", "data_report.json", "errors.csv", "report.html",
             "submission.csv")


def contents(folder):
    """Every file under `folder`, by relative path, with its bytes."""
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_a_run_writes_every_output_and_no_leftovers(trained_run):
    for name in RUN_FILES:
        assert (trained_run / name).stat().st_size > 0, name
    assert (trained_run / "full_finetune_model" / "config.json").is_file()
    assert (trained_run / "full_finetune_model" / "modeling_mean_pooling.py").is_file()
    card = (trained_run / "full_finetune_model" / "README.md").read_text()  # the model card
    for fact in ("`delivery`, `price`, `refund`", "trust_remote_code=True", "rows of the test split",
                 "every labelled row", "| `LEARNING_RATE` | `0.001` |", "## Limits",
                 "pipeline_tag: text-classification"):
        assert fact in card, fact
    hidden = {p.name for p in trained_run.iterdir() if p.name.startswith(".")}
    assert hidden == {OWNER_FILE, LOCK_FILE}  # no temporary or staging folder left
    assert sorted(json.loads((trained_run / OWNER_FILE).read_text())["published"]) == sorted(
        [*RUN_FILES, "full_finetune_model"])
    assert not (trained_run / "checkpoint.pt").exists()
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert metrics["label_names"] == ["delivery", "price", "refund"]
    assert set(metrics["test"]) >= {"accuracy", "macro_f1", "weighted_f1", "report", "confusion_matrix"}
    assert metrics["device"] == "cpu" and metrics["precision"] in ("bf16", "fp32") and metrics["precision_reason"]
    assert list(metrics["seconds"]) == ["data, model and audit", "training", "validation", "checkpoints and other",
                                        "calibration and the test split", "refit", "predicting the test file"]
    history = pd.read_csv(trained_run / "history.csv")
    assert list(history["epoch"]) == [1, 2]
    assert {"train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_macro_f1", "lr"} <= set(history)
    submission = pd.read_csv(trained_run / "submission.csv")
    assert list(submission.columns) == ["id", "label"] and list(submission["id"]) == [101, 205, 307]


def test_the_submission_is_what_the_saved_model_predicts(trained_run, test_csv):
    reloaded = Trainer.from_pretrained(trained_run / "full_finetune_model", progress=False)
    texts = pd.read_csv(test_csv)["text"].tolist()
    assert reloaded.predict(texts)[0] == pd.read_csv(trained_run / "submission.csv")["label"].tolist()


def test_errors_csv_holds_every_test_mistake_most_confident_first(trained_run):
    metrics = json.loads((trained_run / "metrics.json").read_text())
    errors = pd.read_csv(trained_run / "errors.csv")
    matrix = np.array(metrics["test"]["confusion_matrix"])
    assert len(errors) == matrix.sum() - np.trace(matrix)
    assert list(errors.columns) == ["text", "true_label", "predicted_label", "confidence", "true_label_probability"]
    assert (errors["true_label"] != errors["predicted_label"]).all()
    assert list(errors["confidence"]) == sorted(errors["confidence"], reverse=True)
    assert (errors["confidence"] >= errors["true_label_probability"]).all()
    counts = errors.groupby(["true_label", "predicted_label"]).size()
    named = metrics["test"]["most_confused"]
    assert named and all(counts[(p["true"], p["predicted"])] == p["count"] for p in named)
    assert [p["count"] for p in named] == sorted(counts, reverse=True)[:10]


def test_most_confused_pairs_and_misclassified_rows_by_hand():
    matrix = [[5, 3, 0], [1, 4, 0], [0, 7, 2]]
    pairs = full_finetune.most_confused_pairs(matrix, ["a", "b", "c"], top=2)
    assert pairs == [{"true": "c", "predicted": "b", "count": 7}, {"true": "a", "predicted": "b", "count": 3}]
    rows = full_finetune.misclassified_rows(["x", "y", "z"], [0, 1, 2], [[0.2, 0.8, 0], [0.1, 0.9, 0],
                                                                       [0.6, 0.1, 0.3]], ["a", "b", "c"])
    assert rows["text"].tolist() == ["x", "z"] and rows["confidence"].tolist() == [0.8, 0.6]
    assert rows["true_label_probability"].tolist() == [0.2, 0.3]


def test_every_folder_loads_in_transformers_alone_and_predicts_what_predict_predicts(trained_run, tmp_path,
                                                                                      tiny_model_dir, small_csv):
    """Both heads (the default mean-pooling one, whose code travels in the folder, and the plain
    [CLS] one of --preset hf_cls), in a process without this project (another folder, no PYTHONPATH):
    AutoModel and pipeline() load them with the label names and agree with `predict` on
    data/test.csv (in fp32 as pipeline runs, cutting texts at the saved MAX_LENGTH as predict does)."""
    assert full_finetune.main(tiny_run_args(tiny_model_dir, small_csv, tmp_path / "cls", "--preset", "hf_cls",
                                            "--model", str(tiny_model_dir), "--epochs", "1")) == 0
    folders = {"MeanPoolingForSequenceClassification": trained_run / "full_finetune_model",
               "BertForSequenceClassification": tmp_path / "cls" / "full_finetune_model"}
    for name, folder in folders.items():
        assert full_finetune.main(["predict", "--model-dir", str(folder), "--input", str(ROOT / "data" / "test.csv"),
                                   "--output", str(tmp_path / f"{name}.csv"), "--precision", "no",
                                   "--probabilities"]) == 0
    script = f"""
import json, sys
import pandas as pd
from transformers import AutoModelForSequenceClassification, pipeline
assert "full_finetune" not in sys.modules and not any("modeling_mean_pooling" in p for p in sys.path)
texts = pd.read_csv({str(ROOT / "data" / "test.csv")!r})["text"].tolist()
for folder in {[str(f) for f in folders.values()]!r}:
    model = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)
    classify = pipeline("text-classification", model=folder, trust_remote_code=True, top_k=None)
    scores = [{{r["label"]: r["score"] for r in rows}} for rows in classify(texts, truncation=True)]
    print(json.dumps({{"class": type(model).__name__, "labels": model.config.id2label, "scores": scores}}))
"""
    env = {k: v for k, v in subprocess_env().items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")  # where transformers copies the head's code
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    results = [json.loads(line) for line in run.stdout.strip().splitlines()[-2:]]
    assert [result["class"] for result in results] == list(folders)
    for result in results:
        assert result["labels"] == {"0": "delivery", "1": "price", "2": "refund"}
        ours = pd.read_csv(tmp_path / f"{result['class']}.csv")
        theirs = [max(scores, key=scores.get) for scores in result["scores"]]
        assert theirs == ours["label"].tolist() and len(theirs) == 209
        for label in ("delivery", "price", "refund"):
            np.testing.assert_allclose([s[label] for s in result["scores"]], ours[f"prob_{label}"], atol=1e-5)


def test_best_weights_file_matches_the_saved_model_unless_a_refit_wrote_the_submission(trained_run, tmp_path,
                                                                                    tiny_model_dir, small_csv,
                                                                                    test_csv):
    assert full_finetune.main(tiny_run_args(tiny_model_dir, small_csv, tmp_path / "no_refit", "--test",
                                            str(test_csv), "--no-refit")) == 0
    for run, same in ((tmp_path / "no_refit", True), (trained_run, False)):
        state = torch.load(run / "best_full_finetune_model.pth", weights_only=True)
        model = Trainer.from_pretrained(run / "full_finetune_model", progress=False).model
        assert state.keys() == model.state_dict().keys()
        assert all(torch.equal(state[k], v) for k, v in model.state_dict().items()) is same
        trained_on = json.loads((run / "metrics.json").read_text())["submission_model"]["trained_on"]
        assert trained_on == ("the training split" if same else "every labelled row (refit)")


def test_predict_writes_id_label_with_original_names_and_warns_of_odd_rows(trained_run, tmp_path, capsys):
    folder = trained_run / "full_finetune_model"
    pd.DataFrame({"id": [101, 205, 101], "text": ["price?", "", "send it back"]}).to_csv(tmp_path / "test.csv",
                                                                                       index=False)
    code = full_finetune.main(["predict", "--model-dir", str(folder), "--input", str(tmp_path / "test.csv"),
                               "--output", str(tmp_path / "sub.csv"), "--probabilities"])
    assert code == 0
    out = capsys.readouterr().out
    assert "warning: 1 rows of" in out and "empty text" in out and "repeat an id" in out
    submission = pd.read_csv(tmp_path / "sub.csv")
    assert list(submission.columns[:2]) == ["id", "label"] and list(submission["id"]) == [101, 205, 101]
    assert set(submission["label"]) <= {"delivery", "price", "refund"}
    probs = submission[["prob_delivery", "prob_price", "prob_refund"]].sum(axis=1)
    assert probs.to_numpy() == pytest.approx([1, 1, 1], abs=1e-4)


def test_predict_numbers_rows_when_there_is_no_id(trained_run, tmp_path):
    folder = trained_run / "full_finetune_model"
    pd.DataFrame({"message": ["a", "b"]}).to_csv(tmp_path / "t.csv", index=False)
    assert full_finetune.main(["predict", "--model-dir", str(folder), "--input", str(tmp_path / "t.csv"),
                               "--output", str(tmp_path / "s.csv"), "--text-column", "message"]) == 0
    assert list(pd.read_csv(tmp_path / "s.csv")["id"]) == [0, 1]


@pytest.mark.parametrize("case, message", [
    ("no text column", "no column 'text'"),
    ("output is the input", "is the input file"),
    ("unwritable output", "Cannot write"),
    ("not a model folder", "is not a saved model folder"),
    ("truncated weights", "Cannot load the model folder"),
])
def test_predict_refuses_bad_input_in_one_sentence_and_keeps_the_files(trained_run, tmp_path, capsys, case, message):
    folder = trained_run / "full_finetune_model"
    test = tmp_path / "t.csv"
    pd.DataFrame({"id": [1], ("body" if case == "no text column" else "text"): ["x"]}).to_csv(test, index=False)
    (tmp_path / "blocker").write_text("a file, not a folder")
    output = {"output is the input": test, "unwritable output": tmp_path / "blocker" / "s.csv"}.get(case,
                                                                                                 tmp_path / "s.csv")
    model_dir = tmp_path if case == "not a model folder" else folder
    if case == "truncated weights":
        model_dir = shutil.copytree(folder, tmp_path / "model")
        weights = model_dir / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    before = test.read_bytes()
    code = full_finetune.main(["predict", "--model-dir", str(model_dir), "--input", str(test), "--output", str(output)])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err and err.count("\n") == 1
    assert test.read_bytes() == before


def test_a_failed_run_leaves_the_earlier_outputs_untouched(own_run, tiny_model_dir, small_csv, capsys):
    before = contents(own_run)
    bad = own_run.parent / "bad.csv"
    bad.write_text("text,label\nonly,one\n")
    assert full_finetune.main(["--data", str(bad), "--output-dir", str(own_run)]) == 2
    assert contents(own_run) == before


class FailsInEpoch2(Trainer):
    """The command line's Trainer, whose loss becomes NaN (or which is asked to stop) in epoch 2."""

    how = "nan loss in epoch 2"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.epoch = 1
        self.step_hooks.append(self.watch)

    def watch(self, run):
        self.epoch = run.epoch
        if run.epoch == 2 and self.how.startswith("stopped"):
            self.request_stop()

    def loss(self, logits, labels):
        loss = super().loss(logits, labels)
        return loss * float("nan") if self.epoch == 2 and self.how.startswith("nan") else loss


@pytest.mark.parametrize("how", ["nan loss in epoch 2", "stopped in epoch 2"])
def test_a_run_that_fails_after_training_started_keeps_every_earlier_output(monkeypatch, own_run, tiny_model_dir,
                                                                            small_csv, how):
    """Epoch 1 is the best so far (it would be saved) when epoch 2 fails or is stopped: nothing of
    the earlier run may change, the best-weights file least of all."""
    before = contents(own_run)
    monkeypatch.setattr(FailsInEpoch2, "how", how)
    monkeypatch.setattr(full_finetune, "Trainer", FailsInEpoch2)
    code = full_finetune.main(tiny_run_args(tiny_model_dir, small_csv, own_run, "--epochs", "3"))
    assert code == (2 if how.startswith("nan") else 130)
    after = contents(own_run)
    assert {name: after[name] for name in before} == before
    assert set(after) - set(before) == {"checkpoint.pt"}


def test_outputs_are_replaced_as_one_set_even_when_killed_during_the_move(monkeypatch, own_run, tiny_model_dir,
                                                                          small_csv):
    """A kill between two renames of the move leaves a mixed folder; the next run to open the
    folder finishes the move from the staging folder: every file is the new run's, and the old
    run's files that the new one does not write (its submission) are gone."""
    old_metrics = json.loads((own_run / "metrics.json").read_text())
    original_replace = os.replace
    moved = []

    def killed_after_three(source, target):
        if "staging" in str(source) and "staging" not in str(target):  # a staged output moved into place
            if len(moved) == 3:
                raise KeyboardInterrupt  # as if killed here; the staging folder stays
            moved.append(target)
        return original_replace(source, target)

    monkeypatch.setattr(os, "replace", killed_after_three)
    assert full_finetune.main(tiny_run_args(tiny_model_dir, small_csv, own_run, "--epochs", "1")) == 130
    monkeypatch.setattr(os, "replace", original_replace)
    assert list(own_run.glob(".staging-*")) and (own_run / "submission.csv").exists()  # a mixed folder
    with OutputFolder.held(own_run, full_finetune.is_output_name):  # what the next run does first
        pass
    assert not list(own_run.glob(".staging-*"))
    metrics = json.loads((own_run / "metrics.json").read_text())
    assert metrics["epochs_run"] == 1 and old_metrics["epochs_run"] == 2
    history = pd.read_csv(own_run / "history.csv")
    assert len(history) == 1
    assert not (own_run / "submission.csv").exists()  # the new run was given no --test
    state = torch.load(own_run / "best_full_finetune_model.pth", weights_only=True)
    model = Trainer.from_pretrained(own_run / "full_finetune_model", progress=False).model
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_a_new_run_replaces_the_whole_set_of_the_last(own_run, tiny_model_dir, small_csv):
    assert (own_run / "submission.csv").exists()
    assert full_finetune.main(tiny_run_args(tiny_model_dir, small_csv, own_run, "--epochs", "1")) == 0
    assert not (own_run / "submission.csv").exists()  # no --test this time: no submission of the last run's
    published = set(json.loads((own_run / OWNER_FILE).read_text())["published"])
    assert published == {p.name for p in own_run.iterdir() if not p.name.startswith(".")}


def test_leftovers_are_cleared_only_where_they_are_provably_this_programs(tmp_path):
    """In an output folder of its own (its owner file, its lock held), the temporaries and the
    staging folders it marked are a dead run's and are removed; a staging-like folder without its
    mark, and anything outside the folder, are not touched."""
    folder = tmp_path / "out"
    with OutputFolder.held(folder, full_finetune.is_output_name):
        pass
    ours = folder / ".staging-123"
    (ours / "new").mkdir(parents=True)
    (ours / "STAGED_BY_FULL_FINETUNE").write_text("made by full_finetune.py\n")
    foreign = folder / ".staging-456"
    (foreign / "new").mkdir(parents=True)
    (folder / ".checkpoint.pt.tmp-99999").write_bytes(b"half")
    beside = tmp_path / ".metrics.json.tmp-99999"
    beside.write_text("{}")
    with OutputFolder.held(folder, full_finetune.is_output_name):
        pass
    assert sorted(p.name for p in folder.iterdir()) == sorted([OWNER_FILE, LOCK_FILE, foreign.name])
    assert beside.exists()


class FullDiskFile:
    """A file opened (and so truncated) for writing, whose writes fail as on a full disk."""

    def __init__(self, file):
        self.file = file

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()

    def __iter__(self):
        return iter(self.file)


def fill_the_disk(monkeypatch, where):
    """Every file opened for writing under `where` is created (truncated), then its writes fail as
    on a full disk: a write straight into an earlier file destroys it, as a real full disk would."""
    real_open = open

    def full_open(file, mode="r", *args, **kwargs):
        opened = real_open(file, mode, *args, **kwargs)
        if str(where) in str(file) and any(flag in mode for flag in "wax"):
            return FullDiskFile(opened)
        return opened

    monkeypatch.setattr("builtins.open", full_open)


def test_a_full_disk_while_saving_outputs_is_one_sentence_and_keeps_the_earlier_run(monkeypatch, own_run,
                                                                                     tiny_model_dir, small_csv, capsys):
    before = contents(own_run)
    original = full_finetune.write_training_outputs

    def disk_fills_up(folder, *args):
        fill_the_disk(monkeypatch, folder)
        original(folder, *args)

    monkeypatch.setattr(full_finetune, "write_training_outputs", disk_fills_up)
    assert full_finetune.main(tiny_run_args(tiny_model_dir, small_csv, own_run, "--epochs", "1")) == 2
    err = capsys.readouterr().err
    assert "no space left on the device" in err and "earlier outputs and the last checkpoint are kept" in err
    assert "Traceback" not in err and err.count("\n") == 1
    after = contents(own_run)
    assert {name: after[name] for name in before} == before and not list(own_run.glob(".staging-*"))
    assert (own_run / "checkpoint.pt").is_file()  # a rerun with --resume finishes it


def test_a_full_disk_while_checkpointing_keeps_the_last_good_checkpoint(monkeypatch, tmp_path, tiny_model_dir,
                                                                        small_csv, capsys):
    out = tmp_path / "out"
    original_save = Trainer.save_checkpoint

    def disk_full_after_epoch_1(self, run):
        if run.epoch == 3:  # the checkpoint after epoch 2
            fill_the_disk(monkeypatch, out)
        original_save(self, run)

    monkeypatch.setattr(Trainer, "save_checkpoint", disk_full_after_epoch_1)
    assert full_finetune.main(tiny_run_args(tiny_model_dir, small_csv, out, "--epochs", "3")) == 2
    err = capsys.readouterr().err
    assert "Cannot write" in err and "checkpoint.pt (no space left on the device)" in err and "Traceback" not in err
    assert full_finetune.load_checkpoint(out / "checkpoint.pt")["epoch"] == 2
    assert [p.name for p in out.iterdir() if not p.name.startswith(".")] == ["checkpoint.pt"]


def small_tmpfs(tmp_path):
    """A 5 MiB tmpfs, where this machine lets the tests mount one (root on Linux), else None."""
    mount = tmp_path / "tiny_disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", str(mount)], capture_output=True)
    return mount if done.returncode == 0 else None


def test_a_run_on_a_really_full_disk_ends_in_one_sentence(tmp_path, tiny_model_dir, small_csv):
    mount = small_tmpfs(tmp_path)
    if mount is None:
        pytest.skip("cannot mount a small tmpfs here; test_a_full_disk_* simulate it instead")
    try:
        run = subprocess.run([sys.executable, str(ROOT / "full_finetune.py"),
                              *tiny_run_args(tiny_model_dir, small_csv, mount / "out", "--epochs", "1")],
                             capture_output=True, text=True, env=subprocess_env(), timeout=300)
        assert run.returncode == 2, run.stderr[-2000:]
        assert "no space left on the device" in run.stderr and "Traceback" not in run.stderr
        assert run.stderr.strip().count("\n") == 0
        assert not [p for p in (mount / "out").iterdir() if ".tmp-" in p.name or "staging" in p.name]
    finally:
        subprocess.run(["umount", str(mount)])


def test_an_unwritable_output_dir_is_refused_before_training(tmp_path, tiny_config, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    code = full_finetune.main(["--data", tiny_config.DATA_PATH, "--output-dir", str(blocker / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "Cannot write to the output directory" in err and "Traceback" not in err


@pytest.mark.parametrize("device, message", [
    ("tpu", "not a device torch knows"), ("cuda:3", "no CUDA GPU"), ("mps", "no Apple MPS support"),
    ("meta", "not supported here")])
def test_impossible_devices_are_one_sentence(device, message):
    with pytest.raises(FinetuneError, match=message):
        full_finetune.choose_device(device)


def test_a_max_length_above_the_models_limit_is_refused_before_training(tiny_config, capsys):
    code = full_finetune.main(["--model", tiny_config.MODEL_NAME, "--data", tiny_config.DATA_PATH,
                               "--output-dir", tiny_config.OUTPUT_DIR, "--max-length", "200"])
    err = capsys.readouterr().err
    assert code == 2 and "MAX_LENGTH is 200 but" in err and "at most 128 tokens" in err  # the tiny model's 128
    assert not os.path.exists(os.path.join(tiny_config.OUTPUT_DIR, "checkpoint.pt"))


def test_a_bad_test_file_is_refused_before_training(tiny_config, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(Trainer, "fit", lambda *a, **k: pytest.fail("training started"))
    (tmp_path / "test.csv").write_text("id,body\n1,hello\n")
    code = full_finetune.main(["--model", tiny_config.MODEL_NAME, "--data", tiny_config.DATA_PATH,
                               "--output-dir", tiny_config.OUTPUT_DIR, "--test", str(tmp_path / "test.csv")])
    assert code == 2 and "no column 'text'" in capsys.readouterr().err


def test_an_unreachable_hub_model_fails_with_one_sentence():
    assert not full_finetune.hub_reachable()  # conftest sets HF_HUB_OFFLINE, as a machine without network is
    with pytest.raises(FinetuneError) as err:
        full_finetune.load_model_and_tokenizer("no-such-org/no-such-model", ["a", "b"])
    message = str(err.value)
    assert "cannot be reached" in message and "--preset minilm" in message and "\n" not in message


def test_the_packaged_model_name_resolves_to_a_local_folder():
    source = full_finetune.resolve_model_source("sentence-transformers/all-MiniLM-L6-v2")
    assert (full_finetune.Path(source) / "config.json").is_file()


def test_plots_return_figures_and_save_them_when_given_a_path(tmp_path):
    from PIL import Image

    history = [{"epoch": e, "train_loss": 1 / e, "val_loss": 1.2 / e, "train_accuracy": 0.5 + e / 10,
                "val_accuracy": 0.4 + e / 10, "val_macro_f1": 0.35 + e / 10} for e in (1, 2, 3)]
    figure = full_finetune.plot_training_curves(history, tmp_path / "curves.png", best_epoch=2)
    assert isinstance(figure, matplotlib.figure.Figure) and Image.open(tmp_path / "curves.png").size[0] > 600
    assert isinstance(full_finetune.plot_training_curves(history), matplotlib.figure.Figure)  # no path: no file
    assert [p.name for p in tmp_path.iterdir()] == ["curves.png"]
    sizes = {}
    for n in (5, 80):
        names = [f"intent_number_{i}" for i in range(n)]
        matrix = torch.eye(n, dtype=torch.long).mul(9).add(1).tolist()
        full_finetune.plot_confusion_matrix(matrix, names, tmp_path / f"cm{n}.png")
        sizes[n] = Image.open(tmp_path / f"cm{n}.png").size
    assert sizes[80][0] > 2 * sizes[5][0]  # room for 80 legible tick labels


def test_the_focused_confusion_figure_names_the_classes_most_confused(tmp_path):
    names = [f"intent_{i}" for i in range(150)]
    matrix = np.eye(150, dtype=int) * 30
    matrix[7, 12], matrix[12, 7], matrix[40, 41] = 9, 4, 6
    figure = full_finetune.plot_confused_classes(matrix, names)
    ax = figure.axes[0]
    ticks = [t.get_text() for t in ax.get_yticklabels()]
    assert ticks == ["intent_7", "intent_12", "intent_40", "intent_41"]
    assert sorted(int(t.get_text()) for t in ax.texts) == [0] * 9 + [4, 6, 9]  # off the diagonal, counts
    images = full_finetune.confusion_images(matrix.tolist(), names)
    assert list(images) == ["Most confused classes", "Confusion matrix"]
    assert list(full_finetune.confusion_images(np.eye(5, dtype=int).tolist(), names[:5])) == ["Confusion matrix"]


def test_evaluate_scores_a_labelled_file_writes_its_errors_and_refuses_unseen_labels(trained_run, tmp_path, capsys):
    folder = trained_run / "full_finetune_model"
    labelled = pd.DataFrame({"text": ["where is my parcel", "refund please", "price?", "money back now"],
                             "label": ["delivery", "refund", "price", "delivery"]})
    labelled.to_csv(tmp_path / "eval.csv", index=False)
    code = full_finetune.main(["evaluate", "--model-dir", str(folder), "--input", str(tmp_path / "eval.csv"),
                               "--output", str(tmp_path / "m.json"), "--errors", str(tmp_path / "e.csv")])
    out = capsys.readouterr().out
    assert code == 0 and "4 rows of" in out and "Most confused (true -> predicted)" in out
    metrics = json.loads((tmp_path / "m.json").read_text())
    errors = pd.read_csv(tmp_path / "e.csv")
    assert len(errors) == round((1 - metrics["accuracy"]) * 4) and "most_confused" in metrics
    pd.DataFrame({"text": [f"t{i}" for i in range(175)], "label": [f"intent_{i}" for i in range(175)]}).to_csv(
        tmp_path / "eval.csv", index=False)
    code = full_finetune.main(["evaluate", "--model-dir", str(folder), "--input", str(tmp_path / "eval.csv")])
    err = capsys.readouterr().err
    assert code == 2 and "never saw ('intent_0'" in err and "and 165 more" in err and len(err) < 400


def test_two_runs_with_the_same_seed_give_identical_metrics(tiny_config, tmp_path):
    results = []
    for name in ("first", "second"):
        tiny_config.OUTPUT_DIR = str(tmp_path / name)
        results.append(full_finetune.run_training(tiny_config))
    assert json.dumps(results[0], sort_keys=True) == json.dumps(results[1], sort_keys=True)


def test_the_report_holds_the_metrics_pairs_errors_and_embedded_figures(trained_run):
    page = (trained_run / "report.html").read_text()
    metrics = json.loads((trained_run / "metrics.json").read_text())
    for heading in ("Training curves", "Training steps", "Confusion matrix (test split)",
                    "Most confused pairs (test split)", "Most confident mistakes", "Per class (test split)", "History"):
        assert f"<h2>{heading}" in page, heading
    assert f"{metrics['test']['accuracy']:.4f}" in page
    assert page.count("data:image/png;base64,") == 4 and "<h2>Reliability (validation split)" in page
    assert "src='http" not in page and 'src="http' not in page


def test_the_report_renders_in_a_real_browser(trained_run, tmp_path):
    """Headless Chromium (Debian's chromium package) draws the page: the screenshot is not blank and
    the page's text holds the headings."""
    from PIL import Image, ImageStat

    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no Chromium installed (apt-get install chromium); .ci/run installs it")
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}"]
    url = (trained_run / "report.html").as_uri()
    shot = subprocess.run([*flags, f"--screenshot={tmp_path / 'shot.png'}", "--window-size=1200,1600", url],
                          capture_output=True, text=True, timeout=120)
    assert shot.returncode == 0, shot.stderr[-1000:]
    image = Image.open(tmp_path / "shot.png").convert("L")
    assert max(ImageStat.Stat(image).stddev) > 20  # text and figures, not a blank page
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert "Training report" in dom.stdout and "Most confused pairs (test split)" in dom.stdout
    assert "<img" in dom.stdout


def test_the_data_audits_warnings_reach_data_report_json_and_the_report(tmp_path, tiny_model_dir):
    frame = make_rows(30)
    frame.loc[len(frame)] = frame.iloc[0]  # an exact duplicate
    frame.to_csv(tmp_path / "train.csv", index=False)
    assert full_finetune.main(tiny_run_args(tiny_model_dir, tmp_path / "train.csv", tmp_path / "out",
                                            "--epochs", "1")) == 0
    report = json.loads((tmp_path / "out" / "data_report.json").read_text())
    assert report["exact_duplicate_rows"] == 1 and report["warnings"]
    assert "repeat an earlier row exactly" in (tmp_path / "out" / "report.html").read_text()
