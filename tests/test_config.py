import json

import pytest

import full_finetune
from config import FinetuneError, FullFinetuneConfig, ModelConfigs


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


def test_instance_sees_class_defaults_until_it_overrides_them(monkeypatch):
    config = FullFinetuneConfig()
    monkeypatch.setattr(FullFinetuneConfig, "BATCH_SIZE", 7)
    assert config.BATCH_SIZE == 7
    config.BATCH_SIZE = 9
    assert FullFinetuneConfig.BATCH_SIZE == 7 and config.to_dict()["BATCH_SIZE"] == 9


@pytest.mark.parametrize("name", ["minilm", "bert_base", "roberta_base", "distilbert", "bert_base_chinese"])
def test_presets_are_valid_and_distinct_from_the_class(name):
    config = ModelConfigs.get_config(name)
    assert config.validate() is config
    assert config.MODEL_NAME == ModelConfigs.PRESETS[name]["MODEL_NAME"]
    assert config.LEARNING_RATE == ModelConfigs.PRESETS[name]["LEARNING_RATE"]


def test_preset_values_do_not_leak_into_the_class():
    before = FullFinetuneConfig.MODEL_NAME
    ModelConfigs.get_config("roberta_base")
    assert FullFinetuneConfig.MODEL_NAME == before


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(FinetuneError) as err:
        ModelConfigs.get_config("gpt5")
    for name in ModelConfigs.PRESETS:
        assert name in str(err.value)


@pytest.mark.parametrize("attribute, value, words", [
    ("BATCH_SIZE", 0, "BATCH_SIZE"),
    ("EPOCHS", 1.5, "EPOCHS"),
    ("LEARNING_RATE", -1e-4, "LEARNING_RATE"),
    ("TRAIN_RATIO", 0.9, "test split"),
    ("VAL_RATIO", 0.0, "test split"),
    ("WARMUP_RATIO", 1.0, "WARMUP_RATIO"),
    ("SCHEDULER", "step", "linear, cosine"),
    ("MIXED_PRECISION", "fp8", "MIXED_PRECISION"),
    ("EARLY_STOPPING_METRIC", "f1", "val_macro_f1"),
    ("EARLY_STOPPING_PATIENCE", 0, "EARLY_STOPPING_PATIENCE"),
    ("MAX_GRAD_NORM", 0, "MAX_GRAD_NORM"),
    ("TOKEN_DROPOUT", 1.0, "TOKEN_DROPOUT"),
    ("DROPOUT", -0.1, "DROPOUT"),
    ("ADVERSARIAL_EPSILON", -1.0, "ADVERSARIAL_EPSILON"),
])
def test_out_of_range_values_are_refused_with_the_setting_named(attribute, value, words):
    config = FullFinetuneConfig()
    setattr(config, attribute, value)
    with pytest.raises(FinetuneError, match=words):
        config.validate()


def test_command_line_refuses_a_bad_value_in_one_line(capsys, tiny_config):
    code = full_finetune.main(["--data", tiny_config.DATA_PATH, "--batch-size", "0",
                               "--output-dir", tiny_config.OUTPUT_DIR])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: BATCH_SIZE") and err.count("\n") == 1


def test_flags_override_only_what_they_name():
    args = full_finetune.build_train_parser().parse_args(["--preset", "distilbert", "--lr", "3e-5",
                                                          "--dropout", "0.05"])
    config = full_finetune.config_from_args(args)
    assert config.LEARNING_RATE == 3e-5 and config.DROPOUT == 0.05
    assert config.MODEL_NAME == "distilbert-base-uncased"
    assert config.BATCH_SIZE == ModelConfigs.PRESETS["distilbert"]["BATCH_SIZE"]
    assert config.SEED == FullFinetuneConfig.SEED
    assert config.FREEZE_WORD_EMBEDDINGS is False


def test_a_switch_flag_turns_its_setting_on():
    args = full_finetune.build_train_parser().parse_args(["--freeze-word-embeddings", "--pooling", "mean",
                                                          "--cosine-head", "20", "--prototype-head",
                                                          "--token-dropout", "0.1", "--adversarial", "0.5"])
    config = full_finetune.config_from_args(args)
    assert config.TOKEN_DROPOUT == 0.1 and config.ADVERSARIAL_EPSILON == 0.5
    assert config.FREEZE_WORD_EMBEDDINGS is True and config.COSINE_HEAD_SCALE == 20.0
    assert config.PROTOTYPE_HEAD_INIT is True


def test_help_documents_the_flags(capsys):
    with pytest.raises(SystemExit):
        full_finetune.main(["--help"])
    out = capsys.readouterr().out
    for flag in ("--model", "--preset", "--data", "--epochs", "--batch-size", "--lr", "--max-length",
                 "--output-dir", "--text-column", "--label-column", "--seed", "predict"):
        assert flag in out
