"""Small on-disk datasets and files for the data-layer tests (real files, written per test)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from cdsp_core import data, synth

REPO = Path(__file__).resolve().parents[1]


def tiny_dataset(root: Path, n_train: int = 3, n_val: int = 2, size: int = 40, seed: int = 0) -> Path:
    """A real synthetic dataset in the VOC layout, small enough for a unit test."""
    return synth.make_dataset(root, n_train=n_train, n_val=n_val, size=size, seed=seed)


def data_with_gt_pseudo(root: Path, n_train: int, n_val: int, size: int, seed: int) -> Path:
    """Synthetic data in root/data and root/pseudo: its ground truth made into a pseudo-label folder
    (real maps of the right sizes, fast, no classifier). Returns root."""
    from cdsp_core.config import PseudoLabelConfig
    from cdsp_core.pseudolabel import pseudo_label

    synth.make_dataset(root / "data", n_train=n_train, n_val=n_val, size=size, seed=seed)
    pseudo_label(str(root / "data"), str(root / "pseudo"), PseudoLabelConfig(),
                 external_pseudo=str(root / "data" / "SegmentationClass"))
    return root


def write_label(path: Path, label: np.ndarray, mode: str = "L") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(np.asarray(label, np.uint8))
    if mode == "P":
        im = im.convert("P")
        im.putpalette(data.voc_palette())
    im.save(path)
    return path


def write_jpeg(path: Path, rgb: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(rgb, np.uint8)).save(path, quality=95)
    return path


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def bomb_png(path: Path, width: int = 20000, height: int = 20000) -> Path:
    """A few hundred bytes whose header claims width x height pixels: a decompression bomb."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    body = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 64)) \
        + _chunk(b"IEND", b"")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(body)
    return path


def leftovers(folder: Path) -> list[str]:
    """Hidden temporary names that an interrupted atomic write would leave behind."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) if folder.is_dir() else []
