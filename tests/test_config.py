"""The typed config is the one source of every flag and pipeline parameter."""

import argparse
import hashlib
import json
from collections import Counter

import pytest

from cdsp_core import config


def test_field_names_are_unique_across_configs():
    names = Counter(f.name for cls in config.ALL_CONFIGS for f in config.fields_of(cls))
    assert [n for n, c in names.items() if c > 1] == []


def test_every_field_has_help_and_a_pipeline_friendly_type():
    for cls in config.ALL_CONFIGS:
        for f in config.fields_of(cls):
            assert f.metadata.get("help"), f.name
            assert f.type in ("str", "int", "float", "bool"), (f.name, f.type)


def test_preset_keys_exist():
    names = {f.name for cls in config.ALL_CONFIGS for f in config.fields_of(cls)}
    for preset, values in config.PRESETS.items():
        assert set(values) <= names, (preset, set(values) - names)


def test_cli_flags_preset_and_overrides():
    parser = argparse.ArgumentParser()
    config.add_arguments(parser, config.SegTrainConfig)
    ns = parser.parse_args(["--preset", "cpu", "--l-lorm", "0", "--no-amp", "--epochs", "3"])
    cfg = config.from_namespace(config.SegTrainConfig, ns)
    assert cfg.l_lorm == 0.0 and cfg.amp is False and cfg.epochs == 3
    assert cfg.crop_size == config.PRESETS["cpu"]["crop_size"]
    assert config.from_namespace(config.SegTrainConfig, parser.parse_args([])).crop_size == 465


def test_settings_roundtrip_through_json():
    """As a model folder's config.json holds them (to_dict), and as the pipeline builds them back (build)."""
    cfg = config.build(config.SegTrainConfig, "cpu", {"lr": 0.5})
    assert config.build(config.SegTrainConfig, None, json.loads(json.dumps(config.to_dict(cfg)))) == cfg


def test_settings_digest_is_canonical_json():
    a = {"lr": 0.5, "epochs": 3, "data": {"b": 1, "a": 2}}
    assert config.settings_digest(a) == config.settings_digest(dict(reversed(a.items())))
    assert config.settings_digest(a) == hashlib.sha256(json.dumps(a, sort_keys=True).encode()).hexdigest()
    assert config.settings_digest({**a, "lr": 0.25}) != config.settings_digest(a)


def test_parse_overrides_types_values_and_refuses_unknown_names():
    got = config.parse_overrides(config.SegTrainConfig, "width=32, lr=0.001,amp=no,lorm_distance=cosine")
    assert got == {"width": 32, "lr": 0.001, "amp": False, "lorm_distance": "cosine"}
    assert config.parse_overrides(config.SegTrainConfig, "") == {}
    for bad in ("cls_width=32", "width", "nonsense=1"):  # a ClassifierConfig field, no value, no field
        with pytest.raises(ValueError, match="SegTrainConfig field"):
            config.parse_overrides(config.SegTrainConfig, bad)
    with pytest.raises(ValueError, match="amp is a bool"):
        config.parse_overrides(config.SegTrainConfig, "amp=maybe")
