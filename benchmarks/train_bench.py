"""Training step throughput, images/s: ichtrain's own ``engine.train_step`` (copy to the device, resize and
augment there, forward, importance-weighted BCE, backward, SGD).

The batch is a random uint8 (B, C, 256, 256) tensor in (pinned, on CUDA) host memory, so this figure is
the step's alone; the loader's figure is measured separately and the two are compared as a ratio.  On CUDA:
ResNet-152, batch 128, bf16 autocast, channels_last, cudnn.benchmark, 5 warm-up and 20 timed steps.  On
a CPU: ResNet-152 at batch 4 with 1 warm-up and 3 timed steps (``--quick``: ResNet-18, batch 2, 64²,
1 step), all cores (``torch.get_num_threads()``).  Each step is timed alone (synchronised on CUDA) and
the figure is the median step.
"""

from __future__ import annotations

import statistics
import time

import torch

from ichprep.reading.labels import LABELS
from ichtrain.engine import StepSetup, loss_weights, train_step
from ichtrain.model import build_model


def settings(device: torch.device, quick: bool) -> dict:
    if device.type == "cuda":
        return {
            "arch": "resnet152",
            "batch": 128,
            "image_size": 224,
            "warmup": 5 if not quick else 1,
            "steps": 20 if not quick else 2,
            "amp": "bfloat16",
            "channels_last": True,
        }
    if quick:
        return {
            "arch": "resnet18",
            "batch": 2,
            "image_size": 64,
            "warmup": 1,
            "steps": 1,
            "amp": None,
            "channels_last": False,
        }
    return {
        "arch": "resnet152",
        "batch": 4,
        "image_size": 224,
        "warmup": 1,
        "steps": 3,
        "amp": None,
        "channels_last": False,
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(
    quick: bool, stored_size: int = 256, channels: int = 3, device: str | None = None, compile_model: bool = False
) -> dict:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = settings(device, quick)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    model = build_model(cfg["arch"], len(LABELS), channels).to(device)
    fmt = torch.channels_last if cfg["channels_last"] else torch.contiguous_format
    model = model.to(memory_format=fmt).train()
    net = torch.compile(model) if compile_model else model
    n_slots = 4 * cfg["batch"]
    # The trainer's own step: same StepSetup, importance weights indexed by slot, augmentation on the device.
    setup = StepSetup(
        model=net,
        optimizer=torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4),
        label_weights=loss_weights(LABELS, device),
        sample_weights=torch.rand(n_slots, device=device) + 0.5,
        image_size=cfg["image_size"],
        generator=torch.Generator(device=device).manual_seed(0),
        amp_dtype=getattr(torch, cfg["amp"]) if cfg["amp"] else None,
        channels_last=cfg["channels_last"],
    )
    pin = device.type == "cuda"
    images = torch.randint(0, 256, (cfg["batch"], channels, stored_size, stored_size), dtype=torch.uint8)
    target = torch.randint(0, 2, (cfg["batch"], len(LABELS))).float()
    slots = torch.randint(0, n_slots, (cfg["batch"],))
    if pin:
        images, target, slots = images.pin_memory(), target.pin_memory(), slots.pin_memory()

    def step() -> float:
        _sync(device)
        started = time.perf_counter()
        train_step(setup, images, target, slots)
        _sync(device)
        return time.perf_counter() - started

    for _ in range(cfg["warmup"]):
        step()
    times = [step() for _ in range(cfg["steps"])]
    median = statistics.median(times)
    return {
        **cfg,
        "compile": compile_model,
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch_threads": torch.get_num_threads(),
        "step_s": times,
        "median_step_s": median,
        "images_per_s": cfg["batch"] / median,
        "note": "ichtrain.engine.train_step on a pinned uint8 batch in host memory (copied to the device "
        "inside the step, as in training); compare with the loader figures",
    }


def main(argv: list[str] | None = None) -> int:
    """The prepared GPU check: the trainer's step with ``--compile`` off and on, side by side."""
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m benchmarks.train_bench", description=main.__doc__)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--quick", action="store_true", help="tiny settings (a smoke run)")
    parser.add_argument("--out", default=None, help="write both figures here (JSON)")
    args = parser.parse_args(argv)
    rows = [run(args.quick, device=args.device, compile_model=flag) for flag in (False, True)]
    for row in rows:
        print(
            f"{row['arch']} {row['image_size']}² batch {row['batch']} {row['amp'] or 'fp32'} "
            f"channels_last={row['channels_last']} compile={row['compile']} on {row['device_name']}: "
            f"{row['images_per_s']:.0f} images/s (median step {row['median_step_s'] * 1000:.1f} ms)"
        )
    print(f"compile on / off: {rows[1]['images_per_s'] / rows[0]['images_per_s']:.2f}x")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
