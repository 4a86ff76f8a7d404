"""Where a run computes: the device, the DDP process group, autocast, gathering across ranks, RNG state."""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.distributed as dist

from .errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when there is one; under torchrun each rank takes the GPU of its LOCAL_RANK."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA device is available; use --device cpu or auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device(name)


def init_distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world_size); joins the process group when started by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def amp_dtype_for(device: torch.device, amp: bool) -> torch.dtype | None:
    """bf16 autocast on GPUs that have it, fp16 (with a GradScaler) on older ones; full precision on CPU."""
    if not amp or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def gather(array: np.ndarray, world: int) -> np.ndarray:
    """Every rank's rows, concatenated in rank order (the array itself in a single process)."""
    if world == 1:
        return array
    parts = [None] * world
    dist.all_gather_object(parts, array)
    return np.concatenate([p for p in parts if len(p)]) if any(len(p) for p in parts) else array


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


#: Environment variables that choose CPU kernels or their thread count, and so a CPU run's last bits.
KERNEL_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_CBWR")


def compute_facts(device: torch.device) -> dict:
    """What a run's figures depend on besides its command, data and seed (README, "Determinism")."""
    facts = {
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "kernel_env": {name: os.environ[name] for name in KERNEL_ENV if name in os.environ},
    }
    if device.type == "cuda":
        facts |= {"gpu": torch.cuda.get_device_name(device), "cuda": torch.version.cuda}
    return facts
