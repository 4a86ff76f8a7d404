"""Write what stage 2 reads from an experiment (its stage-1 out-of-fold logits) as a small .npz for the tests.

    python tests/data/make_stage1_oof.py demo_study/exp tests/data/demo_study_stage1_oof.npz

After ``make demo-study``: the calibrated out-of-fold logits of every slot, the targets (NaN where
unlabelled), each study's slot range and its fold; exactly the arrays ``ichtrain seq`` cross-fits on.
"""

import sys

import numpy as np

from ichtrain.experiment import calibrated_oof, oof_outputs, open_experiment, open_training_store
from ichtrain.stage2 import seq_inputs


def main(exp: str, out: str) -> None:
    experiment = open_experiment(exp)
    store = open_training_store(experiment)
    mapped = calibrated_oof(experiment, store, oof_outputs(experiment, store))
    inputs = seq_inputs(store, mapped, kind="logits", task=experiment.cfg.task, slot_fold=experiment.fold)
    np.savez_compressed(
        out,
        logits=inputs.logits,
        targets=inputs.targets,
        starts=inputs.starts,
        stops=inputs.stops,
        study_fold=inputs.study_fold,
        names=np.array(experiment.names),
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
