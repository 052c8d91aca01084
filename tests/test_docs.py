"""The READMEs say what the code does: both settings tables list every setting with its flag and
default (and nothing else), README.md stays a five-minute read, and its notebook example runs."""

import re

import matplotlib.figure
import numpy as np
import pytest

from config import SETTINGS, SWITCH, FullFinetuneConfig
from conftest import ROOT

READMES = ("README.md", "README_full_finetune.md")


def flag_cell(setting):
    if setting.flag is None:
        return "—"
    if setting.kind is SWITCH:
        return f"`{setting.flag}` / `--no-{setting.flag[2:]}`"
    return f"`{setting.flag}`"


def settings_rows(readme):
    """{name: (flag cell, default cell)} of the table rows whose first cell is a setting's name."""
    rows = {}
    for line in (ROOT / readme).read_text(encoding="utf-8").splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| `") and re.fullmatch(r"`[A-Z][A-Z0-9_]+`", cells[0]) and len(cells) >= 4:
            rows[cells[0].strip("`")] = (cells[1], cells[2])
    return rows


@pytest.mark.parametrize("readme", READMES)
def test_the_settings_table_lists_every_setting_with_its_flag_and_default_and_nothing_else(readme):
    rows = settings_rows(readme)
    assert sorted(rows) == sorted(s.name for s in SETTINGS), set(rows) ^ {s.name for s in SETTINGS}
    for setting in SETTINGS:
        assert rows[setting.name] == (flag_cell(setting), f"`{setting.default!r}`"), setting.name


def test_readme_is_a_five_minute_read():
    assert len((ROOT / "README.md").read_text(encoding="utf-8")) <= 15_000


def test_the_readme_notebook_example_runs_and_does_what_it_says(monkeypatch, tiny_model_dir, small_csv):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    snippet = re.search(r"```python\n(.*?)```", readme.split("## In a notebook", 1)[1], re.S).group(1)
    monkeypatch.setattr(FullFinetuneConfig, "MODEL_NAME", str(tiny_model_dir))
    monkeypatch.setattr(FullFinetuneConfig, "DATA_PATH", str(small_csv))
    monkeypatch.setattr(FullFinetuneConfig, "MAX_LENGTH", 32)
    namespace = {}
    exec(compile(snippet, "README.md", "exec"), namespace)
    trainer, data = namespace["trainer"], namespace["data"]
    assert [row["epoch"] for row in namespace["history"]] == [1, 2, 3]  # EPOCHS = 3, as the snippet sets
    predicted = trainer.predict(data.test.texts)[0]
    truth = [data.label_names[i] for i in data.test.labels]
    assert namespace["metrics"]["accuracy"] == np.mean([p == t for p, t in zip(predicted, truth, strict=True)])
    labels, probabilities = namespace["labels"], namespace["probabilities"]
    assert set(labels) <= set(data.label_names) and probabilities.shape == (2, 3)
    assert probabilities.sum(1) == pytest.approx([1, 1], abs=1e-5)
    assert isinstance(namespace["figure"], matplotlib.figure.Figure)
