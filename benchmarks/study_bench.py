"""``python -m benchmarks.study_bench``: the study-level evaluation at RSNA size, timed.

A simulated table of 21,744 studies (RSNA 2019's count) with six labels, three readers and two operating
points per label goes through :func:`ichtrain.evaluation.studylevel.external_table` (AUC intervals from 2,000
study resamples, exact intervals, reader statistics and Fleiss' kappa); 750,000 slices go through each study
rule of :func:`ichtrain.evaluation.studylevel.study_scores`.  Target: the table in < 10 s.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd

from ichprep.reading.labels import LABELS
from ichtrain.config import STUDY_RULES
from ichtrain.evaluation.studylevel import external_table, study_scores

TARGET_S = 10.0


def simulated_studies(n_studies: int, seed: int = 0) -> pd.DataFrame:
    """Study truths, scores that track them, and three readers who each misread 6 % of findings."""
    rng = np.random.default_rng(seed)
    truth = (rng.random((n_studies, len(LABELS))) < 0.12).astype(float)
    truth[:, -1] = truth[:, :-1].max(axis=1)
    score = np.clip(0.55 * truth + 0.6 * rng.random(truth.shape), 0, 1)
    frame = pd.DataFrame({f"true_{n}": truth[:, j] for j, n in enumerate(LABELS)})
    for j, n in enumerate(LABELS):
        frame[f"prob_{n}"] = score[:, j]
    for reader in ("R1", "R2", "R3"):
        flips = rng.random(truth.shape) < 0.06
        for j, n in enumerate(LABELS):
            frame[f"{reader}:{n}"] = np.abs(truth[:, j] - flips[:, j]).astype(int)
    return frame.set_index(pd.Index([f"S{i}" for i in range(n_studies)], name="study_uid"))


def simulated_slices(n_slices: int, n_studies: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({"study_uid": np.sort(rng.integers(0, n_studies, n_slices)).astype(str)})
    for n in LABELS:
        frame[f"prob_{n}"] = rng.random(n_slices)
    return frame


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.study_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=21_744)
    parser.add_argument("--slices", type=int, default=750_000)
    parser.add_argument("--resamples", type=int, default=2000)
    args = parser.parse_args(argv)
    studies = simulated_studies(args.studies)
    thresholds = {n: {"sens>=0.95": 0.35, "youden": 0.5} for n in LABELS}
    start = time.perf_counter()
    external_table(studies, labels=LABELS, thresholds=thresholds, n_boot=args.resamples)
    table_s = time.perf_counter() - start
    slices = simulated_slices(args.slices, args.studies)
    rules = {}
    for rule in STUDY_RULES:
        start = time.perf_counter()
        study_scores(slices, rule=rule)
        rules[rule] = time.perf_counter() - start
    verdict = "met" if table_s < TARGET_S else "NOT met"
    print(
        f"external_table, {args.studies} studies x {len(LABELS)} labels, 3 readers, {args.resamples} resamples: "
        f"{table_s:.2f} s (target < {TARGET_S:g} s: {verdict})"
    )
    for rule, seconds in rules.items():
        print(f"study_scores {rule}, {args.slices} slices: {seconds:.2f} s")
    return {"external_table_s": table_s, "study_scores_s": rules}


if __name__ == "__main__":
    main()
