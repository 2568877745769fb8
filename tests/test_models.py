"""Networks: torchvision's ResNet state-dict layout, output strides, heads, pretrained loading, LoRM."""

from __future__ import annotations

import argparse

import pytest
import torch

from cdsp_core.errors import CdspError
from cdsp_core.models import (
    LoRM,
    build_classifier,
    build_segmenter,
    load_pretrained,
    resnet,
)

# torchvision's block counts and widths, written down independently of cdsp_core.models.
BLOCKS = {"resnet18": (False, [2, 2, 2, 2]), "resnet34": (False, [3, 4, 6, 3]),
          "resnet50": (True, [3, 4, 6, 3]), "resnet101": (True, [3, 4, 23, 3]), "resnet152": (True, [3, 8, 36, 3])}
# Parameter counts that torchvision's documentation lists for these models.
TORCHVISION_PARAMS = {"resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032,
                      "resnet101": 44_549_160, "resnet152": 60_192_808}


def torchvision_layout(name: str) -> list[tuple[str, tuple[int, ...]]]:
    """The (key, shape) list of torchvision's `models.<name>().state_dict()`, in order."""
    bottleneck, counts = BLOCKS[name]

    def bn(prefix: str, n: int) -> list[tuple[str, tuple[int, ...]]]:
        return [(f"{prefix}.weight", (n,)), (f"{prefix}.bias", (n,)), (f"{prefix}.running_mean", (n,)),
                (f"{prefix}.running_var", (n,)), (f"{prefix}.num_batches_tracked", ())]

    keys = [("conv1.weight", (64, 3, 7, 7)), *bn("bn1", 64)]
    inplanes = 64
    for layer, (planes, n_blocks) in enumerate(zip([64, 128, 256, 512], counts), start=1):
        out = planes * (4 if bottleneck else 1)
        for i in range(n_blocks):
            p = f"layer{layer}.{i}"
            cin = inplanes if i == 0 else out
            if bottleneck:
                keys += [(f"{p}.conv1.weight", (planes, cin, 1, 1)), *bn(f"{p}.bn1", planes),
                         (f"{p}.conv2.weight", (planes, planes, 3, 3)), *bn(f"{p}.bn2", planes),
                         (f"{p}.conv3.weight", (out, planes, 1, 1)), *bn(f"{p}.bn3", out)]
            else:
                keys += [(f"{p}.conv1.weight", (planes, cin, 3, 3)), *bn(f"{p}.bn1", planes),
                         (f"{p}.conv2.weight", (planes, planes, 3, 3)), *bn(f"{p}.bn2", planes)]
            if i == 0 and (layer > 1 or cin != out):
                keys += [(f"{p}.downsample.0.weight", (out, cin, 1, 1)), *bn(f"{p}.downsample.1", out)]
        inplanes = out
    keys += [("fc.weight", (1000, inplanes)), ("fc.bias", (1000,))]
    return keys


def fake_torchvision_weights(name: str, drop_batch_counters: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    state = {}
    for k, shape in torchvision_layout(name):
        if k.endswith("num_batches_tracked"):
            if not drop_batch_counters:  # old torchvision files lack these
                state[k] = torch.tensor(7)
        else:
            state[k] = torch.randn(shape, generator=g)
    return state


def test_resnet50_layout_is_torchvision():
    expected = torchvision_layout("resnet50")
    assert len(expected) == 320
    with torch.device("meta"):
        model = resnet("resnet50")
    got = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    # torchvision's, but for its classification top (fc), which load_pretrained drops
    assert [k for k, _ in expected[-2:]] == ["fc.weight", "fc.bias"]
    assert got == expected[:-2]


@pytest.mark.parametrize("name", list(BLOCKS))
def test_every_resnet_layout_and_size(name):
    with torch.device("meta"):
        model = resnet(name)
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == torchvision_layout(name)[:-2]
    fc = 1000 * model.out_channels + 1000  # torchvision's classification top, which ours has not
    assert sum(p.numel() for p in model.parameters()) + fc == TORCHVISION_PARAMS[name]
    # dilation changes no key or shape
    with torch.device("meta"):
        dilated = resnet(name, output_stride=8)
    assert [(k, tuple(v.shape)) for k, v in dilated.state_dict().items()] == torchvision_layout(name)[:-2]


@pytest.mark.parametrize("name, device", [("resnet18", "cpu"), ("resnet50", "meta"), ("resnet101", "meta")])
def test_output_strides(name, device):
    # on the meta device shapes are computed without arithmetic: the big ResNets cost nothing
    with torch.device(device):
        x = torch.randn(1, 3, 64, 64)
        for stride in (8, 16, 32):
            model = resnet(name, output_stride=stride).eval()
            with torch.no_grad():
                low, out = model(x)
            assert model.output_stride == stride
            assert out.shape == (1, model.out_channels, 64 // stride, 64 // stride)
            assert low.shape == (1, model.low_level_channels, 16, 16)


def test_a_stem_without_max_pool_doubles_the_early_resolution_and_keeps_the_output_stride(tmp_path):
    x = torch.randn(1, 3, 64, 64)
    for stride in (4, 8, 16):
        model = resnet("resnet18", output_stride=stride, width=8, stem_stride=2).eval()
        with torch.no_grad():
            low, out = model(x)
        assert model.output_stride == stride
        assert out.shape == (1, model.out_channels, 64 // stride, 64 // stride)
        assert low.shape == (1, model.low_level_channels, 32, 32)  # layer1 at stride 2, not 4
    # at output stride 8 layer3 keeps its stride 2 and only layer4 is dilated
    model = resnet("resnet18", output_stride=8, stem_stride=2)
    assert model.layer3[0].conv1.stride == (2, 2) and model.layer4[0].conv1.dilation == (1, 1)
    assert model.layer4[1].conv1.dilation == (2, 2)
    # the max-pool has no weights: the same state-dict layout, so ImageNet weights load
    assert [(k, v.shape) for k, v in model.state_dict().items()] == \
        [(k, v.shape) for k, v in resnet("resnet18", output_stride=8).state_dict().items()]
    path = tmp_path / "resnet18.pth"
    torch.save(fake_torchvision_weights("resnet18"), path)
    seg = build_segmenter("deeplabv2", "resnet18", 6, pretrained=str(path), stem_stride=2)
    assert isinstance(seg.backbone.maxpool, torch.nn.Identity)
    assert seg(torch.randn(2, 3, 48, 48))["out"].shape == (2, 6, 48, 48)
    v3 = build_segmenter("deeplabv3p", "resnet18", 6, width=8, stem_stride=2)
    assert v3(torch.randn(2, 3, 48, 48))["out"].shape == (2, 6, 48, 48)  # its decoder takes layer1 at stride 2


def test_resnet_rejects_bad_settings():
    with pytest.raises(CdspError, match="output stride"):
        resnet("resnet18", output_stride=4)
    with pytest.raises(CdspError, match="output stride must be 4, 8, 16 with stem stride 2"):
        resnet("resnet18", output_stride=32, stem_stride=2)
    with pytest.raises(CdspError, match="stem stride must be 4 or 2"):
        resnet("resnet18", output_stride=8, stem_stride=1)
    with pytest.raises(CdspError, match="resnet19"):
        resnet("resnet19")


def test_load_pretrained_strict(tmp_path):
    state = fake_torchvision_weights("resnet18")
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    net = load_pretrained(resnet("resnet18"), str(path))  # torchvision's file: its fc entries are dropped
    assert torch.equal(net.layer3[0].downsample[0].weight, state["layer3.0.downsample.0.weight"])

    # into a classifier's and a segmenter's backbone
    clf = build_classifier("resnet18", 21, output_stride=8, pretrained=str(path))
    assert torch.equal(clf.backbone.conv1.weight, state["conv1.weight"])
    seg = build_segmenter("deeplabv3p", "resnet18", 21, pretrained=str(path))
    assert torch.equal(seg.backbone.layer4[1].bn2.running_var, state["layer4.1.bn2.running_var"])

    # old files without BatchNorm batch counters still load
    old = tmp_path / "old.pth"
    torch.save(fake_torchvision_weights("resnet18", drop_batch_counters=True), old)
    load_pretrained(resnet("resnet18"), str(old))


def test_narrow_resnets_keep_the_layout_and_refuse_imagenet_weights(tmp_path):
    narrow = resnet("resnet18", output_stride=8, width=16)
    standard = resnet("resnet18", output_stride=8)
    assert list(narrow.state_dict()) == list(standard.state_dict())  # the same modules, fewer channels
    assert narrow.layer4[1].conv2.weight.shape == (128, 128, 3, 3) and narrow.out_channels == 128
    low, out = narrow(torch.randn(1, 3, 64, 64))
    assert low.shape == (1, 16, 16, 16) and out.shape == (1, 128, 8, 8)
    seg = build_segmenter("deeplabv2", "resnet18", 6, output_stride=8, width=16)
    assert seg(torch.randn(2, 3, 48, 48))["out"].shape == (2, 6, 48, 48)
    assert sum(p.numel() for p in seg.parameters()) < sum(p.numel() for p in standard.parameters()) / 10

    path = tmp_path / "resnet18.pth"
    torch.save(fake_torchvision_weights("resnet18"), path)
    with pytest.raises(CdspError, match=r"resnet18\.pth: weights do not fit .*width.*wrong shape: conv1\.weight"):
        build_segmenter("deeplabv2", "resnet18", 6, pretrained=str(path), width=16)
    with pytest.raises(CdspError, match=r"resnet18\.pth: weights do not fit"):
        build_classifier("resnet18", 6, pretrained=str(path), width=32)


def test_pretrained_from_an_earlier_model_file(tmp_path):
    # a narrow stage-1 classifier's model.pt starts a segmenter of that width (its backbone only)
    clf = build_classifier("resnet18", 5, output_stride=8, width=16)
    torch.nn.init.normal_(clf.backbone.layer4[1].conv2.weight)
    torch.save(clf.state_dict(), tmp_path / "model.pt")
    seg = build_segmenter("deeplabv2", "resnet18", 5, pretrained=str(tmp_path / "model.pt"), width=16,
                          stem_stride=2)
    assert torch.equal(seg.backbone.layer4[1].conv2.weight, clf.backbone.layer4[1].conv2.weight)
    assert torch.equal(seg.backbone.bn1.running_var, clf.backbone.bn1.running_var)
    # and a segmenter's model.pt another segmenter (its head is left as built)
    torch.save(seg.state_dict(), tmp_path / "seg.pt")
    again = build_segmenter("deeplabv2", "resnet18", 5, pretrained=str(tmp_path / "seg.pt"), width=16)
    assert torch.equal(again.backbone.conv1.weight, seg.backbone.conv1.weight)
    with pytest.raises(CdspError, match=r"model\.pt: weights do not fit .*wrong shape"):
        build_segmenter("deeplabv2", "resnet18", 5, pretrained=str(tmp_path / "model.pt"), width=32)


def test_load_pretrained_from_s3(tmp_path, s3):
    state = fake_torchvision_weights("resnet18")
    torch.save(state, tmp_path / "r18.pth")
    bucket = s3.new_bucket("w")
    s3.client().upload_file(str(tmp_path / "r18.pth"), bucket, "weights/r18.pth")
    model = build_segmenter("deeplabv2", "resnet18", 5, pretrained=f"s3://{bucket}/weights/r18.pth")
    assert torch.equal(model.backbone.layer2[1].conv2.weight, state["layer2.1.conv2.weight"])
    with pytest.raises(CdspError, match=f"s3://{bucket}/weights/absent.pth"):
        load_pretrained(model, f"s3://{bucket}/weights/absent.pth")


def test_load_pretrained_errors_name_the_file(tmp_path):
    wrong_arch = tmp_path / "r34.pth"
    torch.save(fake_torchvision_weights("resnet34"), wrong_arch)
    with pytest.raises(CdspError, match=r"r34\.pth.*unexpected: layer1\.2"):
        load_pretrained(resnet("resnet18"), str(wrong_arch))

    state = fake_torchvision_weights("resnet18")
    state["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    del state["layer1.0.bn1.bias"]
    broken = tmp_path / "broken.pth"
    torch.save(state, broken)
    with pytest.raises(CdspError, match=r"broken\.pth.*missing: layer1\.0\.bn1\.bias.*wrong shape: conv1\.weight"):
        load_pretrained(resnet("resnet18"), str(broken))

    with pytest.raises(CdspError, match=r"absent\.pth.*not found"):
        load_pretrained(resnet("resnet18"), str(tmp_path / "absent.pth"))
    (tmp_path / "junk.pth").write_bytes(b"\x00garbage")
    with pytest.raises(CdspError, match=r"junk\.pth.*not a torch state dict"):
        load_pretrained(resnet("resnet18"), str(tmp_path / "junk.pth"))

    # weights_only=True refuses to unpickle arbitrary objects
    torch.save({"conv1.weight": argparse.Namespace(x=1)}, tmp_path / "evil.pth")
    with pytest.raises(CdspError, match=r"evil\.pth.*not a torch state dict") as err:
        load_pretrained(resnet("resnet18"), str(tmp_path / "evil.pth"))
    assert "\n" not in str(err.value)  # one line for the CLI
    with pytest.raises(CdspError, match="is a folder"):
        load_pretrained(resnet("resnet18"), str(tmp_path))
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(CdspError, match=r"list\.pth.*not a state dict"):
        load_pretrained(resnet("resnet18"), str(tmp_path / "list.pth"))


def test_classifier_cams_and_logits():
    model = build_classifier("resnet18", n_classes=5, output_stride=8).eval()
    x = torch.randn(2, 3, 48, 40)
    with torch.no_grad():
        logits = model(x)
        maps, map_logits = model.class_maps(x)
        cams, cam_logits = model.forward_cams(x)
    assert logits.shape == (2, 4) and maps.shape == (2, 4, 6, 5)
    torch.testing.assert_close(map_logits, logits, rtol=1e-4, atol=1e-5)  # GAP and 1×1 conv commute
    torch.testing.assert_close(cams, maps.clamp(min=0))
    torch.testing.assert_close(cam_logits, logits, rtol=1e-4, atol=1e-5)
    assert model.classifier.bias is None


@pytest.mark.parametrize("name", ["deeplabv2", "deeplabv3p"])
def test_segmenter_outputs(name):
    model = build_segmenter(name, "resnet18", n_classes=3)
    x = torch.randn(2, 3, 41, 50)  # not a multiple of the stride
    out = model(x)
    assert out["out"].shape == (2, 3, 41, 50)
    assert out["features"].shape == (2, 512, 6, 7)  # output stride 8
    out["out"].mean().backward()
    assert model.backbone.conv1.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["deeplabv2", "deeplabv3p"])
def test_channels_last_and_autocast(name):
    model = build_segmenter(name, "resnet18", n_classes=4).eval().to(memory_format=torch.channels_last)
    x = torch.randn(1, 3, 32, 32).to(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = model(x.contiguous())["out"]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
    assert out["out"].shape == (1, 4, 32, 32) and torch.isfinite(out["out"]).all()
    assert (out["out"].float().argmax(1) == ref.argmax(1)).float().mean() > 0.9
    lorm = LoRM(512)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rect = lorm(out["features"], torch.ones(1, 32, 32, dtype=torch.long))
    assert rect.shape == out["features"].shape and torch.isfinite(rect).all()


def test_aspp_rates_replace_the_heads_dilations():
    v2 = build_segmenter("deeplabv2", "resnet18", 3, width=8)
    assert [c.dilation for c in v2.aspp] == [(6, 6), (12, 12), (18, 18), (24, 24)]  # the paper's
    small = build_segmenter("deeplabv2", "resnet18", 3, width=8, aspp_rates="1,2,4,6")
    assert [(c.dilation, c.padding) for c in small.aspp] == [((r, r), (r, r)) for r in (1, 2, 4, 6)]
    v3 = build_segmenter("deeplabv3p", "resnet18", 3, width=8, aspp_rates="2, 3")
    assert [m[0].dilation for m in v3.aspp.convs[1:-1]] == [(2, 2), (3, 3)]
    assert small(torch.randn(1, 3, 40, 40))["out"].shape == (1, 3, 40, 40)
    for bad in ("0,2", "a,b", "-1"):
        with pytest.raises(CdspError, match="aspp_rates"):
            build_segmenter("deeplabv2", "resnet18", 3, aspp_rates=bad)


def test_unknown_segmenter():
    with pytest.raises(CdspError, match="deeplabv4"):
        build_segmenter("deeplabv4", "resnet18", 21)


def test_lorm_mask_and_consensus():
    lorm = LoRM(4)
    assert lorm.gamma.item() == 1.0
    feats = torch.randn(1, 4, 2, 2)
    pseudo = torch.tensor([[[0, 3], [255, 1]]])
    rect = lorm(feats, pseudo)
    assert (rect[0, :, 0, 0] == 0).all() and (rect[0, :, 1, 0] == 0).all()  # background and ignored
    assert (rect[0, :, 0, 1] != 0).all()
    # identical features everywhere: the attention-weighted consensus is the feature itself
    same = torch.randn(1, 4, 1, 1).expand(1, 4, 3, 3).contiguous()
    rect = lorm(same, torch.ones(1, 3, 3, dtype=torch.long))
    torch.testing.assert_close(rect, same)


def test_lorm_temperature_sharpens_the_attention_toward_similar_features():
    # two groups of positions with orthogonal features; Q = K = F (identity 1x1 convolutions)
    a, b = torch.tensor([1.0, 0, 0, 0]), torch.tensor([0, 1.0, 0, 0])
    feats = torch.stack([a, a, b, b, b, b]).T.reshape(1, 4, 2, 3)
    fg = torch.ones(1, 2, 3, dtype=torch.long)
    rectified = {}
    for t in (1.0, 0.05):
        lorm = LoRM(4, temperature=t)
        for conv in (lorm.query, lorm.key):
            torch.nn.init.eye_(conv.weight.view(4, 4))
            torch.nn.init.zeros_(conv.bias)
        rectified[t] = lorm(feats, fg).reshape(4, 6).T[0]  # F' at a position of group a
    # at 1 the cosines 1 and 0 weigh e : 1, so 4 b's outweigh the 2 a's; at 0.05, a's own group alone
    assert rectified[1.0][1] > rectified[1.0][0] / 2
    torch.testing.assert_close(rectified[0.05], a, atol=1e-6, rtol=0)
    for bad in (0.0, -1.0):
        with pytest.raises(CdspError, match="lorm_temperature"):
            LoRM(4, temperature=bad)
