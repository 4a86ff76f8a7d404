"""CPU training-step time of a timm backbone beside torchvision's of the same name.

``python -m benchmarks.backbone_bench [--pairs resnet50] [--batch 8] [--size 224] [--steps 6]``

Each pair is built by :func:`ichtrain.model.build_model` as training builds it (6 outputs, 3 windows; random
weights), then timed on the same batches: forward, weighted BCE, backward and an SGD step, on the CPU with
torch's threads.  One untimed warm-up step each; then steps alternate between the two (ABAB), so a drift in the
machine's load hits both.  Reports the median ms/step and timm / torchvision.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ichtrain.engine import weighted_bce
from ichtrain.model import build_model


def _step(model, optimizer, images, targets, weights) -> float:
    start = time.perf_counter()
    loss = weighted_bce(model(images), targets, weights, None)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return time.perf_counter() - start


def run(pairs: list[str], batch: int, size: int, steps: int) -> list[dict]:
    torch.manual_seed(0)
    images = torch.randn(batch, 3, size, size)
    targets = (torch.rand(batch, 6) < 0.3).float()
    weights = torch.ones(6)
    rows = []
    for name in pairs:
        models = {arch: build_model(arch, n_outputs=6, windows=3).train() for arch in (name, f"timm:{name}")}
        optimizers = {arch: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for arch, m in models.items()}
        times: dict[str, list[float]] = {arch: [] for arch in models}
        for arch in models:
            _step(models[arch], optimizers[arch], images, targets, weights)  # warm-up
        for _ in range(steps):
            for arch in models:
                times[arch].append(_step(models[arch], optimizers[arch], images, targets, weights))
        tv, tm = (statistics.median(times[a]) * 1e3 for a in models)
        params = {a: sum(p.numel() for p in m.parameters()) for a, m in models.items()}
        rows.append({"name": name, "torchvision_ms": tv, "timm_ms": tm, "ratio": tm / tv, "params": params})
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", nargs="+", default=["resnet50"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args(argv)
    rows = run(args.pairs, args.batch, args.size, args.steps)
    print(f"CPU, {torch.get_num_threads()} threads, batch {args.batch} x 3 x {args.size}², median of {args.steps}")
    print("| model | torchvision ms/step | timm ms/step | timm / torchvision | parameters (tv, timm) |")
    print("|---|---:|---:|---:|---|")
    for r in rows:
        tv_params, timm_params = r["params"].values()
        print(
            f"| {r['name']} | {r['torchvision_ms']:.0f} | {r['timm_ms']:.0f} | {r['ratio']:.2f} | "
            f"{tv_params:,}, {timm_params:,} |"
        )
    return rows


if __name__ == "__main__":
    main()
