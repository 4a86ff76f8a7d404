"""The order samples leave a stream in: as read (evaluation) or shuffled over a window of pieces (training)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple

import numpy as np


class Emission(NamedTuple):
    """Samples to write next, in order: sample ``sample[i]`` of piece number ``piece[i]``."""

    piece: np.ndarray
    sample: np.ndarray


_NOTHING = Emission(np.empty(0, np.int64), np.empty(0, np.int64))


class SequenceOrder:
    """Each piece's samples in sequence as soon as it arrives (evaluation order); no piece is held."""

    window = 1

    def __init__(self):
        self._added = 0

    def add(self, n: int) -> Emission:
        self._added += 1
        return Emission(np.full(n, self._added - 1, np.int64), np.arange(n))

    def rest(self) -> Emission:
        return _NOTHING


class WindowShuffle:
    """Shuffled order over a window of ``window`` pieces, so that exactly that many are ever held.

    Each sample of piece p goes out in one of the rounds p .. p + window - 1 (raised to window - 1:
    nothing goes out before ``window`` pieces are in).  When piece p arrives, round p goes out in random
    order; after the last piece, every later round goes out together in random order.  No sample of piece
    p - window + 1 is due after round p, so a round mixes the ``window`` latest pieces evenly.  Rounds are
    stratified: each run of ``window`` consecutive samples of a piece (neighbouring slices, mostly of one
    study) takes the ``window`` rounds in a random permutation, so a study's slices spread over the
    rounds instead of bunching in one batch.
    """

    def __init__(self, window: int, rng: np.random.Generator):
        self.window, self.rng = window, rng
        self._pending: list[tuple[int, np.ndarray]] = []  # (piece number, round of each of its samples)
        self._added = 0

    def add(self, n: int) -> Emission:
        p = self._added
        self._added += 1
        delays = np.argsort(self.rng.random((-(-n // self.window), self.window)), axis=1).ravel()[:n]
        self._pending.append((p, np.maximum(p + delays, self.window - 1)))
        out = self._due(lambda rounds: rounds == p)
        self._pending = [(q, rounds) for q, rounds in self._pending if q > p - self.window + 1]
        return out

    def rest(self) -> Emission:
        last = self._added - 1
        out = self._due(lambda rounds: rounds > last)
        self._pending = []
        return out

    def _due(self, due) -> Emission:
        picked = [(q, np.flatnonzero(due(rounds))) for q, rounds in self._pending]
        if not picked:
            return _NOTHING
        piece = np.concatenate([np.full(len(samples), q, np.int64) for q, samples in picked])
        sample = np.concatenate([samples for _, samples in picked])
        shuffled = self.rng.permutation(len(sample))
        return Emission(piece[shuffled], sample[shuffled])


class Step(NamedTuple):
    """What to emit after one more piece arrived (or, last, after all of them)."""

    live: dict  # piece number -> piece, for every piece the emission may name
    emission: Emission


def emissions(order, pieces: Iterable, size: Callable[[object], int]) -> Iterator[Step]:
    """Feeds ``pieces`` (taken one at a time, so a lazy iterable loads each when its turn comes) to ``order``.

    ``live`` drops a piece once ``order`` is done with it, right after the step is consumed: use a
    step's emission before asking for the next step.
    """
    live = {}
    for p, piece in enumerate(pieces):
        live[p] = piece
        step = Step(live, order.add(size(piece)))
        del piece  # only ``live`` holds a piece, so it is freed as soon as ``order`` is done with it
        yield step
        live.pop(p - order.window + 1, None)
    yield Step(live, order.rest())
