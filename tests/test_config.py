"""The typed config is the one source of every flag and pipeline parameter."""

import argparse
import hashlib
import json
import math
from collections import Counter

import pytest

from cdsp_core import config
from cdsp_core.errors import CdspError


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


# ---------------------------------------------------------------------------- what each setting accepts


def test_every_numeric_setting_declares_its_range():
    """So that NaN, infinities and out-of-range values are refused for every setting (test_error_boundary
    generates its bad values from these declarations)."""
    for name, f in config.FIELDS.items():
        if f.type in ("int", "float") and "choices" not in f.metadata:
            assert {"min", "above"} & set(f.metadata) and {"max", "below"} & set(f.metadata), name


def test_declared_choices_are_the_ones_the_code_knows():
    from cdsp_core import losses, models

    choices = {name: f.metadata.get("choices") for name, f in config.FIELDS.items()}
    assert choices["backbone"] == choices["cls_backbone"] == models.BACKBONES
    assert choices["segmenter"] == tuple(models.SEGMENTERS)
    assert choices["lorm_distance"] == tuple(losses.LORM_DISTANCES)
    assert choices["stem_stride"] == models.STEM_STRIDES


@pytest.mark.parametrize("cls, values, message", [
    (config.SegTrainConfig, {"batch_size": 0}, "--batch-size must be a whole number from 1 to 4096, got 0"),
    (config.SegTrainConfig, {"lr": float("nan")}, "--lr must be a number > 0 and <= 10, got nan"),
    (config.SegTrainConfig, {"momentum": 1.0}, "--momentum must be a number >= 0 and < 1, got 1.0"),
    (config.SegTrainConfig, {"lr": "0.1"}, "--lr must be a number > 0 and <= 10, got '0.1'"),
    (config.SegTrainConfig, {"epochs": True}, "--epochs must be a whole number from 1 to 100000, got True"),
    (config.SegTrainConfig, {"amp": 1}, "--amp must be true or false, got 1"),
    (config.SegTrainConfig, {"optimizer": "lion"}, "--optimizer must be sgd or adamw, got 'lion'"),
    (config.SegTrainConfig, {"device": "gpu"}, "--device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
    (config.SegTrainConfig, {"aspp_rates": "6,0"}, "--aspp-rates must be empty or comma-separated whole numbers"),
    (config.SegTrainConfig, {"scale_min": 3.0}, "--scale-min 3.0 is above --scale-max 2.0"),
    (config.SegTrainConfig, {"batch_size": 1, "segmenter": "deeplabv3p"}, "--batch-size 1 cannot train deeplabv3p"),
    (config.SegTrainConfig, {"batch_size": 1, "crop_size": 16, "output_stride": 16},
     "--batch-size 1 with --crop-size 16 leaves one pixel"),
    (config.ClassifierConfig, {"cls_batch_size": 1, "cls_crop_size": 16},
     "--cls-batch-size 1 with --cls-crop-size 16 leaves"),
    (config.EvalConfig, {"eval_tile": -1}, "--eval-tile must be 0 (off) or a whole number from 32 to 8192, got -1"),
    (config.EvalConfig, {"eval_scales": "0.01"}, "--eval-scales must be comma-separated scales from 0.1 to 4.0"),
    (config.PseudoLabelConfig, {"lambda_c": math.inf}, "--lambda-c must be a number > 0 and <= 1000000000, got inf"),
    (config.BenchConfig, {"seeds": 0}, "--seeds must be a whole number from 1 to 1000, got 0"),
])
def test_a_config_refuses_what_its_fields_do_not_accept_as_it_is_made(cls, values, message):
    with pytest.raises(CdspError) as e:
        cls(**values)
    assert str(e.value).startswith(message), str(e.value)


def test_accepted_values_and_the_range_in_help():
    assert config.EvalConfig(eval_tile=0).eval_tile == 0  # off: outside the range, accepted
    assert config.SegTrainConfig(device="cuda:1", aspp_rates=" 6, 12", seed=2**32 - 1).device == "cuda:1"
    assert config.parse_scales("0.5, 1,") == [0.5, 1.0] and config.parse_rates("") == []
    for bad in ("", "x", "0.05", "nan", "1e999"):
        with pytest.raises(ValueError, match="comma-separated floats from 0.1 to 4.0"):
            config.parse_scales(bad)
    parser = argparse.ArgumentParser()
    config.add_arguments(parser, config.SegTrainConfig)
    assert "(default: 16; a whole number from 1 to 4096)" in " ".join(parser.format_help().split())


def test_check_values_checks_the_settings_among_other_keys():
    config.check_values({"data": "/x", "lr": None, "epochs": 3, "out": 5})  # not settings, unset: ignored
    with pytest.raises(CdspError, match="^--seed must be"):
        config.check_values({"seed": -1})
    with pytest.raises(CdspError, match="^backbone must be"):
        config.check_values({"backbone": "resnet19"}, named=str)
    with pytest.raises(CdspError) as e:  # a credential in a value is not repeated
        config.check_values({"device": "s3://KEY:SECRET@bucket/x"})
    assert "SECRET" not in str(e.value) and "s3://bucket/x" in str(e.value)
