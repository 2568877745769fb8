"""`cdsp synth`: a synthetic scribble-segmentation dataset that behaves like a real one.

Four foreground classes, each a shape with its own texture (disc with spots, box with
stripes, triangle with a checkerboard, star with concentric rings), drawn in random colours,
sizes, rotations and lighting over cluttered, textured backgrounds whose clutter borrows
object textures in blob and line shapes, so neither colour nor texture alone gives a class
away. 1-3 objects per image, later ones occluding earlier ones. The sizes and the amount of
clutter are set so that the problem separates supervision signals: a plain network learns the
classes from 400 images, and full masks teach it clearly more than scribbles do
(docs/benchmarks.md, "The synthetic data"). Scribbles are width-3 strokes along each object's interior plus a few
background strokes (about 3-8% of the pixels), as an annotator would draw them. Full ground
truth goes to SegmentationClass/ (mode P, VOC palette). Deterministic for a seed: image i
of a split depends only on (seed, split, i).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from cdsp_core.data import DEFAULT_SCRIBBLE_DIR, IGNORE, IMAGE_DIR, voc_palette
from cdsp_core.errors import CdspError
from cdsp_core.outputs import output_dir

log = logging.getLogger(__name__)

CLASSES = ["background", "disc", "box", "triangle", "star"]
SPLIT_DIR = "ImageSets/Segmentation"
GT_DIR = "SegmentationClass"
MARKER = "synth.json"
SUPERSAMPLE = 2  # the image is rendered at 2x and averaged down: soft, anti-aliased edges


# ---------------------------------------------------------------------------------------
# Shapes and textures, as functions of an object's local coordinates (u, v): the object's
# centre is the origin and its radius 1.


def _shape(cls: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    if cls == 1:  # disc (an ellipse, through the aspect ratio)
        return u * u + v * v <= 1.0
    if cls == 2:  # box
        return (np.abs(u) <= 0.85) & (np.abs(v) <= 0.85)
    if cls == 3:  # equilateral triangle in the circle of radius 1.15
        u, v = u / 1.15, v / 1.15
        s3 = math.sqrt(3.0)
        return (v >= -0.5) & (s3 * u + v <= 1.0) & (-s3 * u + v <= 1.0)
    if cls == 4:  # five-pointed star, outer radius 1.1, inner 0.5
        r = np.hypot(u, v) / 1.1
        psi = np.abs(np.mod(np.arctan2(v, u), 2 * math.pi / 5) - math.pi / 5)
        x2, y2 = 0.5 * math.cos(math.pi / 5), 0.5 * math.sin(math.pi / 5)
        return r * (y2 * np.cos(psi) + (1 - x2) * np.sin(psi)) <= y2
    raise ValueError(cls)


def _texture(kind: int, u: np.ndarray, v: np.ndarray, freq: float, phase: float) -> np.ndarray:
    """A two-tone pattern in [0, 1] (0: first colour, 1: second)."""
    if kind == 1:  # spots
        du, dv = np.mod(u * freq + phase, 1.0) - 0.5, np.mod(v * freq + phase, 1.0) - 0.5
        return (du * du + dv * dv < 0.09).astype(np.float32)
    if kind == 2:  # stripes
        return (np.mod(u * freq + phase, 1.0) < 0.5).astype(np.float32)
    if kind == 3:  # checkerboard
        return (np.mod(np.floor(u * freq + phase) + np.floor(v * freq + phase), 2) == 1).astype(np.float32)
    if kind == 4:  # concentric rings
        return (np.mod(np.hypot(u, v) * freq + phase, 1.0) < 0.5).astype(np.float32)
    if kind == 5:  # grid lines (clutter only)
        return ((np.mod(u * freq + phase, 1.0) < 0.28) | (np.mod(v * freq + phase, 1.0) < 0.28)).astype(np.float32)
    raise ValueError(kind)


TEXTURE_FREQ = {1: (2.5, 4.0), 2: (2.0, 3.5), 3: (1.5, 2.5), 4: (2.0, 3.5), 5: (1.8, 3.0)}


def _local(x: np.ndarray, y: np.ndarray, obj: dict) -> tuple[np.ndarray, np.ndarray]:
    dx, dy = x - obj["cx"], y - obj["cy"]
    c, s = math.cos(obj["angle"]), math.sin(obj["angle"])
    return (c * dx + s * dy) / obj["radius"], (-s * dx + c * dy) / (obj["radius"] * obj["aspect"])


def _window(obj: dict, reach: float, size: int, scale: int) -> tuple[slice, slice]:
    """The rows and columns of a size*scale grid within `reach` radii of an object's centre."""
    r = reach * obj["radius"]
    lo_x, hi_x = max(0, int((obj["cx"] - r) * scale)), min(size * scale, int((obj["cx"] + r) * scale) + 1)
    lo_y, hi_y = max(0, int((obj["cy"] - r) * scale)), min(size * scale, int((obj["cy"] + r) * scale) + 1)
    return slice(lo_y, max(lo_y, hi_y)), slice(lo_x, max(lo_x, hi_x))


@functools.lru_cache(maxsize=4)
def _grid(size: int, scale: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates, in 1x pixel units, of a size*scale square grid (read-only, cached)."""
    c = (np.arange(size * scale, dtype=np.float32) + 0.5) / scale
    x, y = np.meshgrid(c, c)
    x.flags.writeable = y.flags.writeable = False
    return x, y


def _colour_pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two random colours far enough apart for the texture to show."""
    while True:
        a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        if np.abs(a - b).sum() > 150:
            return a.astype(np.float32), b.astype(np.float32)


def _smooth_noise(rng: np.random.Generator, n: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1] over an n x n grid."""
    coarse = Image.fromarray(rng.random((cells, cells), dtype=np.float32), mode="F")
    return np.asarray(coarse.resize((n, n), Image.BICUBIC)).clip(0, 1)


def _paint(canvas: np.ndarray, mask: np.ndarray, colours: tuple[np.ndarray, np.ndarray],
           pattern: np.ndarray, shade: np.ndarray | float = 1.0) -> None:
    a, b = colours
    shade = np.broadcast_to(np.asarray(shade, dtype=np.float32), mask.shape)[mask]
    canvas[mask] = (a + pattern[mask][:, None] * (b - a)) * shade[:, None]


# ---------------------------------------------------------------------------------------
# Scene


def _background(rng: np.random.Generator, size: int, x2: np.ndarray, y2: np.ndarray) -> np.ndarray:
    """Textured, cluttered background at the supersampled resolution (float RGB)."""
    n = size * SUPERSAMPLE
    c1, c2 = _colour_pair(rng)
    c2 = c1 + (c2 - c1) * rng.uniform(0.3, 0.7)  # a lower-contrast base than the objects
    canvas = c1 + _smooth_noise(rng, n, rng.integers(3, 7))[..., None] * (c2 - c1)
    # clutter: irregular blobs, some with an object texture, and thick lines
    for _ in range(rng.integers(2, 5)):
        blob = {"cx": rng.uniform(0, size), "cy": rng.uniform(0, size), "radius": rng.uniform(0.06, 0.18) * size,
                "aspect": rng.uniform(0.3, 1.0), "angle": rng.uniform(0, math.pi)}
        win = _window(blob, 1.5, size, SUPERSAMPLE)
        u, v = _local(x2[win], y2[win], blob)
        if u.size == 0:
            continue
        # an amoeba: a radius that wobbles slowly with the angle (1-3 lobes, no star-like points)
        lobes, phase = rng.uniform(-0.3, 0.3, 3), rng.uniform(0, 2 * math.pi, 3)
        angle = np.arctan2(v, u)
        radius = 1.0 + sum(a * np.cos((k + 1) * angle + p) for k, (a, p) in enumerate(zip(lobes, phase)))
        mask = u * u + v * v <= radius * radius
        if rng.random() < 0.3:  # stripes or checkerboard (object textures) or a grid, never object shapes
            kind = int(rng.choice([2, 3, 5]))
            pattern = _texture(kind, u, v, rng.uniform(*TEXTURE_FREQ[kind]), rng.random())
        else:
            pattern = _smooth_noise(rng, max(u.shape), 4)[:u.shape[0], :u.shape[1]]
        _paint(canvas[win], mask, _colour_pair(rng), pattern)
    img = Image.fromarray(canvas.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.integers(1, 4)):
        pts = [tuple(p) for p in rng.uniform(0, n, (int(rng.integers(2, 4)), 2))]
        draw.line(pts, fill=tuple(int(c) for c in rng.uniform(0, 255, 3)),
                  width=int(rng.integers(2, 5)) * SUPERSAMPLE)
    return np.asarray(img, dtype=np.float32)


def _new_object(rng: np.random.Generator, size: int) -> dict:
    cls = int(rng.integers(1, len(CLASSES)))
    return {"cls": cls, "cx": rng.uniform(0.15, 0.85) * size, "cy": rng.uniform(0.15, 0.85) * size,
            "radius": rng.uniform(0.22, 0.34) * size, "aspect": rng.uniform(0.65, 1.0),
            "angle": rng.uniform(0, 2 * math.pi)}


def make_sample(size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One (image H×W×3, ground truth H×W, scribble H×W) triple, all uint8."""
    x1, y1 = _grid(size, 1)
    x2, y2 = _grid(size, SUPERSAMPLE)
    canvas = _background(rng, size, x2, y2)
    gt = np.zeros((size, size), np.uint8)
    instance = np.zeros((size, size), np.int32)  # which object owns each pixel (0: none)
    objects: list[dict] = []
    n_objects = int(rng.choice([1, 2, 3], p=[0.4, 0.4, 0.2]))
    for attempt in range(100):  # a few tries per object, and never an image without one
        if len(objects) == n_objects or (objects and attempt >= 6 * n_objects):
            break
        obj = _new_object(rng, size)
        mask = np.zeros((size, size), bool)
        win = _window(obj, 1.25, size, 1)
        mask[win] = _shape(obj["cls"], *_local(x1[win], y1[win], obj))
        # occlusion is welcome, but every object (earlier ones too) must stay clearly visible
        trial = np.where(mask, len(objects) + 1, instance)
        areas = np.bincount(trial.ravel(), minlength=len(objects) + 2)[1:]
        full = [o["area"] for o in objects] + [int(mask.sum())]
        if min(full) < 30 or any(a < 0.5 * f for a, f in zip(areas, full)):
            continue
        obj["area"] = int(mask.sum())
        objects.append(obj)
        instance, gt = trial, np.where(mask, obj["cls"], gt).astype(np.uint8)
        # paint at the supersampled resolution: two colours in the class texture, lit from one side
        win = _window(obj, 1.25, size, SUPERSAMPLE)
        u, v = _local(x2[win], y2[win], obj)
        freq = rng.uniform(*TEXTURE_FREQ[obj["cls"]])
        light = rng.uniform(0, 2 * math.pi)
        shade = 1.0 + rng.uniform(0.1, 0.3) * (u * math.cos(light) + v * math.sin(light)) / 2
        _paint(canvas[win], _shape(obj["cls"], u, v), _colour_pair(rng),
               _texture(obj["cls"], u, v, freq, rng.random()), shade)

    s = SUPERSAMPLE
    image = canvas.reshape(size, s, size, s, 3).mean(axis=(1, 3))
    image += rng.normal(0, rng.uniform(2, 6), image.shape)  # sensor noise
    image = image.clip(0, 255).astype(np.uint8)
    scribble = _scribbles(rng, gt, instance, objects)
    return image, gt, scribble


# ---------------------------------------------------------------------------------------
# Scribbles


def _longest_run(points: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """The longest contiguous run of `points` (N×2, x/y) whose `ok` flag is set."""
    best, start = (0, 0), None
    for i, good in enumerate(list(ok) + [False]):
        if good and start is None:
            start = i
        elif not good and start is not None:
            if i - start > best[1] - best[0]:
                best = (start, i)
            start = None
    return points[best[0]:best[1]]


def _inside(points: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    h, w = allowed.shape
    xi, yi = np.round(points[:, 0] - 0.5).astype(int), np.round(points[:, 1] - 0.5).astype(int)
    ok = (xi >= 0) & (yi >= 0) & (xi < w) & (yi < h)
    ok[ok] = allowed[yi[ok], xi[ok]]
    return ok


def _object_stroke(rng: np.random.Generator, region: np.ndarray) -> np.ndarray:
    """A wavy stroke along the main axis of `region` (the pixels a width-3 line may centre on)."""
    ys, xs = np.nonzero(region)
    centre = np.array([xs.mean(), ys.mean()]) + 0.5
    cov = np.cov(np.stack([xs, ys])) if len(xs) > 1 else np.eye(2)
    axis = np.linalg.eigh(cov)[1][:, -1]
    if rng.random() < 0.3:  # annotators do not always follow the long axis
        axis = np.array([axis[1], -axis[0]])
    normal = np.array([-axis[1], axis[0]])
    half = np.sqrt(len(xs)) * 1.5
    t = np.arange(-half, half, 1.0)
    amplitude, period, phase = rng.uniform(0.5, 2.5), rng.uniform(15, 35), rng.uniform(0, 2 * math.pi)
    offset = rng.uniform(-1.5, 1.5) + amplitude * np.sin(2 * math.pi * t / period + phase)
    points = centre + t[:, None] * axis + offset[:, None] * normal
    run = _longest_run(points, _inside(points, region))
    if len(run) < 3:  # a small or thin region: a dab at its deepest point
        y, x = np.unravel_index(np.argmax(ndimage.distance_transform_edt(region)), region.shape)
        return np.array([[x + 0.5, y + 0.5], [x + 1.5, y + 0.5]])
    keep = rng.uniform(0.7, 0.95)  # annotators stop short of the object's ends
    n = max(3, int(len(run) * keep))
    first = int(rng.integers(0, len(run) - n + 1))
    return run[first:first + n]


def _background_stroke(rng: np.random.Generator, region: np.ndarray, size: int) -> np.ndarray | None:
    """A meandering stroke through the background, starting anywhere in `region`."""
    ys, xs = np.nonzero(region)
    if len(xs) == 0:
        return None
    k = int(rng.integers(len(xs)))
    start = np.array([xs[k], ys[k]], dtype=float) + 0.5
    heading = rng.uniform(0, 2 * math.pi)
    n = int(rng.uniform(0.2, 0.4) * size)
    turns = np.cumsum(rng.normal(0, 0.12, 2 * n))
    halves = []
    for direction, turn in ((0.0, turns[:n]), (math.pi, turns[n:])):  # grow both ways from the start
        angles = heading + direction + turn
        steps = np.stack([np.cos(angles), np.sin(angles)], axis=1)
        pts = start + np.cumsum(steps, axis=0)
        ok = _inside(pts, region)
        stop = int(np.argmin(ok)) if not ok.all() else len(ok)
        halves.append(pts[:stop])
    return np.concatenate([halves[1][::-1], start[None], halves[0]])


def _scribbles(rng: np.random.Generator, gt: np.ndarray, instance: np.ndarray, objects: list[dict]) -> np.ndarray:
    size = gt.shape[0]
    canvas = Image.new("L", (size, size), IGNORE)
    draw = ImageDraw.Draw(canvas)

    def stroke(points: np.ndarray | None, value: int) -> None:
        if points is not None and len(points) >= 2:
            # PIL's pixel centres are at integer coordinates; ours at +0.5
            draw.line([tuple(p) for p in points - 0.5], fill=value, width=3)

    background = ndimage.distance_transform_edt(gt == 0) >= 2
    for _ in range(int(rng.integers(2, 4))):
        stroke(_background_stroke(rng, background, size), 0)
    for k, obj in enumerate(objects, start=1):
        mine = instance == k
        region = ndimage.distance_transform_edt(mine) >= 2  # a width-3 line centred here stays inside
        if not region.any():
            region = mine
        stroke(_object_stroke(rng, region), obj["cls"])
    scribble = np.asarray(canvas).copy()
    scribble[(scribble != IGNORE) & (scribble != gt)] = IGNORE  # never label a pixel wrongly
    return scribble


# ---------------------------------------------------------------------------------------
# The dataset


def make_dataset(out_dir: str | Path, n_train: int = 400, n_val: int = 100, size: int = 96,
                 seed: int = 0) -> Path:
    """Write the synthetic dataset to `out_dir` (VOC layout, classes.txt, full ground truth)."""
    if n_train < 1 or n_val < 0:
        raise CdspError(f"{out_dir}: need at least one training image (got --n-train {n_train}, --n-val {n_val})")
    if size < 32:
        raise CdspError(f"{out_dir}: --size {size} is too small; use 32 pixels or more")
    palette = voc_palette()
    out = Path(out_dir)
    with output_dir(out, "synthetic-dataset") as tmp:
        for sub in (IMAGE_DIR, DEFAULT_SCRIBBLE_DIR, GT_DIR, SPLIT_DIR):
            (tmp / sub).mkdir(parents=True)
        for split_code, (split, n) in enumerate((("train", n_train), ("val", n_val))):
            ids = [f"{split}_{i:05d}" for i in range(n)]
            for i, image_id in enumerate(ids):
                image, gt, scribble = make_sample(size, np.random.default_rng([seed, split_code, i]))
                Image.fromarray(image).save(tmp / IMAGE_DIR / f"{image_id}.jpg", quality=95)
                Image.fromarray(scribble).save(tmp / DEFAULT_SCRIBBLE_DIR / f"{image_id}.png")
                gt_png = Image.fromarray(gt).convert("P")  # index = class
                gt_png.putpalette(palette)
                gt_png.save(tmp / GT_DIR / f"{image_id}.png")
            if ids:
                (tmp / SPLIT_DIR / f"{split}.txt").write_text("\n".join(ids) + "\n", encoding="utf-8")
        (tmp / "classes.txt").write_text("\n".join(CLASSES) + "\n", encoding="utf-8")
        params = {"n_train": n_train, "n_val": n_val, "size": size, "seed": seed, "classes": CLASSES}
        (tmp / MARKER).write_text(json.dumps(params, indent=2) + "\n", encoding="utf-8")
    log.info("wrote %d training and %d validation images of %dpx to %s", n_train, n_val, size, out)
    return out


def add_subcommand(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("synth", help="write the synthetic demo dataset",
                              description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output dataset folder (VOC layout)")
    p.add_argument("--n-train", type=int, default=400, help="training images (default: 400)")
    p.add_argument("--n-val", type=int, default=100, help="validation images (default: 100)")
    p.add_argument("--size", type=int, default=96, help="image side in pixels (default: 96)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> None:
    make_dataset(args.out, args.n_train, args.n_val, args.size, args.seed)
    print(f"wrote the synthetic dataset ({args.n_train} train, {args.n_val} val, {args.size}px) to {args.out}")
