"""The one error boundary (cdsp_core/cli.py `main`), as a family: every setting of every command at
every kind of bad value is one line on stderr, `cdsp COMMAND: error: ...` naming the flag, exit 2,
no traceback, nothing written; the same values are refused where the KFP components and the
pipeline make their configs; and a credential in a URI never reaches stderr.

The table is generated: every subcommand's flags whose dest is a setting of cdsp_core/config.py,
each at the bad values its declared range implies (below the minimum, above the maximum, NaN and
infinities, a fraction for a whole number, a word outside its choices), so a new setting or a new
command is covered without an edit here.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cdsp_core import cli, config
from cdsp_core.errors import CdspError

REPO = Path(__file__).resolve().parents[1]


@functools.cache
def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else repr(float(x))


def bad_values(f) -> list[str]:
    """The values (as typed on a command line) that field `f` must refuse, from what it declares."""
    m = f.metadata
    if "choices" in m:
        return ["nonsense"] if f.type == "str" else [str(max(m["choices"]) + 1), "-1", "1.5"]
    if "items" in m:
        return ["x", "-1", "0.01,1", "nan"]
    if "pattern" in m:
        return ["nonsense", ""]
    if f.type not in ("int", "float"):
        return []
    bad = []
    if "min" in m:
        bad.append(_number(m["min"] - 1))
    if "above" in m:
        bad.append(_number(m["above"]))
    if "max" in m:
        bad.append(_number(m["max"] + 1))
    if "below" in m:
        bad.append(_number(m["below"]))
    if "off" in m:
        bad.append(_number(m["off"] - 1))
    return bad + (["nan", "inf"] if f.type == "float" else ["nan"])  # an int's "nan": argparse refuses it


def cases() -> list[tuple[str, str, str]]:
    """(command, flag, bad value) for every setting flag of every command."""
    out = []
    for command, parser in subcommands().items():
        for action in parser._actions:
            f = config.FIELDS.get(action.dest)
            if f is not None and action.option_strings:
                out += [(command, config.flag(f.name), v) for v in bad_values(f)]
    return out


CASES = cases()


def required_args(parser: argparse.ArgumentParser, work: Path) -> list[str]:
    """Values for a command's required flags: paths under `work` (none of them exists; .csv: suggest's
    --out is a file), a choice, 1."""
    args = []
    for action in parser._actions:
        if action.required and action.option_strings:
            value = (action.choices and next(iter(action.choices))) or ("1" if action.type in (int, float) else
                                                                         str(work / f"{action.dest}.csv"))
            args += [action.option_strings[0], value]
    return args


def refused_in_one_line(capsys, argv: list[str], command: str, named: str, work: Path) -> str:
    """`cdsp ARGV` exits 2 with one stderr line `cdsp COMMAND: error: ...NAMED...` and writes nothing in `work`."""
    before = sorted(work.rglob("*"))
    capsys.readouterr()
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 2, (argv, err)
    assert err.endswith("\n") and err.count("\n") == 1, err  # exactly one line
    assert err.startswith(f"cdsp {command}: error: "), err
    assert named in err and "Traceback" not in err, err
    assert sorted(work.rglob("*")) == before, argv  # nothing written: no --out, no staging folder
    return err


def test_the_table_covers_every_setting_of_the_commands():
    flags = {flag for _, flag, _ in CASES}
    assert {"--batch-size", "--crop-size", "--workers", "--lr", "--eval-tile", "--eval-scales", "--cls-lr",
            "--cam-threshold", "--seeds", "--device", "--seed"} <= flags
    numeric = {config.flag(n) for n, f in config.FIELDS.items() if f.type in ("int", "float")}
    assert numeric <= flags  # every numeric setting is some command's flag, so in the table
    assert len(CASES) > 200


@pytest.mark.parametrize("command, flag, value", CASES, ids=[" ".join(c) for c in CASES])
def test_a_bad_setting_is_one_line_naming_the_flag_exit_2_nothing_written(capsys, tmp_path, command, flag, value):
    argv = [command, *required_args(subcommands()[command], tmp_path), f"{flag}={value}"]
    refused_in_one_line(capsys, argv, command, flag, tmp_path)


@pytest.mark.parametrize("name", sorted(n for n, f in config.FIELDS.items() if bad_values(f)))
def test_the_configs_that_components_and_the_pipeline_build_refuse_the_same_values(name):
    """The KFP components construct the config dataclasses; the pipeline (local or submitted) builds
    them with config.build: both refuse each bad value of the table, naming the setting."""
    f = config.FIELDS[name]
    cls = next(c for c in (*config.ALL_CONFIGS, config.BenchConfig) if f in config.fields_of(c))
    for text in bad_values(f):
        value = text if f.type == "str" else (int(text) if text.lstrip("-").isdigit() else float(text))
        with pytest.raises(CdspError, match=f"^{config.flag(name)} must be "):
            cls(**{name: value})
        with pytest.raises(CdspError, match=f"^{config.flag(name)} must be "):
            config.build(cls, "cpu", {name: value})


def test_every_declared_default_and_preset_is_accepted():
    for cls in (*config.ALL_CONFIGS, config.BenchConfig):
        cls()
        for preset in config.PRESETS:
            config.build(cls, preset)


@pytest.mark.parametrize("command, flags, message", [
    ("train-seg", ["--scale-min", "1.5", "--scale-max", "1.2"], "--scale-min 1.5 is above --scale-max 1.2"),
    ("train-seg", ["--batch-size", "1", "--segmenter", "deeplabv3p"], "--batch-size 1 cannot train deeplabv3p"),
    ("train-seg", ["--preset", "cpu", "--batch-size", "1", "--crop-size", "16", "--output-stride", "16"],
     "--crop-size 16 leaves one pixel"),
    ("bench", ["--cls-batch-size", "1", "--cls-crop-size", "16"], "--cls-crop-size 16 leaves one pixel"),
])
def test_settings_that_do_not_fit_together(capsys, tmp_path, command, flags, message):
    argv = [command, "--data", str(tmp_path / "d"), "--out", str(tmp_path / "o"), *flags]
    refused_in_one_line(capsys, argv, command, message, tmp_path)


def test_a_model_folder_whose_config_names_an_unknown_backbone(capsys, tmp_path):
    """The issue's: the error named neither the file nor the folder."""
    from PIL import Image

    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "a.png")
    model = tmp_path / "model"
    model.mkdir()
    settings = {"kind": "segmenter", "class_names": ["background", "cat"], "segmenter": "deeplabv2"}
    for backbone, problem in (("resnet19", "backbone must be resnet18, "), ("mobilenet_v2", "width 64")):
        (model / "config.json").write_text(json.dumps({**settings, "backbone": backbone, "width": 16}))
        err = refused_in_one_line(capsys, ["predict", "--model", str(model), "--images", str(tmp_path / "images"),
                                           "--out", str(tmp_path / "out"), "--device", "cpu"],
                                  "predict", f"{model / 'config.json'}: ", tmp_path)
        assert problem in err, err


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e999"])
def test_scribblesup_xml_with_a_coordinate_that_is_no_finite_number(capsys, tmp_path, value):
    """The issue's: `nan`/`inf` in ScribbleSup XML gave tracebacks."""
    from PIL import Image

    (tmp_path / "xml").mkdir()
    (tmp_path / "img").mkdir()
    Image.new("RGB", (8, 6)).save(tmp_path / "img" / "a.jpg")
    xml = tmp_path / "xml" / "a.xml"
    xml.write_text("<annotation><size><width>8</width><height>6</height></size><polygon><tag>cat</tag><point>"
                   f"<X>{value}</X><Y>1</Y></point></polygon></annotation>")
    err = refused_in_one_line(capsys, ["convert-scribbles", "--xml-dir", str(tmp_path / "xml"), "--image-dir",
                                       str(tmp_path / "img"), "--out", str(tmp_path / "out")],
                              "convert-scribbles", f"{xml}: polygon 1 point X is missing or not a number", tmp_path)
    assert repr(value) in err


# Numeric flags of commands that are no settings (a command's own): checked by the command, first.
OWN_FLAGS = [("synth", "--size", "0"), ("synth", "--n-train", "0"), ("synth", "--n-val", "-1"),
             ("degrade-scribbles", "--ratio", "nan"), ("degrade-scribbles", "--ratio", "1.5"),
             ("suggest", "--n", "0"), ("suggest", "--low-margin", "nan"), ("suggest", "--low-margin", "-1"),
             ("synth", "--size", "x"), ("suggest", "--n", "1.5")]


@pytest.mark.parametrize("command, flag, value", OWN_FLAGS, ids=[" ".join(c) for c in OWN_FLAGS])
def test_a_commands_own_numeric_flags(capsys, tmp_path, command, flag, value):
    args = required_args(subcommands()[command], tmp_path)
    if command == "degrade-scribbles":  # a folder with a scribble, so that the ratio is what is wrong
        from PIL import Image

        scribbles = tmp_path / "scribbles"
        scribbles.mkdir()
        Image.new("L", (4, 4), 255).save(scribbles / "a.png")
        args[args.index("--scribbles") + 1] = str(scribbles)
    refused_in_one_line(capsys, [command, *args, f"{flag}={value}"], command, flag, tmp_path)


def test_suggest_refuses_outputs_it_cannot_write_before_any_work(capsys, tmp_path):
    """The issue's: `suggest --manifest` naming a folder failed with a traceback after writing its CSV."""
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("x")
    run = ["suggest", "--model", str(tmp_path / "no-model"), "--images", str(tmp_path / "no-images")]
    err = refused_in_one_line(capsys, [*run, "--out", str(tmp_path / "ranked.csv"), "--manifest",
                                       str(tmp_path / "folder")], "suggest", "--manifest is a folder", tmp_path)
    assert str(tmp_path / "folder") in err
    refused_in_one_line(capsys, [*run, "--out", str(tmp_path / "file" / "ranked.csv")], "suggest",
                        "which is a file, not a folder", tmp_path)


# ---------------------------------------------------------------------------- credentials


KEY, SECRET = "AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI%2FK7MDENG"  # AWS's documented example key


@pytest.fixture
def no_aws(monkeypatch):
    """An S3 endpoint nobody listens on, and credentials of the environment (not the URI's)."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "env-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def secret_free(err: str) -> None:
    for part in (KEY, SECRET, "wJalrXUtnFEMI/K7MDENG"):
        assert part not in err, err


@pytest.mark.parametrize("argv", [
    ["prepare", "--data", f"s3://{KEY}:{SECRET}@bucket/x", "--out", "{out}"],
    ["predict", "--images", "{images}", "--model", f"s3://{KEY}:{SECRET}@bucket/model", "--out", "{out}"],
    ["predict", "--images", f"s3://{KEY}:{SECRET}@bucket/images", "--model", "{images}", "--out", "{out}"],
    ["train-seg", "--data", "{out}", "--out", "{out}", "--device", f"s3://{KEY}:{SECRET}@bucket/x" + "y" * 80],
    ["train-seg", "--data", "{out}", "--out", "{out}", "--preset", f"s3://{KEY}:{SECRET}@bucket/x"],
], ids=["an S3 listing", "a model URI", "an image URI", "a long setting's value", "a usage error"])
def test_a_credential_in_a_uri_never_reaches_stderr(capsys, tmp_path, no_aws, argv):
    from PIL import Image

    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "a.png")
    argv = [a.replace("{out}", str(tmp_path / "out")).replace("{images}", str(tmp_path / "images")) for a in argv]
    capsys.readouterr()
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"cdsp {argv[0]}: error: "), err
    secret_free(err)
    assert not (tmp_path / "out").exists()


def test_a_credential_in_a_uri_never_reaches_stderr_of_the_real_command(tmp_path):
    env = {**os.environ, "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "env-key",
           "AWS_SECRET_ACCESS_KEY": "env-secret", "AWS_EC2_METADATA_DISABLED": "true", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "cdsp_core", "prepare", "--data", f"s3://{KEY}:{SECRET}@bucket/x",
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("cdsp prepare: error: s3://bucket/x: "), done.stderr
    secret_free(done.stderr + done.stdout)
    assert not (tmp_path / "out").exists()


def test_redaction_masks_the_credentials_wherever_a_library_repeats_them():
    from cdsp_core.credentials import redact, secrets_in

    known = secrets_in(["--data", f"s3://{KEY}:{SECRET}@bucket/x"])
    line = f's3://{KEY}:{SECRET}@bucket/x: Invalid bucket name "{KEY}:wJalrXUtnFEMI/K7MDENG@bucket"'
    assert redact(line, known) == 's3://bucket/x: Invalid bucket name "***@bucket"'
    assert secrets_in(["s3://bucket/x", "--lr", "0.1"]) == set()


def test_log_lines_are_redacted_too():
    """A library that logs a URI with its credentials (at the level `cdsp -v` shows) prints none of them."""
    code = ("import logging; from cdsp_core import logs; logs.configure(logging.DEBUG); "
            "logging.getLogger('some.library').debug('GET %s', 's3://AKIDEXAMPLE:wJalrXUtnFEMI@bucket/key')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert "GET s3://bucket/key" in done.stderr
    assert "wJalrXUtnFEMI" not in done.stderr and "AKIDEXAMPLE" not in done.stderr
