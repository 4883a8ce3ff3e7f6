from __future__ import annotations

import pytest
from pydantic import Field

from protege.config import ConfigError, StageConfig, config_help, load_config, parse_overrides, save_config


class Optim(StageConfig):
    learning_rate: float = Field(1e-4, description="peak learning rate")
    warmup_steps: int = Field(0, description="linear warmup steps")


class Demo(StageConfig):
    out_dir: str = Field("out", description="where outputs go")
    batch_size: int = Field(4, description="rows per step")
    tags: list[str] = Field(default_factory=list, description="free tags")
    optim: Optim = Field(default_factory=Optim, description="optimizer settings")


def test_yaml_then_overrides(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("batch_size: 8\noptim:\n  learning_rate: 0.001\n")
    cfg = load_config(Demo, cfg_file, ["--optim.warmup_steps=10", "--tags=[a, b]", "--batch_size=16"])
    assert cfg.batch_size == 16 and cfg.optim.learning_rate == 0.001 and cfg.optim.warmup_steps == 10
    assert cfg.tags == ["a", "b"]


def test_unknown_key_suggests_closest(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("optim:\n  learnin_rate: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(Demo, cfg_file)
    msg = str(err.value)
    assert str(cfg_file) in msg and "`optim.learnin_rate`" in msg and "did you mean `learning_rate`" in msg


def test_unknown_override_key():
    with pytest.raises(ConfigError, match="did you mean `batch_size`"):
        load_config(Demo, None, ["--bach_size=3"])


def test_wrong_type_names_field_and_expected(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("batch_size: lots\n")
    with pytest.raises(ConfigError) as err:
        load_config(Demo, cfg_file)
    assert "`batch_size`" in str(err.value) and "integer" in str(err.value) and "'lots'" in str(err.value)


def test_bad_yaml_has_line(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("batch_size: 4\noptim: [unclosed\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:\d+: invalid YAML"):
        load_config(Demo, cfg_file)


def test_missing_file_and_bad_override():
    with pytest.raises(ConfigError, match="not found"):
        load_config(Demo, "/nonexistent/x.yaml")
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_overrides(["batch_size"])


def test_overrides_take_space_separated_values():
    # `--help` shows `--key`; users type `--key value` as with any argparse tool.
    assert parse_overrides(["--batch_size", "4", "--optim.learning_rate=0.5", "--flag"]) == \
        {"batch_size": 4, "optim": {"learning_rate": 0.5}, "flag": True}
    assert parse_overrides(["--prompts", "a b.jsonl", "--x", "-1"]) == {"prompts": "a b.jsonl", "x": -1}


def test_overrides_keep_yes_no_on_off_as_words():
    """YAML 1.1 reads yes/no/on/off as booleans; on the command line `--out_dir=off` names a folder and
    `--resume=no` picks a choice, while boolean fields still take the words (pydantic parses them)."""
    from protege.train.sft import SFTConfig

    assert parse_overrides(["--out_dir=off", "--resume", "no", "--x=true", "--y=False", "--z=On"]) == \
        {"out_dir": "off", "resume": "no", "x": True, "y": False, "z": "On"}
    cfg = load_config(SFTConfig, None, ["--model=m", "--datasets=[d.jsonl]", "--out_dir=off", "--resume=no",
                                        "--tensorboard=off", "--packing=yes"])
    assert (cfg.out_dir, cfg.resume, cfg.tensorboard, cfg.packing) == ("off", "no", False, True)


def test_save_config_round_trip(tmp_path):
    cfg = load_config(Demo, None, ["--optim.learning_rate=0.5"])
    path = save_config(cfg, tmp_path)
    assert load_config(Demo, path) == cfg


def test_help_lists_defaults_and_docs():
    text = config_help(Demo)
    assert "--batch_size  (int, default 4): rows per step" in text
    assert "--optim.learning_rate" in text and "peak learning rate" in text
