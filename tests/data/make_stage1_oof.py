"""Write what stage 2 reads from an experiment, as a small .npz for the tests.

After ``make demo-study``, with its held-out archive converted like the training store::

    ichprep convert demo_study/heldout/stage_2_train --labels demo_study/heldout/stage_2_train.csv \\
        -o demo_study/heldout64.zarr --size 64 --shard-slices 32
    python tests/data/make_stage1_oof.py demo_study/exp demo_study/heldout64.zarr tests/data/demo_study_stage1.npz

``oof_*``: the calibrated out-of-fold logits of every slot of the experiment's store, the targets (NaN where
unlabelled), each study's slot range and fold: exactly the arrays ``ichtrain seq`` cross-fits on.
``held_*``: each fold's calibrated logits on the held-out store (fold, slot, label), as ``ichtrain predict``
hands them to that fold's stage 2, with that store's targets and study ranges.
"""

import sys

import numpy as np

from ichtrain.evaluation.evaluate import as_store, load_for_store
from ichtrain.files import fold_dir
from ichtrain.study.experiment import calibrated_oof, oof_outputs, open_experiment, open_training_store
from ichtrain.study.stage2 import seq_inputs
from ichtrain.study.submit import stage1


def main(exp: str, heldout: str, out: str) -> None:
    experiment = open_experiment(exp)
    task = experiment.cfg.task
    store = open_training_store(experiment)
    mapped = calibrated_oof(experiment, store, oof_outputs(experiment, store))
    oof = seq_inputs(store, mapped, kind="logits", task=task, slot_fold=experiment.fold)
    held_store = as_store(heldout)
    none = np.zeros(len(held_store.slices), np.int64)
    held = []
    for k in range(experiment.folds):
        loaded = load_for_store(fold_dir(experiment.path, k) / "best.pt", held_store, "cpu")
        stage = stage1(loaded, tta="none", batch_size=64, workers=0)
        held.append(seq_inputs(held_store, stage.mapped, kind="logits", task=task, slot_fold=none))
    np.savez_compressed(
        out,
        names=np.array(experiment.names),
        oof_logits=oof.logits,
        oof_targets=oof.targets,
        oof_starts=oof.starts,
        oof_stops=oof.stops,
        oof_fold=oof.study_fold,
        held_logits=np.stack([h.logits for h in held]),
        held_targets=held[0].targets,
        held_starts=held[0].starts,
        held_stops=held[0].stops,
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
