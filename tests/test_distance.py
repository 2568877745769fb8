"""Distance maps: equal to the authors' reference PNGs on every pixel, edge cases, file reading."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from cdsp_core.distance import (
    boundary_distance_map,
    pseudo_label_boundary,
    read_distance_map,
    scribble_distance_map,
    write_distance_map,
)
from cdsp_core.errors import CdspError


def load_label(path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.mode == "L"
        return np.array(im)


def brute_force(points: np.ndarray, shape: tuple[int, int], lam: float) -> np.ndarray:
    """The reference's way: for every pixel, min over all points of sqrt(λ·dy² + λ·dx²), capped at 255."""
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(np.float64)
    best = np.full(shape, 255.0)
    for y, x in points:
        best = np.minimum(best, np.sqrt(lam * (yy - y) ** 2 + lam * (xx - x) ** 2))
    return best.astype(np.uint8)


def test_scribble_map_equals_reference(sample_dir):
    scribble = load_label(sample_dir / "pascal_2012_scribble" / "2007_000032.png")
    ref = read_distance_map(sample_dir / "distance_map" / "2007_000032.png")
    got = scribble_distance_map(scribble)
    assert got.dtype == np.uint8 and got.shape == scribble.shape
    assert np.array_equal(got, ref), f"{(got != ref).sum()} pixels differ"


def test_boundary_map_equals_reference(sample_dir):
    pseudo = load_label(sample_dir / "bmp_pseudolabel" / "2007_000032.png")
    ref = read_distance_map(sample_dir / "distance_pseudo" / "2007_000032.png")
    got = boundary_distance_map(pseudo)
    assert got.dtype == np.uint8 and got.shape == pseudo.shape
    assert np.array_equal(got, ref), f"{(got != ref).sum()} pixels differ"


def test_background_strokes_change_the_map_only_when_asked(sample_dir):
    scribble = load_label(sample_dir / "pascal_2012_scribble" / "2007_000032.png")
    fg_only = scribble_distance_map(scribble)
    with_bg = scribble_distance_map(scribble, include_background=True)
    on_bg_stroke = scribble == 0
    assert (with_bg[on_bg_stroke] == 255).all()
    assert (fg_only[on_bg_stroke] < 255).any()
    assert (with_bg >= fg_only).all()  # more seeds, never farther


@pytest.mark.parametrize("lam", [math.e, 2.0, 0.5])
def test_scribble_map_matches_brute_force_on_random_strokes(lam):
    rng = np.random.default_rng(1)
    scribble = np.full((23, 31), 255, np.uint8)
    scribble[rng.random(scribble.shape) < 0.03] = 3
    scribble[rng.random(scribble.shape) < 0.03] = 0  # background strokes do not count
    points = np.argwhere((scribble != 255) & (scribble != 0))
    assert len(points) > 0
    expected = 255 - brute_force(points, scribble.shape, lam)
    assert np.array_equal(scribble_distance_map(scribble, lam=lam), expected)


def test_boundary_map_matches_brute_force_on_a_blob():
    pseudo = np.zeros((20, 24), np.uint8)
    pseudo[4:15, 6:20] = 2
    pseudo[0:3, 0:3] = 1  # touches the image border: its border-side pixels are boundary
    pseudo[10, 10] = 255  # an ignored pixel inside the object counts as not foreground
    boundary = pseudo_label_boundary(pseudo)
    # hand check: interior of the big blob is not boundary, its rim is
    assert boundary[4, 10] and boundary[14, 10] and boundary[8, 6] and not boundary[8, 8]
    assert boundary[0, 0] and boundary[1, 0] and boundary[0, 1] and boundary[2, 1] and not boundary[1, 1]
    assert boundary[9, 10] and boundary[11, 10] and boundary[10, 9]  # around the 255 hole
    expected = brute_force(np.argwhere(boundary), pseudo.shape, math.e**6)
    assert np.array_equal(boundary_distance_map(pseudo), expected)


@pytest.mark.parametrize("corner", [(30, 40), (0, 0), (55, 75)])
def test_far_pixels_saturate_exactly(corner):
    # a small object in a larger image: beyond 255/√λ pixels of it the map is 255 (0 for scribbles)
    y, x = corner
    pseudo = np.zeros((60, 80), np.uint8)
    pseudo[max(y - 2, 0): y + 3, max(x - 3, 0): x + 3] = 1
    for lam in (math.e**6, 100.0, 1.0):
        expected = brute_force(np.argwhere(pseudo_label_boundary(pseudo)), pseudo.shape, lam)
        assert np.array_equal(boundary_distance_map(pseudo, lam=lam), expected)
        expected = 255 - brute_force(np.argwhere(pseudo == 1), pseudo.shape, lam)
        assert np.array_equal(scribble_distance_map(pseudo, lam=lam), expected)
    assert (boundary_distance_map(pseudo)[pseudo == 0] == 255).mean() > 0.5


def test_lambda_must_be_positive():
    one = np.zeros((3, 3), np.uint8)
    one[1, 1] = 1
    for lam in (0.0, -1.0, float("nan")):
        with pytest.raises(CdspError, match="lambda"):
            boundary_distance_map(one, lam=lam)


def test_boundary_explicit_loops():
    rng = np.random.default_rng(2)
    pseudo = (rng.random((12, 13)) < 0.5).astype(np.uint8) * 7
    h, w = pseudo.shape
    expected = np.zeros((h, w), bool)
    for y in range(h):
        for x in range(w):
            if pseudo[y, x] == 0:
                continue
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                outside = not (0 <= ny < h and 0 <= nx < w)
                if outside or pseudo[ny, nx] == 0:
                    expected[y, x] = True
    assert np.array_equal(pseudo_label_boundary(pseudo), expected)


def test_edge_cases():
    empty = np.full((5, 7), 255, np.uint8)
    assert (scribble_distance_map(empty) == 0).all()
    only_bg = empty.copy()
    only_bg[2, 3] = 0
    assert (scribble_distance_map(only_bg) == 0).all()
    assert scribble_distance_map(only_bg, include_background=True)[2, 3] == 255
    assert (boundary_distance_map(np.zeros((5, 7), np.uint8)) == 255).all()
    assert (boundary_distance_map(np.full((5, 7), 255, np.uint8)) == 255).all()
    # one foreground pixel: it is its own boundary; its map is 0 there, √λ·d elsewhere
    one = np.zeros((5, 7), np.uint8)
    one[2, 3] = 4
    m = boundary_distance_map(one, lam=4.0)
    assert m[2, 3] == 0 and m[2, 4] == 2 and m[0, 3] == 4 and m[0, 0] == int(2 * math.sqrt(13))
    s = scribble_distance_map(one, lam=4.0)
    assert s[2, 3] == 255 and s[2, 4] == 253 and s[0, 0] == 255 - int(2 * math.sqrt(13))
    # far pixels clip: 255 − 255 = 0
    big = np.full((1, 300), 255, np.uint8)
    big[0, 0] = 1
    assert scribble_distance_map(big, lam=1.0)[0, 299] == 0
    with pytest.raises(ValueError):
        scribble_distance_map(np.zeros((2, 3, 3), np.uint8))


def test_read_and_write_distance_map(tmp_path):
    m = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    write_distance_map(tmp_path / "l.png", m)
    assert np.array_equal(read_distance_map(tmp_path / "l.png"), m)
    assert [p.name for p in tmp_path.iterdir()] == ["l.png"]  # no temporary left behind
    Image.fromarray(np.stack([m, m, m], -1)).save(tmp_path / "rgb.png")
    assert np.array_equal(read_distance_map(tmp_path / "rgb.png"), m)

    rgb = np.stack([m, m, m], -1)
    rgb[1, 1, 2] += 1
    Image.fromarray(rgb).save(tmp_path / "bad_rgb.png")
    with pytest.raises(CdspError, match=r"bad_rgb\.png.*unequal"):
        read_distance_map(tmp_path / "bad_rgb.png")
    Image.fromarray(m.astype(np.uint16) * 100).save(tmp_path / "int.png")  # 16-bit grey
    with pytest.raises(CdspError, match=r"int\.png.*mode I;16"):
        read_distance_map(tmp_path / "int.png")
    (tmp_path / "junk.png").write_bytes(b"not a png")
    with pytest.raises(CdspError, match=r"junk\.png"):
        read_distance_map(tmp_path / "junk.png")
    with pytest.raises(CdspError, match=r"missing\.png"):
        read_distance_map(tmp_path / "missing.png")
