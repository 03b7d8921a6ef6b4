import ml_collections
import pytest

from lf_jax.configuration import (
    ConfigError,
    apply_overrides,
    convert_value,
    load_config,
    parse_config_arg,
    split_override_args,
)


def _config():
    config = ml_collections.ConfigDict(
        {
            "train": {"steps": 10, "lr": 0.1, "use_ips": True, "name": "x", "dims": (16, 32)},
            "maybe": None,
        }
    )
    config.lock()
    return config


def test_overrides_convert_to_existing_types():
    config = apply_overrides(
        _config(),
        {
            "train.steps": "5",
            "train.lr": "3e-4",
            "train.use_ips": "false",
            "train.name": "y",
            "train.dims": "(8, 16, 64)",
            "maybe": "[1, 2]",
        },
    )
    assert config.train.steps == 5 and config.train.lr == pytest.approx(3e-4)
    assert config.train.use_ips is False and config.train.name == "y"
    assert config.train.dims == (8, 16, 64) and config.maybe == [1, 2]


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("train.stepz", "1", "unknown config key 'train.stepz'.*steps"),
        ("nope.x", "1", "unknown config key 'nope.x'"),
        ("train.steps", "ten", "config key 'train.steps' expects an int, got 'ten'"),
        ("train.use_ips", "maybe", "expects a bool"),
        ("train.lr", "fast", "expects a float"),
        ("train", "1", "is a section"),
        ("train.dims", "[1", "expects a Python tuple literal"),
    ],
)
def test_bad_overrides_name_the_key(key, value, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(_config(), {key: value})


def test_parse_config_arg():
    assert parse_config_arg("size=tiny,steps=3", {"size": "small", "steps": 1}) == {
        "size": "tiny",
        "steps": 3,
    }
    with pytest.raises(ConfigError, match="unknown config argument 'sise'"):
        parse_config_arg("sise=tiny", {"size": "small"})
    with pytest.raises(ConfigError, match="not key=value"):
        parse_config_arg("tiny", {"size": "small"})


def test_split_override_args():
    overrides, rest = split_override_args(
        ["demo", "--config.a.b=1", "--config.c", "two", "--workdir", "w"]
    )
    assert overrides == {"a.b": "1", "c": "two"} and rest == ["demo", "--workdir", "w"]
    with pytest.raises(ConfigError, match="has no value"):
        split_override_args(["--config.a"])


def test_load_config_with_arg_and_lock(repo_root):
    config = load_config(f"{repo_root}/configs/demo.py:devices=4")
    assert config.devices == 4
    with pytest.raises(AttributeError):
        config.new_key = 1


def test_load_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.py")
    (tmp_path / "empty.py").write_text("x = 1\n")
    with pytest.raises(ConfigError, match="no get_config"):
        load_config(tmp_path / "empty.py")


def test_convert_value_rejects_unsupported_types():
    with pytest.raises(ConfigError, match="not settable"):
        convert_value("k", "1", object())


def test_free_form_section_takes_a_dict_literal(repo_root):
    config = load_config(f"{repo_root}/configs/feed_ranker.py:size=tiny")
    apply_overrides(
        config,
        {"embedding.plan": '{"member": {"strategy": "row_wise", "axes": ("data", "model")}}'},
    )
    assert config.embedding.plan.member.strategy == "row_wise"
    assert tuple(config.embedding.plan.member.axes) == ("data", "model")
    with pytest.raises(ConfigError, match="free-form section"):
        apply_overrides(
            load_config(f"{repo_root}/configs/feed_ranker.py:size=tiny"),
            {"embedding.plan": "row_wise"},
        )
    with pytest.raises(ConfigError, match="is a section; set one of"):
        apply_overrides(config, {"embedding.tables": "{}"})
