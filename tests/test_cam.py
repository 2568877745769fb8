"""CAMs: normalisation, scales and flips, absent classes; pseudo-label thresholding; random-walk refinement."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cdsp_core.cam import cams_to_pseudo_label, compute_cams, refine_with_scribbles, scores_to_pseudo_label
from cdsp_core.models import build_classifier


@pytest.fixture(scope="module")
def classifier():
    torch.manual_seed(0)
    model = build_classifier("resnet18", n_classes=6, output_stride=8)
    model(torch.randn(4, 3, 32, 32))  # one training-mode pass gives BatchNorm non-trivial statistics
    return model.eval()


@pytest.fixture(scope="module")
def image():
    return torch.randn(3, 30, 44, generator=torch.Generator().manual_seed(1))


def normalise(t: torch.Tensor) -> torch.Tensor:
    return t / (t.amax(dim=(1, 2), keepdim=True) + 1e-5)


def test_cams_shape_range_and_order(classifier, image):
    cams = compute_cams(classifier, image, [2, 5], scales=(1.0, 0.5))
    assert cams.shape == (2, 30, 44) and cams.dtype == torch.float32
    assert cams.min() >= 0 and cams.amax(dim=(1, 2)).sub(1).abs().max() < 1e-4  # each class peaks at 1
    swapped = compute_cams(classifier, image, [5, 2], scales=(1.0, 0.5))
    torch.testing.assert_close(swapped, cams.flip(0))
    alone = compute_cams(classifier, image[None], [5], scales=(1.0, 0.5))  # 1×3×H×W accepted too
    torch.testing.assert_close(alone[0], cams[1])
    assert compute_cams(classifier, image, []).shape == (0, 30, 44)  # no present class: no CAM
    with pytest.raises(ValueError, match="1..5"):
        compute_cams(classifier, image, [6])


def test_cams_single_scale_equal_the_class_maps(classifier, image):
    with torch.no_grad():
        maps, _ = classifier.class_maps(image[None])
        raw = F.interpolate(maps.clamp(min=0), size=(30, 44), mode="bilinear", align_corners=False)[0]
        flipped, _ = classifier.class_maps(image[None].flip(-1))
        raw_flip = F.interpolate(flipped.clamp(min=0), size=(30, 44), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(compute_cams(classifier, image, [1, 3], scales=(1.0,), flip=False),
                               normalise(raw[[0, 2]]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(compute_cams(classifier, image, [1, 3], scales=(1.0,), flip=True),
                               normalise(raw[[0, 2]] + raw_flip[[0, 2]].flip(-1)), rtol=1e-4, atol=1e-5)


def test_cams_average_over_scales(classifier, image):
    def at_scale(s):
        x = F.interpolate(image[None], scale_factor=s, mode="bilinear", align_corners=False)
        with torch.no_grad():
            maps, _ = classifier.class_maps(x)
        return F.interpolate(maps.clamp(min=0)[:, [3]], size=(30, 44), mode="bilinear", align_corners=False)[0]

    # 0.5 × (30, 44) = (15, 22) and 2 × = (60, 88): exact sizes, so scale_factor gives the same resize
    expected = normalise(at_scale(0.5) + at_scale(1.0) + at_scale(2.0))
    got = compute_cams(classifier, image, [4], scales=(0.5, 1.0, 2.0), flip=False)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_cams_restore_training_mode_and_handle_a_dead_class(image):
    torch.manual_seed(2)
    model = build_classifier("resnet18", n_classes=4, output_stride=8)
    model(torch.randn(2, 3, 32, 32))
    with torch.no_grad():
        model.classifier.weight[1] = -model.classifier.weight[1].abs()  # features ≥ 0, so class 2's CAM is 0
    model.train()
    cams = compute_cams(model, image, [1, 2], scales=(1.0,))
    assert model.training
    assert (cams[1] == 0).all() and torch.isfinite(cams).all()
    assert cams[0].max() > 0.99


def test_cams_to_pseudo_label_by_hand():
    cams = torch.tensor([[[0.9, 0.2, 0.5], [0.0, 0.6, 0.31]],    # class 3
                         [[0.1, 0.25, 0.7], [0.0, 0.59, 0.29]]])  # class 7
    expected = np.array([[3, 0, 7], [0, 3, 3]], np.uint8)
    got = cams_to_pseudo_label(cams, [3, 7], threshold=0.3)
    assert got.dtype == np.uint8 and np.array_equal(got, expected)
    # a higher threshold turns weak pixels to background
    assert np.array_equal(cams_to_pseudo_label(cams, [3, 7], threshold=0.65),
                          np.array([[3, 0, 7], [0, 0, 0]], np.uint8))
    # margin: best two within 0.05 become 255 (0.6 vs 0.59, 0.31 vs τ=0.3)
    assert np.array_equal(cams_to_pseudo_label(cams, [3, 7], threshold=0.3, margin=0.05),
                          np.array([[3, 0, 7], [0, 255, 255]], np.uint8))
    # no present class: background everywhere, margin or not
    assert (cams_to_pseudo_label(torch.zeros(0, 2, 3), [], 0.3, margin=0.1) == 0).all()
    # ties go to background
    assert (cams_to_pseudo_label(torch.full((1, 2, 2), 0.3), [1], 0.3) == 0).all()
    with pytest.raises(ValueError, match="score rows"):
        scores_to_pseudo_label(torch.zeros(2, 2, 2), [1, 2])


def two_region_image(height: int = 48, width: int = 64) -> np.ndarray:
    rng = np.random.default_rng(0)
    image = np.zeros((height, width, 3), np.float64)
    image[:, : width // 2] = (200, 40, 40)
    image[:, width // 2:] = (40, 40, 200)
    return np.clip(image + rng.normal(0, 6, image.shape), 0, 255).astype(np.uint8)


def test_random_walk_spreads_scribbles_within_colour_regions():
    image = two_region_image()
    scribble = np.full((48, 64), 255, np.uint8)
    scribble[24, 40:58] = 5  # a stroke of class 5 in the blue half
    scribble[10, 4:26] = 0  # a background stroke in the red half
    cams = torch.full((1, 48, 64), 0.2)  # a CAM too weak to beat τ anywhere
    assert (cams_to_pseudo_label(cams, [5], threshold=0.3) == 0).all()

    scores = refine_with_scribbles(cams, [5], image, scribble, threshold=0.3)
    assert scores.shape == (2, 48, 64) and scores.min() >= 0 and scores.max() <= 1
    pseudo = scores_to_pseudo_label(scores, [5])
    assert (pseudo[:, 36:] == 5).mean() > 0.95  # the blue half, away from the colour edge
    assert (pseudo[:, :28] == 0).all()  # the colour edge stops the class
    assert (pseudo[scribble == 5] == 5).all() and (pseudo[scribble == 0] == 0).all()

    # without the colour edge (flat image) class 5 leaks over the middle: affinities do the work
    flat = np.full_like(image, 120)
    leaked = scores_to_pseudo_label(refine_with_scribbles(cams, [5], flat, scribble, threshold=0.3), [5])
    assert (leaked[:, 26:32] == 5).mean() > (pseudo[:, 26:32] == 5).mean()


def test_random_walk_without_scribbles_keeps_uniform_scores():
    image = two_region_image()
    cams = torch.full((2, 48, 64), 0.6)
    # the transition matrix is row-stochastic, with no weight outside the image: constant scores stay
    # constant (a black image would lose mass at the border if outside pixels counted)
    for img in (image, np.zeros_like(image)):
        scores = refine_with_scribbles(cams, [1, 2], img, np.full((48, 64), 255, np.uint8), threshold=0.3)
        torch.testing.assert_close(scores, torch.cat([torch.full((1, 48, 64), 0.3), cams]))
    with pytest.raises(ValueError, match="size"):
        refine_with_scribbles(cams, [1, 2], image[:10], np.full((48, 64), 255, np.uint8), threshold=0.3)
    with pytest.raises(ValueError, match="size"):
        refine_with_scribbles(cams, [1, 2], image[..., 0], np.full((48, 64), 255, np.uint8), threshold=0.3)
