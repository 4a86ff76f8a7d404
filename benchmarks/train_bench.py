"""Training step throughput, images/s: ichtrain's step (augment on device, forward, weighted BCE, backward, SGD).

The batch is a random uint8 (B, C, 256, 256) tensor already on the device, so this figure is the model's
alone; the loader's figure is measured separately and the two are compared as a ratio.  On CUDA:
ResNet-152, batch 128, bf16 autocast, channels_last, cudnn.benchmark, 5 warm-up and 20 timed steps.  On
a CPU: ResNet-152 at batch 4 with 1 warm-up and 3 timed steps (``--quick``: ResNet-18, batch 2, 64²,
1 step), all cores (``torch.get_num_threads()``).  Each step is timed alone (synchronised on CUDA) and
the figure is the median step.
"""

from __future__ import annotations

import statistics
import time

import torch

from ichprep.labels import LABELS
from ichtrain.augment import train_batch
from ichtrain.engine import loss_weights, weighted_bce
from ichtrain.model import build_model


def settings(device: torch.device, quick: bool) -> dict:
    if device.type == "cuda":
        return {"arch": "resnet152", "batch": 128, "image_size": 224, "warmup": 5 if not quick else 1,
                "steps": 20 if not quick else 2, "amp": "bfloat16", "channels_last": True}
    if quick:
        return {"arch": "resnet18", "batch": 2, "image_size": 64, "warmup": 1, "steps": 1, "amp": None,
                "channels_last": False}
    return {"arch": "resnet152", "batch": 4, "image_size": 224, "warmup": 1, "steps": 3, "amp": None,
            "channels_last": False}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(quick: bool, stored_size: int = 256, channels: int = 3, device: str | None = None) -> dict:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = settings(device, quick)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    model = build_model(cfg["arch"], len(LABELS), channels).to(device)
    fmt = torch.channels_last if cfg["channels_last"] else torch.contiguous_format
    model = model.to(memory_format=fmt).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    weights = loss_weights(LABELS, device)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (cfg["batch"], channels, stored_size, stored_size), dtype=torch.uint8,
                           device=device).contiguous(memory_format=fmt)
    target = torch.randint(0, 2, (cfg["batch"], len(LABELS)), device=device).float()
    amp = getattr(torch, cfg["amp"]) if cfg["amp"] else None

    def step() -> float:
        _sync(device)
        started = time.perf_counter()
        inputs = train_batch(images, cfg["image_size"], generator)
        with torch.autocast(device_type=device.type, dtype=amp, enabled=amp is not None):
            logits = model(inputs)
        loss = weighted_bce(logits, target, weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        _sync(device)
        return time.perf_counter() - started

    for _ in range(cfg["warmup"]):
        step()
    times = [step() for _ in range(cfg["steps"])]
    median = statistics.median(times)
    return {
        **cfg,
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch_threads": torch.get_num_threads(),
        "step_s": times,
        "median_step_s": median,
        "images_per_s": cfg["batch"] / median,
        "note": "model only: the batch is resident on the device; compare with the loader figures",
    }
