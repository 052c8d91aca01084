"""The settings table: class attributes, validation of types and ranges, presets, and the flags."""

import json
import math
from pathlib import Path

import pytest

import full_finetune
from config import SETTING_BY_NAME, SETTINGS, SWITCH, FinetuneError, FullFinetuneConfig, ModelConfigs


def test_class_attribute_assignment_changes_the_next_run(monkeypatch, tiny_config, tiny_model_dir, tmp_path):
    # The design document's usage: assign on the class, then run with a fresh config.
    monkeypatch.setattr(FullFinetuneConfig, "MODEL_NAME", str(tiny_model_dir))
    monkeypatch.setattr(FullFinetuneConfig, "DATA_PATH", tiny_config.DATA_PATH)
    monkeypatch.setattr(FullFinetuneConfig, "OUTPUT_DIR", str(tmp_path / "class_out"))
    monkeypatch.setattr(FullFinetuneConfig, "EPOCHS", 1)
    monkeypatch.setattr(FullFinetuneConfig, "MAX_LENGTH", 24)
    assert full_finetune.main([]) == 0
    metrics = json.loads((tmp_path / "class_out" / "metrics.json").read_text())
    assert metrics["model"] == str(tiny_model_dir)
    assert metrics["epochs_run"] == 1
    assert metrics["config"]["MAX_LENGTH"] == 24


def test_every_setting_is_a_class_attribute_with_its_rows_default():
    for setting in SETTINGS:
        assert getattr(FullFinetuneConfig, setting.name) == setting.default
    assert FullFinetuneConfig().validate().to_dict() == {s.name: s.default for s in SETTINGS}


def test_instance_sees_class_defaults_until_it_overrides_them(monkeypatch):
    config = FullFinetuneConfig()
    monkeypatch.setattr(FullFinetuneConfig, "BATCH_SIZE", 7)
    assert config.BATCH_SIZE == 7
    config.BATCH_SIZE = 9
    assert FullFinetuneConfig.BATCH_SIZE == 7 and config.to_dict()["BATCH_SIZE"] == 9


def test_paths_may_be_pathlib_paths_and_are_recorded_as_text(tmp_path):
    config = FullFinetuneConfig()
    config.DATA_PATH, config.OUTPUT_DIR = tmp_path / "train.csv", tmp_path / "out"
    assert config.validate().to_dict()["DATA_PATH"] == str(tmp_path / "train.csv")
    json.dumps(config.to_dict())


@pytest.mark.parametrize("name", list(ModelConfigs.PRESETS))
def test_presets_are_valid_and_name_only_settings(name):
    config = ModelConfigs.get_config(name)
    assert config.validate() is config
    assert set(ModelConfigs.PRESETS[name]) <= set(SETTING_BY_NAME)
    for key, value in ModelConfigs.PRESETS[name].items():
        assert getattr(config, key) == value


def test_the_default_is_the_tuned_recipe_and_hf_cls_the_plain_one():
    default = FullFinetuneConfig()
    assert (default.POOLING, default.COSINE_HEAD_SCALE, default.LAYERWISE_LR_DECAY, default.LABEL_SMOOTHING,
            default.FREEZE_WORD_EMBEDDINGS, default.EMA_DECAY, default.ADVERSARIAL_EPSILON) == (
        "mean", 20.0, 0.7, 0.1, True, 0.999, 0.0)
    assert ModelConfigs.get_config("minilm").to_dict() == default.to_dict()
    assert ModelConfigs.get_config("minilm_adversarial").ADVERSARIAL_EPSILON == 1.0
    plain = ModelConfigs.get_config("hf_cls")
    assert (plain.POOLING, plain.COSINE_HEAD_SCALE, plain.EMA_DECAY, plain.FREEZE_WORD_EMBEDDINGS) == (
        "cls", None, None, False)


def test_preset_values_do_not_leak_into_the_class():
    before = FullFinetuneConfig.MODEL_NAME
    ModelConfigs.get_config("roberta_base")
    assert FullFinetuneConfig.MODEL_NAME == before


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(FinetuneError) as err:
        ModelConfigs.get_config("gpt5")
    for name in ModelConfigs.PRESETS:
        assert name in str(err.value)


# Written by hand for every setting (not picked with the check under test): values of the wrong
# type or out of range, each of which must be refused naming the setting, the value and what it
# expects.
WRONG_VALUES = {
    "MODEL_NAME": [None, 3, "  "], "NUM_LABELS": [1, 2.0, "3"], "MAX_LENGTH": [0, 64.0, None],
    "POOLING": ["max", None], "COSINE_HEAD_SCALE": [0, -1.0, "20"], "DROPOUT": [1.0, -0.1, "0.1"],
    "FREEZE_WORD_EMBEDDINGS": [1, "yes", None], "EPOCHS": [0, 1.5, True], "BATCH_SIZE": [0, -8, None],
    "EVAL_BATCH_SIZE": [0, "128"], "GRADIENT_ACCUMULATION_STEPS": [0, 2.5],
    "LEARNING_RATE": [0, -1e-4, math.nan, "2e-4"],
    "WEIGHT_DECAY": [-0.01, None, math.inf], "WARMUP_RATIO": [1.0, -0.1, None], "SCHEDULER": ["step", None],
    "LAYERWISE_LR_DECAY": [0, 1.5, None], "MAX_GRAD_NORM": [0, -1.0, "1"], "LABEL_SMOOTHING": [1.0, -0.1],
    "CLASS_WEIGHTS": ["auto", None, True], "EMA_DECAY": [1.0, 0, "0.999"], "ADVERSARIAL_EPSILON": [-1.0, None],
    "MIXED_PRECISION": ["fp8", None, True], "GROUP_BY_LENGTH": [0, "no"], "FUSED_ADAMW": [None, 1],
    "EARLY_STOPPING_PATIENCE": [0, 1.5], "METRIC": ["f1", "val_loss", None],
    "LABEL_ORDER": ["a,b", ["a"], ["a", "a"], ["a", ""], [1, 2]], "TRUNCATION": ["middle", None],
    "REFIT": [1, "yes"], "CV_SUBMISSION": ["mean", None],
    "SAMPLE_SUBMISSION": [3, ""], "SAVE_EVERY_STEPS": [0, 2.5],
    "LOG_EVERY_STEPS": [0, None], "REPORT_TO": ["wandb", None], "DATA_PATH": [None, 3, ""],
    "TEST_PATH": [3, ""], "TEXT_COLUMN": [None, "", 1], "LABEL_COLUMN": [None, " "], "TRAIN_RATIO": [0, 1, 1.2],
    "VAL_RATIO": [0.0, 1.0, None], "SEED": [-1, 2**32, 4.2], "N_FOLDS": [1, 5.0], "OUTPUT_DIR": [None, 7, ""],
    "DEVICE": [0, None, ""],
}


def test_every_setting_has_its_wrong_values_written_down():
    assert set(WRONG_VALUES) == set(SETTING_BY_NAME)


@pytest.mark.parametrize("name", sorted(WRONG_VALUES))
def test_every_setting_refuses_values_of_the_wrong_type_or_range(name):
    for value in WRONG_VALUES[name]:
        config = FullFinetuneConfig()
        setattr(config, name, value)
        with pytest.raises(FinetuneError) as err:
            config.validate()
        assert str(err.value) == f"{name} must be {SETTING_BY_NAME[name].kind.expects}, not {value!r}.", value


@pytest.mark.parametrize("name, value", [
    ("LEARNING_RATE", "2e-4"), ("WEIGHT_DECAY", None), ("WARMUP_RATIO", "0.1"), ("DROPOUT", "0.1"),
    ("MAX_GRAD_NORM", "1"), ("OUTPUT_DIR", None), ("GROUP_BY_LENGTH", "no"), ("FREEZE_WORD_EMBEDDINGS", 1),
    ("DEVICE", 0), ("SEED", -1), ("SEED", 2**32), ("EPOCHS", 1.5), ("BATCH_SIZE", 0), ("SCHEDULER", "step"),
    ("MIXED_PRECISION", "fp8"), ("EMA_DECAY", 1.0), ("LEARNING_RATE", math.nan), ("TEST_PATH", 3),
])
def test_the_wrong_values_users_wrote_are_refused_naming_setting_and_value(name, value):
    config = FullFinetuneConfig()
    setattr(config, name, value)
    with pytest.raises(FinetuneError, match=f"^{name} must be .*, not {value!r}"):
        config.validate()


def test_cross_setting_rules_are_refused_in_one_sentence():
    config = FullFinetuneConfig()
    config.POOLING = "cls"  # the default cosine head needs mean pooling
    with pytest.raises(FinetuneError, match="COSINE_HEAD_SCALE .*needs POOLING"):
        config.validate()
    config.COSINE_HEAD_SCALE = None
    config.validate()
    config.TRAIN_RATIO, config.VAL_RATIO = 0.8, 0.2
    with pytest.raises(FinetuneError, match="test split"):
        config.validate()


def test_a_misspelt_setting_is_refused_with_the_likely_name():
    config = FullFinetuneConfig()
    config.LEARNIN_RATE = 1e-3
    with pytest.raises(FinetuneError, match="LEARNIN_RATE is not a setting; did you mean LEARNING_RATE"):
        config.validate()


def test_command_line_refuses_a_bad_value_in_one_line(capsys, tiny_config):
    code = full_finetune.main(["--data", tiny_config.DATA_PATH, "--weight-decay", "-1",
                               "--output-dir", tiny_config.OUTPUT_DIR])
    err = capsys.readouterr().err
    assert code == 2 and err == "error: WEIGHT_DECAY must be a number of 0 or more, not -1.0.\n"


def test_a_flag_that_cannot_be_read_says_what_it_expects(capsys):
    with pytest.raises(SystemExit) as exit_:
        full_finetune.main(["--epochs", "three"])
    assert exit_.value.code == 2
    assert "EPOCHS must be a whole number of at least 1, not 'three'" in capsys.readouterr().err


def test_every_setting_with_a_flag_is_in_the_help_and_sets_it(capsys):
    with pytest.raises(SystemExit):
        full_finetune.main(["--help"])
    help_text = capsys.readouterr().out
    for command in ("cv", "predict", "evaluate"):
        assert command in help_text
    for setting in SETTINGS:
        if setting.flag and setting.name not in ("N_FOLDS", "CV_SUBMISSION"):  # cv --help lists these
            assert setting.flag in help_text, setting.flag
    args = full_finetune.parse_args(["cv", "--folds", "3", "--no-freeze-word-embeddings", "--ema-decay", "None",
                                     "--patience", "none", "--lr", "3e-5"])
    config = full_finetune.config_from_args(args)
    assert (config.N_FOLDS, config.FREEZE_WORD_EMBEDDINGS, config.EMA_DECAY, config.EARLY_STOPPING_PATIENCE,
            config.LEARNING_RATE) == (3, False, None, None, 3e-5)  # a flag given as None sets None
    preset = full_finetune.config_from_args(full_finetune.parse_args(["--preset", "distilbert", "--lr", "3e-5"]))
    assert preset.MODEL_NAME == "distilbert-base-uncased" and preset.LEARNING_RATE == 3e-5
    assert preset.BATCH_SIZE == 32 and preset.SEED == FullFinetuneConfig.SEED


def test_switch_flags_turn_a_setting_on_and_off():
    for flag, value in (("--group-by-length", True), ("--no-group-by-length", False)):
        assert full_finetune.config_from_args(full_finetune.parse_args([flag])).GROUP_BY_LENGTH is value
    assert all(s.flag for s in SETTINGS if s.kind is SWITCH)


def test_flags_override_only_what_they_name():
    config = full_finetune.config_from_args(full_finetune.parse_args(["--dropout", "0.05", "--test", "t.csv"]))
    changed = {k for k, v in config.to_dict().items() if v != getattr(FullFinetuneConfig, k)}
    assert changed == {"DROPOUT", "TEST_PATH"} and config.TEST_PATH == "t.csv"


def test_setting_names_and_flags_are_unique():
    names = [s.name for s in SETTINGS]
    flags = [s.flag for s in SETTINGS if s.flag]
    assert len(set(names)) == len(names) and len(set(flags)) == len(flags)
    assert all(Path(flag).name.startswith("--") for flag in flags)
