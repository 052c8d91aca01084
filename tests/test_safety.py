"""Never wrong in silence, never outside its own folder: what a hostile user, or plain bad luck,
brings. Labels drawn as plain text, tokenizers that cannot be the model's, folders that are not
the program's to write, two runs at once, data or models that changed under a resume or a reused
fold, code in a model folder, pickled weights, damaged files, special files, and refusals of
argparse's own, each in one line."""

import json
import os
import shutil
import subprocess

import pandas as pd
import pytest
import torch

import full_finetune
from config import FinetuneError
from conftest import ROOT, make_rows, tiny_run_args
from runtime import LOCK_FILE, OWNER_FILE


def one_line_error(capsys):
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


# -- labels and texts drawn as written -------------------------------------------------------

def test_labels_with_dollar_signs_are_drawn_as_plain_text(tmp_path, tiny_model_dir):
    """matplotlib reads $...$ as mathematics; a label like '$5-10$ budget' once crashed the run
    after training, in the confusion figure."""
    frame = make_rows(30)
    frame["label"] = frame["label"].map({"delivery": "$5-10$ budget", "price": "x^2 $$", "refund": "100$"})
    frame.to_csv(tmp_path / "train.csv", index=False)
    out = tmp_path / "out"
    assert full_finetune.main(tiny_run_args(tiny_model_dir, tmp_path / "train.csv", out, "--epochs", "1")) == 0
    assert json.loads((out / "metrics.json").read_text())["label_names"] == ["$5-10$ budget", "100$", "x^2 $$"]
    figure = full_finetune.plot_confusion_matrix([[1, 0], [0, 1]], ["$a$", "$b"])
    figure.canvas.draw()
    assert [t.get_text() for t in figure.axes[0].get_xticklabels()] == [r"\$a\$", r"\$b"]  # shown as $a$, $b


# -- models and tokenizers ---------------------------------------------------------------------

def test_a_model_folder_without_its_tokenizer_files_is_refused_before_training(tmp_path, tiny_model_dir, small_csv,
                                                                               capsys):
    folder = tmp_path / "no_tokenizer"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_model_dir / name, folder / name)
    assert full_finetune.main(tiny_run_args(folder, small_csv, tmp_path / "out")) == 2
    err = one_line_error(capsys)
    assert "tokens but the model's embedding table has 30522 rows" in err and "tokenizer files" in err
    assert not (tmp_path / "out" / "checkpoint.pt").exists()


def test_a_saved_output_folder_can_be_the_model_of_a_new_run(trained_run, tmp_path, small_csv, capsys):
    folder = trained_run / "full_finetune_model"
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert full_finetune.main(tiny_run_args(folder, small_csv, tmp_path / "further", "--epochs", "1")) == 0
    assert json.loads((tmp_path / "further" / "metrics.json").read_text())["model"] == str(folder)
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before


def test_a_model_folder_with_code_of_its_own_is_refused_and_its_code_never_runs(trained_run, tmp_path, small_csv,
                                                                               capsys):
    folder = shutil.copytree(trained_run / "full_finetune_model", tmp_path / "foreign_model")
    marker = tmp_path / "the_folders_code_ran"
    (folder / "modeling_other.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "other_pooling_classifier"
    config["auto_map"] = {"AutoConfig": "modeling_other.OtherConfig",
                          "AutoModelForSequenceClassification": "modeling_other.OtherModel"}
    (folder / "config.json").write_text(json.dumps(config))
    assert full_finetune.main(tiny_run_args(folder, small_csv, tmp_path / "out", "--epochs", "1")) == 2
    assert "Cannot load model" in one_line_error(capsys)
    assert full_finetune.main(["predict", "--model-dir", str(folder), "--input", str(ROOT / "data" / "test.csv"),
                               "--output", str(tmp_path / "s.csv")]) == 2
    assert "Cannot load the model folder" in one_line_error(capsys)
    assert not marker.exists()


def test_pickled_weights_are_refused_without_advice_to_unpickle_them(trained_run, tmp_path, small_csv, capsys):
    folder = shutil.copytree(trained_run / "full_finetune_model", tmp_path / "pickled")
    (folder / "model.safetensors").unlink()
    torch.save({"encoder.embeddings.word_embeddings.weight": torch.zeros(2), "run": os.getcwd},
               folder / "pytorch_model.bin")
    for command in (tiny_run_args(folder, small_csv, tmp_path / "out", "--epochs", "1"),
                    ["predict", "--model-dir", str(folder), "--input", str(ROOT / "data" / "test.csv"),
                     "--output", str(tmp_path / "s.csv")]):
        assert full_finetune.main(command) == 2
        err = one_line_error(capsys)
        assert "holds more than tensors" in err and "weights_only" not in err


# -- files: special files, outputs beside inputs, folders that are not the program's -----------

@pytest.mark.parametrize("special", ["fifo", "/dev/null"])
def test_a_special_file_as_data_is_named_as_such(tmp_path, capsys, special):
    path = tmp_path / "pipe.csv"
    if special == "fifo":
        if not hasattr(os, "mkfifo"):
            pytest.skip("no FIFOs on this system")
        os.mkfifo(path)
    else:
        path = special
    assert full_finetune.main(["--data", str(path), "--output-dir", str(tmp_path / "out")]) == 2
    assert "is not a regular file" in one_line_error(capsys)


def test_evaluate_writes_no_file_it_was_not_asked_for_and_never_over_its_input(trained_run, tmp_path, capsys):
    folder = trained_run / "full_finetune_model"
    labelled = tmp_path / "labelled.csv"
    pd.DataFrame({"text": ["where is my parcel", "refund please"], "label": ["delivery", "refund"]}).to_csv(
        labelled, index=False)
    before = labelled.read_bytes()
    assert full_finetune.main(["evaluate", "--model-dir", str(folder), "--input", str(labelled)]) == 0
    capsys.readouterr()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labelled.csv"]  # no errors.csv in the working folder
    for flags, message in ((["--errors", str(labelled)], "is the input file"),
                           (["--output", str(labelled)], "is the input file"),
                           (["--errors", str(tmp_path / "e.csv"), "--output", str(tmp_path / "e.csv")],
                            "is the --errors file")):
        assert full_finetune.main(["evaluate", "--model-dir", str(folder), "--input", str(labelled), *flags]) == 2
        assert message in one_line_error(capsys)
    assert labelled.read_bytes() == before


def test_reading_a_model_touches_nothing_beside_it(trained_run, tmp_path, capsys):
    """predict and evaluate once tidied 'leftovers' in the parent of --model-dir: a planted staging
    folder was moved over the user's files. Reading a model writes nothing anywhere."""
    store = tmp_path / "store"
    folder = shutil.copytree(trained_run / "full_finetune_model", store / "model")
    planted = store / ".staging-1"
    (planted / "new").mkdir(parents=True)
    (planted / "new" / "notes.txt").write_text("planted")
    (planted / "COMPLETE").write_text("")
    (planted / "STAGED_BY_FULL_FINETUNE").write_text("")
    (store / ".notes.txt.tmp-1").write_text("a user's file")
    (store / "notes.txt").write_text("the user's notes")
    snapshot = {str(p.relative_to(store)): p.read_bytes() for p in store.rglob("*") if p.is_file()}
    assert full_finetune.main(["predict", "--model-dir", str(folder), "--input", str(ROOT / "data" / "test.csv"),
                               "--output", str(tmp_path / "s.csv")]) == 0
    assert {str(p.relative_to(store)): p.read_bytes() for p in store.rglob("*") if p.is_file()} == snapshot


def test_predict_runs_from_a_read_only_model_store(trained_run, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(trained_run / "full_finetune_model", store / "model")
    mounted = subprocess.run(["mount", "--bind", "-o", "ro", str(store), str(store)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("cannot bind-mount a folder read-only here")
    try:
        with pytest.raises(OSError):
            (store / "probe").write_text("x")  # it is read-only, even for root
        assert full_finetune.main(["predict", "--model-dir", str(store / "model"), "--input",
                                   str(ROOT / "data" / "test.csv"), "--output", str(tmp_path / "s.csv")]) == 0
    finally:
        subprocess.run(["umount", str(store)])


def test_an_output_folder_holding_the_users_files_is_refused_and_left_alone(tmp_path, tiny_model_dir, capsys):
    data_folder = tmp_path / "data"
    data_folder.mkdir()
    make_rows(40).to_csv(data_folder / "train.csv", index=False)
    (data_folder / "history.csv").write_text("my own history\n")
    before = {p.name: p.read_bytes() for p in data_folder.iterdir()}
    assert full_finetune.main(tiny_run_args(tiny_model_dir, data_folder / "train.csv", data_folder)) == 2
    assert "holds files full_finetune.py did not write ('train.csv')" in one_line_error(capsys)
    assert {p.name: p.read_bytes() for p in data_folder.iterdir()} == before
    assert full_finetune.main(tiny_run_args(tiny_model_dir, data_folder / "train.csv", "/")) == 2
    assert "is the root of the file system" in one_line_error(capsys)


def test_an_output_folder_of_an_earlier_version_is_taken_over(tmp_path, tiny_model_dir, small_csv):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("metrics.json", "submission.csv", "history.csv"):
        (out / name).write_text("from an earlier version\n")
    assert full_finetune.main(tiny_run_args(tiny_model_dir, small_csv, out, "--epochs", "1")) == 0
    assert not (out / "submission.csv").exists()  # that run's set was replaced whole
    assert "epochs_run" in json.loads((out / "metrics.json").read_text())


def test_two_runs_into_one_folder_are_refused_and_a_crash_leaves_no_stuck_lock(tmp_path, tiny_model_dir, small_csv,
                                                                             capsys):
    from filelock import FileLock

    out = tmp_path / "out"
    assert full_finetune.main(tiny_run_args(tiny_model_dir, small_csv, out, "--epochs", "1")) == 0
    capsys.readouterr()
    other_run = FileLock(str(out / LOCK_FILE), timeout=0)
    other_run.acquire()  # as another process writing there now
    try:
        before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
        assert full_finetune.main(tiny_run_args(tiny_model_dir, small_csv, out, "--epochs", "1")) == 2
        assert f"Another run is writing to {out}" in one_line_error(capsys)
        assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    finally:
        other_run.release()
    # A run killed while it held the lock leaves only the lock file, which binds no one.
    assert (out / LOCK_FILE).exists() and (out / OWNER_FILE).exists()
    assert full_finetune.main(tiny_run_args(tiny_model_dir, small_csv, out, "--epochs", "1")) == 0


# -- resumes and folds that match their data and model -----------------------------------------

def interrupted_run(tmp_path, tiny_model_dir, data, monkeypatch, *more):
    class StoppedAtStep2(full_finetune.Trainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.step_hooks.append(lambda run: run.step == 2 and self.request_stop())

    args = tiny_run_args(tiny_model_dir, data, tmp_path / "out", "--epochs", "2", *more)
    with monkeypatch.context() as patch:
        patch.setattr(full_finetune, "Trainer", StoppedAtStep2)
        assert full_finetune.main(args) == 130
    return args


def test_a_resume_on_changed_data_or_another_model_is_refused(monkeypatch, tmp_path, tiny_model_dir, tokenizer,
                                                              capsys):
    from conftest import tiny_bert

    data = tmp_path / "train.csv"
    frame = make_rows(40)
    frame.to_csv(data, index=False)
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    args = interrupted_run(tmp_path, model, data, monkeypatch)
    capsys.readouterr()
    frame.loc[7, "label"] = "price" if frame.loc[7, "label"] != "price" else "refund"  # a label fixed
    frame.to_csv(data, index=False)
    assert full_finetune.main([*args, "--resume"]) == 2
    assert "training or validation rows differ" in one_line_error(capsys)
    make_rows(40).to_csv(data, index=False)
    bigger = tiny_bert(tokenizer)  # the same path now holds a model of another shape
    bigger.config.intermediate_size = 96
    type(bigger)(bigger.config).save_pretrained(model)
    capsys.readouterr()
    assert full_finetune.main([*args, "--resume"]) == 2
    assert "is now another model than the interrupted run started from" in one_line_error(capsys)
    checkpoint = torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=True)
    del checkpoint["optimizer"]
    torch.save(checkpoint, tmp_path / "incomplete.pt")
    with pytest.raises(FinetuneError, match="incomplete checkpoint .no 'optimizer'"):
        full_finetune.load_checkpoint(tmp_path / "incomplete.pt")


# -- the command line --------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--epoch", "3"], "unrecognized arguments: --epoch 3"),  # not guessed as --epochs
    (["--pooling", "max"], "POOLING must be one of mean, cls, not 'max'"),
    (["--preset", "gpt"], "invalid choice: 'gpt'"),
    (["predict", "--input", "x.csv"], "the following arguments are required: --model-dir"),
    (["--text-column", "body", "--label-column", "body"], "TEXT_COLUMN and LABEL_COLUMN are both 'body'"),
])
def test_every_refusal_is_one_line_with_a_pointer_to_help(capsys, argv, message):
    try:
        code = full_finetune.main([*argv, "--output-dir", "out"] if argv[0] != "predict" else argv)
    except SystemExit as exit_:
        code = exit_.code
    err = one_line_error(capsys)
    assert code == 2 and message in err
    assert "usage:" not in err


def test_fewer_batches_than_processes_give_every_process_a_batch():
    from full_finetune import ShuffledBatches

    for world_size in (2, 3, 5):
        shards = [list(ShuffledBatches([4] * 10, 16, seed=0, rank=r, world_size=world_size))
                  for r in range(world_size)]
        assert all(len(shard) == 1 and sorted(shard[0]) == list(range(10)) for shard in shards)
