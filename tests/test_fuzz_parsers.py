"""The parsers of files from outside, fuzzed (Hypothesis): ANY input gives a result or one CdspError
naming the file, never another exception.

ScribbleSup XML, CVAT for images 1.1 (XML and export zip), Label Studio JSON, split lists, class
lists and a model folder's config.json. Each strategy mixes raw bytes with documents built from the
format's own grammar, whose values come from a pool of hostile ones (NaN, infinities, 1.7e308,
integers too large for a float, NUL, 300-character names, lone surrogates, ...), so that the
examples reach past the first syntax check. The exports go through `convert_export` whole: the
painted PNGs are written under each image's id, so a name that cannot be a file name is found.
Examples are fixed (derandomize) and few: the whole file runs in seconds.
"""

from __future__ import annotations

import io
import json
import math
import tempfile
import zipfile
from pathlib import Path
from xml.sax.saxutils import quoteattr

import numpy as np
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from cdsp_core import annotations, cli, data, modelfolder, scribbles
from cdsp_core.errors import CdspError

FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
CLASSES = ["background", "cat", "dog"]

# ---------------------------------------------------------------------------- hostile values

HOSTILE_TEXT = st.sampled_from(["-1", "-0", "1e308", "1.7e308", "-1e308", "1e999", "nan", "NaN", "inf", "-inf",
                                "Infinity", "99999999999999999999999", "0x10", "1_0", "²", "", " ", "abc", "3,4",
                                "1e-320", "١٢", "7.5"])


def mostly(good, hostile):
    """Values of `good` about nine times in ten: a document with a few hostile values among plausible
    ones gets past its first check, to the code behind it."""
    return st.integers(0, 9).flatmap(lambda k: hostile if k == 7 else good)


NUMBERS_TEXT = mostly(st.integers(1, 25).map(str), HOSTILE_TEXT)
NAMES = mostly(st.sampled_from(["a.jpg", "dir/b.png", "c", "x/../y.jpg", "é.jpg", "C:\\img\\d.jpg", "e.tar.gz"]),
               st.one_of(st.sampled_from([".hidden.jpg", "/", "", "a\0b.jpg", "a" * 300 + ".jpg", "é" * 150 + ".jpg",
                                          "tab\there.jpg", "\ud800.jpg"]), st.text(max_size=40)))
JSON_NUMBERS = mostly(st.floats(0, 100) | st.integers(0, 100),
                      st.sampled_from([-1, 1.7e308, -1.7e308, 10**400, math.nan, math.inf, True, None, "5", [], {}])
                      | st.floats() | st.integers())
SIZES = mostly(st.integers(1, 30), JSON_NUMBERS)


def clean(fn, path, *args):
    """fn(path, *args): its result, or None after a CdspError that names the file in one line."""
    try:
        return fn(path, *args)
    except CdspError as e:
        line = cli.one_line(e)
        assert str(path) in line, line
        return None


def scratch() -> Path:
    """A new folder for one example (Hypothesis runs many examples in one test call)."""
    return Path(tempfile.mkdtemp(prefix="fuzz-"))


# ---------------------------------------------------------------------------- ScribbleSup XML


@st.composite
def scribblesup_xml(draw) -> bytes:
    parts = ["<annotation>"]
    if draw(st.booleans()):
        parts.append(f"<size><width>{draw(NUMBERS_TEXT)}</width><height>{draw(NUMBERS_TEXT)}</height></size>")
    for _ in range(draw(st.integers(0, 3))):
        tag = draw(mostly(st.sampled_from(CLASSES + ["Cat"]), st.sampled_from(["unicorn", ""]) | st.text(max_size=8)))
        points = "".join(f"<point><X>{draw(NUMBERS_TEXT)}</X><Y>{draw(NUMBERS_TEXT)}</Y></point>"
                         for _ in range(draw(st.integers(0, 3))))
        parts.append(f"<polygon><tag>{escape(tag)}</tag>{points}</polygon>")
    return ("".join(parts) + "</annotation>").encode()


def escape(text: str) -> str:
    return quoteattr(text)[1:-1]


SIZE_5 = "<size><width>5</width><height>5</height></size>"


@FUZZ
@given(content=st.one_of(st.binary(max_size=200), scribblesup_xml()),
       size=st.one_of(st.none(), st.tuples(st.integers(1, 30), st.integers(1, 30))))
@example(content=b"<annotation><size><width>nan</width><height>5</height></size></annotation>", size=None)
@example(content=f"<annotation>{SIZE_5}<polygon><tag>cat</tag><point><X>inf</X><Y>1</Y></point></polygon>"
         "</annotation>".encode(), size=None)  # the issue's: tracebacks
def test_scribblesup_xml(content, size):
    path = scratch() / "a.xml"
    path.write_bytes(content)
    scribble = clean(scribbles.xml_to_scribble, path, CLASSES, size)
    if scribble is not None:
        assert scribble.dtype == np.uint8 and scribble.ndim == 2
        assert set(np.unique(scribble)) <= {0, 1, 2, 255}


# ---------------------------------------------------------------------------- CVAT


@st.composite
def cvat_xml(draw) -> bytes:
    parts = ["<annotations>", f"<version>{draw(mostly(st.just('1.1'), st.sampled_from(['1.0', ''])))}</version>"]
    for k in range(draw(st.integers(0, 3))):
        w, h = draw(NUMBERS_TEXT), draw(NUMBERS_TEXT)
        parts.append(f"<image id='{k}' name={quoteattr(draw(NAMES))} width={quoteattr(w)} height={quoteattr(h)}>")
        for _ in range(draw(st.integers(1, 3))):
            tag = draw(mostly(st.sampled_from(["polyline", "points"]), st.sampled_from(["box", "track"])))
            pts = ";".join(f"{draw(NUMBERS_TEXT)},{draw(NUMBERS_TEXT)}" for _ in range(draw(st.integers(1, 3))))
            label = draw(mostly(st.sampled_from(["cat", "dog"]), st.sampled_from(["", "unicorn"])))
            z = draw(mostly(st.sampled_from(["0", "1"]), st.sampled_from(["-2", "x", "1e3"])))
            outside = draw(mostly(st.just("0"), st.just("1")))
            parts.append(f"<{tag} label={quoteattr(label)} points={quoteattr(pts)} z_order='{z}' "
                         f"outside='{outside}'/>")
        parts.append("</image>")
    return "".join(parts + ["</annotations>"]).encode("utf-8", "surrogatepass")


@st.composite
def cvat_zip(draw) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=draw(st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED]))) as z:
        for name in draw(st.lists(st.sampled_from(["annotations.xml", "images/a.jpg", "../evil", "dir/"]),
                                  max_size=3, unique=True)):
            z.writestr(name, draw(cvat_xml()))
    blob = buf.getvalue()
    if draw(st.booleans()) and blob:  # a byte changed: bad CRCs, bad headers
        i = draw(st.integers(0, len(blob) - 1))
        blob = blob[:i] + bytes([blob[i] ^ 0xFF]) + blob[i + 1:]
    return blob


def convert(fmt: str, export: Path) -> int | None:
    """The whole conversion, PNGs written under each id; the classes as a labelmap."""
    labelmap = export.parent / "labelmap.txt"
    labelmap.write_text("background:0,0,0::\ncat:1,1,1::\ndog:2,2,2::\n", encoding="utf-8")
    return clean(lambda p: scribbles.convert_export(fmt, p, export.parent / "out", labelmap), export)


@FUZZ
@given(content=st.one_of(st.binary(max_size=200), cvat_xml(), cvat_zip()))
@example(content=f"<annotations><image name='{'a' * 300}.jpg' width='9' height='9'><points label='cat' "
         "points='1,1'/></image></annotations>".encode())  # the issue's: a traceback from the PNG's name
def test_cvat_export(content):
    export = scratch() / "annotations.xml"
    export.write_bytes(content)
    images = clean(lambda p: list(annotations.read_cvat(p)), export)
    written = convert("cvat", export)
    if written:
        assert images and any(im.marks for im in images)
        assert len(list((export.parent / "out").glob("*.png"))) == written


# ---------------------------------------------------------------------------- Label Studio


@st.composite
def labelstudio_json(draw) -> bytes:
    tasks = []
    for _ in range(draw(st.integers(0, 3))):
        results, size = [], (draw(SIZES), draw(SIZES))
        for _ in range(draw(st.integers(1, 3))):
            kind = draw(mostly(st.just("keypointlabels"), st.sampled_from(["brushlabels", "rectanglelabels", None])))
            value = {"x": draw(JSON_NUMBERS), "y": draw(JSON_NUMBERS),
                     f"{kind}": [draw(mostly(st.just("cat"), st.sampled_from(["x", 3])))],
                     "format": "rle", "rle": draw(st.lists(st.integers(-1, 256), max_size=12))}
            w, h = draw(mostly(st.just(size), st.tuples(SIZES, SIZES)))
            results.append({"type": kind, "value": value, "original_width": w, "original_height": h,
                            "image_rotation": draw(mostly(st.just(0), st.sampled_from([90, None, "x", math.nan])))})
        url = draw(mostly(NAMES, st.sampled_from(["http://[x/a.jpg", "/data/upload/1/0a1b2c3d-a.jpg",
                                                  "/data/local-files/?d=dir%2Fb.jpg", "s3://k:s@b/c.jpg"])))
        cancelled = draw(mostly(st.just(False), st.just(True)))
        tasks.append({"data": {"image": url}, "annotations": [{"result": results, "was_cancelled": cancelled}]})
    doc = tasks[0] if len(tasks) == 1 and draw(st.booleans()) else tasks
    return json.dumps(doc).encode("utf-8", "surrogatepass")


def one_keypoint(url: str, x: float) -> bytes:
    return json.dumps([{"data": {"image": url}, "annotations": [{"result": [
        {"type": "keypointlabels", "original_width": 9, "original_height": 9,
         "value": {"x": x, "y": 5, "keypointlabels": ["cat"]}}]}]}]).encode()


@FUZZ
@given(content=st.one_of(st.binary(max_size=200), labelstudio_json()))
@example(content=one_keypoint("a.jpg", 1.7e308))  # the issue's: tracebacks
@example(content=one_keypoint("/data/upload/1/a\0b.jpg", 5))
def test_labelstudio_export(content):
    export = scratch() / "export.json"
    export.write_bytes(content)
    clean(lambda p: list(annotations.read_labelstudio(p)), export)
    convert("labelstudio", export)


# ---------------------------------------------------------------------------- split and class lists

LINES = st.lists(st.one_of(NAMES, st.sampled_from(["# comment", "/JPEGImages/a.jpg /SegmentationClass/a.png", "b",
                                                   "   ", "dir/", "x.jpeg"])), max_size=6)


def text_file(lines: list[str]) -> bytes:
    return "\n".join(lines).encode("utf-8", "surrogatepass")


@FUZZ
@given(content=st.one_of(st.binary(max_size=200), LINES.map(text_file)))
@example(content=b"a\n" + b"b" * 300 + b"\n")
def test_split_list(content):
    folder = scratch()
    path = folder / "train.txt"
    path.write_bytes(content)
    ids = clean(data.read_split, path)
    for i in ids or []:  # every id can name the files looked up for it
        assert not (folder / f"{i}.jpg").is_file()


@FUZZ
@given(content=st.one_of(st.binary(max_size=200), LINES.map(text_file),
                         st.lists(st.sampled_from(["background:0,0,0::", "cat:1,2,3::", ":::", "a:b", "#x"]),
                                  max_size=4).map(text_file)),
       name=st.sampled_from(["classes.txt", "labelmap.txt"]))
def test_class_list(content, name):
    path = scratch() / name
    path.write_bytes(content)
    names = clean(data.read_class_file, path)
    if names is not None:
        assert 2 <= len(names) <= 255 and all(isinstance(n, str) and n for n in names)


# ---------------------------------------------------------------------------- a model folder's config.json

ARCH_VALUES = st.sampled_from([None, 0, -1, 1, 2, 4, 8, 16, 32, 64, 10**6, 2.5, True, "8", "", "1,2", "x", [],
                               "resnet18", "resnet19", "mobilenet_v2", "deeplabv2", "deeplabv3p", math.nan])


@st.composite
def model_config(draw) -> dict:
    kind = draw(st.sampled_from(["segmenter", "classifier", "other", None]))
    info = {"kind": kind, "class_names": draw(st.sampled_from([["bg", "cat"], ["bg"], [], ["a", "a"], [1, 2], "ab",
                                                               None]))}
    keys = [k for keys in modelfolder.ARCHITECTURE.get(kind, ((), ())) for k in keys]
    info.update({k: draw(ARCH_VALUES) for k in keys if draw(st.booleans())})
    return info


@settings(FUZZ, max_examples=40)
@given(content=st.one_of(st.binary(max_size=100), model_config().map(lambda d: json.dumps(d).encode())))
@example(content=json.dumps({"kind": "segmenter", "class_names": ["bg", "cat"], "segmenter": "deeplabv2",
                             "backbone": "resnet19"}).encode())  # the issue's: named neither file nor folder
def test_model_folder_config(content):
    folder = scratch()
    (folder / modelfolder.CONFIG).write_bytes(content)
    info = clean(modelfolder.read_config, folder)
    if info is not None:  # then the network it describes is built, or refused naming config.json
        try:
            modelfolder.load(folder)
        except CdspError as e:
            assert str(folder) in cli.one_line(e)
            assert "config.json" in str(e) or "model.pt: missing" in str(e), e
