"""Joint augmentation of an image with its label maps and weight maps.

Every transform takes and returns `(image, labels, weights)`: a PIL RGB image and two
dicts of PIL mode-L maps. Label maps (scribbles, pseudo-labels, ground truth) are padded
with 255 (ignored) and weight maps (distance maps) with 0 (no weight); both are resampled
nearest-neighbour so that they keep their exact values and follow the image's geometry.
The recipe is the method page's: random scale, rotation, Gaussian blur, horizontal flip,
random crop, ImageNet normalisation.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image, ImageFilter

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MEAN_PIXEL = tuple(round(255 * m) for m in IMAGENET_MEAN)  # pad colour: zero after normalising
LABEL_FILL = 255
WEIGHT_FILL = 0

Maps = dict[str, Image.Image]


def _maps(labels: Maps, weights: Maps, fn) -> tuple[Maps, Maps]:
    """Apply `fn(map, fill)` to every label map (fill 255) and weight map (fill 0)."""
    return ({k: fn(v, LABEL_FILL) for k, v in labels.items()},
            {k: fn(v, WEIGHT_FILL) for k, v in weights.items()})


class Compose:
    def __init__(self, transforms):
        self.transforms = transforms

    def __call__(self, image, labels, weights):
        for t in self.transforms:
            image, labels, weights = t(image, labels, weights)
        return image, labels, weights


class RandomScale:
    """Resize by a factor drawn uniformly from [low, high]."""

    def __init__(self, low: float, high: float):
        self.low, self.high = low, high

    def __call__(self, image, labels, weights):
        s = random.uniform(self.low, self.high)
        size = (max(1, round(image.width * s)), max(1, round(image.height * s)))
        image = image.resize(size, Image.BILINEAR)
        labels, weights = _maps(labels, weights, lambda m, _: m.resize(size, Image.NEAREST))
        return image, labels, weights


class RandomRotation:
    """Rotate by an angle drawn uniformly from [-degrees, degrees]; corners get the fills."""

    def __init__(self, degrees: float):
        self.degrees = degrees

    def __call__(self, image, labels, weights):
        if self.degrees <= 0:
            return image, labels, weights
        angle = random.uniform(-self.degrees, self.degrees)
        image = image.rotate(angle, Image.BILINEAR, fillcolor=MEAN_PIXEL)
        labels, weights = _maps(labels, weights, lambda m, fill: m.rotate(angle, Image.NEAREST, fillcolor=fill))
        return image, labels, weights


class RandomGaussianBlur:
    """Blur the image (only) with probability p, sigma drawn from [0.1, 2.0]."""

    def __init__(self, p: float = 0.5, sigma: tuple[float, float] = (0.1, 2.0)):
        self.p, self.sigma = p, sigma

    def __call__(self, image, labels, weights):
        if random.random() < self.p:
            image = image.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))
        return image, labels, weights


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image, labels, weights):
        if random.random() < self.p:
            flip = Image.Transpose.FLIP_LEFT_RIGHT
            image = image.transpose(flip)
            labels, weights = _maps(labels, weights, lambda m, _: m.transpose(flip))
        return image, labels, weights


def _pad_to(im: Image.Image, width: int, height: int, fill) -> Image.Image:
    if im.width >= width and im.height >= height:
        return im
    out = Image.new(im.mode, (max(width, im.width), max(height, im.height)), fill)
    out.paste(im, (0, 0))
    return out


class RandomCrop:
    """Pad (bottom/right) to at least size×size, then crop size×size at a random place."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image, labels, weights):
        s = self.size
        image = _pad_to(image, s, s, MEAN_PIXEL)
        labels, weights = _maps(labels, weights, lambda m, fill: _pad_to(m, s, s, fill))
        x = random.randint(0, image.width - s)
        y = random.randint(0, image.height - s)
        box = (x, y, x + s, y + s)
        image = image.crop(box)
        labels, weights = _maps(labels, weights, lambda m, _: m.crop(box))
        return image, labels, weights


class ToTensor:
    """Image → normalised float C×H×W; labels → int64 H×W; weights → float H×W in [0, 1]."""

    def __call__(self, image, labels, weights):
        return (to_normalized_tensor(image),
                {k: torch.from_numpy(np.array(v, dtype=np.int64)) for k, v in labels.items()},
                {k: torch.from_numpy(np.array(v, dtype=np.float32) / 255.0) for k, v in weights.items()})


def to_normalized_tensor(image: Image.Image) -> torch.Tensor:
    """A PIL RGB image as an ImageNet-normalised float tensor, 3×H×W."""
    x = torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1).float().div_(255)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x - mean) / std


def train_transform(crop_size: int, scale_min: float, scale_max: float, rotation: float) -> Compose:
    """The training recipe: scale, rotate, blur, flip, crop, normalise."""
    return Compose([
        RandomScale(scale_min, scale_max),
        RandomRotation(rotation),
        RandomGaussianBlur(),
        RandomHorizontalFlip(),
        RandomCrop(crop_size),
        ToTensor(),
    ])
