"""The notebook example in README.md runs as written (with a tiny model and small data)."""

import re

from config import FullFinetuneConfig
from conftest import ROOT


def test_readme_notebook_snippet_runs(monkeypatch, tiny_model_dir, small_csv):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## In a notebook", 1)[1]
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.setattr(FullFinetuneConfig, "MODEL_NAME", str(tiny_model_dir))
    monkeypatch.setattr(FullFinetuneConfig, "DATA_PATH", str(small_csv))
    monkeypatch.setattr(FullFinetuneConfig, "MAX_LENGTH", 32)
    namespace = {}
    exec(compile(snippet, "README.md", "exec"), namespace)
    assert len(namespace["history"]) >= 1
    assert 0 <= namespace["metrics"]["accuracy"] <= 1
    assert len(namespace["labels"]) == 2 and namespace["probabilities"].shape == (2, 3)
