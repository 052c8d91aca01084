"""The CUDA paths, run for real on a CUDA GPU: fp16 with its gradient scaler (the steps it skips
included), bf16 autocast, the precision "auto" picks for the card, pinned memory, `predict` against
transformers' pipeline() on the GPU, and two NCCL processes under torchrun.

Every test here is marked `gpu` (select them with `pytest -m gpu`) and is skipped on a machine
without a CUDA GPU; bench/gpu_check.sh runs them, with a short benchmark, where there is one.
The models are the 2-layer, 32-wide BERTs of conftest.py, so that the whole file stays short.
"""

import contextlib
import functools
import io
import json
import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

import full_finetune
from conftest import ROOT, fit, labelled, overflow_and_record, subprocess_env, tiny_run_args

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="needs a CUDA GPU: run bench/gpu_check.sh on a machine with one"),
]

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
LABELS = ("delivery", "price", "refund")  # make_rows' classes, as the saved model names them


def native_bf16():
    return torch.cuda.is_bf16_supported(including_emulation=False)


def auto_precision_for(index=0):
    """The rule of runtime.choose_precision: native bf16 from compute capability 8.0, else fp16."""
    return "bf16" if torch.cuda.get_device_capability(index)[0] >= 8 else "fp16"


def autocast_dtypes(model):
    """Record the dtype of the first Linear layer's outputs: what autocast really computes in."""
    seen = set()
    linear = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
    handle = linear.register_forward_hook(lambda module, args, output: seen.add(output.dtype))
    return seen, handle


def run_with_a_time_limit(command, timeout, what, **kwargs):
    """subprocess.run, but past `timeout` seconds the command gets SIGTERM (torchrun then stops its
    workers, which run in sessions of their own and would otherwise keep the GPUs), SIGKILL a
    minute later, and the test fails saying what hung."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.terminate()
        try:
            out, err = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            out, err = process.communicate()
        pytest.fail(f"{what} did not finish in {timeout} s; its last output:\n{(out + err)[-3000:]}")
    return process.returncode, out, err


@pytest.fixture(scope="module")
def gpu_run(tmp_path_factory, tiny_model_dir, small_csv):
    """One command-line run of the tiny model on this card with DEVICE and MIXED_PRECISION "auto":
    its output folder and what it printed."""
    out = tmp_path_factory.mktemp("gpu_run") / "out"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = full_finetune.main(tiny_run_args(tiny_model_dir, small_csv, out, "--epochs", "1",
                                                "--device", "auto", "--precision", "auto"))
    assert code == 0, printed.getvalue()[-3000:]
    return out, printed.getvalue()


def test_fp16_trains_on_the_gpu_with_the_gradient_scaler(new_trainer):
    trainer = new_trainer(DEVICE="cuda", EPOCHS=2, BATCH_SIZE=8, MIXED_PRECISION="fp16")  # 9 windows an epoch
    assert trainer.device.type == "cuda" and trainer.precision == "fp16"
    dtypes, handle = autocast_dtypes(trainer.model)
    scaling, taken = [], []

    def record(run):
        scaling.append(run.scaler.is_enabled())
        taken.append(run.stepped)

    trainer.step_hooks.append(record)
    try:
        fit(trainer, labelled())
    finally:
        handle.remove()
    assert dtypes == {torch.float16}  # training and validation forward passes
    assert len(taken) == 18 and all(scaling)
    # The scaler starts at 2**16 and halves on an overflow: a few early steps may be skipped, not most.
    assert taken.count(True) > len(taken) // 2
    assert all(math.isfinite(row["train_loss"]) and math.isfinite(row["val_loss"]) for row in trainer.history)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_steps_the_fp16_scaler_skips_on_the_gpu_move_neither_weights_nor_schedule_nor_average(monkeypatch,
                                                                                             new_trainer):
    # Scale 1 (no growth within 2000 steps): only the windows this test makes overflow are skipped.
    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, init_scale=1.0))
    trainer = new_trainer(DEVICE="cuda", EPOCHS=1, BATCH_SIZE=8, EMA_DECAY=0.9, MIXED_PRECISION="fp16")
    assert trainer.precision == "fp16"
    record = overflow_and_record(trainer, overflowing={2, 3, 6})  # the scaler skips these windows' steps
    fit(trainer, labelled())
    learning_rates, averages, weights = record["learning_rates"], record["averages"], record["head"]
    assert record["steps"] == [1, 1, 1, 2, 3, 3, 4, 5, 6]  # windows 2, 3 and 6 took no optimizer step
    assert record["taken"] == [True, False, False, True, True, False, True, True, True]
    for skipped in (1, 2, 5):  # weights, schedule and average stand still on a skipped step
        assert torch.equal(weights[skipped], weights[skipped - 1])
        assert learning_rates[skipped] == learning_rates[skipped - 1]
        assert torch.equal(averages[skipped], averages[skipped - 1])
    assert not torch.equal(weights[3], weights[2]) and learning_rates[3] != learning_rates[2]
    assert not torch.equal(averages[3], averages[2])
    assert math.isfinite(trainer.history[0]["train_loss"])  # the run went on to the end of the epoch


@pytest.mark.skipif(torch.cuda.is_available() and not native_bf16(),
                    reason="this GPU has no native bf16 (compute capability below 8.0)")
def test_bf16_autocast_on_the_gpu_gives_losses_close_to_fp32(new_trainer):
    losses = {}
    for precision in ("no", "bf16"):
        trainer = new_trainer(DEVICE="cuda", EPOCHS=2, MIXED_PRECISION=precision)
        dtypes, handle = autocast_dtypes(trainer.model)
        try:
            fit(trainer, labelled())
        finally:
            handle.remove()
        assert trainer.precision == {"no": "fp32"}.get(precision, precision)
        assert dtypes == {torch.float32 if precision == "no" else torch.bfloat16}
        losses[precision] = [row["train_loss"] for row in trainer.history]
    assert losses["bf16"] == pytest.approx(losses["no"], rel=0.05)


def test_auto_precision_follows_the_cards_compute_capability_and_the_run_names_the_card(gpu_run):
    card = torch.cuda.get_device_name(0)
    expected = auto_precision_for(0)
    chosen, reason = full_finetune.choose_precision("auto", torch.device("cuda", 0))
    assert chosen == expected and card in reason
    out, printed = gpu_run
    assert f"| device: cuda:0 | precision: {expected} ({reason})" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["device"], metrics["precision"], metrics["precision_reason"]) == ("cuda:0", expected, reason)


def test_batches_go_through_pinned_memory_on_the_gpu(monkeypatch, new_trainer):
    trainer = new_trainer(DEVICE="cuda", EPOCHS=1)
    assert trainer.pin_memory is True
    pinned = []

    class Recording(full_finetune.DataLoader):
        def __iter__(self):
            for batch in super().__iter__():
                pinned.append(all(value.is_pinned() for value in batch.values()))
                yield batch

    monkeypatch.setattr(full_finetune, "DataLoader", Recording)
    fit(trainer, labelled(rows_per_class=4))
    trainer.predict(["where is my parcel"])
    assert len(pinned) >= 3 and all(pinned)  # training, validation and prediction batches


PIPELINE_ON_THE_GPU = """
import json, sys
import pandas as pd
from transformers import pipeline
folder, data = sys.argv[1:3]
assert "full_finetune" not in sys.modules
classify = pipeline("text-classification", model=folder, trust_remote_code=True, top_k=None, device=0)
texts = pd.read_csv(data)["text"].tolist()
scores = [{r["label"]: r["score"] for r in rows} for rows in classify(texts, truncation=True)]
print(json.dumps({"device": str(classify.device), "scores": scores}))
"""


def test_predict_and_pipeline_agree_on_the_gpu_in_fp32(gpu_run, tmp_path):
    folder = gpu_run[0] / "full_finetune_model"
    data = ROOT / "data" / "test.csv"
    assert full_finetune.main(["predict", "--model-dir", str(folder), "--input", str(data), "--output",
                               str(tmp_path / "ours.csv"), "--device", "cuda", "--precision", "no",
                               "--probabilities"]) == 0
    # In a process without this project, as a user of the saved folder would load it.
    env = {k: v for k, v in subprocess_env().items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")  # where transformers copies the head's code
    code, out, err = run_with_a_time_limit([sys.executable, "-c", PIPELINE_ON_THE_GPU, str(folder), str(data)],
                                           120, "pipeline() on the GPU", env=env, cwd=tmp_path)
    assert code == 0, err[-3000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert result["device"].startswith("cuda")
    ours = pd.read_csv(tmp_path / "ours.csv")
    theirs = [max(scores, key=scores.get) for scores in result["scores"]]
    assert len(theirs) == len(pd.read_csv(data)) and theirs == ours["label"].tolist()
    for label in LABELS:
        np.testing.assert_allclose([s[label] for s in result["scores"]], ours[f"prob_{label}"], atol=1e-4)


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_two_nccl_processes_train_from_the_command_line(tmp_path, tiny_model_dir, small_csv):
    command = [*TORCHRUN, str(ROOT / "full_finetune.py"),
               *tiny_run_args(tiny_model_dir, small_csv, tmp_path / "out", "--epochs", "1", "--device", "auto")]
    code, out, err = run_with_a_time_limit(
        command, 150, "the two-process NCCL run (if it hangs at the start, try NCCL_P2P_DISABLE=1)",
        cwd=tmp_path, env=subprocess_env(threads=1))
    assert code == 0, err[-3000:]
    assert "accumulated x 2 processes)" in out and out.count("Test split (") == 1  # rank 0 alone reports
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["device"] == "cuda:0" and metrics["epochs_run"] == 1
