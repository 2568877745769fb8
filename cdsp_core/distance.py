"""The two distance maps of CDSP (docs/cdsp-method.md, "Distance maps").

Both are uint8 H×W maps built from one exact Euclidean distance transform
(`scipy.ndimage.distance_transform_edt`, O(H·W)). The authors' reference computed them
by brute force over every point; the EDT gives the same numbers on every pixel:
√λ·d is clipped to [0, 255] and truncated toward zero exactly as the reference does.

- scribble map  M_s = 255 − uint8(clip(√λ_s·d_s, 0, 255)), d_s = distance to the nearest
  foreground-scribble pixel: high near the scribbles.
- boundary map  M_b = uint8(clip(√λ_c·d_b, 0, 255)), d_b = distance to the nearest
  pseudo-label boundary pixel: high far from object boundaries.

As loss weights, w = M / 255.
"""

from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image
from scipy import ndimage

from cdsp_core.errors import CdspError
from cdsp_core.fsutil import atomic_path

IGNORE = 255

# 4-connectivity: a boundary pixel has a non-foreground pixel above, below, left or right.
_CROSS = ndimage.generate_binary_structure(2, 1)


def _scaled_distance(targets: np.ndarray, lam: float) -> np.ndarray:
    """uint8(clip(√λ · d, 0, 255)) with d the distance of each pixel to the nearest target pixel.

    Farther than 255/√λ from every target the map saturates at 255, so the EDT runs only on the
    targets' bounding box grown by that reach (the whole image when the reach is long, as for
    the scribble map). Distances inside are still exact: every target lies in the box.
    """
    if not lam > 0:
        raise CdspError(f"the distance map's lambda must be positive, got {lam}")
    scale = math.sqrt(lam)
    reach = math.ceil(255.0 / scale)
    rows, cols = np.flatnonzero(targets.any(axis=1)), np.flatnonzero(targets.any(axis=0))
    box = (slice(max(rows[0] - reach, 0), rows[-1] + reach + 1), slice(max(cols[0] - reach, 0), cols[-1] + reach + 1))
    d = ndimage.distance_transform_edt(~targets[box])
    d *= scale  # √λ·d, the reference's arithmetic: then clip, then truncate
    np.minimum(d, 255.0, out=d)
    out = np.full(targets.shape, 255, np.uint8)
    out[box] = d.astype(np.uint8)
    return out


def scribble_distance_map(scribble: np.ndarray, lam: float = math.e,
                          include_background: bool = False) -> np.ndarray:
    """M_s = 255 − uint8(clip(√λ·d_s, 0, 255)) of a scribble label map (H×W, 255 = unlabelled).

    d_s is the distance to the nearest foreground-scribble pixel (class ≥ 1); with
    `include_background` background strokes (class 0) count too. No such pixel: 0 everywhere.
    """
    scribble = np.asarray(scribble)
    if scribble.ndim != 2:
        raise ValueError(f"scribble must be H×W, got shape {scribble.shape}")
    seeds = scribble != IGNORE
    if not include_background:
        seeds &= scribble != 0
    if not seeds.any():
        return np.zeros(scribble.shape, np.uint8)
    return 255 - _scaled_distance(seeds, lam)


def pseudo_label_boundary(pseudo_label: np.ndarray) -> np.ndarray:
    """Boundary pixels: foreground (1..C−1) pixels with a 4-neighbour that is not foreground.

    Pixels outside the image count as not foreground, so foreground touching the border is boundary.
    """
    foreground = (pseudo_label != 0) & (pseudo_label != IGNORE)
    inner = ndimage.binary_erosion(foreground, structure=_CROSS, border_value=0)
    return foreground & ~inner


def boundary_distance_map(pseudo_label: np.ndarray, lam: float = math.e**6) -> np.ndarray:
    """M_b = uint8(clip(√λ·d_b, 0, 255)) of a pseudo-label (H×W class indices, 255 = ignored).

    d_b is the distance to the nearest boundary pixel (see `pseudo_label_boundary`).
    No foreground: 255 everywhere.
    """
    pseudo_label = np.asarray(pseudo_label)
    if pseudo_label.ndim != 2:
        raise ValueError(f"pseudo_label must be H×W, got shape {pseudo_label.shape}")
    boundary = pseudo_label_boundary(pseudo_label)
    if not boundary.any():
        return np.full(pseudo_label.shape, 255, np.uint8)
    return _scaled_distance(boundary, lam)


def read_distance_map(path: str | os.PathLike) -> np.ndarray:
    """A distance map PNG as uint8 H×W: mode L, or RGB with three equal channels (the reference's format)."""
    try:
        with Image.open(path) as im:
            im.load()
            mode, arr = im.mode, np.asarray(im)
    except (OSError, ValueError) as e:
        raise CdspError(f"{path}: cannot read distance map: {e}") from e
    if mode == "L":
        return arr
    if mode == "RGB":
        if not ((arr[..., 0] == arr[..., 1]).all() and (arr[..., 0] == arr[..., 2]).all()):
            raise CdspError(f"{path}: distance map is RGB with unequal channels (expected grey)")
        return np.ascontiguousarray(arr[..., 0])
    raise CdspError(f"{path}: distance map has image mode {mode} (expected L, or RGB with equal channels)")


def write_distance_map(path: str | os.PathLike, distance_map: np.ndarray) -> None:
    """Write a uint8 H×W map as a mode-L PNG, atomically."""
    distance_map = np.asarray(distance_map)
    if distance_map.dtype != np.uint8 or distance_map.ndim != 2:
        raise ValueError(f"distance map must be uint8 H×W, got {distance_map.dtype} {distance_map.shape}")
    with atomic_path(path) as tmp:
        Image.fromarray(distance_map).save(tmp, format="PNG")
