"""Stage 2: a sequence model over each study's slices, correcting stage 1's per-slice logits from its neighbours.

Stage 1 (a per-slice CNN trained in K patient folds) leaves, for every slot of the store, out-of-fold
penultimate features and logits.  Stage 2 reads one study at a time in z order, as a sequence of those
per-slice inputs (standardised, with stage 1's logits concatenated), and outputs ``stage-1 logits +
correction`` for every slice: a bidirectional GRU or a transformer encoder fills isolated misses and removes
isolated false alarms from what the neighbouring slices show, as the RSNA 2019 winners did.

The correction's last layer starts at zero, so an untrained model is exactly stage 1.  Training uses a fixed
epoch count (nothing is selected on held-out data) and :func:`cross_fit` fits one model per stage-1 fold
on the other folds' studies, so the out-of-fold probabilities stay honest.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from ..checkpoint import safe_load, save_checkpoint
from ..config import HEADS, SEQ_INPUTS, SEQ_MODELS, SeqConfig, check_choice
from ..engine import loss_weights
from ..errors import CheckpointError, DataError

logger = logging.getLogger(__name__)

#: Rows of the feature array converted at a time when computing the standardisation (bounded memory at D = 2048).
STATS_CHUNK = 16_384
#: Slices each side of a slice whose logits the window model reads.
WINDOW = 2
#: The window model's inputs times this: logits of about -10 .. 10 start in tanh's linear range.
LOGIT_SCALE = 0.25
#: Gradient-norm clip of every step (recurrent nets occasionally spike).
CLIP_NORM = 1.0
FORMAT = "ichtrain-seq"
FORMAT_VERSION = 1


# ---------------------------------------------------------------- inputs and configuration


class SeqInputs(NamedTuple):
    """Per-slot stage-1 outputs of one store; study ``s`` is slots ``[starts[s], stops[s])`` in z order."""

    x: np.ndarray  # (n_slots, D) float16/float32: stage-1 features or logits, the model's input
    logits: np.ndarray  # (n_slots, L) float32: stage-1 logits, the residual base
    targets: np.ndarray  # (n_slots, L) float32, NaN = unlabelled (no loss)
    starts: np.ndarray  # (n_studies,) int64
    stops: np.ndarray  # (n_studies,) int64
    study_fold: np.ndarray  # (n_studies,) int64: the stage-1 fold of each study, -1 = in no fold


def _shape_error(what: str, shape, expected: str) -> DataError:
    return DataError(f"{what} has shape {tuple(shape)}, expected {expected}")


def _check_arrays(inputs: SeqInputs, n_labels: int) -> int:
    """Shapes of the per-slot arrays; returns the slot count."""
    if inputs.x.ndim != 2:
        raise _shape_error("x", inputs.x.shape, "(n_slots, D)")
    n = inputs.x.shape[0]
    for what in ("logits", "targets"):
        arr = getattr(inputs, what)
        if arr.shape != (n, n_labels):
            raise _shape_error(what, arr.shape, f"({n}, {n_labels}): one row per slot of x, one column per name")
    if not np.isfinite(inputs.logits).all():
        raise DataError("stage-1 logits contain NaN or inf")
    return n


def _check_ranges(inputs: SeqInputs, n_slots: int) -> None:
    """Study ranges: integer, non-empty, inside the slots, not overlapping, one fold each."""
    starts, stops, folds = (np.asarray(a) for a in (inputs.starts, inputs.stops, inputs.study_fold))
    if starts.ndim != 1 or stops.shape != starts.shape or folds.shape != starts.shape:
        raise DataError(
            f"starts, stops and study_fold must be 1-D of one length, got shapes "
            f"{starts.shape}, {stops.shape}, {folds.shape}"
        )
    if not all(np.issubdtype(a.dtype, np.integer) for a in (starts, stops, folds)):
        raise DataError("starts, stops and study_fold must be integer arrays")
    if (starts < 0).any() or (stops > n_slots).any() or (stops <= starts).any():
        raise DataError(f"every study needs 0 <= start < stop <= {n_slots} (the slot count)")
    order = np.argsort(starts, kind="stable")
    if (stops[order[:-1]] > starts[order[1:]]).any():
        raise DataError("study slot ranges overlap: each slot belongs to at most one study")
    if (folds < -1).any():
        raise DataError("study_fold must be a fold number >= 0, or -1 for a study in no fold")


def check_inputs(inputs: SeqInputs, names: Sequence[str]) -> None:
    """Raise :class:`DataError` unless the arrays agree with each other and with ``names`` (the L labels)."""
    _check_ranges(inputs, _check_arrays(inputs, len(names)))


def _check_own_labels(inputs: SeqInputs) -> None:
    """:func:`check_inputs` with L taken from the logits (prediction needs no names)."""
    _check_ranges(inputs, _check_arrays(inputs, inputs.logits.shape[-1] if inputs.logits.ndim == 2 else -1))


def _check_studies(studies, n_studies: int, what: str) -> np.ndarray:
    studies = np.asarray(studies)
    if studies.ndim != 1 or not np.issubdtype(studies.dtype, np.integer):
        raise DataError(f"{what} must be a 1-D array of study indices, got {studies.dtype} shape {studies.shape}")
    if studies.size and (studies.min() < 0 or studies.max() >= n_studies):
        raise DataError(f"{what} must index the {n_studies} studies")
    if np.unique(studies).size != studies.size:
        raise DataError(f"{what} lists a study twice")
    return studies.astype(np.int64)


def _device(name: str) -> torch.device:
    from ..device import resolve_device  # the trainer's rule for "auto" and a missing CUDA device

    return resolve_device(name)


# ---------------------------------------------------------------- models


def _zeroed(layer: nn.Linear) -> nn.Linear:
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class _Corrector(nn.Module):
    """``base + head(context(embed([x, base])))``; subclasses give the context over the slices."""

    def __init__(self, *, in_dim: int, n_out: int, hidden: int, context_dim: int, dropout: float, concat_logits: bool):
        super().__init__()
        self.concat_logits = concat_logits
        width = in_dim + (n_out if concat_logits else 0)
        self.embed = nn.Sequential(nn.Linear(width, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Dropout(dropout))
        # Zero weights and bias: the correction is exactly 0 until trained, so the output starts at stage 1.
        self.head = nn.Sequential(nn.Dropout(dropout), _zeroed(nn.Linear(context_dim, n_out)))

    def context(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, base: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (B, T, D) float32, base (B, T, L) stage-1 logits, mask (B, T) bool valid -> (B, T, L) logits."""
        inputs = torch.cat([x, base], dim=-1) if self.concat_logits else x
        h = self.embed(inputs) * mask.unsqueeze(-1)  # padding enters every context layer as zeros
        return base + self.head(self.context(h, mask))


class GruCorrector(_Corrector):
    """Bidirectional GRU over packed sequences: a study's backward pass starts at its own last slice."""

    def __init__(self, *, in_dim: int, n_out: int, hidden: int, layers: int, dropout: float, concat_logits: bool):
        super().__init__(
            in_dim=in_dim,
            n_out=n_out,
            hidden=hidden,
            context_dim=2 * hidden,
            dropout=dropout,
            concat_logits=concat_logits,
        )
        self.gru = nn.GRU(
            hidden,
            hidden,
            num_layers=layers,
            batch_first=True,
            bidirectional=True,
            dropout=dropout if layers > 1 else 0.0,
        )

    def context(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        lengths = mask.sum(dim=1).cpu()  # pack_padded_sequence takes host lengths
        packed = pack_padded_sequence(h, lengths, batch_first=True, enforce_sorted=False)
        out, _ = self.gru(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=h.shape[1])
        return out


def sinusoid(length: int, dim: int, device=None) -> torch.Tensor:
    """(length, dim) sinusoidal encoding of the slice index 0 .. length-1 (Vaswani et al.)."""
    position = torch.arange(length, dtype=torch.float32, device=device)[:, None]
    rate = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32, device=device) * (-math.log(10_000.0) / dim))
    out = torch.zeros(length, dim, device=device)
    out[:, 0::2] = torch.sin(position * rate)
    out[:, 1::2] = torch.cos(position * rate[: dim // 2])
    return out


class TransformerCorrector(_Corrector):
    """A 3-slice convolution (local context), the slice index's sinusoid, then a pre-norm transformer encoder.

    Padded keys are masked out of attention, and the convolution sees zeros past a study's last slice
    whether or not other studies pad it, so a study's output does not depend on its batch.
    """

    def __init__(self, *, in_dim: int, n_out: int, hidden: int, layers: int, dropout: float, concat_logits: bool):
        super().__init__(
            in_dim=in_dim, n_out=n_out, hidden=hidden, context_dim=hidden, dropout=dropout, concat_logits=concat_logits
        )
        self.local = nn.Conv1d(hidden, hidden, kernel_size=3, padding=1)
        layer = nn.TransformerEncoderLayer(
            hidden,
            HEADS,
            dim_feedforward=2 * hidden,
            dropout=dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(
            layer, num_layers=layers, norm=nn.LayerNorm(hidden), enable_nested_tensor=False
        )

    def context(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = h + self.local(h.transpose(1, 2)).transpose(1, 2)
        h = h + sinusoid(h.shape[1], h.shape[2], h.device)
        return self.encoder(h, src_key_padding_mask=~mask)


def neighbour(base: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """(B, T, L): the logits of slice t + k of the same study, clamped to its first and last slice."""
    last = (mask.sum(dim=1, keepdim=True) - 1).clamp_min(0)
    index = torch.minimum((torch.arange(base.shape[1], device=base.device)[None, :] + k).clamp_min(0), last)
    return torch.gather(base, 1, index.unsqueeze(-1).expand_as(base))


def study_top(base: torch.Tensor, mask: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 1, L) each label's highest logit in the study, and the mean of its k highest (fewer in a short study)."""
    top = base.masked_fill(~mask.unsqueeze(-1), -math.inf).topk(min(k, base.shape[1]), dim=1).values
    known = torch.isfinite(top)
    mean = torch.where(known, top, 0.0).sum(dim=1, keepdim=True) / known.sum(dim=1, keepdim=True).clamp_min(1)
    return top[:, :1], mean


class WindowCorrector(nn.Module):
    """One small network shared by all labels, reading a label's own stage-1 logits around each slice.

    Per slice and label: its logit, the larger and the smaller of the two logits at each distance
    1 .. WINDOW (sorted, so above and below count alike), and the study's highest and top-3 mean logit; a
    learned per-label offset lets the labels differ.  About a hundred weights in all, so a few dozen studies
    can fit it where a recurrent net over embeddings overfits.  It reads only the logits: ``in_dim``,
    ``layers`` and ``concat_logits`` do not apply.
    """

    def __init__(self, *, in_dim: int, n_out: int, hidden: int, layers: int, dropout: float, concat_logits: bool):
        super().__init__()
        n_features = 1 + 2 * WINDOW + 2
        self.inner = nn.Linear(n_features, hidden)
        self.label_offset = nn.Parameter(torch.zeros(n_out, hidden))
        self.head = nn.Sequential(nn.Dropout(dropout), _zeroed(nn.Linear(hidden, 1)))  # untrained: exactly stage 1

    def forward(self, x: torch.Tensor, base: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        columns = [base]
        for k in range(1, WINDOW + 1):
            below, above = neighbour(base, mask, -k), neighbour(base, mask, k)
            columns += [torch.maximum(below, above), torch.minimum(below, above)]
        highest, top_mean = study_top(base, mask, 3)
        columns += [highest.expand_as(base), top_mean.expand_as(base)]
        features = torch.stack(columns, dim=-1) * LOGIT_SCALE
        h = torch.tanh(self.inner(features) + self.label_offset)
        return base + self.head(h).squeeze(-1)


_MODELS = {"gru": GruCorrector, "transformer": TransformerCorrector, "window": WindowCorrector}


def build_seq_model(
    kind: str, *, in_dim: int, n_out: int, hidden: int, layers: int, dropout: float, concat_logits: bool = True
) -> nn.Module:
    """A stage-2 model: ``forward(x, base, mask) -> base + correction``, the correction 0 until trained."""
    check_choice("model", kind, SEQ_MODELS)
    return _MODELS[kind](
        in_dim=in_dim, n_out=n_out, hidden=hidden, layers=layers, dropout=dropout, concat_logits=concat_logits
    )


def _model_for(cfg: SeqConfig, in_dim: int, n_out: int) -> nn.Module:
    return build_seq_model(
        cfg.model,
        in_dim=in_dim,
        n_out=n_out,
        hidden=cfg.hidden,
        layers=cfg.layers,
        dropout=cfg.dropout,
        concat_logits=cfg.concat_logits,
    )


# ---------------------------------------------------------------- batches


class Norm(NamedTuple):
    mean: np.ndarray  # (D,) float32
    std: np.ndarray  # (D,) float32, 1 where a feature is constant


def _slots_of(inputs: SeqInputs, studies: np.ndarray) -> np.ndarray:
    lengths = inputs.stops[studies] - inputs.starts[studies]
    # Slot k of the concatenation is start of its study + its offset within the study.
    offsets = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.repeat(inputs.starts[studies], lengths) + offsets


def standardisation(inputs: SeqInputs, studies: np.ndarray) -> Norm:
    """Mean and std of ``x`` over the slots of ``studies`` (float64 sums, a chunk of rows at a time)."""
    slots = np.sort(_slots_of(inputs, studies))
    total = np.zeros(inputs.x.shape[1])
    squares = np.zeros(inputs.x.shape[1])
    for lo in range(0, len(slots), STATS_CHUNK):
        block = inputs.x[slots[lo : lo + STATS_CHUNK]].astype(np.float32)
        total += block.sum(axis=0, dtype=np.float64)
        squares += np.square(block).sum(axis=0, dtype=np.float64)
    if not (np.isfinite(total).all() and np.isfinite(squares).all()):
        raise DataError("x contains NaN or inf in the training studies' slots")
    mean = total / max(len(slots), 1)
    std = np.sqrt(np.maximum(squares / max(len(slots), 1) - mean**2, 0.0))
    # A constant feature (a dead unit) carries nothing: divide by 1 rather than by ~0.
    std = np.where(std > 1e-6, std, 1.0)
    return Norm(mean=mean.astype(np.float32), std=std.astype(np.float32))


class SeqBatch(NamedTuple):
    """Studies padded at the end to the longest: x standardised, padding 0 (NaN in targets)."""

    studies: np.ndarray  # (B,) study indices
    x: torch.Tensor  # (B, T, D) float32
    base: torch.Tensor  # (B, T, L) float32
    targets: torch.Tensor  # (B, T, L) float32
    mask: torch.Tensor  # (B, T) bool
    labelled: int  # slots with at least one label


def make_batch(inputs: SeqInputs, studies: np.ndarray, norm: Norm) -> SeqBatch:
    lengths = inputs.stops[studies] - inputs.starts[studies]
    b, t = len(studies), int(lengths.max())
    x = np.zeros((b, t, inputs.x.shape[1]), np.float32)
    base = np.zeros((b, t, inputs.logits.shape[1]), np.float32)
    targets = np.full((b, t, inputs.targets.shape[1]), np.nan, np.float32)
    inv_std = (1.0 / norm.std).astype(np.float32)
    for i, (a, n) in enumerate(zip(inputs.starts[studies], lengths)):
        np.subtract(inputs.x[a : a + n], norm.mean, out=x[i, :n])
        x[i, :n] *= inv_std
        base[i, :n] = inputs.logits[a : a + n]
        targets[i, :n] = inputs.targets[a : a + n]
    mask = np.arange(t)[None, :] < lengths[:, None]
    labelled = int((~np.isnan(targets)).any(axis=2).sum())
    return SeqBatch(
        studies=studies,
        x=torch.from_numpy(x),
        base=torch.from_numpy(base),
        targets=torch.from_numpy(targets),
        mask=torch.from_numpy(mask),
        labelled=labelled,
    )


def iter_batches(inputs: SeqInputs, studies: np.ndarray, batch_studies: int, norm: Norm) -> Iterator[SeqBatch]:
    """Batches of ``batch_studies`` consecutive entries of ``studies`` (the last may be short)."""
    for lo in range(0, len(studies), batch_studies):
        yield make_batch(inputs, studies[lo : lo + batch_studies], norm)


def _to(batch: SeqBatch, device: torch.device) -> SeqBatch:
    return batch._replace(
        **{k: getattr(batch, k).to(device, non_blocking=True) for k in ("x", "base", "targets", "mask")}
    )


# ---------------------------------------------------------------- training


def masked_weighted_bce(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The RSNA metric over labelled slots: per slot ``sum_j w_j BCE_j / sum_j w_j`` over its known labels.

    NaN targets (unlabelled slots, padding) drop out of both sums; the mean runs over slots with a label
    (0 when a batch has none, without reading anything back from the device).
    """
    known = ~torch.isnan(targets)
    bce = F.binary_cross_entropy_with_logits(logits, torch.nan_to_num(targets), reduction="none")
    w = weights * known
    denom = w.sum(dim=-1)
    per_slot = (bce * w).sum(dim=-1) / denom.clamp_min(1e-12)
    labelled = denom > 0
    return per_slot[labelled].sum() / labelled.sum().clamp_min(1)


class SeqStep(NamedTuple):
    """What every training step of one fit shares."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    weights: torch.Tensor  # (L,) the competition's label weights
    device: torch.device


def make_step(
    model: nn.Module, cfg: SeqConfig, names: Sequence[str], total_steps: int, device: torch.device
) -> SeqStep:
    """AdamW with a cosine decay to 0 over ``total_steps`` steps."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps, 1))
    return SeqStep(
        model=model, optimizer=optimizer, scheduler=scheduler, weights=loss_weights(tuple(names), device), device=device
    )


def train_step(step: SeqStep, batch: SeqBatch) -> torch.Tensor:
    """One optimiser step; returns the batch loss as a detached device scalar (no sync)."""
    batch = _to(batch, step.device)
    logits = step.model(batch.x, batch.base, batch.mask)
    loss = masked_weighted_bce(logits, batch.targets, step.weights)
    step.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(step.model.parameters(), CLIP_NORM)
    step.optimizer.step()
    step.scheduler.step()
    return loss.detach()


def _epoch(step: SeqStep, batches: Iterator[SeqBatch]) -> float:
    """Mean loss per labelled slot over one pass; read back once at the end."""
    step.model.train()
    total = torch.zeros((), device=step.device)
    labelled = 0
    for batch in batches:
        total += train_step(step, batch) * batch.labelled
        labelled += batch.labelled
    return total.item() / max(labelled, 1)


def _labelled_slots(inputs: SeqInputs, studies: np.ndarray) -> int:
    rows = inputs.targets[_slots_of(inputs, studies)]
    return int((~np.isnan(rows)).any(axis=1).sum())


class Fitted(NamedTuple):
    model: nn.Module  # on the CPU, eval mode
    norm_mean: np.ndarray  # (D,) float32
    norm_std: np.ndarray  # (D,) float32
    history: list[dict]  # per epoch: epoch, train_loss, lr (at the epoch's end), seconds


def _rng_devices(device: torch.device) -> list:
    return [device] if device.type == "cuda" else []


def _holdout(studies: np.ndarray, cfg: SeqConfig) -> tuple[np.ndarray, np.ndarray]:
    """(fit, pick) studies: a seeded ``cfg.holdout`` share picks the epoch; none when too few to judge."""
    n_pick = round(cfg.holdout * len(studies))
    if n_pick < 2 or len(studies) - n_pick < 2:
        return studies, studies[:0]
    order = np.random.default_rng([cfg.seed, 7]).permutation(studies)
    return np.sort(order[n_pick:]), np.sort(order[:n_pick])


@torch.no_grad()
def _loss(step: SeqStep, inputs: SeqInputs, studies: np.ndarray, *, norm: Norm, batch_studies: int) -> float:
    """Mean weighted log loss per labelled slot of ``studies``."""
    step.model.eval()
    total, labelled = 0.0, 0
    for batch in iter_batches(inputs, studies, batch_studies, norm):
        batch = _to(batch, step.device)
        logits = step.model(batch.x, batch.base, batch.mask)
        total += masked_weighted_bce(logits, batch.targets, step.weights).item() * batch.labelled
        labelled += batch.labelled
    return total / max(labelled, 1)


def fit(inputs: SeqInputs, studies, cfg: SeqConfig, names: Sequence[str]) -> Fitted:
    """Train one stage-2 model on ``studies``; the epoch is chosen on a held-out share of those studies.

    Epoch 0 (the untrained model, which is stage 1 itself) is a candidate, so stage 2 is kept only where it
    beats stage 1 on studies it did not fit.  ``x`` is standardised with the mean and std of the fitting
    studies' slots.  Deterministic for a seed on the CPU; the global torch RNG is left as it was.
    """
    names = tuple(names)
    check_inputs(inputs, names)
    studies = _check_studies(studies, len(inputs.starts), "training studies")
    if not studies.size or not _labelled_slots(inputs, studies):
        raise DataError("no labelled slot among the training studies: nothing to fit")
    device = _device(cfg.device)
    fit_on, pick_on = _holdout(studies, cfg)
    norm = standardisation(inputs, fit_on)
    steps_per_epoch = math.ceil(len(fit_on) / cfg.batch_studies)
    history = []
    with torch.random.fork_rng(devices=_rng_devices(device)):
        torch.manual_seed(cfg.seed)
        model = _model_for(cfg, inputs.x.shape[1], len(names)).to(device)
        step = make_step(model, cfg, names, cfg.epochs * steps_per_epoch, device)
        judged = len(pick_on) and _labelled_slots(inputs, pick_on)
        best = _loss(step, inputs, pick_on, norm=norm, batch_studies=cfg.batch_studies) if judged else math.inf
        best_epoch, best_state = 0, copy.deepcopy(model.state_dict())
        for epoch in range(1, cfg.epochs + 1):
            started = time.perf_counter()
            order = np.random.default_rng([cfg.seed, epoch]).permutation(fit_on)
            loss = _epoch(step, iter_batches(inputs, order, cfg.batch_studies, norm))
            held = _loss(step, inputs, pick_on, norm=norm, batch_studies=cfg.batch_studies) if judged else None
            history.append(
                {
                    "epoch": epoch,
                    "train_loss": loss,
                    "holdout_loss": held,
                    "lr": step.scheduler.get_last_lr()[0],
                    "seconds": time.perf_counter() - started,
                }
            )
            if not judged or held < best:
                best, best_epoch, best_state = (held if judged else best), epoch, copy.deepcopy(model.state_dict())
            logger.debug("stage 2 epoch %d/%d: train loss %.5f, held-out %s", epoch, cfg.epochs, loss, held)
        model.load_state_dict(best_state)
    if history:
        history[-1]["best_epoch"] = best_epoch
    logger.info(
        "stage 2 fit on %d studies: epoch %d of %d kept (held-out studies: %d)",
        len(fit_on),
        best_epoch,
        cfg.epochs,
        len(pick_on),
    )
    return Fitted(model=model.cpu().eval(), norm_mean=norm.mean, norm_std=norm.std, history=history)


# ---------------------------------------------------------------- prediction


@torch.no_grad()
def predict(fitted: Fitted, inputs: SeqInputs, studies, *, batch_studies: int = 64, device="cpu") -> np.ndarray:
    """(n_slots, L) float32 probabilities for the slots of ``studies``, NaN elsewhere.

    Studies are batched by length (less padding); a study's output does not depend on its batch.
    """
    _check_own_labels(inputs)
    studies = _check_studies(studies, len(inputs.starts), "studies")
    if fitted.norm_mean.shape != (inputs.x.shape[1],):
        raise DataError(f"the model reads {fitted.norm_mean.shape[0]} input features, x has {inputs.x.shape[1]}")
    device = torch.device(device)
    model = fitted.model.to(device).eval()
    norm = Norm(mean=fitted.norm_mean, std=fitted.norm_std)
    out = np.full(inputs.logits.shape, np.nan, np.float32)
    by_length = studies[np.argsort(inputs.stops[studies] - inputs.starts[studies], kind="stable")]
    for batch in iter_batches(inputs, by_length, batch_studies, norm):
        batch = _to(batch, device)
        probs = torch.sigmoid(model(batch.x, batch.base, batch.mask)).cpu().numpy()
        mask = batch.mask.cpu().numpy()
        out[_slots_of(inputs, batch.studies)] = probs[mask]  # row-major mask order = study by study, z order
    return out


def predict_ensemble(
    fitted_list: Sequence[Fitted],
    inputs_per_fold: Sequence[SeqInputs],
    studies,
    *,
    batch_studies: int = 64,
    device="cpu",
) -> np.ndarray:
    """Mean probability of ``fitted_list[k]`` applied to ``inputs_per_fold[k]`` (fold k's stage-1 outputs)."""
    if len(fitted_list) != len(inputs_per_fold) or not fitted_list:
        raise DataError(
            f"one input set per fitted model is needed, got {len(fitted_list)} models and "
            f"{len(inputs_per_fold)} input sets"
        )
    total = None
    for fitted, inputs in zip(fitted_list, inputs_per_fold):
        probs = predict(fitted, inputs, studies, batch_studies=batch_studies, device=device)
        if total is not None and probs.shape != total.shape:
            raise DataError(f"input sets disagree on the slots: {probs.shape} vs {total.shape}")
        total = probs if total is None else total + probs
    return total / len(fitted_list)


class CrossFit(NamedTuple):
    probs: np.ndarray  # (n_slots, L) out-of-fold probabilities, NaN for studies in no fold
    fitted: list[Fitted]  # one per fold, in sorted fold order


def folds_of(inputs: SeqInputs) -> list[int]:
    return sorted(set(np.asarray(inputs.study_fold).tolist()) - {-1})


def cross_fit(inputs: SeqInputs, cfg: SeqConfig, names: Sequence[str]) -> CrossFit:
    """For each fold k: fit on the studies of the other folds (never fold k, never fold -1), predict fold k."""
    names = tuple(names)
    check_inputs(inputs, names)
    folds = folds_of(inputs)
    if len(folds) < 2:
        raise DataError(f"cross-fitting needs at least 2 folds, study_fold has {folds}")
    fold = np.asarray(inputs.study_fold)
    probs = np.full(inputs.logits.shape, np.nan, np.float32)
    fitted = []
    for k in folds:
        train = np.flatnonzero((fold != k) & (fold != -1))
        held = np.flatnonzero(fold == k)
        logger.info("stage 2 fold %d: fitting %s on %d studies, predicting %d", k, cfg.model, len(train), len(held))
        model = fit(inputs, train, cfg, names)
        part = predict(model, inputs, held, device=_device(cfg.device))
        rows = _slots_of(inputs, held)
        probs[rows] = part[rows]
        fitted.append(model)
    return CrossFit(probs=probs, fitted=fitted)


# ---------------------------------------------------------------- saving


class LoadedSeq(NamedTuple):
    fitted: list[Fitted]
    cfg: SeqConfig
    names: tuple[str, ...]
    in_dim: int
    inputs_kind: str
    calibrated: bool  # stage-1 logits pass through each fold's Platt map before stage 2 reads them


def save_seq(
    path,
    fitted_list: Sequence[Fitted],
    cfg: SeqConfig,
    *,
    names: Sequence[str],
    in_dim: int,
    inputs_kind: str,
    calibrated: bool,
) -> None:
    """One file for the per-fold models: tensors, numbers, strings, lists and dicts only (weights_only loading)."""
    check_choice("inputs_kind", inputs_kind, SEQ_INPUTS)
    for f in fitted_list:
        if f.norm_mean.shape != (in_dim,):
            raise DataError(f"a fitted model reads {f.norm_mean.shape[0]} features, in_dim is {in_dim}")
    state = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "config": asdict(cfg),
        "names": list(names),
        "in_dim": int(in_dim),
        "inputs_kind": inputs_kind,
        "calibrated": bool(calibrated),
        "folds": [
            {
                "model": {k: v.detach().cpu().clone() for k, v in f.model.state_dict().items()},
                "norm_mean": torch.from_numpy(np.asarray(f.norm_mean, np.float32)),
                "norm_std": torch.from_numpy(np.asarray(f.norm_std, np.float32)),
                "history": [dict(row) for row in f.history],
            }
            for f in fitted_list
        ],
    }
    save_checkpoint(state, Path(path))


def load_seq(path, device="cpu") -> LoadedSeq:
    """The models :func:`save_seq` wrote, loaded with ``weights_only=True``, in eval mode on ``device``."""
    state = safe_load(path, "stage-2 model file")
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a stage-2 model file (written by ichtrain.study.sequence.save_seq)")
    if state.get("version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has stage-2 format version {state.get('version')}, this ichtrain reads {FORMAT_VERSION}"
        )
    cfg = SeqConfig(**{f.name: state["config"][f.name] for f in fields(SeqConfig) if f.name in state["config"]})
    names = tuple(state["names"])
    fitted = []
    for fold in state["folds"]:
        model = _model_for(cfg, state["in_dim"], len(names))
        model.load_state_dict(fold["model"])
        fitted.append(
            Fitted(
                model=model.to(device).eval(),
                norm_mean=fold["norm_mean"].numpy(),
                norm_std=fold["norm_std"].numpy(),
                history=list(fold["history"]),
            )
        )
    return LoadedSeq(
        fitted=fitted,
        cfg=cfg,
        names=names,
        in_dim=int(state["in_dim"]),
        inputs_kind=state["inputs_kind"],
        calibrated=bool(state.get("calibrated", False)),  # files written before stage 2 read calibrated logits
    )
