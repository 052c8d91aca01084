"""examples/kaggle_quickstart.ipynb runs top to bottom and shows what it says: executed headless in
a kernel of its own (offline, in the test's tmp folder), without its install cell, with settings
for a tiny random model, one epoch and 91 rows of the sample data put after its parameters cell."""

import base64

import nbformat
import pandas as pd
import pytest
from nbclient import NotebookClient

from conftest import ROOT, subprocess_env

NOTEBOOK = ROOT / "examples" / "kaggle_quickstart.ipynb"


def cells_tagged(notebook, tag):
    return [cell for cell in notebook.cells if tag in cell.metadata.get("tags", [])]


def cell(notebook, cell_id):
    (found,) = [c for c in notebook.cells if c.get("id") == cell_id]
    return found


def stdout(code_cell):
    return "".join(o.get("text", "") for o in code_cell.outputs if o.output_type == "stream" and o.name == "stdout")


def shown(code_cell, mime):
    """The values of `mime` the cell displayed or returned."""
    return [o.data[mime] for o in code_cell.outputs
            if o.output_type in ("execute_result", "display_data") and mime in o.data]


def test_the_committed_notebook_has_no_outputs_and_marks_its_install_and_parameters_cells():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    for code_cell in (c for c in notebook.cells if c.cell_type == "code"):
        assert code_cell.outputs == [] and code_cell.execution_count is None, code_cell.id
    (install,) = cells_tagged(notebook, "install")
    assert "pip install" in install.source and "--no-index --find-links" in install.source
    (parameters,) = cells_tagged(notebook, "parameters")
    for name in ("REPO", "DATA_PATH", "TEST_PATH", "OUTPUT_DIR", "MODEL_NAME", "EPOCHS", "MAX_LENGTH"):
        assert f"\n{name} = " in f"\n{parameters.source}", name


@pytest.fixture
def small_sample(tmp_path):
    """13 rows of each of the sample data's 7 labels (91 rows)."""
    frame = pd.read_csv(ROOT / "data" / "train.csv")
    small = frame.groupby("label", group_keys=False).sample(n=13, random_state=0).sample(frac=1, random_state=0)
    path = tmp_path / "train_small.csv"
    small.to_csv(path, index=False)
    return path, sorted(small["label"].unique())


def test_the_notebook_runs_top_to_bottom_and_shows_curves_report_submission_and_labels(
        tmp_path, tiny_model_dir, small_sample):
    data_path, label_names = small_sample
    output_dir = tmp_path / "outputs"
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    notebook.cells = [c for c in notebook.cells if "install" not in c.metadata.get("tags", [])]
    (parameters,) = cells_tagged(notebook, "parameters")
    settings = {"REPO": str(ROOT), "MODEL_NAME": str(tiny_model_dir), "DATA_PATH": str(data_path),
                "TEST_PATH": str(ROOT / "data" / "test.csv"), "OUTPUT_DIR": str(output_dir), "EPOCHS": 1,
                "MAX_LENGTH": 32, "BATCH_SIZE": 16}
    injected = nbformat.v4.new_code_cell(
        "import sys\nsys.dont_write_bytecode = True\nimport torch\ntorch.set_num_threads(2)\n"
        + "".join(f"{name} = {value!r}\n" for name, value in settings.items()),
        id="injected-parameters", metadata={"tags": ["injected-parameters"]})
    notebook.cells.insert(notebook.cells.index(parameters) + 1, injected)

    # The kernel finds the code through REPO alone (no PYTHONPATH), writes no bytecode, stays offline.
    env = {key: value for key, value in subprocess_env(threads=2).items() if key != "PYTHONPATH"}
    env.update(PYTHONDONTWRITEBYTECODE="1", HF_HUB_OFFLINE="1")
    client = NotebookClient(notebook, timeout=180, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute(env=env)  # a cell that raises fails the test here (CellExecutionError)

    # Relative paths went nowhere: the working folder holds the inputs and outputs named above.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outputs", "submission_from_saved_model.csv",
                                                          "train_small.csv"]
    curves = shown(cell(notebook, "training-curves"), "image/png")
    assert curves and base64.b64decode(curves[0]).startswith(b"\x89PNG")

    evaluation = stdout(cell(notebook, "evaluate"))
    assert "accuracy" in evaluation and "macro F1" in evaluation and "Most confused" in evaluation

    report = output_dir / "report.html"
    assert report.is_file()
    (frame,) = shown(cell(notebook, "show-report"), "text/html")
    assert "<iframe srcdoc=" in frame and "Training report: " in frame

    test_ids = pd.read_csv(ROOT / "data" / "test.csv")["id"].tolist()
    submission = pd.read_csv(output_dir / "submission.csv")
    assert submission["id"].tolist() == test_ids and set(submission["label"]) <= set(label_names)
    assert shown(cell(notebook, "submission-head"), "text/html")

    predictions = pd.read_csv(tmp_path / "submission_from_saved_model.csv")
    assert predictions["id"].tolist() == test_ids and set(predictions["label"]) <= set(label_names)

    lines = stdout(cell(notebook, "pipeline")).splitlines()
    assert len(lines) == 2 and all(line.split()[0] in label_names for line in lines), lines
