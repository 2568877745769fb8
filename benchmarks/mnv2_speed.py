"""Training speed of the segmenters on MobileNetV2: images/s of forward, backward and an SGD step.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/mnv2_speed.py deeplabv2:16:225 deeplabv3p:16:225 deeplabv2:8:225

Each argument is HEAD:OUTPUT_STRIDE:CROP[:RATES]; batch 8, random data, 7 classes, channels-last, 2 torch
threads; two warm-up steps, then the mean of three.
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F

from cdsp_core import models


def images_per_second(head: str, output_stride: int, crop: int, rates: str = "", batch: int = 8) -> float:
    net = models.build_segmenter(head, "mobilenet_v2", 7, output_stride=output_stride, aspp_rates=rates)
    net = net.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, crop, crop).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 7, (batch, crop, crop))
    for i in range(5):
        if i == 2:
            start = time.perf_counter()
        loss = F.cross_entropy(net(x)["out"], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return 3 * batch / (time.perf_counter() - start)


if __name__ == "__main__":
    torch.set_num_threads(2)
    for arg in sys.argv[1:]:
        head, stride, crop, *rates = arg.split(":")
        print(f"{arg}: {images_per_second(head, int(stride), int(crop), *rates):.1f} images/s", flush=True)
