"""scribbles.py: ScribbleSup XML rasterisation and the drop/shrink scribble-quality variants."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from tiny_data import leftovers, write_jpeg, write_label

from cdsp_core import cli, data, scribbles
from cdsp_core.errors import CdspError

CLASSES = ["background", "cat", "dog"]


def write_xml(path, polygons, size=(20, 12)):
    """A ScribbleSup-style XML file; polygons = [(tag, [(x, y), ...]), ...]."""
    parts = ["<annotation>", f"<filename>{path.stem}.jpg</filename>"]
    if size:
        parts.append(f"<size><width>{size[0]}</width><height>{size[1]}</height></size>")
    for tag, points in polygons:
        parts.append(f"<polygon><tag>{tag}</tag>")
        parts += [f"<point><X>{x}</X><Y>{y}</Y></point>" for x, y in points]
        parts.append("</polygon>")
    path.write_text("\n".join(parts + ["</annotation>"]), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------
# XML -> PNG


def test_a_horizontal_stroke_is_three_pixels_wide(tmp_path):
    s = scribbles.xml_to_scribble(write_xml(tmp_path / "a.xml", [("cat", [(3, 5), (15, 5)])]), CLASSES)
    assert s.shape == (12, 20) and s.dtype == np.uint8
    expected = np.full((12, 20), 255, np.uint8)
    expected[4:7, 3:16] = 1
    np.testing.assert_array_equal(s, expected)


def test_a_vertical_stroke_and_a_single_point(tmp_path):
    s = scribbles.xml_to_scribble(
        write_xml(tmp_path / "a.xml", [("dog", [(10, 2), (10, 9)]), ("background", [(2, 2)])]), CLASSES)
    assert (s[2:10, 9:12] == 2).all() and (s[:, [8, 12]] == 255).all()
    assert (s[1:4, 1:4] == 0).all() and (s == 0).sum() == 9  # a dab of width 3


def test_later_strokes_paint_over_earlier_ones(tmp_path):
    polygons = [("cat", [(2, 6), (17, 6)]), ("dog", [(9, 0), (9, 11)])]
    s = scribbles.xml_to_scribble(write_xml(tmp_path / "a.xml", polygons), CLASSES)
    assert (s[5:8, 8:11] == 2).all()  # the crossing belongs to the later dog stroke
    assert (s[5:8, 2:7] == 1).all()
    reverse = scribbles.xml_to_scribble(write_xml(tmp_path / "b.xml", polygons[::-1]), CLASSES)
    assert (reverse[5:8, 8:11] == 1).all()


def test_points_outside_the_image_are_clamped(tmp_path):
    s = scribbles.xml_to_scribble(write_xml(tmp_path / "a.xml", [("cat", [(-30, 5), (400, 5)])]), CLASSES)
    assert (s[4:7, 0] == 1).all() and (s[4:7, 19] == 1).all()
    s = scribbles.xml_to_scribble(write_xml(tmp_path / "b.xml", [("cat", [(5, -8), (5, 99)])]), CLASSES)
    assert (s[:, 4:7] == 1).all()


def test_tag_names_are_matched_loosely_unknown_tags_are_errors(tmp_path):
    voc = data.VOC_CLASSES
    s = scribbles.xml_to_scribble(write_xml(tmp_path / "a.xml", [("TV/Monitor", [(3, 3), (8, 3)]),
                                                                 ("Potted Plant", [(3, 8), (8, 8)])]), voc)
    assert set(np.unique(s)) == {voc.index("tvmonitor"), voc.index("pottedplant"), 255}
    with pytest.raises(CdspError, match=r"b\.xml: polygon 2 has tag 'unicorn', which is not a class"):
        scribbles.xml_to_scribble(write_xml(tmp_path / "b.xml", [("cat", [(1, 1)]), ("unicorn", [(2, 2)])]),
                                  CLASSES)


def test_bad_xml_files(tmp_path):
    (tmp_path / "broken.xml").write_text("<annotation><polygon>", encoding="utf-8")
    with pytest.raises(CdspError, match=r"broken\.xml: not a readable XML"):
        scribbles.xml_to_scribble(tmp_path / "broken.xml", CLASSES)
    write_xml(tmp_path / "nan.xml", [("cat", [("left", 3)])])
    with pytest.raises(CdspError, match=r"nan\.xml: polygon 1 point X is missing or not a number"):
        scribbles.xml_to_scribble(tmp_path / "nan.xml", CLASSES)
    write_xml(tmp_path / "nosize.xml", [("cat", [(1, 1)])], size=None)
    with pytest.raises(CdspError, match=r"nosize\.xml: no annotation/size"):
        scribbles.xml_to_scribble(tmp_path / "nosize.xml", CLASSES)
    assert scribbles.xml_to_scribble(tmp_path / "nosize.xml", CLASSES, size=(6, 4)).shape == (4, 6)
    with pytest.raises(CdspError, match=r"a\.xml: size 20x12 differs from its image's 30x12"):
        scribbles.xml_to_scribble(write_xml(tmp_path / "a.xml", [("cat", [(1, 1)])]), CLASSES, size=(30, 12))


def test_convert_scribbles_cli(tmp_path, capsys):
    xml_dir, image_dir, out = tmp_path / "xml", tmp_path / "img", tmp_path / "scribbles"
    xml_dir.mkdir()
    write_xml(xml_dir / "im1.xml", [("background", [(0, 0), (19, 0)]), ("dog", [(5, 5), (9, 9)])])
    write_xml(xml_dir / "im2.xml", [("cat", [(2, 2), (2, 9)])])
    for name in ("im1", "im2"):
        write_jpeg(image_dir / f"{name}.jpg", np.zeros((12, 20, 3)))
    (tmp_path / "labelmap.txt").write_text("background:0,0,0::\ncat:1,1,1::\ndog:2,2,2::\n", encoding="utf-8")
    argv = ["convert-scribbles", "--xml-dir", str(xml_dir), "--image-dir", str(image_dir), "--out", str(out),
            "--classes", str(tmp_path / "labelmap.txt")]
    assert cli.main(argv) == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["im1.png", "im2.png"]
    with Image.open(out / "im1.png") as im:
        assert im.mode == "L" and im.size == (20, 12)
    assert data.image_labels(data.read_label(out / "im1.png"), 3) == [2]
    assert data.image_labels(data.read_label(out / "im2.png"), 3) == [1]
    assert cli.main(argv) == 0  # its own earlier output may be replaced
    # an XML without its image: error, and the earlier output is left exactly as it was
    write_xml(xml_dir / "im3.xml", [("cat", [(2, 2)])])
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "im3.xml: no image im3.jpg" in err and len(err.splitlines()) == 1
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert cli.main(argv[:-2] + ["--out", str(tmp_path / "new")]) == 2
    assert not (tmp_path / "new").exists() and leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------
# drop and shrink


def many_strokes(rng, n=60, size=96):
    """A scribble map of n separate short strokes of random classes 0..3 (at least one fg)."""
    s = np.full((size, size), 255, np.uint8)
    for k in range(n):
        y, x = divmod(k, 6)
        s[y * 9 + 1: y * 9 + 4, x * 16 + 1: x * 16 + 13] = rng.integers(0, 4)
    s[1:4, 1:13] = 1
    return s


def components(scribble):
    labels, classes = scribbles.strokes(scribble)
    return [(classes[k - 1], frozenset(np.flatnonzero(labels == k))) for k in range(1, len(classes) + 1)]


def test_strokes_are_8_connected_components_of_one_class():
    s = np.full((6, 6), 255, np.uint8)
    s[0, 0], s[1, 1] = 1, 1  # diagonal neighbours: one stroke
    s[4, 4], s[4, 5] = 1, 2  # touching, but two classes: two strokes
    _, classes = scribbles.strokes(s)
    assert sorted(classes) == [1, 1, 2]


def test_drop_removes_whole_strokes_keeps_every_class_and_is_deterministic():
    rng = np.random.default_rng(0)
    s = many_strokes(rng)
    before = components(s)
    out = scribbles.degrade(s, "drop", 0.5, np.random.default_rng(1))
    np.testing.assert_array_equal(out, scribbles.degrade(s, "drop", 0.5, np.random.default_rng(1)))
    assert not np.array_equal(out, scribbles.degrade(s, "drop", 0.5, np.random.default_rng(2)))
    assert ((out == 255) | (out == s)).all()
    kept = [pixels for _, pixels in before if (out.flat[list(pixels)] != 255).all()]
    gone = [pixels for _, pixels in before if (out.flat[list(pixels)] == 255).all()]
    assert len(kept) + len(gone) == len(before) == 60  # no stroke is cut
    assert 0.3 < len(gone) / len(before) < 0.7
    assert data.image_labels(out, 4) == data.image_labels(s, 4)


def test_drop_all_keeps_one_stroke_per_image_level_class():
    s = many_strokes(np.random.default_rng(3))
    out = scribbles.degrade(s, "drop", 1.0, np.random.default_rng(0))
    kept = components(out)
    assert sorted(c for c, _ in kept) == data.image_labels(s, 4)  # one each, background not required
    np.testing.assert_array_equal(scribbles.degrade(s, "drop", 0.0, np.random.default_rng(0)), s)


def test_shrink_keeps_the_middle_of_each_stroke():
    s = np.full((20, 120), 255, np.uint8)
    s[4:7, 10:110] = 1  # a straight stroke, 100 long
    yy, xx = np.nonzero(ndimage.binary_dilation(np.eye(12, dtype=bool), iterations=1))
    s[yy + 7, xx + 2] = 0  # a diagonal one
    out = scribbles.degrade(s, "shrink", 0.5, np.random.default_rng(0))
    assert ((out == 255) | (out == s)).all()
    cols = np.flatnonzero((out == 1).any(axis=0))
    assert (out == 1).sum() == 150 and abs(cols.mean() - 59.5) <= 1 and 45 <= cols.size <= 55
    for c in (0, 1):  # each stroke stays one contiguous piece with about half its pixels
        assert ndimage.label(out == c, np.ones((3, 3)))[1] == 1
        assert abs((out == c).sum() - 0.5 * (s == c).sum()) <= 1
    np.testing.assert_array_equal(scribbles.degrade(s, "shrink", 1.0, np.random.default_rng(0)), s)
    tiny = scribbles.degrade(s, "shrink", 0.01, np.random.default_rng(0))
    assert (tiny == 1).sum() == 3 and (tiny == 0).sum() >= 1


def test_shrink_follows_a_curved_stroke():
    s = np.full((40, 40), 255, np.uint8)
    s[2:5, 2:30] = 2  # an L: along the top, then down the right side
    s[2:35, 27:30] = 2
    out = scribbles.degrade(s, "shrink", 0.2, np.random.default_rng(0))
    ys, xs = np.nonzero(out == 2)
    assert ndimage.label(out == 2, np.ones((3, 3)))[1] == 1
    assert ys.min() <= 5 and xs.max() >= 27  # the middle of the L is its corner


@pytest.mark.parametrize("mode, ratio", [("drop", 1.5), ("drop", -0.1), ("shrink", 0.0), ("blur", 0.5)])
def test_bad_degrade_arguments(mode, ratio):
    with pytest.raises(CdspError):
        scribbles.degrade(np.zeros((3, 3), np.uint8), mode, ratio, np.random.default_rng(0))


def test_degrade_cli_is_deterministic_and_per_file(tmp_path, capsys):
    src = tmp_path / "s"
    rng = np.random.default_rng(5)
    for name in ("a", "b"):
        write_label(src / f"{name}.png", many_strokes(rng))
    run = ["degrade-scribbles", "--scribbles", str(src), "--mode", "drop", "--ratio", "0.4", "--seed", "9"]
    assert cli.main(run + ["--out", str(tmp_path / "o1")]) == 0
    assert cli.main(run + ["--out", str(tmp_path / "o2")]) == 0
    for name in ("a.png", "b.png"):
        assert (tmp_path / "o1" / name).read_bytes() == (tmp_path / "o2" / name).read_bytes()
    provenance = json.loads((tmp_path / "o1" / "degrade-scribbles.json").read_text())
    assert provenance["mode"] == "drop" and provenance["ratio"] == 0.4 and provenance["seed"] == 9
    # a file's result does not depend on its neighbours
    (src / "b.png").unlink()
    assert cli.main(run + ["--out", str(tmp_path / "o3")]) == 0
    assert (tmp_path / "o3" / "a.png").read_bytes() == (tmp_path / "o1" / "a.png").read_bytes()
    capsys.readouterr()
    assert cli.main(run[:5] + ["--ratio", "2", "--out", str(tmp_path / "o4")]) == 2
    assert "not a probability" in capsys.readouterr().err and not (tmp_path / "o4").exists()
    colour = np.zeros((4, 4, 3), np.uint8)
    colour[..., 1] = 9
    Image.fromarray(colour).save(src / "c.png")  # a colour mask: refused, nothing written
    assert cli.main(run + ["--out", str(tmp_path / "o5")]) == 2
    assert "c.png: label map is a colour (RGB) PNG" in capsys.readouterr().err
    assert not (tmp_path / "o5").exists() and leftovers(tmp_path) == []


def test_degrade_the_real_sample(sample_dir):
    scribble = data.read_label(sample_dir / "pascal_2012_scribble" / "2007_000032.png")
    dropped = scribbles.degrade(scribble, "drop", 1.0, np.random.default_rng(0))
    assert data.image_labels(dropped, 21) == [1, 15]
    assert 0 < (dropped != 255).sum() < (scribble != 255).sum()
    shrunk = scribbles.degrade(scribble, "shrink", 0.5, np.random.default_rng(0))
    ratio = (shrunk != 255).sum() / (scribble != 255).sum()
    assert 0.45 < ratio < 0.55 and data.image_labels(shrunk, 21) == [1, 15]
    assert ((shrunk == 255) | (shrunk == scribble)).all()
