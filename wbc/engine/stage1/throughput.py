"""Training throughput of a backbone on synthetic batches, with and without AMP (GPU checks).

`train_throughput` runs the same step as Stage 1 (autocast, GradScaler for fp16, channels_last,
AdamW) on random inputs, so the figure isolates the model and device from data loading.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from wbc.backbones import create_backbone
from wbc.device import amp_dtype, resolve_device
from wbc.engine.stage1.loops import optimizer_step


def train_throughput(
    backbone: str = "r50", batch_size: int = 64, image_size: int = 224, steps: int = 20,
    warmup: int = 5, amp: bool = True, channels_last: bool = True, device: str = "auto",
    num_classes: int = 9,
) -> dict:
    """Images/s of forward+backward+AdamW steps; returns {"images_per_s", "amp", "device", ...}."""
    dev = resolve_device(device)
    dtype = amp_dtype(dev, amp)
    cl = channels_last and dev.type == "cuda"
    torch.manual_seed(0)
    model = create_backbone(backbone, num_classes, "none", crop=image_size).to(dev).train()
    if cl:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    x = torch.randn(batch_size, 3, image_size, image_size, device=dev)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(num_classes, (batch_size,), device=dev)

    def step() -> None:
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(model(x), y)
        (scaler.scale(loss) if scaler else loss).backward()
        optimizer_step(opt, scaler)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    for _ in range(warmup):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    secs = time.perf_counter() - t0
    return {"backbone": backbone, "device": str(dev), "amp": str(dtype).replace("torch.", "") if dtype else "fp32",
            "channels_last": cl, "batch_size": batch_size, "image_size": image_size,
            "images_per_s": batch_size * steps / secs}


def amp_speedup(backbone: str = "r50", **kw) -> dict:
    """Throughput without and with AMP in one process, and their ratio."""
    fp32 = train_throughput(backbone, amp=False, **kw)
    mixed = train_throughput(backbone, amp=True, **kw)
    return {"fp32": fp32, "amp": mixed, "speedup": mixed["images_per_s"] / fp32["images_per_s"]}
