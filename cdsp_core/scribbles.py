"""Scribble files: annotators' scribbles to PNG (`cdsp convert-scribbles`) and the scribble-quality
variants drop/shrink (`cdsp degrade-scribbles`).

`convert-scribbles --format` reads ScribbleSup XML (below), a CVAT for images 1.1 export or a
Label Studio JSON export (`cdsp_core.annotations` reads those two); all three are painted the
same way by `paint`.

A ScribbleSup XML file holds `annotation/size/{width,height}` and `annotation/polygon`
elements, each a stroke with a `tag` (the class name) and `point`s with `X`, `Y` (0-based
pixels). A stroke joins its points with width-3 lines painted with its class; later strokes
paint over earlier ones; every other pixel is 255.

A stroke of a scribble map is a connected component (8-connectivity) of one class. drop(p)
removes each stroke with probability p but keeps at least one stroke of every image-level
class (every class >= 1 present); shrink(r) keeps of each stroke the contiguous part, about
r of its pixels, around its middle along the stroke (geodesic order from one end).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import zlib
from collections.abc import Iterable
from pathlib import Path
from xml.etree.ElementTree import Element, ParseError

import numpy as np
from defusedxml import DefusedXmlException
from defusedxml.ElementTree import parse
from PIL import Image, ImageDraw
from scipy import ndimage, sparse
from scipy.sparse import csgraph

from cdsp_core import annotations, data, outputs
from cdsp_core.data import IGNORE
from cdsp_core.errors import CdspError

log = logging.getLogger(__name__)

LINE_WIDTH = 3
FORMATS = ("scribblesup", "cvat", "labelstudio")
CONVERT_MARKER = "convert-scribbles.json"
EIGHT = np.ones((3, 3), dtype=bool)  # 8-connectivity


# ---------------------------------------------------------------------------------------
# ScribbleSup XML


def _normalise(name: str) -> str:
    """'TV/Monitor', 'tv monitor' and 'tvmonitor' are one class name."""
    return re.sub(r"[^0-9a-z]", "", name.lower())


def _number(elem: Element | None, what: str, path: Path) -> float:
    """The finite number an element holds (NaN and infinities are refused, as they have no pixel)."""
    text = (elem.text or "").strip() if elem is not None else ""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise CdspError(f"{path}: {what} is missing or not a number (got {text[:40]!r}; a finite one is needed)")
    return value


def xml_to_scribble(xml_path: str | os.PathLike, classes: list[str],
                    size: tuple[int, int] | None = None) -> np.ndarray:
    """Rasterise one ScribbleSup XML file to a uint8 H×W scribble map (255 = unlabelled).

    `size` (width, height), when given, is the image's true size; the XML's own size must
    then agree with it (or be absent).
    """
    path = Path(xml_path)
    try:  # defused: no DTD, no entities (an outside file)
        root = parse(path, forbid_dtd=True).getroot()
    except (ParseError, DefusedXmlException, OSError) as e:
        raise CdspError(f"{path}: not a readable XML file: {type(e).__name__}: {e}") from e

    size_elem = root.find("size")
    if size_elem is not None:
        xml_size = annotations.check_size(str(path), _number(size_elem.find("width"), "size/width", path),
                                          _number(size_elem.find("height"), "size/height", path))
        if size is not None and xml_size != tuple(size):
            raise CdspError(f"{path}: size {xml_size[0]}x{xml_size[1]} differs from its image's "
                            f"{size[0]}x{size[1]}")
        size = xml_size
    if size is None:
        raise CdspError(f"{path}: no annotation/size and no image to take the size from")
    width, height = size

    index = {_normalise(c): i for i, c in enumerate(classes)}
    marks = []
    for n, polygon in enumerate(root.iter("polygon"), start=1):
        tag = (polygon.findtext("tag") or "").strip()
        if _normalise(tag) not in index:
            raise CdspError(f"{path}: polygon {n} has tag {tag!r}, which is not a class "
                            f"(known: {', '.join(classes)})")
        points = [(min(max(round(_number(p.find("X"), f"polygon {n} point X", path)), 0), width - 1),
                   min(max(round(_number(p.find("Y"), f"polygon {n} point Y", path)), 0), height - 1))
                  for p in polygon.iter("point")]
        marks.append((index[_normalise(tag)], points))
    return paint((width, height), marks)


def paint(size: tuple[int, int], marks: Iterable[tuple[int, list[tuple[int, int]] | np.ndarray]]) -> np.ndarray:
    """A uint8 H×W scribble map (255 elsewhere) of (class, mark) pairs, later marks over earlier ones.

    A mark is a list of pixel points inside the image (one point: a width-3 dab; more: width-3
    lines joining them) or a boolean H×W mask (a brush stroke, painted as it is).
    """
    width, height = size
    canvas = Image.new("L", (width, height), IGNORE)
    draw = ImageDraw.Draw(canvas)
    for value, mark in marks:
        if isinstance(mark, np.ndarray):
            canvas.paste(value, (0, 0, width, height), Image.fromarray(mark.astype(np.uint8) * 255))
        elif len(mark) == 1:  # a dab: a width-3 square
            (x, y), r = mark[0], LINE_WIDTH // 2
            draw.rectangle([x - r, y - r, x + r, y + r], fill=value)
        elif mark:
            draw.line(mark, fill=value, width=LINE_WIDTH, joint="curve")
    return np.array(canvas, dtype=np.uint8)


def convert_scribbles(xml_dir: str | os.PathLike, image_dir: str | os.PathLike, out_dir: str | os.PathLike,
                      classes_file: str | os.PathLike | None = None) -> int:
    """Convert every `<id>.xml` in xml_dir to `out_dir/<id>.png`; returns the number written."""
    xml_dir, image_dir = Path(xml_dir), Path(image_dir)
    classes = data.read_class_file(classes_file) if classes_file else list(data.VOC_CLASSES)
    xml_files = sorted(xml_dir.glob("*.xml"))
    if not xml_files:
        raise CdspError(f"{xml_dir}: no .xml files found")
    with outputs.output_dir(out_dir, "scribbles", inputs=[xml_dir, image_dir]) as tmp:
        for xml_path in xml_files:
            image = next((p for ext in data.IMAGE_EXTS if (p := image_dir / (xml_path.stem + ext)).is_file()), None)
            if image is None:
                raise CdspError(f"{xml_path}: no image {xml_path.stem}.jpg in {image_dir}")
            scribble = xml_to_scribble(xml_path, classes, size=data.image_size(image))
            Image.fromarray(scribble).save(tmp / f"{xml_path.stem}.png")
        provenance = {"xml_dir": str(xml_dir), "image_dir": str(image_dir), "classes": classes,
                      "count": len(xml_files)}
        (tmp / CONVERT_MARKER).write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
    log.info("converted %d ScribbleSup XML files to %s", len(xml_files), out_dir)
    return len(xml_files)


def convert_export(fmt: str, export: str | os.PathLike, out_dir: str | os.PathLike,
                   classes_file: str | os.PathLike | None = None, image_dir: str | os.PathLike | None = None) -> int:
    """A CVAT ("cvat") or Label Studio ("labelstudio") export to `out_dir/<id>.png`; returns the number written.

    Images with nothing to paint (not annotated yet, or only shapes that are not scribbles) get
    no PNG; they are listed in the provenance file. With `image_dir`, every painted image must
    be there (`<id>.jpg` or another image suffix) with the export's size.
    """
    readers = {"cvat": annotations.read_cvat, "labelstudio": annotations.read_labelstudio}
    if fmt not in readers:
        raise CdspError(f"unknown export format {fmt!r} (use {', '.join(readers)})")
    export, image_dir = Path(export), Path(image_dir) if image_dir else None
    classes = data.read_class_file(classes_file) if classes_file else list(data.VOC_CLASSES)
    index = {_normalise(c): i for i, c in enumerate(classes)}
    names: dict[str, str] = {}
    written, unannotated, warnings = [], [], []
    with outputs.output_dir(out_dir, "scribbles", inputs=[export, image_dir]) as tmp:
        for image in readers[fmt](export):
            where = f"{export}: image {image.name!r}"
            if image.id in names:
                raise CdspError(f"{where}: image {names[image.id]!r} has the same id {image.id!r}; "
                                "image file names must be unique")
            names[image.id] = image.name
            for w in image.warnings:
                log.warning("%s: %s", where, w)
                warnings.append(f"{image.name}: {w}")
            if not image.marks:
                unannotated.append(image.id)
                continue
            unknown = next((m.label for m in image.marks if _normalise(m.label) not in index), None)
            if unknown is not None:
                raise CdspError(f"{where}: label {unknown!r} is not a class (known: {', '.join(classes)}); "
                                "pass --classes with it")
            if image_dir is not None:
                path = next((p for ext in data.IMAGE_EXTS if (p := image_dir / (image.id + ext)).is_file()), None)
                if path is None:
                    raise CdspError(f"{where}: no image {image.id}.jpg in {image_dir}")
                if data.image_size(path) != image.size:
                    w, h = data.image_size(path)
                    raise CdspError(f"{where}: size {image.size[0]}x{image.size[1]} differs from {path}'s {w}x{h}")
            scribble = paint(image.size, [(index[_normalise(m.label)], m.points) for m in image.marks])
            Image.fromarray(scribble).save(tmp / f"{image.id}.png")
            written.append(image.id)
        if not written:
            raise CdspError(f"{export}: no scribbles to convert (CVAT: polylines or points; Label Studio: "
                            "brushlabels or keypointlabels)")
        provenance = {"format": fmt, "export": str(export), "image_dir": str(image_dir or ""), "classes": classes,
                      "count": len(written), "unannotated": unannotated, "warnings": warnings}
        (tmp / CONVERT_MARKER).write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
    log.info("converted %d %s images to %s (%d without scribbles)", len(written), fmt, out_dir, len(unannotated))
    return len(written)


# ---------------------------------------------------------------------------------------
# Scribble quality: drop and shrink


def strokes(scribble: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """Label the strokes: (H×W int map, 0 = none, k = stroke k), and each stroke's class."""
    labels = np.zeros(scribble.shape, np.int32)
    stroke_class: list[int] = []
    for value in np.unique(scribble):
        if value == IGNORE:
            continue
        comp, n = ndimage.label(scribble == value, structure=EIGHT)
        labels[comp > 0] = comp[comp > 0] + len(stroke_class)
        stroke_class += [int(value)] * n
    return labels, stroke_class


def _geodesic_order(mask: np.ndarray) -> np.ndarray:
    """Flat indices of a connected mask's pixels, ordered by geodesic distance from one end.

    One end = the pixel farthest (along the stroke, 8-connected steps) from an arbitrary
    pixel; the classic two-sweep estimate of a path's endpoints.
    """
    flat = np.flatnonzero(mask)
    h, w = mask.shape
    node = -np.ones(mask.size, np.int64)
    node[flat] = np.arange(len(flat))
    ys, xs = np.divmod(flat, w)
    rows, cols = [], []
    for dy, dx in ((0, 1), (1, -1), (1, 0), (1, 1)):  # each undirected 8-neighbour pair once
        ny, nx = ys + dy, xs + dx
        ok = (ny < h) & (nx >= 0) & (nx < w)
        nb = node[ny[ok] * w + nx[ok]]
        rows.append(np.arange(len(flat))[ok][nb >= 0])
        cols.append(nb[nb >= 0])
    r, c = np.concatenate(rows), np.concatenate(cols)
    graph = sparse.coo_matrix((np.ones(len(r)), (r, c)), shape=(len(flat), len(flat))).tocsr()
    far = int(np.argmax(csgraph.shortest_path(graph, directed=False, unweighted=True, indices=0)))
    dist = csgraph.shortest_path(graph, directed=False, unweighted=True, indices=far)
    return flat[np.argsort(dist, kind="stable")]


def degrade(scribble: np.ndarray, mode: str, ratio: float, rng: np.random.Generator) -> np.ndarray:
    """A worse copy of a scribble map: mode 'drop' (probability `ratio`) or 'shrink' (keep `ratio`)."""
    if mode not in ("drop", "shrink"):
        raise CdspError(f"unknown degradation mode {mode!r} (drop or shrink)")
    if mode == "drop" and not 0.0 <= ratio <= 1.0:  # also NaN
        raise CdspError(f"--ratio {ratio}: not a probability in [0, 1] (the share of strokes drop removes)")
    if mode == "shrink" and not 0.0 < ratio <= 1.0:
        raise CdspError(f"--ratio {ratio}: not a fraction in (0, 1] (the share of each stroke shrink keeps)")
    labels, stroke_class = strokes(scribble)
    out = np.full_like(scribble, IGNORE)
    if not stroke_class:
        return out
    if mode == "drop":
        keep = rng.random(len(stroke_class)) >= ratio
        for c in set(stroke_class) - {0}:  # every image-level class keeps one stroke
            mine = [k for k, sc in enumerate(stroke_class) if sc == c]
            if not keep[mine].any():
                keep[rng.choice(mine)] = True
        kept = np.concatenate([[False], keep])[labels]
        out[kept] = scribble[kept]
        return out
    for k in range(1, len(stroke_class) + 1):
        order = _geodesic_order(labels == k)
        n = max(1, round(ratio * len(order)))
        start = (len(order) - n) // 2
        part = order[start:start + n]
        out.flat[part] = stroke_class[k - 1]
    return out


def degrade_dir(scribble_dir: str | os.PathLike, out_dir: str | os.PathLike, mode: str, ratio: float,
                seed: int) -> int:
    """Degrade every `<id>.png` of a folder into out_dir; returns the number written.

    Each file's random stream depends on (seed, its name) only, so a file's result does not
    depend on which other files the folder holds.
    """
    src = Path(scribble_dir)
    files = sorted(src.glob("*.png"))
    if not files:
        raise CdspError(f"{src}: no .png scribbles found")
    degrade(np.zeros((1, 1), np.uint8), mode, ratio, np.random.default_rng(0))  # check the arguments first
    with outputs.output_dir(out_dir, "degraded-scribbles", inputs=[src]) as tmp:
        for path in files:
            rng = np.random.default_rng([seed, zlib.crc32(path.stem.encode())])
            Image.fromarray(degrade(data.read_label(path), mode, ratio, rng)).save(tmp / path.name)
        provenance = {"scribbles": str(src), "mode": mode, "ratio": ratio, "seed": seed, "count": len(files)}
        (tmp / "degrade-scribbles.json").write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
    log.info("wrote %d %s(%g) scribbles to %s", len(files), mode, ratio, out_dir)
    return len(files)


def add_subcommand(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("convert-scribbles", help="ScribbleSup XML, CVAT or Label Studio scribbles to PNGs",
                              description="Rasterise scribbles (line width 3, later strokes over earlier ones, "
                                          "255 elsewhere) to mode-L PNGs named after the images.")
    p.add_argument("--format", default="scribblesup", choices=FORMATS,
                   help="scribblesup: a folder of ScribbleSup XML files (--xml-dir); cvat: a CVAT for images 1.1 "
                        "export, annotations.xml or its zip (--export); labelstudio: a Label Studio JSON export "
                        "(--export). Default: scribblesup")
    p.add_argument("--xml-dir", default=None, help="scribblesup: folder of <id>.xml files")
    p.add_argument("--export", default=None, help="cvat: annotations.xml, its folder or the export zip; "
                                                  "labelstudio: the JSON export file")
    p.add_argument("--image-dir", default=None, help="folder of the <id>.jpg images: gives each size (scribblesup, "
                                                     "required) or checks it (cvat, labelstudio)")
    p.add_argument("--out", required=True, help="output folder of <id>.png scribbles")
    p.add_argument("--classes", default=None,
                   help="class list: labelmap.txt or classes.txt (default: the 21 VOC classes)")
    p.set_defaults(func=_run_convert)

    p = subparsers.add_parser("degrade-scribbles", help="worse scribbles for robustness tests (drop/shrink)",
                              description="drop: remove each stroke with probability R, keeping one stroke "
                                          "per image-level class; shrink: keep about R of each stroke "
                                          "around its middle.")
    p.add_argument("--scribbles", required=True, help="folder of <id>.png scribbles")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--mode", required=True, choices=["drop", "shrink"], help="drop or shrink")
    p.add_argument("--ratio", required=True, type=float, help="drop probability, or fraction kept by shrink")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.set_defaults(func=_run_degrade)


def _run_convert(args: argparse.Namespace) -> None:
    if args.format == "scribblesup":
        if args.export or not (args.xml_dir and args.image_dir):
            raise CdspError("--format scribblesup reads --xml-dir and --image-dir (not --export)")
        n = convert_scribbles(args.xml_dir, args.image_dir, args.out, args.classes)
        print(f"converted {n} XML files to {args.out}")
        return
    if args.xml_dir or not args.export:
        raise CdspError(f"--format {args.format} reads --export (not --xml-dir)")
    n = convert_export(args.format, args.export, args.out, args.classes, args.image_dir)
    print(f"converted {n} {args.format} images to {args.out}")


def _run_degrade(args: argparse.Namespace) -> None:
    n = degrade_dir(args.scribbles, args.out, args.mode, args.ratio, args.seed)
    print(f"wrote {n} {args.mode}({args.ratio:g}) scribbles to {args.out}")
