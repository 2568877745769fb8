"""The dataset on disk: class lists, label and image reading, the VOC layout, `load_index`.

Layout (VOC style): `JPEGImages/<id>.jpg`, scribbles `<scribble_dir>/<id>.png`, optional
ground truth `SegmentationClassAug/` or `SegmentationClass/`, lists
`ImageSets/Segmentation{,Aug}/{train,val}.txt`. A scribble or label map is uint8 H×W:
value = class index, 255 = unlabelled (ignored).
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from cdsp_core.errors import CdspError
from cdsp_core.outputs import confined

log = logging.getLogger(__name__)

VOC_CLASSES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
]
IGNORE = 255  # unlabelled / void pixels in scribbles, pseudo-labels and ground truth

DEFAULT_SCRIBBLE_DIR = "pascal_2012_scribble"
IMAGE_DIR = "JPEGImages"
GT_DIRS = ("SegmentationClassAug", "SegmentationClass")  # first found per image wins
SPLIT_DIRS = ("ImageSets/SegmentationAug", "ImageSets/Segmentation")  # first existing wins
SPLITS = ("train", "val")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")
MANIFEST = "manifest.json"


def voc_palette() -> list[int]:
    """The PASCAL VOC colour map (768 values), as in the devkit's `labelcolormap`."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


def class_colours(n: int) -> list[tuple[int, int, int]]:
    """The RGB colours of classes 0..n−1 in the VOC palette (how label PNGs and overlays paint them)."""
    p = voc_palette()
    return [(p[3 * i], p[3 * i + 1], p[3 * i + 2]) for i in range(n)]


# ---------------------------------------------------------------------------------------
# Which files a dataset root holds


class RootFiles:
    """The files under a dataset root: on disk, or given as a listing of relative paths
    ('/'-separated), e.g. of an S3 prefix whose objects are not downloaded (prepare.py)."""

    def __init__(self, root: Path, listing: Collection[str] | None = None):
        self.root = root
        self.listing = None if listing is None else set(listing)
        self.dirs = None if listing is None else {rel.rsplit("/", 1)[0] for rel in self.listing if "/" in rel}
        if self.dirs is not None:  # every ancestor folder too
            self.dirs |= {d.rsplit("/", k)[0] for d in self.dirs for k in range(1, d.count("/") + 1)}

    def is_file(self, rel: str) -> bool:
        return (self.root / rel).is_file() if self.listing is None else Path(rel).as_posix() in self.listing

    def is_dir(self, rel: str) -> bool:
        return (self.root / rel).is_dir() if self.dirs is None else Path(rel).as_posix() in self.dirs


# ---------------------------------------------------------------------------------------
# Class lists


CLASS_FILES = ("labelmap.txt", "classes.txt")  # first found wins


def read_classes(root: str | os.PathLike, files: RootFiles | None = None) -> list[str]:
    """Class names of a dataset root, index = class: `labelmap.txt`, else `classes.txt`, else VOC's 21."""
    root = Path(root)
    files = files or RootFiles(root)
    for name in CLASS_FILES:
        if files.is_file(name):
            return read_class_file(root / name)
    return list(VOC_CLASSES)


def read_class_file(path: str | os.PathLike) -> list[str]:
    """A class list file; the first row is class 0, the background.

    Either CVAT/Datumaro's labelmap.txt (rows `name:r,g,b:parts:actions`, `#` lines are
    comments) or a plain list (one name per line); a file whose rows hold `:` is a labelmap.
    """
    path = Path(path)
    rows = _lines(path)
    labelmap = path.name == "labelmap.txt" or (rows and all(":" in r for r in rows))
    names = [r.split(":", 1)[0].strip() if labelmap else r for r in rows]
    if any(not n for n in names):
        raise CdspError(f"{path}: a row has an empty class name")
    dupes = sorted(n for n, k in Counter(names).items() if k > 1)
    if dupes:
        raise CdspError(f"{path}: duplicate class names {dupes}")
    if not 2 <= len(names) <= IGNORE:
        raise CdspError(f"{path}: needs 2 to {IGNORE} classes (background first), found {len(names)}")
    return names


def _lines(path: Path) -> list[str]:
    """Non-empty, non-comment lines of a small text file (a final newline is optional)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise CdspError(f"{path}: cannot read: {e}") from e
    return [ln for ln in (raw.strip() for raw in text.splitlines()) if ln and not ln.startswith("#")]


# ---------------------------------------------------------------------------------------
# Images and label maps


@contextmanager
def _opened(path: str | os.PathLike, what: str) -> Iterator[Image.Image]:
    """Open an image with Pillow, turning every way it can fail into a CdspError.

    Images over Pillow's decompression-bomb limit are refused: Pillow itself raises above
    twice the limit and only warns between once and twice it. (The size is checked here
    rather than by turning the warning into an error, which would not be thread-safe.)
    """
    limit = Image.MAX_IMAGE_PIXELS
    try:
        with Image.open(path) as im:
            if limit and im.width * im.height > limit:
                raise CdspError(f"{path}: {what} of {im.width}x{im.height} pixels is too large (Pillow's "
                                f"decompression-bomb limit is {limit} pixels)")
            yield im
    except CdspError:
        raise
    except Image.DecompressionBombError as e:
        raise CdspError(f"{path}: {what} is too large (Pillow's decompression-bomb limit "
                        f"is {limit} pixels): {e}") from e
    except FileNotFoundError as e:
        raise CdspError(f"{path}: {what} not found") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise CdspError(f"{path}: unreadable or truncated {what}: {e}") from e


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) from the file header, without decoding the pixels."""
    with _opened(path, "image") as im:
        return im.size


def read_image(path: str | os.PathLike) -> np.ndarray:
    """An RGB image as uint8 H×W×3 (greyscale, palette and CMYK files are converted)."""
    with _opened(path, "image") as im:
        im.load()  # decode everything now, so a truncated file fails here
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def read_label(path: str | os.PathLike) -> np.ndarray:
    """A label map (scribble, pseudo-label, ground truth) as uint8 H×W class indices.

    Mode L holds the indices directly; mode P holds them as palette indices (VOC's
    SegmentationClass). An RGB file whose three channels are equal is read as mode L;
    colour-coded masks are refused, since their colours are not class indices.
    """
    with _opened(path, "label map") as im:
        im.load()
        if im.mode in ("L", "P"):
            return np.array(im, dtype=np.uint8)
        if im.mode == "RGB":
            rgb = np.asarray(im, dtype=np.uint8)
            if (rgb == rgb[..., :1]).all():
                return rgb[..., 0].copy()
            raise CdspError(
                f"{path}: label map is a colour (RGB) PNG; labels must be class indices in an 8-bit "
                "mode L (greyscale) or mode P (palette index = class) PNG. Map each colour to its "
                "class index (e.g. with the colours of labelmap.txt) and save the indices as mode L.")
        raise CdspError(f"{path}: label map has PNG mode {im.mode}; expected 8-bit mode L or P "
                        "holding class indices (255 = unlabelled)")


def write_label(path: str | os.PathLike, label: np.ndarray) -> None:
    """Write a uint8 label map as a mode-L PNG (atomically)."""
    from cdsp_core.fsutil import atomic_path

    with atomic_path(path) as tmp:
        Image.fromarray(np.asarray(label, dtype=np.uint8), mode="L").save(tmp, format="PNG")


def image_labels(scribble: np.ndarray, n_classes: int) -> list[int]:
    """Image-level labels: the classes c >= 1 with at least one scribble pixel."""
    counts = np.bincount(np.asarray(scribble, dtype=np.uint8).ravel(), minlength=256)
    return [int(c) for c in np.flatnonzero(counts[1:n_classes]) + 1]


# ---------------------------------------------------------------------------------------
# The VOC layout


@dataclass
class Item:
    id: str
    image: Path
    scribble: Path | None  # None only for val images without scribbles (VOC val has none)
    gt: Path | None


@dataclass
class DatasetIndex:
    root: Path
    classes: list[str]
    scribble_dir: str
    split_dir: str
    splits: dict[str, list[Item]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def train(self) -> list[Item]:
        return self.splits.get("train", [])

    @property
    def val(self) -> list[Item]:
        return self.splits.get("val", [])


MAX_ID_BYTES = 200  # an id names files (<id>.png, and .<id>.png.<random>.tmp while one is written): 255 at most


def check_id(ident: str) -> str:
    """An image id as it may name files (its stem): ValueError saying why not."""
    try:
        size = len(ident.encode("utf-8"))
    except UnicodeEncodeError:  # a lone surrogate, which JSON can hold
        raise ValueError(f"id {ident[:80]!r} is not valid Unicode") from None
    if not ident or any(c < " " or c == "\x7f" for c in ident):  # NUL, newline, ...
        raise ValueError(f"id {ident[:80]!r} is empty or holds a control character")
    if size > MAX_ID_BYTES:
        raise ValueError(f"id {ident[:40]!r}... is {size} bytes long; file names allow {MAX_ID_BYTES}")
    return ident


def read_split(path: Path) -> list[str]:
    """Ids of a split list: one per line, or SBD-style `/JPEGImages/<id>.jpg /Seg.../<id>.png`."""
    ids = []
    for n, line in enumerate(_lines(path), start=1):
        name = line.split()[0].rsplit("/", 1)[-1]
        stem, ext = os.path.splitext(name)
        try:
            ids.append(check_id(stem if ext in IMAGE_EXTS else name))
        except ValueError as e:
            raise CdspError(f"{path}: entry {n} ({line[:80]!r}): {e}") from e
    dupes = sorted(i for i, n in Counter(ids).items() if n > 1)
    if dupes:
        raise CdspError(f"{path}: ids listed more than once: {dupes[:5]}")
    return ids


def _find_split_dir(root: Path, files: RootFiles) -> str:
    for d in SPLIT_DIRS:
        if any(files.is_file(f"{d}/{s}.txt") for s in SPLITS):
            return d
    raise CdspError(f"{root}: no split lists found (looked for train.txt/val.txt in "
                    f"{' and '.join(SPLIT_DIRS)}; pass --split-dir)")


def _find(files: RootFiles, folder: str, stem: str, exts: tuple[str, ...]) -> Path | None:
    for ext in exts:
        if files.is_file(f"{folder}/{stem}{ext}"):
            return files.root / folder / (stem + ext)
    return None


def load_index(root: str | os.PathLike, scribble_dir: str | None = None,
               split_dir: str | None = None, *, listing: Collection[str] | None = None) -> DatasetIndex:
    """Resolve a dataset root to its classes and the files of every split.

    Folder names: the explicit arguments, else those recorded in `root/manifest.json` (written
    by `cdsp prepare`), else the defaults (`pascal_2012_scribble`, the first of
    ImageSets/SegmentationAug and ImageSets/Segmentation that holds lists). Checks that the
    files exist (every image; scribbles of train images; scribble or ground truth of val
    images); their contents are checked by `cdsp prepare`.

    `listing` (relative paths) says which files the root holds where they are not all on disk:
    existence is checked in it, and only the small files read here (manifest.json, the class
    list, the split lists) need to be under `root`; the items' paths are under `root` all the same.
    """
    root = Path(root)
    if not root.is_dir():
        raise CdspError(f"{root}: dataset folder not found")
    files = RootFiles(root, listing)
    manifest = _read_manifest(root) if files.is_file(MANIFEST) else {}
    classes = read_classes(root, files)
    # Names from the caller or the manifest: nothing outside the root is read (outputs.confined).
    scribble_dir = confined(root, scribble_dir or manifest.get("scribble_dir") or DEFAULT_SCRIBBLE_DIR,
                            "scribble folder")
    if not files.is_dir(scribble_dir):
        raise CdspError(f"{root / scribble_dir}: scribble folder not found (pass --scribble-dir)")
    split_dir = confined(root, split_dir or manifest.get("split_dir") or _find_split_dir(root, files),
                         "split-list folder")
    if not files.is_dir(split_dir):
        raise CdspError(f"{root / split_dir}: split folder not found")

    index = DatasetIndex(root, classes, scribble_dir, split_dir)
    missing: list[str] = []
    for split in SPLITS:
        list_path = root / split_dir / f"{split}.txt"
        if not files.is_file(f"{split_dir}/{split}.txt"):
            if split == "train":
                raise CdspError(f"{list_path}: training list not found")
            index.warnings.append(f"{list_path}: no val list; nothing to evaluate on")
            continue
        ids = read_split(list_path)
        if not ids:
            raise CdspError(f"{list_path}: the {split} split is empty")
        items = []
        for i in ids:
            image = _find(files, IMAGE_DIR, i, IMAGE_EXTS)
            scribble = _find(files, scribble_dir, i, (".png",))
            gt = next((p for d in GT_DIRS if (p := _find(files, d, i, (".png",)))), None)
            if image is None:
                missing.append(f"{list_path} names {i}, but {root / IMAGE_DIR / i}.jpg is missing")
            elif scribble is None and split == "train":
                missing.append(f"{list_path} names {i}, but its scribble {root / scribble_dir / i}.png is missing")
            elif scribble is None and gt is None:
                missing.append(f"{list_path} names {i}, which has neither a scribble in {root / scribble_dir} "
                               f"nor ground truth in {' or '.join(GT_DIRS)}")
            else:
                items.append(Item(i, image, scribble, gt))
        index.splits[split] = items
    if missing:
        more = f" (and {len(missing) - 1} more missing files)" if len(missing) > 1 else ""
        raise CdspError(missing[0] + more)
    return index


def _read_manifest(root: Path) -> dict:
    path = root / MANIFEST
    if not path.is_file():
        return {}
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CdspError(f"{path}: unreadable manifest: {e}") from e
    if not isinstance(manifest, dict):
        raise CdspError(f"{path}: not a manifest (expected a JSON object)")
    return manifest
