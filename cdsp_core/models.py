"""Networks: ResNet and MobileNetV2 backbones, the stage-1 CAM classifier, DeepLab-v2/v3+ segmenters, LoRM.

The ResNets follow torchvision's `resnet.py` module for module, and MobileNetV2 its
`mobilenetv2.py`, so a torchvision ImageNet state dict (e.g. `resnet50-0676ba61.pth`,
`mobilenet_v2-b0353104.pth`) loads into them with strict=True; torchvision itself is not a
dependency (its wheels are CUDA builds). Unlike torchvision, BasicBlock also takes a dilation,
so ResNet-18/34 can run at output stride 8 or 16 too, and the stem's max-pool can be left out
(`stem_stride` 2): small images then keep twice the resolution through layer1 and layer2.
MobileNetV2 reaches output stride 16 or 8 the DeepLab way: its last stride-2 blocks keep stride
1 and dilate their depthwise convolutions instead.

Every backbone's `forward(x)` returns (low-level map at stride 4, last map at the output stride)
and the attributes `low_level_channels`, `out_channels`, `output_stride`, `skipped_keys` (prefixes of
the torchvision state dict it leaves out, dropped when weights load).

Builders:
    make_backbone(name, output_stride, width, stem_stride, segmenter)  -> ResNet | MobileNetV2
    build_classifier(backbone, n_classes, output_stride, pretrained="") -> Classifier
    build_segmenter(name, backbone, n_classes, pretrained="")          -> DeepLabV2 | DeepLabV3Plus
    LoRM(channels)   the localisation rectification module (training only, kept outside the segmenter)

`n_classes` always counts background (21 for VOC). Segmenters return
`{"out": logits B×n_classes×H×W at the input size, "features": last backbone map B×C×h×w}`.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cdsp_core import config
from cdsp_core.errors import CdspError, load_failure

# ---------------------------------------------------------------------------- ResNet


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 dilation: int = 1):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride, dilation)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes, dilation=dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    # ResNet v1.5 (torchvision): the stride sits on the 3×3 convolution.
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 dilation: int = 1):
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


RESNETS: dict[str, tuple[type[nn.Module], list[int]]] = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
    "resnet101": (Bottleneck, [3, 4, 23, 3]),
    "resnet152": (Bottleneck, [3, 8, 36, 3]),
}


class ResNet(nn.Module):
    """torchvision's ResNet without its classification top (avgpool, fc): the backbone of the
    classifier and the segmenters, in torchvision's state-dict layout (`load_pretrained`).

    `forward(x)` returns (layer1 output at the stem's stride, layer4 output at the output stride).
    `stem_stride` 4 is torchvision's stem (7×7 convolution at stride 2, then a 3×3 max-pool at
    stride 2); 2 leaves the max-pool out. Neither has weights of its own, so ImageNet weights load
    into both.
    """

    def __init__(self, block: type[nn.Module], layers: Sequence[int],
                 replace_stride_with_dilation: Sequence[bool] = (False, False, False), width: int = 64,
                 stem_stride: int = 4):
        super().__init__()
        w = width  # channels of the first stage: torchvision's 64; less is a narrow net for CPU-scale runs
        self.inplanes = w
        self.dilation = 1
        self.conv1 = nn.Conv2d(3, w, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1) if stem_stride == 4 else nn.Identity()
        self.layer1 = self._make_layer(block, w, layers[0])
        self.layer2 = self._make_layer(block, 2 * w, layers[1], stride=2, dilate=replace_stride_with_dilation[0])
        self.layer3 = self._make_layer(block, 4 * w, layers[2], stride=2, dilate=replace_stride_with_dilation[1])
        self.layer4 = self._make_layer(block, 8 * w, layers[3], stride=2, dilate=replace_stride_with_dilation[2])
        self.low_level_channels = w * block.expansion
        self.out_channels = 8 * w * block.expansion
        self.output_stride = stem_stride * 8 // 2 ** sum(bool(d) for d in replace_stride_with_dilation)
        self.skipped_keys = ()  # layers of torchvision's that this backbone leaves out (MobileNetV2's)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, block: type[nn.Module], planes: int, blocks: int, stride: int = 1,
                    dilate: bool = False) -> nn.Sequential:
        previous_dilation = self.dilation
        if dilate:  # keep the resolution, grow the receptive field instead
            self.dilation *= stride
            stride = 1
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample, previous_dilation)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, dilation=self.dilation) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        low = self.layer1(x)
        return low, self.layer4(self.layer3(self.layer2(low)))


STEM_STRIDES = (4, 2)  # torchvision's stem (convolution and max-pool), or the convolution alone


def dilation_for_stride(output_stride: int, stem_stride: int = 4) -> tuple[bool, bool, bool]:
    """replace_stride_with_dilation for layer2..layer4 that gives `output_stride` after a stem of
    `stem_stride`: the first stages keep their stride 2, the later ones dilate instead."""
    if stem_stride not in STEM_STRIDES:
        raise CdspError(f"stem stride must be {' or '.join(map(str, STEM_STRIDES))}, got {stem_stride}")
    strides = {stem_stride * 2 ** k: k for k in (1, 2, 3)}  # output stride -> stages of layer2..4 that keep stride 2
    if output_stride not in strides:
        raise CdspError(f"output stride must be {', '.join(map(str, strides))} with stem stride {stem_stride}, "
                        f"got {output_stride}")
    kept = strides[output_stride]
    return tuple(i >= kept for i in range(3))


def resnet(name: str, output_stride: int = 32, width: int = 64, stem_stride: int = 4) -> ResNet:
    """ResNet-18/34/50/101/152 by name, e.g. resnet("resnet50", output_stride=8).

    `width` is the first stage's channel count (64: torchvision's, the only one ImageNet weights fit);
    `stem_stride` 2 leaves the stem's max-pool out (see ResNet).
    """
    if name not in RESNETS:
        raise CdspError(f"unknown backbone {name!r} (choose from {', '.join(RESNETS)})")
    if width < 1:
        raise CdspError(f"backbone width must be at least 1, got {width}")
    block, layers = RESNETS[name]
    return ResNet(block, layers, dilation_for_stride(output_stride, stem_stride), width, stem_stride)


# ---------------------------------------------------------------------------- MobileNetV2


class ConvBNReLU6(nn.Sequential):
    """torchvision's Conv2dNormActivation as MobileNetV2 uses it: convolution, BatchNorm, ReLU6."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1, dilation: int = 1):
        super().__init__(nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2 * dilation, dilation=dilation,
                                   groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    """torchvision's MobileNetV2 block (`conv`: expand 1×1, depthwise 3×3, project 1×1 + BN), with a dilation."""

    def __init__(self, cin: int, cout: int, stride: int, expand_ratio: int, dilation: int = 1):
        super().__init__()
        hidden = cin * expand_ratio
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = [ConvBNReLU6(cin, hidden, 1)] if expand_ratio != 1 else []
        layers += [ConvBNReLU6(hidden, hidden, 3, stride, groups=hidden, dilation=dilation),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


# (expand ratio t, channels c, blocks n, stride s of the first block): torchvision's / the paper's table 2
MOBILENET_V2_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                        (6, 320, 1, 1))
MOBILENET_V2_LOW_LEVEL = 4  # features[:4] ends at stride 4 (24 channels): DeepLab-v3+'s low-level features


class MobileNetV2(nn.Module):
    """torchvision's MobileNetV2 (width 1.0) without its classification top (`classifier`): `features.0`..`18`.

    With `last_conv` (the classifier's backbone) the last map is that of `features.18`, the 1×1
    convolution to 1280 channels that the ImageNet classifier reads. Without it (the segmenters'),
    the last map is the 320-channel output of the last block, `features.17`, as DeepLab-v3+ and
    Google's DeepLab models read MobileNetV2; `features.18.*` is then left out when ImageNet weights
    load (`skipped_keys`). On 225-px crops at stride 16 a DeepLab-v2 head with LoRM trains 1.9×
    faster so (LoRM's two 1×1 projections are C×C), docs/benchmarks.md "Real photos".
    Output stride 32, 16 or 8: the stride-2 blocks past it keep stride 1 and their stage's later
    blocks dilate their depthwise convolutions (as ResNet layers do).
    """

    def __init__(self, output_stride: int = 32, last_conv: bool = True):
        super().__init__()
        if output_stride not in (8, 16, 32):
            raise CdspError(f"output stride must be 8, 16 or 32 for mobilenet_v2, got {output_stride}")
        stride, dilation = 2, 1
        layers: list[nn.Module] = [ConvBNReLU6(3, 32, stride=2)]
        cin = 32
        for t, c, n, s in MOBILENET_V2_SETTING:
            previous_dilation = dilation
            if stride * s > output_stride:  # keep the resolution, grow the receptive field instead
                dilation *= s
                s = 1
            stride *= s
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t,
                                               previous_dilation if i == 0 else dilation))
                cin = c
        self.skipped_keys = () if last_conv else (f"features.{len(layers)}.",)
        if last_conv:
            layers.append(ConvBNReLU6(cin, 1280, 1))
            cin = 1280
        self.features = nn.Sequential(*layers)
        self.low_level_channels = layers[MOBILENET_V2_LOW_LEVEL - 1].conv[-1].num_features
        self.out_channels = cin
        self.output_stride = output_stride

        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        low = self.features[:MOBILENET_V2_LOW_LEVEL](x)
        return low, self.features[MOBILENET_V2_LOW_LEVEL:](low)


BACKBONES = (*RESNETS, "mobilenet_v2")


def make_backbone(name: str, output_stride: int = 32, width: int = 64, stem_stride: int = 4,
                  segmenter: bool = False) -> ResNet | MobileNetV2:
    """A backbone by name: a ResNet (`resnet`) or MobileNetV2, whose width and stem are torchvision's only.

    `segmenter`: the backbone as the segmenters read it (MobileNetV2 without its last 1×1 convolution)."""
    if name == "mobilenet_v2":
        if width != 64 or stem_stride != 4:
            raise CdspError(f"mobilenet_v2 has torchvision's width and stem only: width 64 and stem stride 4, "
                            f"got {width} and {stem_stride}")
        return MobileNetV2(output_stride, last_conv=not segmenter)
    if name not in RESNETS:
        raise CdspError(f"unknown backbone {name!r} (choose from {', '.join(BACKBONES)})")
    return resnet(name, output_stride, width, stem_stride)


# ---------------------------------------------------------------------------- pretrained weights


def _torch_load(path: str | Path, name: str) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise CdspError(f"{name}: pretrained weights not found") from e
    except IsADirectoryError as e:
        raise CdspError(f"{name}: is a folder, expected a weights file") from e
    except OSError as e:
        raise CdspError(f"{name}: cannot read pretrained weights: {e}") from e
    except Exception as e:  # unpickling errors come in many types
        raise CdspError(f"{name}: not a torch state dict ({load_failure(e)})") from e


BACKBONE_PREFIX = "backbone."  # the backbone's entries in a classifier's or segmenter's state dict
IMAGENET_TOPS = ("fc.", "classifier.")  # torchvision's classification tops: ResNet's, MobileNetV2's
BACKBONE_TYPES = (ResNet, MobileNetV2)


def load_pretrained(model: nn.Module, path_or_uri: str) -> nn.Module:
    """Load backbone weights (a file or a storage URI) into `model`'s backbone, strictly.

    `model` is a backbone (ResNet, MobileNetV2), or a network with one as `.backbone`. The weights are
    torchvision's layout (ImageNet files; their classification top, a ResNet's `fc.*` or a MobileNetV2's
    `classifier.*`, which our backbones have not, is dropped) or
    one of our model files (a classifier's or segmenter's model.pt: its `backbone.*` entries, so a
    run can start from an earlier one's backbone, at any width). Any missing, unexpected or
    misshapen entry is a CdspError naming the file (ImageNet weights fit only width 64). Loaded
    with torch.load(weights_only=True); a URI (s3://...) is first downloaded to a temporary file
    through `cdsp_core.storage`.
    """
    target = model.backbone if isinstance(getattr(model, "backbone", None), BACKBONE_TYPES) else model
    if "://" in path_or_uri:
        from cdsp_core import storage  # lazily: boto3 is only needed for URIs

        with tempfile.TemporaryDirectory(prefix="cdsp-weights-") as tmp:
            state = _torch_load(storage.download_file(path_or_uri, Path(tmp) / "weights.pth"), path_or_uri)
    else:
        state = _torch_load(path_or_uri, path_or_uri)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a common checkpoint wrapping
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CdspError(f"{path_or_uri}: not a state dict of tensors")
    if any(k.startswith(BACKBONE_PREFIX) for k in state):  # our model file: its backbone alone
        state = {k[len(BACKBONE_PREFIX):]: v for k, v in state.items() if k.startswith(BACKBONE_PREFIX)}
    state = {k: v for k, v in state.items() if not k.startswith(IMAGENET_TOPS + target.skipped_keys)}

    own = target.state_dict()
    # BatchNorm fills in num_batches_tracked when old torchvision files lack it.
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    misshapen = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
                 if k in state and state[k].shape != v.shape]
    if missing or unexpected or misshapen:
        parts = [f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''} ({len(keys)})"
                 for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshapen))
                 if keys]
        raise CdspError(f"{path_or_uri}: weights do not fit this {type(target).__name__} "
                        f"(wrong backbone or width?): {'; '.join(parts)}")
    target.load_state_dict(state, strict=True)
    return model


# ---------------------------------------------------------------------------- stage 1: classifier


class Classifier(nn.Module):
    """Backbone, global average pooling, a bias-free 1×1 convolution to n_classes − 1 logits.

    Logit k is class k + 1 (background is not an output). Because pooling and the 1×1
    convolution are both linear, the logits equal the spatial mean of the class maps w_c·F.
    """

    def __init__(self, backbone: ResNet | MobileNetV2, n_classes: int):
        super().__init__()
        self.backbone = backbone
        self.n_classes = n_classes
        self.classifier = nn.Conv2d(backbone.out_channels, n_classes - 1, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Image-level logits B×(C−1)."""
        pooled = self.backbone(x)[1].mean((2, 3), keepdim=True)
        return self.classifier(pooled).flatten(1)

    def class_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(w_c·F, the class maps B×(C−1)×h×w before ReLU, and the logits B×(C−1) = their mean)."""
        maps = self.classifier(self.backbone(x)[1])
        return maps, maps.mean((2, 3))

    def forward_cams(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(raw CAMs ReLU(w_c·F) B×(C−1)×h×w, logits B×(C−1))."""
        maps, logits = self.class_maps(x)
        return F.relu(maps), logits


def build_classifier(backbone: str, n_classes: int, output_stride: int = 16, pretrained: str = "",
                     width: int = 64) -> Classifier:
    """The stage-1 classifier; `pretrained` is a weight file or URI for its backbone (`load_pretrained`;
    "" = from scratch)."""
    model = Classifier(make_backbone(backbone, output_stride, width=width), n_classes)
    if pretrained:
        load_pretrained(model, pretrained)
    return model


# ---------------------------------------------------------------------------- stage 2: segmenters


class DeepLabV2(nn.Module):
    """DeepLab-v2: ASPP-v2 = four parallel 3×3 atrous convolutions (6/12/18/24) to class scores, summed."""

    def __init__(self, backbone: ResNet | MobileNetV2, n_classes: int, rates: Sequence[int] = (6, 12, 18, 24)):
        super().__init__()
        self.backbone = backbone
        self.n_classes = n_classes
        self.aspp = nn.ModuleList(
            nn.Conv2d(backbone.out_channels, n_classes, 3, padding=r, dilation=r) for r in rates)
        for conv in self.aspp:  # as in the original DeepLab-v2 release
            nn.init.normal_(conv.weight, 0, 0.01)
            nn.init.constant_(conv.bias, 0)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.backbone(x)[1]
        logits = sum(branch(features) for branch in self.aspp)
        out = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return {"out": out, "features": features}


class ASPPPooling(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_channels, out_channels, 1, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(super().forward(x), size=x.shape[-2:], mode="bilinear", align_corners=False)


class ASPP(nn.Module):
    """DeepLab-v3 ASPP (torchvision's): a 1×1 branch, 3×3 atrous branches, image pooling; concat, project."""

    def __init__(self, in_channels: int, rates: Sequence[int] = (6, 12, 18), out_channels: int = 256):
        super().__init__()
        branches: list[nn.Module] = [nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False),
                                                   nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))]
        for r in rates:
            branches.append(nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 3, padding=r, dilation=r, bias=False),
                nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)))
        branches.append(ASPPPooling(in_channels, out_channels))
        self.convs = nn.ModuleList(branches)
        self.project = nn.Sequential(nn.Conv2d(len(branches) * out_channels, out_channels, 1, bias=False),
                                     nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True), nn.Dropout(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([conv(x) for conv in self.convs], dim=1))


class DeepLabV3Plus(nn.Module):
    """DeepLab-v3+: ASPP (1/6/12/18 + image pooling) on the last map, decoder with the layer1 map (stride 4, or 2
    without the stem's max-pool)."""

    def __init__(self, backbone: ResNet | MobileNetV2, n_classes: int, rates: Sequence[int] = (6, 12, 18)):
        super().__init__()
        self.backbone = backbone
        self.n_classes = n_classes
        self.aspp = ASPP(backbone.out_channels, rates, 256)
        self.project_low = nn.Sequential(nn.Conv2d(backbone.low_level_channels, 48, 1, bias=False),
                                         nn.BatchNorm2d(48), nn.ReLU(inplace=True))
        self.decoder = nn.Sequential(
            nn.Conv2d(256 + 48, 256, 3, padding=1, bias=False), nn.BatchNorm2d(256), nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, 3, padding=1, bias=False), nn.BatchNorm2d(256), nn.ReLU(inplace=True),
            nn.Conv2d(256, n_classes, 1))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        low, features = self.backbone(x)
        y = F.interpolate(self.aspp(features), size=low.shape[-2:], mode="bilinear", align_corners=False)
        logits = self.decoder(torch.cat([self.project_low(low), y], dim=1))
        out = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return {"out": out, "features": features}


SEGMENTERS: dict[str, type[nn.Module]] = {"deeplabv2": DeepLabV2, "deeplabv3p": DeepLabV3Plus}


def parse_rates(text: str) -> tuple[int, ...]:
    """Atrous rates from "6,12,18,24" ("" = none given): `config.parse_rates`, as a CdspError naming the setting."""
    try:
        return tuple(config.parse_rates(text))
    except ValueError as e:
        raise CdspError(f"aspp_rates: {e}") from e


def build_segmenter(name: str, backbone: str, n_classes: int, pretrained: str = "",
                    output_stride: int = 8, width: int = 64, aspp_rates: str = "", stem_stride: int = 4) -> nn.Module:
    """DeepLab-v2 ("deeplabv2") or DeepLab-v3+ ("deeplabv3p") on a ResNet or MobileNetV2 at output stride 8 (or 16).

    `pretrained` loads ImageNet weights or an earlier model's backbone into the backbone
    (`load_pretrained`; "" = from scratch).
    `aspp_rates` ("6,12,18,24") replaces the head's atrous rates ("" = the architecture's own);
    `stem_stride` 2 leaves the backbone's max-pool out (ResNet).
    """
    if name not in SEGMENTERS:
        raise CdspError(f"unknown segmenter {name!r} (choose from {', '.join(SEGMENTERS)})")
    rates = parse_rates(aspp_rates)
    model = SEGMENTERS[name](make_backbone(backbone, output_stride, width, stem_stride, segmenter=True), n_classes,
                             **({"rates": rates} if rates else {}))
    if pretrained:
        load_pretrained(model, pretrained)
    return model


# ---------------------------------------------------------------------------- LoRM


class LoRM(nn.Module):
    """Localisation rectification module (training only): F' = γ · m · softmax_j(cos(Q_i, K_j) / τ) F_j.

    Q = W_q F, K = W_k F (1×1 convolutions C→C); m_i = 1 where the pseudo-label, resized to
    h×w by nearest neighbour, is foreground (1..C−1; 0 and 255 are not); γ a learnt scalar,
    initialised to 1. forward(features, pseudo_label) returns F'; the loss against F is
    `losses.lorm_loss(features, rectified)`. Kept out of the segmenter so inference and the
    saved model do not carry it; the training loop owns (and optimises) it.

    τ = 1 is the method's: a cosine lies in [−1, 1], so over N positions no weight exceeds
    e²/N and F'_i is close to the image's mean feature. A smaller τ lets each foreground
    feature attend to the features most like it (`lorm_temperature`).
    """

    def __init__(self, channels: int, temperature: float = 1.0):
        super().__init__()
        if not temperature > 0:
            raise CdspError(f"lorm_temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.query = nn.Conv2d(channels, channels, 1)
        self.key = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.ones(()))
        for conv in (self.query, self.key):  # as in the authors' code
            nn.init.xavier_uniform_(conv.weight)
            nn.init.constant_(conv.bias, 0)

    @staticmethod
    def foreground(pseudo_label: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """m: B×1×h×w booleans, the pseudo-label resized to the feature map is foreground (not 0, not 255)."""
        label = F.interpolate(pseudo_label[:, None].float(), size=size, mode="nearest")
        return (label != 0) & (label != 255)

    def forward(self, features: torch.Tensor, pseudo_label: torch.Tensor) -> torch.Tensor:
        b, c, h, w = features.shape
        # cosine similarity: unit-length columns, normalised in at least float32 (fp16 norms overflow)
        precision = torch.promote_types(features.dtype, torch.float32)
        q = F.normalize(self.query(features).flatten(2).to(precision), dim=1)  # B×C×N
        k = F.normalize(self.key(features).flatten(2).to(precision), dim=1)
        attention = torch.softmax(q.transpose(1, 2) @ k / self.temperature, dim=-1)  # B×N×N, rows sum to 1
        mask = self.foreground(pseudo_label, (h, w)).flatten(2).to(features.dtype)  # B×1×N
        consensus = features.flatten(2) @ attention.transpose(1, 2).to(features.dtype)  # Σ_j A_ij F_j, B×C×N
        return (self.gamma * mask * consensus).view(b, c, h, w)
