"""One training step, one epoch of them, and one pass of evaluation (the torchvision reference's split of work).

No step reads a value back from the device: random numbers are drawn there, the loss is summed there and
read once per ``log_every`` steps, so a GPU queues work without waiting for the host.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from .config import TTA_VIEWS, TTAS, check_choice
from .data.augment import eval_batch, train_batch
from .evaluation.metrics import label_weights


def loss_weights(names: tuple[str, ...], device) -> torch.Tensor:
    """The competition's weights (:func:`ichtrain.evaluation.metrics.label_weights`) as a tensor on ``device``."""
    return torch.as_tensor(label_weights(names), dtype=torch.float32, device=device)


def weighted_bce(
    logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, sample_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over images of ``s_i * sum_j w_j BCE_ij / sum_j w_j``: the RSNA metric, importance-weighted by ``s``."""
    per_label = F.binary_cross_entropy_with_logits(logits.float(), targets, reduction="none")
    per_image = (per_label * weights).sum(dim=1).div(weights.sum())
    if sample_weights is not None:
        per_image = per_image * sample_weights
    return per_image.mean()


def _autocast(device: torch.device, amp_dtype: torch.dtype | None):
    if amp_dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def _for_model(inputs: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """The model's memory format, applied to the augmented float batch (grid_sample returns NCHW)."""
    return inputs.contiguous(memory_format=torch.channels_last) if channels_last else inputs


class WeightAverage:
    """An exponential moving average of a model's parameters: the model that is evaluated and saved.

    ``average = d * average + (1 - d) * weights`` after update ``t`` (0, 1, ...), on the device, with no host
    sync, where ``d = min(decay, (1 + t) / (10 + t))``: early on the average spans the last ~t/9 steps, so it
    never carries the random start of a short run, and it spans ~1/(1 - decay) steps once ``t`` is large.
    Buffers (BatchNorm statistics) are not averaged: :meth:`take_buffers` copies the model's, and
    :func:`refresh_batchnorm` then recomputes them for the averaged weights.
    """

    def __init__(self, model: torch.nn.Module, decay: float, updates: int = 0):
        self.module = copy.deepcopy(model).eval()
        self.module.requires_grad_(False)
        self.decay, self.updates = decay, updates
        self._params = list(self.module.parameters())

    @staticmethod
    def warmed_up(decay: float) -> int:
        """The first update count whose decay is ``decay`` (averages saved before the warm-up count as warm)."""
        return math.ceil((10 * decay - 1) / (1 - decay))

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        weight = 1.0 - self.current_decay()
        torch._foreach_lerp_(self._params, [p.detach() for p in model.parameters()], weight)
        self.updates += 1

    @torch.no_grad()
    def take_buffers(self, model: torch.nn.Module) -> None:
        for mine, theirs in zip(self.module.buffers(), model.buffers()):
            mine.copy_(theirs)


@dataclass(frozen=True)
class StepSetup:
    """What every training step of a run shares; tensors live on the model's device."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    label_weights: torch.Tensor  # (K,) the competition's weights
    sample_weights: torch.Tensor | None  # (N slots,) importance weights of the balance plan, None = all 1
    image_size: int
    generator: torch.Generator  # on the device, for the augmentation's random numbers
    amp_dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None
    channels_last: bool = False
    average: WeightAverage | None = None  # updated after every optimiser step

    @property
    def device(self) -> torch.device:
        return self.label_weights.device


def train_step(setup: StepSetup, images: torch.Tensor, targets: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """One optimiser step on a uint8 batch; returns the loss as a detached device scalar (no sync)."""
    device = setup.device
    images = images.to(device, non_blocking=True)
    targets = targets.to(device, non_blocking=True)
    weights = None
    if setup.sample_weights is not None:
        weights = setup.sample_weights[slots.to(device, non_blocking=True)]
    inputs = _for_model(train_batch(images, setup.image_size, setup.generator), setup.channels_last)
    with _autocast(device, setup.amp_dtype):
        logits = setup.model(inputs)
    loss = weighted_bce(logits, targets, setup.label_weights, weights)
    setup.optimizer.zero_grad(set_to_none=True)
    if setup.scaler is not None and setup.scaler.is_enabled():
        setup.scaler.scale(loss).backward()
        setup.scaler.step(setup.optimizer)
        setup.scaler.update()
    else:
        loss.backward()
        setup.optimizer.step()
    if setup.average is not None:
        setup.average.update(setup.model)
    return loss.detach()


class EpochStats(NamedTuple):
    train_loss: float
    train_images: int
    train_seconds: float
    train_images_per_s: float


def train_one_epoch(
    setup: StepSetup,
    loader,
    *,
    max_steps: int | None = None,
    log_every: int = 20,
    on_log: Callable[[int, float, float], None] | None = None,
) -> EpochStats:
    """Train for one pass over ``loader`` (batches of images, targets, slots).

    ``on_log(steps since the last call, mean loss so far, images/s)`` runs every ``log_every`` steps and
    at the end: the only points where the loss is read back from the device.
    """
    setup.model.train()
    total = torch.zeros((), device=setup.device)
    steps, seen, logged, started = 0, 0, 0, time.perf_counter()
    for images, targets, slots in loader:
        if max_steps is not None and steps >= max_steps:
            break
        loss = train_step(setup, images, targets, slots)
        n = images.shape[0]
        total += loss * n
        seen += n
        steps += 1
        if on_log is not None and steps % log_every == 0:
            on_log(steps - logged, total.item() / seen, seen / (time.perf_counter() - started))
            logged = steps
    mean_loss = total.item() / max(seen, 1)
    seconds = time.perf_counter() - started
    rate = seen / seconds if seconds > 0 else 0.0
    if on_log is not None and steps > logged:
        on_log(steps - logged, mean_loss, rate)
    return EpochStats(train_loss=mean_loss, train_images=seen, train_seconds=seconds, train_images_per_s=rate)


@torch.no_grad()
def refresh_batchnorm(setup: StepSetup, loader, *, max_batches: int) -> int:
    """Recompute every BatchNorm's statistics as exact averages over ``max_batches`` training batches.

    The running averages kept during an epoch mix statistics of weights that kept changing; at a high
    learning rate they lag far enough to shift every eval-mode logit, which ruins log loss (not AUC).
    Returns the number of batches used (0 leaves the statistics as they were).
    """
    norms = [m for m in setup.model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms or max_batches < 1:
        return 0
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # None: a cumulative average over the batches below
    setup.model.train()
    used = 0
    for images, _targets, _slots in loader:
        if used >= max_batches:
            break
        images = images.to(setup.device, non_blocking=True)
        inputs = _for_model(train_batch(images, setup.image_size, setup.generator), setup.channels_last)
        with _autocast(setup.device, setup.amp_dtype):
            setup.model(inputs)
        used += 1
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    return used


class Predictions(NamedTuple):
    probs: np.ndarray  # float32 (n, K)
    targets: np.ndarray  # float32 (n, K)
    slots: np.ndarray  # int64 (n,)


class Outputs(NamedTuple):
    """Everything one inference pass gives per sample, in the loader's order."""

    logits: np.ndarray  # float32 (n, K)
    features: np.ndarray | None  # float16 (n, D): the head's input (penultimate features), when asked for
    targets: np.ndarray  # float32 (n, K)
    slots: np.ndarray  # int64 (n,)


@torch.no_grad()
def infer(
    model: torch.nn.Module,
    loader,
    *,
    image_size: int,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    tta: str = "none",
    features: bool = False,
    on_step: Callable[[int], None] | None = None,
) -> Outputs:
    """Logits (and penultimate features) of every sample of ``loader``, averaged over the ``tta`` views.

    The image is the whole stored slice resized to ``image_size``; features are the input of
    :func:`ichtrain.model.classifier`, caught by a forward hook.
    """
    from .model import classifier

    check_choice("tta", tta, TTAS)
    model.eval()
    caught: list[torch.Tensor] = []
    hook = classifier(model).register_forward_hook(lambda m, args, out: caught.append(args[0])) if features else None
    logits, feats, targets, slots = [], [], [], []
    try:
        for images, target, slot in loader:
            images = eval_batch(images.to(device, non_blocking=True), image_size)
            views = [images.flip(-1) if flip else images for flip in TTA_VIEWS[tta]]
            caught.clear()
            with _autocast(device, amp_dtype):
                out = sum(model(_for_model(v, channels_last)).float() for v in views) / len(views)
            logits.append(out)  # stays on the device until the pass is over
            if features:
                feats.append((sum(c.float() for c in caught) / len(caught)).half())
            targets.append(target.numpy())
            slots.append(np.asarray(slot))
            if on_step is not None:
                on_step(images.shape[0])
    finally:
        if hook is not None:
            hook.remove()
    if not logits:
        empty = np.zeros((0, 0), np.float32)
        return Outputs(
            logits=empty,
            features=empty.astype(np.float16) if features else None,
            targets=empty,
            slots=np.zeros(0, np.int64),
        )
    return Outputs(
        logits=torch.cat(logits).cpu().numpy(),
        features=torch.cat(feats).cpu().numpy() if features else None,
        targets=np.concatenate(targets),
        slots=np.concatenate(slots).astype(np.int64),
    )


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """float32 probabilities of logits, computed in float64 (no overflow warning at |logit| > 88)."""
    return (1.0 / (1.0 + np.exp(-np.asarray(logits, np.float64)))).astype(np.float32)
