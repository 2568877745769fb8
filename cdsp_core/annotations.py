"""Annotators' exports read as marks to paint: CVAT for images 1.1 XML and Label Studio JSON.

Both readers are for files from outside, so every value is checked and a bad one is a
CdspError naming the file (and the image); nothing here writes. `scribbles.convert_export`
maps the label names to classes and paints the marks.

CVAT for images 1.1 (docs.cvat.ai, "XML annotation format" and "CVAT for image"): an
`annotations.xml`, or the task/project export zip holding it at its root. Each
`<image name= width= height=>` holds shapes; `<polyline label= points="x0,y0;x1,y1;..."
z_order=>` is a stroke and `<points>` a set of dots. Shapes are painted in z_order, document
order at equal z_order. Coordinates are continuous (pixel i spans [i, i+1)), so a point falls
in pixel floor(x). Other shapes (box, polygon, mask, ellipse, cuboid, skeleton, tag) are not
scribbles: they are skipped with a warning naming the image. `outside="1"` shapes (a track's
hidden frames) are not drawn. The XML is parsed with defusedxml (no DTD, no entities), in
a stream, at most MAX_EXPORT_BYTES and MAX_XML_DEPTH deep.

Label Studio JSON export (labelstud.io, "Label Studio Task Format", tags BrushLabels and
KeyPointLabels): a list of tasks `{"data": {"image": URL}, "annotations": [{"result": [...]}]}`.
Results of type `brushlabels` (`value.format` "rle", `value.rle`, `value.brushlabels`) are
brush masks; `keypointlabels` (`value.x`, `value.y` in percent of the image) are dots. The
image size is each result's `original_width`/`original_height`. Every annotation that was
not cancelled is painted, in export order; predictions are not (they are a model's).
"""

from __future__ import annotations

import json
import math
import os
import re
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO
from urllib.parse import parse_qs, unquote, urlparse
from xml.etree.ElementTree import Element, ParseError

import numpy as np
from defusedxml import DefusedXmlException
from defusedxml.ElementTree import iterparse
from PIL import Image

from cdsp_core import data
from cdsp_core.credentials import redact
from cdsp_core.errors import CdspError

MAX_EXPORT_BYTES = 512 * 2**20  # an export over this is refused rather than read into memory
MAX_XML_DEPTH = 32  # CVAT's deepest element is 7 levels down
ALPHA_MIN = 128  # a brush pixel counts where its RLE alpha is at least this (half covered)

CVAT_STROKES = ("polyline", "points")  # box, polygon, mask, ellipse, cuboid, skeleton and tag are not


@dataclass
class Mark:
    """One thing to paint: pixel points (one: a dab, more: a width-3 line) or a boolean H×W mask."""

    label: str
    points: list[tuple[int, int]] | np.ndarray


@dataclass
class Annotated:
    """One image of an export: its id (file stem), size (width, height), marks in paint order."""

    id: str
    name: str
    size: tuple[int, int] | None  # None: nothing to paint and no size given
    marks: list[Mark] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def image_id(name: str) -> str:
    """The dataset id of an image path or URL: its file name without the extension (ValueError: why
    it has none that can name the scribble PNG)."""
    stem = PurePosixPath(name.replace("\\", "/")).stem
    if not stem or stem.startswith("."):
        raise ValueError(f"image name {name[:80]!r} has no usable file name")
    return data.check_id(stem)


def _pixel(x: float, y: float, size: tuple[int, int], off: list[int]) -> tuple[int, int]:
    """The pixel a finite point falls in, clamped to the image; counts clamped points in off[0]."""
    w, h = size
    if not (0 <= x <= w and 0 <= y <= h):
        off[0] += 1
    # clamped before floor: a point far off the image (1e308, or inf once scaled) is a border pixel
    return math.floor(min(max(x, 0), w - 1)), math.floor(min(max(y, 0), h - 1))


def _finite(v: object) -> float | None:
    """A JSON number as a finite float, else None (a bool, NaN, an infinity, an int too large for a float)."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    try:
        f = float(v)
    except OverflowError:
        return None
    return f if math.isfinite(f) else None


def _clamp_warning(off: list[int], what: str) -> list[str]:
    return [f"{off[0]} {what} off the image, clamped to its border"] if off[0] else []


def _whole(v: object) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, str) and re.fullmatch(r"\s*[0-9]{1,12}\s*", v):  # ASCII digits ("²".isdigit() too)
        return int(v)
    return None


def check_size(where: str, width: object, height: object) -> tuple[int, int]:
    """An image size from an export: whole numbers >= 1, within Pillow's decompression-bomb limit."""
    w, h = _whole(width), _whole(height)
    if w is None or h is None or w < 1 or h < 1:
        raise CdspError(f"{where}: invalid image size {width!r}x{height!r}")
    if Image.MAX_IMAGE_PIXELS and w * h > Image.MAX_IMAGE_PIXELS:
        raise CdspError(f"{where}: image size {w}x{h} is over Pillow's decompression-bomb limit of "
                        f"{Image.MAX_IMAGE_PIXELS} pixels")
    return w, h


# ---------------------------------------------------------------------------------------
# CVAT for images 1.1


def _unsafe_member(name: str) -> bool:
    """A zip member name that would land outside the folder it is unpacked into (zip-slip)."""
    parts = name.replace("\\", "/").split("/")
    return name.startswith(("/", "\\")) or bool(re.match(r"^[A-Za-z]:", name)) or ".." in parts


@contextmanager
def _cvat_xml(path: Path) -> Iterator[IO[bytes]]:
    """The annotations.xml of a CVAT export (the file, a folder holding it, or the export zip), opened."""
    if path.is_dir():
        path = path / "annotations.xml"
    if not path.is_file():
        raise CdspError(f"{path}: CVAT export not found")
    if not zipfile.is_zipfile(path):
        if (size := path.stat().st_size) > MAX_EXPORT_BYTES:
            raise CdspError(f"{path}: {size} bytes, over the {MAX_EXPORT_BYTES}-byte limit for an export")
        with open(path, "rb") as fh:
            yield fh
        return
    try:
        with zipfile.ZipFile(path) as zf:
            bad = [i.filename for i in zf.infolist() if _unsafe_member(i.filename)]
            if bad:
                raise CdspError(f"{path}: refused: the zip has a member outside its folder ({bad[0]!r}), "
                                "as a zip-slip attack would")
            info = next((i for i in zf.infolist() if i.filename == "annotations.xml"), None)
            if info is None:
                raise CdspError(f"{path}: no annotations.xml at the top of the zip (export as \"CVAT for images 1.1\")")
            if info.file_size > MAX_EXPORT_BYTES:
                raise CdspError(f"{path}: annotations.xml unpacks to {info.file_size} bytes, over the "
                                f"{MAX_EXPORT_BYTES}-byte limit for an export")
            with zf.open(info) as fh:
                yield fh
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError) as e:  # e.g. a CRC error, found on reading
        raise CdspError(f"{path}: corrupt zip: {e}") from e


def _elements(stream: IO[bytes], path: Path) -> Iterator[Element]:
    """The top-level children of a CVAT XML's <annotations>, each whole, then cleared (memory stays small)."""
    depth = 0
    try:
        for event, elem in iterparse(stream, events=("start", "end"), forbid_dtd=True):
            if event == "start":
                depth += 1
                if depth > MAX_XML_DEPTH:
                    raise CdspError(f"{path}: XML nested deeper than {MAX_XML_DEPTH} levels; not a CVAT export")
                if depth == 1 and elem.tag != "annotations":
                    raise CdspError(f"{path}: root element <{elem.tag}>, not <annotations>: not a CVAT XML export")
                continue
            depth -= 1
            if depth == 1:
                yield elem
                elem.clear()
    except (ParseError, DefusedXmlException) as e:
        raise CdspError(f"{path}: not a readable XML file: {type(e).__name__}: {e}") from e


def _points(text: str | None, where: str) -> list[tuple[float, float]]:
    """CVAT's "x0,y0;x1,y1;..." as finite numbers."""
    try:
        points = [tuple(float(v) for v in pair.split(",")) for pair in (text or "").split(";")]
    except ValueError as e:
        raise CdspError(f"{where}: malformed points {text!r} (expected x0,y0;x1,y1;...)") from e
    if not points or any(len(p) != 2 or not all(map(math.isfinite, p)) for p in points):
        raise CdspError(f"{where}: malformed points {text!r} (expected x0,y0;x1,y1;...)")
    return points  # type: ignore[return-value]


def _cvat_image(elem: Element, path: Path) -> Annotated:
    name = elem.get("name", "")
    where = f"{path}: image {name!r}"
    try:
        ident = image_id(name)
    except ValueError as e:
        raise CdspError(f"{where}: {e}") from e
    size = check_size(where, elem.get("width"), elem.get("height"))
    image = Annotated(ident, name, size)
    shapes, skipped, off = [], {}, [0]
    for n, shape in enumerate(elem, start=1):
        if shape.tag not in CVAT_STROKES:
            skipped[shape.tag] = skipped.get(shape.tag, 0) + 1
            continue
        if shape.get("outside", "0") == "1":
            continue
        at = f"{where}: shape {n} (<{shape.tag}>)"
        label = shape.get("label")
        if not label:
            raise CdspError(f"{at}: no label")
        try:
            z = int(shape.get("z_order", "0"))
        except ValueError as e:
            raise CdspError(f"{at}: z_order {shape.get('z_order')!r} is not a whole number") from e
        points = [_pixel(x, y, size, off) for x, y in _points(shape.get("points"), at)]
        marks = [Mark(label, points)] if shape.tag == "polyline" else [Mark(label, [p]) for p in points]
        shapes.append((z, marks))
    shapes.sort(key=lambda s: s[0])  # stable: document order within a z_order
    image.marks = [m for _, marks in shapes for m in marks]
    image.warnings += [f"{k} {tag} shape{'s' * (k > 1)} skipped (only polylines and points are scribbles)"
                       for tag, k in skipped.items()]
    image.warnings += _clamp_warning(off, "points")
    return image


def read_cvat(path: str | os.PathLike) -> Iterator[Annotated]:
    """Every <image> of a CVAT for images 1.1 export, in file order."""
    path = Path(path)
    with _cvat_xml(path) as stream:
        for elem in _elements(stream, path):
            if elem.tag == "track":
                raise CdspError(f"{path}: holds <track> elements, a \"CVAT for video\" export; export the task "
                                "as \"CVAT for images 1.1\"")
            if elem.tag == "version" and (elem.text or "").strip() != "1.1":
                raise CdspError(f"{path}: CVAT XML version {(elem.text or '').strip()!r}; version 1.1 is supported")
            if elem.tag == "image":
                yield _cvat_image(elem, path)


# ---------------------------------------------------------------------------------------
# Label Studio JSON


class _Bits:
    """Big-endian bit reader over bytes (the RLE's bit stream), on a string of '0'/'1' (fast to slice)."""

    def __init__(self, data: bytes):
        self.bits = bin(int.from_bytes(data, "big"))[2:].zfill(len(data) * 8) if data else ""
        self.i = 0

    def read(self, n: int) -> int:
        if self.i + n > len(self.bits):
            raise ValueError("the RLE ends early")
        self.i += n
        return int(self.bits[self.i - n:self.i], 2)

    def read_bytes(self, n: int) -> np.ndarray:
        """n 8-bit words at once (a literal run: most of a brush stroke's pixels)."""
        if self.i + 8 * n > len(self.bits):
            raise ValueError("the RLE ends early")
        chunk = np.frombuffer(self.bits[self.i:self.i + 8 * n].encode("ascii"), np.uint8) - ord("0")
        self.i += 8 * n
        return np.packbits(chunk)


def decode_rle(rle: list[int], n_values: int) -> np.ndarray:
    """Label Studio's brush RLE (thi.ng rle-pack, as its brush tool writes it) to n_values uint8 values.

    Header: 32 bits value count, 5 bits word size − 1, four 4-bit run-length sizes − 1. Then
    runs: 1 flag bit, 2 bits choosing a run-length size, the run length − 1 in that many bits;
    flag 1 repeats one word that many times, flag 0 is followed by that many words.
    """
    if not all(isinstance(b, int) and 0 <= b <= 255 for b in rle):
        raise ValueError("the RLE is not a list of bytes")
    bits = _Bits(bytes(rle))
    count, word = bits.read(32), bits.read(5) + 1
    if count != n_values:
        raise ValueError(f"the RLE holds {count} values, not width*height*4 = {n_values}")
    if word != 8:
        raise ValueError(f"the RLE has {word}-bit words, not 8-bit")
    sizes = [bits.read(4) + 1 for _ in range(4)]
    out = np.zeros(count, np.uint8)
    i = 0
    while i < count:
        repeat = bits.read(1)
        j = i + 1 + bits.read(sizes[bits.read(2)])
        if j > count:
            raise ValueError("a run goes past the end of the image")
        if repeat:
            out[i:j] = bits.read(word)
        else:
            out[i:j] = bits.read_bytes(j - i) if j - i > 1 else bits.read(word)
        i = j
    return out


def _ls_image_name(task: dict, where: str) -> str:
    """The file name of a task's image: the last part of its URL (Label Studio's upload prefix removed)."""
    data = task.get("data")
    urls = [v for v in data.values() if isinstance(v, str)] if isinstance(data, dict) else []
    url = data.get("image") if isinstance(data, dict) and isinstance(data.get("image"), str) else \
        (urls[0] if len(urls) == 1 else None)
    if url is None:
        raise CdspError(f"{where}: no image URL in data (expected data.image)")
    try:
        parsed = urlparse(url)
        local = parse_qs(parsed.query).get("d")  # local files: /data/local-files/?d=dir/x.jpg
    except ValueError as e:  # e.g. "http://[x" (not an IPv6 address)
        raise CdspError(f"{where}: image URL {redact(url)[:120]!r} cannot be parsed: {e}") from e
    name = (local[0] if local else unquote(parsed.path)).rsplit("/", 1)[-1]
    if parsed.path.startswith("/data/upload/"):
        name = re.sub(r"^[0-9a-f]{8}-", "", name)  # uploads are stored as <8 hex digits>-<name>
    return name


def _ls_size(result: dict, where: str) -> tuple[int, int]:
    return check_size(where, result.get("original_width"), result.get("original_height"))


def _ls_label(value: dict, key: str, where: str) -> str:
    labels = value.get(key)
    if not isinstance(labels, list) or len(labels) != 1 or not isinstance(labels[0], str):
        raise CdspError(f"{where}: {key} must name exactly one label, found {labels!r}")
    return labels[0]


def _ls_task(task: object, n: int, path: Path) -> Annotated:
    where = f"{path}: task {n}"
    if not isinstance(task, dict):
        raise CdspError(f"{where}: not a JSON object")
    name = _ls_image_name(task, where)
    where = f"{path}: task {n} (image {name!r})"
    try:
        ident = image_id(name)
    except ValueError as e:
        raise CdspError(f"{where}: {e}") from e
    annotations = task.get("annotations", task.get("completions", []))
    if not isinstance(annotations, list):
        raise CdspError(f"{where}: annotations is not a list")
    image = Annotated(ident, name, None)
    skipped, off = {}, [0]
    for annotation in annotations:
        if not isinstance(annotation, dict) or not isinstance(annotation.get("result", []), list):
            raise CdspError(f"{where}: an annotation is not an object with a result list")
        if annotation.get("was_cancelled"):
            continue
        for k, result in enumerate(annotation.get("result", []), start=1):
            at = f"{where}: result {k}"
            kind = result.get("type") if isinstance(result, dict) else None
            if kind not in ("brushlabels", "keypointlabels"):
                skipped[str(kind)] = skipped.get(str(kind), 0) + 1
                continue
            value = result.get("value")
            if not isinstance(value, dict):
                raise CdspError(f"{at}: no value object")
            size = _ls_size(result, at)
            if image.size is None:
                image.size = size
            elif size != image.size:
                raise CdspError(f"{at}: original size {size[0]}x{size[1]} differs from the task's "
                                f"{image.size[0]}x{image.size[1]}")
            if result.get("image_rotation", 0) not in (0, None):
                raise CdspError(f"{at}: image_rotation {result['image_rotation']!r} is not supported (rotate the "
                                "image itself, not its view)")
            w, h = size
            if kind == "brushlabels":
                label = _ls_label(value, "brushlabels", at)
                if value.get("format") != "rle" or not isinstance(value.get("rle"), list):
                    raise CdspError(f"{at}: brush format {value.get('format')!r}; only \"rle\" is supported")
                try:
                    rgba = decode_rle(value["rle"], w * h * 4)
                except ValueError as e:
                    raise CdspError(f"{at}: bad brush RLE: {e}") from e
                image.marks.append(Mark(label, rgba.reshape(h, w, 4)[..., 3] >= ALPHA_MIN))
            else:
                label = _ls_label(value, "keypointlabels", at)
                x, y = _finite(value.get("x")), _finite(value.get("y"))
                if x is None or y is None:
                    raise CdspError(f"{at}: keypoint x/y {str(value.get('x'))[:40]}/{str(value.get('y'))[:40]} are "
                                    "not finite numbers")
                image.marks.append(Mark(label, [_pixel(x / 100 * w, y / 100 * h, size, off)]))
    image.warnings += [f"{k} {kind} result{'s' * (k > 1)} skipped (only brushlabels and keypointlabels are "
                       "scribbles)" for kind, k in skipped.items()]
    image.warnings += _clamp_warning(off, "keypoints")
    return image


def read_labelstudio(path: str | os.PathLike) -> Iterator[Annotated]:
    """Every task of a Label Studio JSON export, in file order."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_EXPORT_BYTES:
            raise CdspError(f"{path}: {size} bytes, over the {MAX_EXPORT_BYTES}-byte limit for an export")
        text = path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError as e:
        raise CdspError(f"{path}: Label Studio export not found") from e
    except UnicodeDecodeError as e:
        raise CdspError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); export JSON from Label Studio "
                        "again") from e
    except OSError as e:
        raise CdspError(f"{path}: cannot read: {e}") from e
    try:
        tasks = json.loads(text)
    except (ValueError, RecursionError) as e:  # RecursionError: nested too deep to be an export
        raise CdspError(f"{path}: not valid JSON: {type(e).__name__}: {str(e)[:200]}") from e
    if isinstance(tasks, dict):  # one task (a cloud-storage export holds one per file)
        tasks = [tasks]
    if not isinstance(tasks, list):
        raise CdspError(f"{path}: not a Label Studio JSON export (expected a list of tasks)")
    for n, task in enumerate(tasks, start=1):
        yield _ls_task(task, n, path)
