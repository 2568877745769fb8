"""Training speed of the segmenters on MobileNetV2: images/s of forward, backward and an AdamW step.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/mnv2_speed.py deeplabv2:16:225:lorm deeplabv2:16:225:lorm:1280

Each argument is HEAD:OUTPUT_STRIDE:CROP[:lorm][:1280]: `lorm` adds the LoRM module and its loss (cosine,
foreground, tau 0.1, the presets'); `1280` reads the classifier's 1280-channel map (`features.18`) instead of
the segmenters' 320-channel one (the last block, as DeepLab reads MobileNetV2). Batch 8, random data, 7
classes, channels-last, 2 torch threads; two warm-up steps, then the mean of four.
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F

from cdsp_core import losses, models


def images_per_second(head: str, output_stride: int, crop: int, lorm: bool, last_conv: bool, batch: int = 8) -> float:
    backbone = models.MobileNetV2(output_stride, last_conv=last_conv)
    net = models.SEGMENTERS[head](backbone, 7, **({"rates": (1, 2, 4, 6)} if head == "deeplabv2" else {}))
    module = models.LoRM(backbone.out_channels, 0.1) if lorm else None
    net = net.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW([*net.parameters(), *(module.parameters() if module else [])], lr=1e-3)
    x = torch.randn(batch, 3, crop, crop).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 7, (batch, crop, crop))
    for i in range(6):
        if i == 2:
            start = time.perf_counter()
        out = net(x)
        loss = F.cross_entropy(out["out"], y)
        if module is not None:
            where = models.LoRM.foreground(y, out["features"].shape[-2:])
            loss = loss + losses.lorm_loss(out["features"], module(out["features"], y), where, "cosine")
        opt.zero_grad()
        loss.backward()
        opt.step()
    return 4 * batch / (time.perf_counter() - start)


if __name__ == "__main__":
    torch.set_num_threads(2)
    for arg in sys.argv[1:]:
        head, stride, crop, *options = arg.split(":")
        speed = images_per_second(head, int(stride), int(crop), "lorm" in options, "1280" in options)
        print(f"{arg}: {speed:.1f} images/s", flush=True)
