"""convert-scribbles --format cvat|labelstudio: exports written here by hand, PNGs checked pixel by pixel."""

from __future__ import annotations

import json
import re
import zipfile

import numpy as np
import pytest
from PIL import Image
from tiny_data import leftovers, write_jpeg

from cdsp_core import annotations, cli, data, scribbles
from cdsp_core.errors import CdspError

CLASSES = ["background", "cat", "dog"]
LABELMAP = "# label:color_rgb:parts:actions\nbackground:0,0,0::\ncat:128,0,0::\ndog:0,128,0::\n"


def cvat_xml(images, version="1.1"):
    """A CVAT for images 1.1 annotations.xml; images = [(name, (w, h), [shape element strings])]."""
    parts = ['<?xml version="1.0" encoding="utf-8"?>', "<annotations>", f"  <version>{version}</version>",
             "  <meta><task><id>7</id><name>scribbles</name><mode>annotation</mode><labels>"
             "<label><name>cat</name><type>polyline</type></label><label><name>dog</name><type>any</type></label>"
             "</labels></task><dumped>2024-05-01 10:00:00+00:00</dumped></meta>"]
    for k, (name, (w, h), shapes) in enumerate(images):
        parts.append(f'  <image id="{k}" name="{name}" width="{w}" height="{h}">')
        parts += [f"    {s}" for s in shapes]
        parts.append("  </image>")
    return "\n".join(parts + ["</annotations>", ""])


def polyline(label, points, z=0, **extra):
    attrs = "".join(f' {k}="{v}"' for k, v in extra.items())
    return (f'<polyline label="{label}" source="manual" occluded="0" points="{points}" z_order="{z}"{attrs}>'
            "</polyline>")


def points(label, pts, z=0):
    return f'<points label="{label}" source="manual" occluded="0" points="{pts}" z_order="{z}"></points>'


def convert(fmt, export, out, *extra):
    return cli.main(["convert-scribbles", "--format", fmt, "--export", str(export), "--out", str(out),
                     *map(str, extra)])


def png(path):
    with Image.open(path) as im:
        assert im.mode == "L"
        return np.array(im)


def write_labelmap(tmp_path):
    (tmp_path / "labelmap.txt").write_text(LABELMAP, encoding="utf-8")
    return tmp_path / "labelmap.txt"


# ---------------------------------------------------------------------------------------
# CVAT


def test_cvat_polyline_is_a_width_3_stroke_and_points_are_dots(tmp_path):
    xml = cvat_xml([("cat1.jpg", (20, 12), [polyline("cat", "3.40,5.50;15.90,5.20"),
                                            points("dog", "2.2,9.7;17.5,0.4")])])
    (tmp_path / "annotations.xml").write_text(xml, encoding="utf-8")
    assert convert("cvat", tmp_path / "annotations.xml", tmp_path / "out", "--classes", write_labelmap(tmp_path)) == 0
    expected = np.full((12, 20), 255, np.uint8)
    expected[4:7, 3:16] = 1  # pixels floor(x), floor(y): (3, 5) to (15, 5), 3 wide
    expected[8:11, 1:4] = 2  # dot at (2, 9)
    expected[0:2, 16:19] = 2  # dot at (17, 0), cut by the top border
    np.testing.assert_array_equal(png(tmp_path / "out" / "cat1.png"), expected)
    provenance = json.loads((tmp_path / "out" / "convert-scribbles.json").read_text())
    assert provenance["format"] == "cvat" and provenance["count"] == 1 and provenance["classes"] == CLASSES


def test_cvat_z_order_then_document_order(tmp_path):
    across = "2,6;18,6"
    down = "9,0;9,12"
    for shapes, crossing in [
        ([polyline("cat", across), polyline("dog", down)], 2),  # equal z: the later shape is on top
        ([polyline("dog", down), polyline("cat", across)], 1),
        ([polyline("cat", across, z=5), polyline("dog", down, z=1)], 1),  # higher z on top, whatever the order
        ([polyline("dog", down, z=2), polyline("cat", across, z=-1)], 2),
    ]:
        image = next(annotations.read_cvat(_write(tmp_path / "a.xml", cvat_xml([("x.jpg", (20, 12), shapes)]))))
        s = scribbles.paint(image.size, [(CLASSES.index(m.label), m.points) for m in image.marks])
        assert (s[5:8, 8:11] == crossing).all(), shapes
        assert (s[5:8, 2:7] == 1).all() and (s[0:4, 8:11] == 2).all()


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_cvat_other_shapes_are_skipped_with_a_warning_naming_the_image(tmp_path, caplog):
    shapes = [polyline("cat", "1,1;5,1"),
              '<polygon label="dog" source="manual" occluded="0" points="0,0;10,0;10,10" z_order="0"></polygon>',
              '<box label="dog" source="manual" occluded="0" xtl="0" ytl="0" xbr="9" ybr="9" z_order="0"></box>',
              '<tag label="cat" source="manual"></tag>',
              polyline("dog", "1,8;9,8", outside="1")]  # a track's hidden frame: not drawn
    xml = cvat_xml([("a.jpg", (12, 10), shapes),
                    ("only_polygon.jpg", (12, 10), [shapes[1]]),
                    ("empty.jpg", (12, 10), [])])
    with caplog.at_level("WARNING"):
        assert convert("cvat", _write(tmp_path / "annotations.xml", xml), tmp_path / "out",
                       "--classes", write_labelmap(tmp_path)) == 0
    s = png(tmp_path / "out" / "a.png")
    assert set(np.unique(s)) == {1, 255} and (s == 1).sum() == 3 * 5  # the polygon and box are not painted
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["a.png"]
    assert "'a.jpg': 1 polygon shape skipped" in caplog.text and "'a.jpg': 1 box shape skipped" in caplog.text
    assert "'only_polygon.jpg': 1 polygon shape skipped" in caplog.text
    provenance = json.loads((tmp_path / "out" / "convert-scribbles.json").read_text())
    assert provenance["unannotated"] == ["only_polygon", "empty"] and len(provenance["warnings"]) == 4


def test_cvat_task_zip_with_images_and_the_image_dir_check(tmp_path):
    xml = cvat_xml([("images/cat1.jpg", (20, 12), [polyline("Cat", "0,0;19,11")]),
                    ("images/sub/dog2.jpg", (16, 16), [polyline("DOG", "8,0;8,16")])])
    export = tmp_path / "task_scribbles-2024_05_01.zip"
    with zipfile.ZipFile(export, "w") as zf:
        zf.writestr("annotations.xml", xml)
        zf.writestr("images/cat1.jpg", b"not read")
        zf.writestr("images/sub/dog2.jpg", b"not read")
    write_jpeg(tmp_path / "JPEGImages" / "cat1.jpg", np.zeros((12, 20, 3)))
    write_jpeg(tmp_path / "JPEGImages" / "dog2.jpg", np.zeros((16, 16, 3)))
    labelmap = write_labelmap(tmp_path)
    assert convert("cvat", export, tmp_path / "out", "--classes", labelmap, "--image-dir", tmp_path / "JPEGImages") == 0
    assert data.image_labels(data.read_label(tmp_path / "out" / "cat1.png"), 3) == [1]  # names match loosely
    dog = png(tmp_path / "out" / "dog2.png")
    assert (dog[:, 7:10] == 2).all() and (dog[:, :7] == 255).all()
    # the same annotations.xml unpacked gives the same PNGs
    (tmp_path / "unpacked").mkdir()
    _write(tmp_path / "unpacked" / "annotations.xml", xml)
    assert convert("cvat", tmp_path / "unpacked", tmp_path / "out2", "--classes", labelmap) == 0
    for name in ("cat1.png", "dog2.png"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "out2" / name).read_bytes()
    # an image of another size than the export says is refused
    write_jpeg(tmp_path / "JPEGImages" / "dog2.jpg", np.zeros((16, 17, 3)))
    with pytest.raises(CdspError, match=r"image 'images/sub/dog2.jpg': size 16x16 differs from .*dog2.jpg's 17x16"):
        scribbles.convert_export("cvat", export, tmp_path / "out3", labelmap, tmp_path / "JPEGImages")


def test_cvat_points_off_the_image_are_clamped_with_a_warning(tmp_path, caplog):
    xml = cvat_xml([("a.jpg", (10, 8), [polyline("cat", "-30,4;400,4"), points("dog", "5,-2")])])
    with caplog.at_level("WARNING"):
        image = next(annotations.read_cvat(_write(tmp_path / "a.xml", xml)))
    assert image.marks[0].points == [(0, 4), (9, 4)] and image.marks[1].points == [(5, 0)]
    assert image.warnings == ["3 points off the image, clamped to its border"]
    edge = next(annotations.read_cvat(_write(tmp_path / "b.xml", cvat_xml([("a.jpg", (10, 8),
                                                                             [polyline("cat", "0,0;10,8")])]))))
    assert edge.marks[0].points == [(0, 0), (9, 7)] and edge.warnings == []  # the far border is on the image


def cli_error(capsys, *args):
    """Run convert-scribbles; it must fail with one line on stderr, which is returned."""
    capsys.readouterr()
    assert convert(*args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


BILLION_LAUGHS = ('<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;">'
                  '<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;">]><annotations><image id="0" name="a.jpg" width="4" '
                  'height="4"><polyline label="&lol3;" points="0,0;1,1"/></image></annotations>')


@pytest.mark.parametrize("xml, message", [
    (cvat_xml([("a.jpg", (10, 8), [polyline("unicorn", "1,1;2,2")])]),
     r"image 'a.jpg': label 'unicorn' is not a class \(known: background, cat, dog\)"),
    (cvat_xml([("a.jpg", (10, 8), [polyline("cat", "1,1;2")])]), r"image 'a.jpg': shape 1 \(<polyline>\): malformed"),
    (cvat_xml([("a.jpg", (10, 8), [points("cat", "1,nan")])]), r"shape 1 \(<points>\): malformed points '1,nan'"),
    (cvat_xml([("a.jpg", (10, 8), [polyline("cat", "1,1", z="top")])]), r"z_order 'top' is not a whole number"),
    (cvat_xml([("a.jpg", (0, 8), [polyline("cat", "1,1")])]), r"image 'a.jpg': invalid image size '0'x'8'"),
    (cvat_xml([("a.jpg", (10, 8), [polyline("cat", "1,1")])], version="1.0"), r"CVAT XML version '1.0'"),
    (cvat_xml([("a.jpg", (4, 4), [polyline("cat", "1,1")]), ("b/a.png", (4, 4), [polyline("cat", "1,1")])]),
     r"image 'b/a.png': image 'a.jpg' has the same id 'a'"),
    ('<annotations><track id="0" label="cat"><polyline frame="0" points="1,1;2,2"/></track></annotations>',
     r"CVAT for video"),
    ("<annotations><image id='0' name='a.jpg'", r"not a readable XML file: ParseError"),
    (BILLION_LAUGHS, r"not a readable XML file: DTDForbidden"),
    ("<annotations>" + "<a>" * 40 + "</a>" * 40 + "</annotations>", r"nested deeper than 32 levels"),
    ("<html><body/></html>", r"root element <html>, not <annotations>"),
    (cvat_xml([("a.jpg", (4, 4), ['<polygon label="cat" points="0,0;3,0;3,3" z_order="0"></polygon>'])]),
     r"no scribbles to convert \(CVAT: polylines or points"),
    (cvat_xml([("a.jpg", (4, 4), ['<points points="1,1"></points>'])]),
     r"image 'a.jpg': shape 1 \(<points>\): no label"),
])
def test_cvat_hostile_or_bad_xml_is_refused_naming_the_file(tmp_path, capsys, xml, message):
    export = _write(tmp_path / "annotations.xml", xml)
    err = cli_error(capsys, "cvat", export, tmp_path / "out", "--classes", write_labelmap(tmp_path))
    assert f"{export}: " in err
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("member", ["../evil.sh", "images/../../evil.sh", "/etc/cron.d/evil", "C:/evil.bat",
                                    "images\\..\\..\\evil.bat"])
def test_cvat_zip_slip_is_refused(tmp_path, capsys, member):
    export = tmp_path / "task.zip"
    with zipfile.ZipFile(export, "w") as zf:
        zf.writestr("annotations.xml", cvat_xml([("a.jpg", (4, 4), [polyline("cat", "0,0;3,3")])]))
        zf.writestr(member, b"#!/bin/sh\n")
    err = cli_error(capsys, "cvat", export, tmp_path / "out", "--classes", write_labelmap(tmp_path))
    assert f"{export}: refused: the zip has a member outside its folder" in err and "evil" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "evil.sh").exists()


def test_cvat_zip_without_annotations_or_corrupt(tmp_path, capsys):
    export = tmp_path / "task.zip"
    with zipfile.ZipFile(export, "w") as zf:
        zf.writestr("images/a.jpg", b"x")
    assert "no annotations.xml at the top of the zip" in cli_error(capsys, "cvat", export, tmp_path / "o")
    with zipfile.ZipFile(export, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("annotations.xml", cvat_xml([("a.jpg", (4, 4), [polyline("cat", "0,0;3,3")])]) * 20)
    raw = bytearray(export.read_bytes())
    start = raw.index(b"annotations.xml") + len("annotations.xml") + 10  # inside the compressed data
    raw[start:start + 40] = bytes(40)
    export.write_bytes(bytes(raw))
    err = cli_error(capsys, "cvat", export, tmp_path / "o")
    assert f"{export}: " in err and ("corrupt zip" in err or "not a readable XML" in err)
    assert not (tmp_path / "o").exists()


def test_a_failed_conversion_leaves_the_earlier_output_as_it_was(tmp_path, capsys):
    labelmap = write_labelmap(tmp_path)
    export = _write(tmp_path / "annotations.xml", cvat_xml([("a.jpg", (6, 6), [polyline("cat", "0,0;5,5")])]))
    assert convert("cvat", export, tmp_path / "out", "--classes", labelmap) == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    _write(export, cvat_xml([("a.jpg", (6, 6), [polyline("dog", "0,0;5,5")]),
                             ("b.jpg", (6, 6), [polyline("horse", "0,0;5,5")])]))
    assert "image 'b.jpg': label 'horse' is not a class" in cli_error(capsys, "cvat", export, tmp_path / "out",
                                                                        "--classes", labelmap)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before and leftovers(tmp_path) == []


def test_convert_flags_per_format(tmp_path, capsys):
    err = cli_error(capsys, "cvat", tmp_path / "nothing.xml", tmp_path / "o")
    assert "nothing.xml: CVAT export not found" in err
    capsys.readouterr()
    assert cli.main(["convert-scribbles", "--format", "cvat", "--xml-dir", str(tmp_path),
                     "--out", str(tmp_path / "o")]) == 2
    assert "--format cvat reads --export" in capsys.readouterr().err
    assert cli.main(["convert-scribbles", "--export", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "--format scribblesup reads --xml-dir and --image-dir" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------
# Label Studio


# Label Studio's own encoder (label_studio_sdk.converter.brush.encode_rle) on a 3x2 RGBA image
# with pixel (x=1, y=0) = (255, 0, 0, 255) and pixel (x=2, y=1) = (0, 0, 255, 200), the rest 0.
SDK_RLE_3x2 = [0, 0, 0, 24, 57, 27, 252, 96, 0, 127, 194, 0, 7, 253, 208, 0, 63, 192, 200, 0]


def rle_pack(values):
    """A test-side encoder of the brush RLE (thi.ng rle-pack): 8-bit words, run-length sizes 3, 4, 8, 16 bits;
    a run of equal values is one repeated word, anything else literal words one run each."""
    bits = f"{len(values):032b}{7:05b}" + "".join(f"{s - 1:04b}" for s in (3, 4, 8, 16))
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[i] and j + 1 - i < 2**16:
            j += 1
        n = j - i + 1
        size = next(k for k, s in enumerate((3, 4, 8, 16)) if n <= 2**s)
        bits += f"{1 if n > 1 else 0}{size:02b}{n - 1:0{(3, 4, 8, 16)[size]}b}{values[i]:08b}"
        i = j + 1
    bits += "0" * (-len(bits) % 8)
    return [int(bits[k:k + 8], 2) for k in range(0, len(bits), 8)]


def brush(label, mask, alpha=255):
    h, w = mask.shape
    rgba = np.zeros((h, w, 4), np.uint8)
    rgba[mask] = (200, 10, 10, alpha)
    return {"id": "b1", "type": "brushlabels", "from_name": "tag", "to_name": "image", "origin": "manual",
            "original_width": w, "original_height": h, "image_rotation": 0,
            "value": {"format": "rle", "rle": rle_pack(rgba.ravel().tolist()), "brushlabels": [label]}}


def keypoint(label, x, y, size=(20, 10)):
    return {"id": "k1", "type": "keypointlabels", "from_name": "kp", "to_name": "image", "original_width": size[0],
            "original_height": size[1], "image_rotation": 0, "value": {"x": x, "y": y, "width": 0.5,
                                                                        "keypointlabels": [label]}}


def task(image, *results, cancelled=(), predictions=()):
    return {"id": 1, "data": {"image": image}, "project": 3,
            "annotations": [{"id": 10, "result": list(results), "was_cancelled": False, "ground_truth": False,
                             "completed_by": 1}] + [{"id": 11, "result": list(cancelled), "was_cancelled": True}],
            "predictions": [{"model_version": "v1", "result": list(predictions)}]}


def test_decode_rle_reads_label_studios_own_encoding():
    rgba = annotations.decode_rle(SDK_RLE_3x2, 3 * 2 * 4).reshape(2, 3, 4)
    np.testing.assert_array_equal(rgba[..., 3], [[0, 255, 0], [0, 0, 200]])
    np.testing.assert_array_equal(rgba[0, 1], [255, 0, 0, 255])
    values = np.random.default_rng(0).integers(0, 4, 300).repeat(np.random.default_rng(1).integers(1, 40, 300))
    np.testing.assert_array_equal(annotations.decode_rle(rle_pack(values.tolist()), values.size), values)
    for bad, message in [(SDK_RLE_3x2, "holds 24 values, not width\\*height\\*4 = 28"),
                         (SDK_RLE_3x2[:12], "ends early"), ([0, 0, 0, 24, 300], "not a list of bytes")]:
        with pytest.raises(ValueError, match=message):
            annotations.decode_rle(bad, 28 if bad is SDK_RLE_3x2 else 24)


def test_labelstudio_brush_and_keypoints_pixel_by_pixel(tmp_path):
    mask = np.zeros((10, 20), bool)
    mask[2:4, 3:15] = True
    faint = np.zeros((10, 20), bool)
    faint[7, :] = True
    tasks = [task("/data/upload/3/5e2a9c1f-cat1.jpg", brush("cat", mask), brush("dog", faint, alpha=100),
                  keypoint("dog", 50.0, 25.0), keypoint("background", 99.9, 95.0),
                  cancelled=[keypoint("cat", 0, 0)], predictions=[brush("dog", ~mask)])]
    export = _write(tmp_path / "project-3-at-2024-05-01.json", json.dumps(tasks))
    assert convert("labelstudio", export, tmp_path / "out", "--classes", write_labelmap(tmp_path)) == 0
    expected = np.full((10, 20), 255, np.uint8)
    expected[2:4, 3:15] = 1  # the brush mask as it is; the faint one (alpha < 128) is not a scribble
    expected[1:4, 9:12] = 2  # keypoint at 50 % x 25 % = pixel (10, 2), painted over the brush
    expected[8:10, 18:20] = 0  # (19, 9), cut by the borders
    np.testing.assert_array_equal(png(tmp_path / "out" / "cat1.png"), expected)  # upload prefix removed


def test_labelstudio_image_names_and_skipped_results(tmp_path, caplog):
    rect = {"type": "rectanglelabels", "original_width": 20, "original_height": 10,
            "value": {"x": 1, "y": 1, "width": 5, "height": 5, "rectanglelabels": ["cat"]}}
    tasks = [task("/data/local-files/?d=photos%2Fdog%202.png", keypoint("dog", 10, 10)),
             task("s3://bucket/raw/cow.jpg", keypoint("cat", 10, 10), rect),
             task("https://example.com/a/only_rect.jpg?sig=1", rect),
             task("https://example.com/a/empty.jpg")]
    export = _write(tmp_path / "export.json", json.dumps(tasks))
    with caplog.at_level("WARNING"):
        assert convert("labelstudio", export, tmp_path / "out", "--classes", write_labelmap(tmp_path)) == 0
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["cow.png", "dog 2.png"]
    assert "image 'only_rect.jpg': 1 rectanglelabels result skipped" in caplog.text
    assert json.loads((tmp_path / "out" / "convert-scribbles.json").read_text())["unannotated"] == ["only_rect",
                                                                                                     "empty"]
    keypoints_off = [task("a.jpg", keypoint("cat", -5, 50), keypoint("cat", 50, 130))]
    image = next(annotations.read_labelstudio(_write(tmp_path / "off.json", json.dumps(keypoints_off))))
    assert [m.points for m in image.marks] == [[(0, 5)], [(10, 9)]]
    assert image.warnings == ["2 keypoints off the image, clamped to its border"]


@pytest.mark.parametrize("content, message", [
    ("[]".encode("utf-16"), r"not UTF-8 text"),
    (b'[{"data": {"image": "caf\xe9.jpg"}}]', r"not UTF-8 text \(byte 24"),
    (b"[" * 100000 + b"]" * 100000, r"not valid JSON: RecursionError"),
    (b'[{"data": {"image": "a.jpg"}', r"not valid JSON: JSONDecodeError"),
    (b'"just a string"', r"not a Label Studio JSON export"),
    (json.dumps([task("a.jpg", keypoint("unicorn", 1, 1))]).encode(), r"image 'a.jpg': label 'unicorn' is not a class"),
    (json.dumps([task("a.jpg", keypoint("cat", "1", 1))]).encode(),
     r"task 1 \(image 'a.jpg'\): result 1: keypoint x/y"),
    (json.dumps([task("a.jpg", {**keypoint("cat", 1, 1), "original_width": -3})]).encode(), r"invalid image size"),
    (json.dumps([task("a.jpg", {**keypoint("cat", 1, 1), "original_width": 10**6, "original_height": 10**6})]).encode(),
     r"decompression-bomb limit"),
    (json.dumps([task("a.jpg", keypoint("cat", 1, 1), keypoint("cat", 1, 1, size=(30, 10)))]).encode(),
     r"result 2: original size 30x10 differs from the task's 20x10"),
    (json.dumps([task("a.jpg", {**keypoint("cat", 1, 1), "image_rotation": 90})]).encode(), r"image_rotation 90"),
    (json.dumps([task("a.jpg", {**brush("cat", np.ones((2, 2), bool)), "original_width": 3})]).encode(),
     r"bad brush RLE: the RLE holds 16 values, not width\*height\*4 = 24"),
    (json.dumps([task("a.jpg", {**keypoint("cat", 1, 1), "value": {"x": 1, "y": 1, "keypointlabels": ["cat", "dog"]}})])
     .encode(), r"keypointlabels must name exactly one label"),
    (json.dumps([{"data": {"text": "x", "other": "y"}}]).encode(), r"task 1: no image URL"),
    (json.dumps([task("a.jpg", keypoint("cat", 1, 1)), task("x/a.png", keypoint("cat", 1, 1))]).encode(),
     r"image 'a.png': image 'a.jpg' has the same id 'a'"),
    # the (tracebacks before): a NUL in the URL, an image name too long for a file name, an unparsable URL
    (json.dumps([task("/data/upload/1/a\0b.jpg", keypoint("cat", 1, 1))]).encode(),
     r"id 'a\\x00b' is empty or holds a control character"),
    (json.dumps([task("b" * 300 + ".jpg", keypoint("cat", 1, 1))]).encode(), r"300 bytes long; file names allow 200"),
    (json.dumps([task("http://[x/a.jpg", keypoint("cat", 1, 1))]).encode(), r"cannot be parsed: Invalid IPv6 URL"),
    (json.dumps([task("a.jpg", keypoint("cat", 10**400, 1))]).encode(), r"keypoint x/y 1000\d*/1 are not finite"),
])
def test_labelstudio_hostile_or_bad_json_is_refused_naming_the_file(tmp_path, capsys, content, message):
    export = tmp_path / "export.json"
    export.write_bytes(content)
    err = cli_error(capsys, "labelstudio", export, tmp_path / "out", "--classes", write_labelmap(tmp_path))
    assert f"{export}: " in err
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_a_keypoint_far_off_the_image_is_clamped_to_its_border(tmp_path, capsys, caplog):
    """The issue's 1.7e308 (a traceback before: scaled to the image it overflowed to infinity)."""
    export = tmp_path / "export.json"
    export.write_text(json.dumps([task("a.jpg", keypoint("cat", 1.7e308, 50), keypoint("dog", -1.7e308, 50))]))
    assert convert("labelstudio", export, tmp_path / "out", "--classes", write_labelmap(tmp_path)) == 0
    scribble = png(tmp_path / "out" / "a.png")
    assert (scribble[4:7, 18:20] == 1).all() and (scribble[4:7, 0:2] == 2).all()  # dots at the right and left border
    assert "2 keypoints off the image, clamped to its border" in caplog.text


def test_a_cvat_image_name_too_long_for_a_file_name(tmp_path, capsys):
    """The issue's 300-character CVAT image name (a traceback before, when its PNG was written)."""
    export = _write(tmp_path / "annotations.xml", cvat_xml([("c" * 300 + ".jpg", (20, 10), [points("cat", "1,1")])]))
    err = cli_error(capsys, "cvat", export, tmp_path / "out", "--classes", write_labelmap(tmp_path))
    assert err.startswith(f"cdsp convert-scribbles: error: {export}: image 'ccc") and "300 bytes long" in err
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
