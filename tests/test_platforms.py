"""Where the users train: Windows and macOS (simulated here, as far as one machine can), Apple's
MPS, CUDA cards (simulated; the real ones are in test_gpu.py), and what users install."""

import json
import os
import re
import signal

import pytest
import torch

import full_finetune
import runtime
from config import FinetuneError
from conftest import ROOT, tiny_run_args

SOURCES = ("full_finetune.py", "runtime.py", "config.py", "modeling_mean_pooling.py")
# Calls that exist only on Unix (or, like os.kill on Windows, do something else there).
UNIX_ONLY = ("pthread_sigmask", "os.kill", "os.fork", "os.killpg", "fcntl", "SIGKILL", "SIGALRM", "SIGHUP",
             "SIGUSR", "os.getuid", "os.geteuid", "os.setsid", "resource.", "/dev/", "/tmp")


@pytest.mark.parametrize("source", SOURCES)
def test_no_unix_only_call_is_on_the_path_of_a_run(source):
    text = (ROOT / source).read_text(encoding="utf-8")
    found = [name for name in UNIX_ONLY if name in text]
    assert not found, f"{source} uses {found}"
    assert not re.search(r"""["']\s*[+]\s*["']/|os\.path\.join""", text)  # paths are built with pathlib only


def test_a_run_completes_and_publishes_where_signals_and_processes_are_windows_like(monkeypatch, tmp_path,
                                                                                  tiny_model_dir, small_csv,
                                                                                  test_csv):
    """Windows' signal module has SIGINT and SIGTERM but no signal masks, SIGKILL or SIGHUP; its
    os.kill terminates the process it is asked about, and there is no fork."""
    for name in ("pthread_sigmask", "sigwait", "SIGKILL", "SIGHUP", "SIGALRM", "alarm"):
        monkeypatch.delattr(signal, name, raising=False)
    monkeypatch.setattr(os, "kill", lambda *args: pytest.fail("os.kill would terminate a process on Windows"))
    monkeypatch.delattr(os, "fork", raising=False)
    out = tmp_path / "out"
    assert full_finetune.main(tiny_run_args(tiny_model_dir, small_csv, out, "--test", str(test_csv))) == 0
    assert json.loads((out / "metrics.json").read_text())["epochs_run"] == 2
    assert (out / "submission.csv").is_file() and not list(out.glob(".staging-*"))


@pytest.fixture
def apple_silicon(monkeypatch):
    """A Mac: no CUDA, an MPS device that reports available, an Arm CPU without x86 bf16."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(runtime, "cpu_supports_bf16", lambda: False)


def test_auto_picks_mps_on_a_mac_in_fp32_and_fp16_when_asked(apple_silicon):
    device = runtime.choose_device("auto")
    assert device.type == "mps"
    precision, reason = runtime.choose_precision("auto", device)
    assert precision == "fp32" and "Apple MPS" in reason
    assert runtime.choose_precision("fp16", device) == ("fp16", "as asked")
    context = runtime.autocast_context("fp16", device)
    assert isinstance(context, torch.autocast) and context.device == "mps" and context.fast_dtype == torch.float16
    assert runtime.choose_device("cpu").type == "cpu"  # --device cpu, the way out


def test_what_mps_cannot_run_is_one_sentence_naming_the_way_out():
    with pytest.raises(FinetuneError, match=r"Apple's MPS could not run this \(The operator 'aten::x' is not "
                                            r"currently implemented for the MPS device\); run again with --device cpu"):
        with runtime.device_errors(torch.device("mps")):
            raise NotImplementedError("The operator 'aten::x' is not currently implemented for the MPS device.\nmore")
    with pytest.raises(RuntimeError, match="a CPU error"), runtime.device_errors(torch.device("cpu")):
        raise RuntimeError("a CPU error")  # elsewhere an error is what it is


def test_users_install_no_test_tools_and_contributors_install_the_rest():
    users = (ROOT / "requirements.txt").read_text()
    assert not re.search(r"^(pytest|ruff|nbclient)", users, re.M)
    assert re.search(r"^torch>=2\.6", users, re.M)  # torch.nn.utils.get_total_norm arrived in 2.6
    dev = (ROOT / "requirements-dev.txt").read_text()
    assert "-r requirements.txt" in dev and re.search(r"^pytest", dev, re.M)
    assert "requirements-dev.txt" in (ROOT / ".ci" / "run").read_text()


def test_help_lists_the_values_of_every_choice_setting(capsys):
    with pytest.raises(SystemExit):
        full_finetune.main(["train", "--help"])
    text = capsys.readouterr().out
    for choices in ("{auto,bf16,fp16,no}", "{mean,cls}", "{linear,cosine}", "{none,balanced}", "{head,tail,head_tail}",
                    "{accuracy,macro_f1,micro_f1,weighted_f1,log_loss,roc_auc,qwk,mcc}", "{none,tensorboard}"):
        assert choices in text, choices
