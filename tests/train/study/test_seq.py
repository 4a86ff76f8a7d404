"""ichtrain.study.sequence: stage 2 beats noisy stage-1 logits out of fold, honestly, batch-independent, round-trips."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from ichprep.reading.labels import LABELS
from ichtrain.config import SEQ_MODEL_DEFAULTS, SeqConfig
from ichtrain.errors import CheckpointError, ConfigError, DataError
from ichtrain.evaluation.metrics import weighted_log_loss
from ichtrain.study.sequence import (
    Fitted,
    SeqInputs,
    build_seq_model,
    cross_fit,
    fit,
    load_seq,
    predict,
    predict_ensemble,
    save_seq,
    standardisation,
)

NAMES = tuple(LABELS)
#: Small and quick: about 2 CPU seconds per 3-fold cross-fit of either model on the data below.
FAST = SeqConfig(model="gru", hidden=16, layers=1, epochs=4, batch_studies=10, lr=1e-2, holdout=0.2)
MODELS = ("gru", "transformer", "window")


def quick(kind: str) -> SeqConfig:
    """FAST for the recurrent and attention models; the window model's own defaults, fewer studies per batch."""
    return dataclasses.replace(FAST, model=kind) if kind != "window" else SeqConfig(model=kind, batch_studies=10)


def synthetic(n_studies: int = 60, seed: int = 0, folds: int = 3, noise: float = 1.5, d_noise: int = 10) -> SeqInputs:
    """Studies of 20-40 slices, lesions as z-runs of 3-12 slices, stage-1 logits = truth + heavy per-slice noise.

    Half the studies bleed (1-2 runs of a random subtype; ``any`` is their union).  As stage-1 penultimate
    features do, the features carry what the logits carry: the logits mixed by a random matrix, with a little
    noise, then ``d_noise`` pure-noise columns.  Two studies are unlabelled.
    """
    rng = np.random.default_rng(seed)
    lengths = rng.integers(20, 41, n_studies)
    stops = np.cumsum(lengths)
    starts = stops - lengths
    truth = np.zeros((int(stops[-1]), len(NAMES)), np.float32)
    for s in np.flatnonzero(rng.random(n_studies) < 0.5):
        for _ in range(rng.integers(1, 3)):
            run = int(rng.integers(3, 13))
            first = starts[s] + int(rng.integers(0, lengths[s] - run + 1))
            truth[first : first + run, rng.integers(0, 5)] = 1
    truth[:, 5] = truth[:, :5].max(axis=1)
    logits = (-2.0 + 3.0 * truth + noise * rng.standard_normal(truth.shape)).astype(np.float32)
    mixed = logits @ rng.standard_normal((len(NAMES), len(NAMES))) + 0.3 * rng.standard_normal(truth.shape)
    x = np.c_[mixed, rng.standard_normal((len(truth), d_noise))].astype(np.float16)
    targets = truth.copy()
    for s in (0, 1):
        targets[starts[s] : stops[s]] = np.nan
    return SeqInputs(
        x=x,
        logits=logits,
        targets=targets,
        starts=starts.astype(np.int64),
        stops=stops.astype(np.int64),
        study_fold=rng.integers(0, folds, n_studies).astype(np.int64),
    )


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small models: one torch thread is as fast, and never stalls waiting on a core another job holds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data() -> SeqInputs:
    return synthetic()


def _stage1(inputs: SeqInputs) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-inputs.logits.astype(np.float64)))


def _slots(inputs: SeqInputs, studies) -> np.ndarray:
    return np.concatenate([np.arange(inputs.starts[s], inputs.stops[s]) for s in studies])


def _untrained(inputs: SeqInputs, cfg: SeqConfig, *, random_head: bool = False) -> Fitted:
    model = build_seq_model(
        cfg.model, in_dim=inputs.x.shape[1], n_out=len(NAMES), hidden=cfg.hidden, layers=cfg.layers, dropout=cfg.dropout
    ).eval()
    if random_head:  # a correction that is not 0, as after training
        torch.nn.init.normal_(model.head[-1].weight, std=0.5)
    norm = standardisation(inputs, np.arange(len(inputs.starts)))
    return Fitted(model, norm.mean, norm.std, [])


@pytest.mark.parametrize("kind", MODELS)
def test_cross_fit_beats_noisy_stage1(data, kind):
    result = cross_fit(data, quick(kind), NAMES)
    assert len(result.fitted) == 3
    assert np.isfinite(result.probs).all()
    stage1 = weighted_log_loss(data.targets, _stage1(data), NAMES)
    stage2 = weighted_log_loss(data.targets, result.probs, NAMES)
    assert stage2 <= 0.9 * stage1, (stage1, stage2)


@pytest.mark.parametrize("kind", MODELS)
def test_stage2_carries_over_to_studies_of_another_seed(data, kind):
    """Fitted on one set of studies, stage 2 beats stage 1 on a set drawn from another seed (new patients)."""
    fitted = fit(data, np.arange(len(data.starts)), quick(kind), NAMES)
    new = synthetic(n_studies=30, seed=1)
    studies = np.arange(2, 30)  # the two unlabelled studies have nothing to score
    rows = _slots(new, studies)
    stage2 = predict(fitted, new, studies)[rows]
    stage1 = _stage1(new)[rows]
    assert weighted_log_loss(new.targets[rows], stage2, NAMES) <= 0.9 * weighted_log_loss(
        new.targets[rows], stage1, NAMES
    )


def test_fold_k_is_predicted_by_a_model_that_never_saw_it(data):
    """Flipping fold 0's (and the fold -1 studies') targets changes nothing in fold 0's out-of-fold output."""
    fold = data.study_fold.copy()
    fold[3:7] = -1
    clean = data._replace(study_fold=fold)
    flipped = clean.targets.copy()
    for s in np.flatnonzero((fold == 0) | (fold == -1)):
        flipped[clean.starts[s] : clean.stops[s]] = 1 - flipped[clean.starts[s] : clean.stops[s]]
    cfg = dataclasses.replace(FAST, model="transformer", epochs=2)
    honest = cross_fit(clean, cfg, NAMES)
    attacked = cross_fit(clean._replace(targets=flipped), cfg, NAMES)
    fold0 = _slots(clean, np.flatnonzero(fold == 0))
    fold1 = _slots(clean, np.flatnonzero(fold == 1))
    nowhere = _slots(clean, np.flatnonzero(fold == -1))
    np.testing.assert_array_equal(honest.probs[fold0], attacked.probs[fold0])
    assert not np.allclose(honest.probs[fold1], attacked.probs[fold1])  # fold 1's model did train on fold 0
    assert np.isnan(honest.probs[nowhere]).all()
    assert np.isfinite(np.delete(honest.probs, nowhere, axis=0)).all()


@pytest.mark.parametrize("kind", MODELS)
def test_output_does_not_depend_on_the_batch(data, kind):
    fitted = _untrained(data, quick(kind), random_head=True)
    lengths = data.stops - data.starts
    short = int(np.argmin(lengths))
    longer = np.argsort(lengths)[-3:]
    alone = predict(fitted, data, np.array([short]))
    batched = predict(fitted, data, np.r_[longer[:1], short, longer[1:]])
    rows = _slots(data, [short])
    assert not np.allclose(alone[rows], _stage1(data)[rows], atol=1e-3)  # the correction is really there
    np.testing.assert_allclose(alone[rows], batched[rows], atol=1e-5, rtol=0)
    assert np.isnan(np.delete(alone, rows, axis=0)).all()


@pytest.mark.parametrize("kind", MODELS)
def test_untrained_model_is_stage1(data, kind):
    model = build_seq_model(kind, in_dim=7, n_out=6, hidden=16, layers=1, dropout=0.0)
    base = torch.randn(3, 9, 6)
    mask = torch.arange(9)[None, :] < torch.tensor([[9], [4], [1]])
    assert torch.equal(model(torch.randn(3, 9, 7), base, mask), base)
    fitted = _untrained(data, quick(kind))
    studies = np.array([5, 2, 9])
    rows = _slots(data, studies)
    np.testing.assert_allclose(predict(fitted, data, studies)[rows], _stage1(data)[rows], rtol=0, atol=1e-6)


def test_fit_is_deterministic_and_leaves_the_global_rng(data):
    cfg = dataclasses.replace(FAST, epochs=1, holdout=0.0)
    train = np.arange(10, 30)
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    first = fit(data, train, cfg, NAMES)
    assert torch.equal(torch.rand(1), expected)
    second = fit(data, train, cfg, NAMES)
    for (name, a), b in zip(first.model.state_dict().items(), second.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert [row["epoch"] for row in first.history] == [1]
    assert first.history[0]["lr"] == pytest.approx(0, abs=1e-12)
    norm = standardisation(data, train)
    np.testing.assert_array_equal(first.norm_mean, norm.mean)
    rows = _slots(data, train)
    np.testing.assert_allclose(norm.mean, data.x[rows].astype(np.float64).mean(axis=0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(norm.std, data.x[rows].astype(np.float64).std(axis=0), rtol=1e-4)


def test_constant_feature_is_divided_by_one(data):
    x = data.x.copy()
    x[:, 3] = 2.5
    norm = standardisation(data._replace(x=x), np.arange(10))
    assert norm.std[3] == 1.0
    assert norm.mean[3] == 2.5


def test_save_load_round_trip_and_ensemble(data, tmp_path):
    cfg = dataclasses.replace(FAST, model="transformer", epochs=1)
    fitted = [fit(data, np.arange(10, 30), cfg, NAMES), fit(data, np.arange(30, 50), cfg, NAMES)]
    path = tmp_path / "seq.pt"
    save_seq(path, fitted, cfg, names=NAMES, in_dim=data.x.shape[1], inputs_kind="features", calibrated=True)
    loaded = load_seq(path)
    assert loaded.cfg == cfg
    assert loaded.names == NAMES
    assert loaded.in_dim == data.x.shape[1]
    assert loaded.inputs_kind == "features"
    assert loaded.calibrated
    assert loaded.fitted[1].history == fitted[1].history
    studies = np.arange(0, 60, 7)
    for before, after in zip(fitted, loaded.fitted):
        np.testing.assert_array_equal(predict(before, data, studies), predict(after, data, studies))
    # Each fold's model reads its own stage-1 model's outputs: here, the second set is shifted.
    shifted = data._replace(logits=data.logits + 0.5)
    mean = predict_ensemble(loaded.fitted, [data, shifted], studies)
    expected = (predict(fitted[0], data, studies) + predict(fitted[1], shifted, studies)) / 2
    np.testing.assert_allclose(mean, expected, rtol=0, atol=1e-7)
    with pytest.raises(DataError, match="one input set per fitted model"):
        predict_ensemble(loaded.fitted, [data], studies)
    with pytest.raises(ConfigError, match="features, logits"):
        save_seq(path, fitted, cfg, names=NAMES, in_dim=data.x.shape[1], inputs_kind="pixels", calibrated=False)
    (tmp_path / "other.pt").write_bytes(b"not a model")
    with pytest.raises(CheckpointError):
        load_seq(tmp_path / "other.pt")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model": "lstm"}, "choose one of gru, transformer, window"),
        ({"device": "tpu"}, "choose one of auto, cpu, cuda"),
        ({"model": "transformer", "hidden": 30}, "multiple of 4"),
        ({"epochs": 0}, "epochs must be >= 1"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"lr": 0.0}, "lr must be > 0"),
    ],
)
def test_bad_config_lists_the_choices(change, message):
    with pytest.raises(ConfigError, match=message):
        SeqConfig(**change)
    with pytest.raises(ConfigError, match="choose one of gru, transformer, window"):
        build_seq_model("lstm", in_dim=4, n_out=6, hidden=8, layers=1, dropout=0.0)


def test_every_seq_model_choice_builds():
    """config.SEQ_MODELS is the one list of choices; each is a model class here (and only those are)."""
    from ichtrain.config import SEQ_MODELS
    from ichtrain.study import sequence as seq

    assert set(seq._MODELS) == set(SEQ_MODELS)


def test_each_model_takes_its_own_defaults_unless_given():
    assert SeqConfig().model == "window"
    for kind, defaults in SEQ_MODEL_DEFAULTS.items():
        assert {name: getattr(SeqConfig(model=kind), name) for name in defaults} == defaults
    assert SeqConfig(model="gru", epochs=3, holdout=0.0).epochs == 3
    assert SeqConfig(model="gru", epochs=3, holdout=0.0).holdout == 0.0


def test_window_model_reads_a_label_near_its_slice_and_its_study_top():
    """Slice 5's correction of label 0 follows label 0's logits at slices 3..7 and the study's top 3, nothing else."""
    torch.manual_seed(0)
    model = build_seq_model("window", in_dim=4, n_out=6, hidden=8, layers=1, dropout=0.0).eval()
    torch.nn.init.normal_(model.head[-1].weight, std=0.5)
    mask = torch.arange(14)[None, :] < torch.tensor([[12]])
    base = torch.randn(1, 14, 6)
    base[0, :12, 0] = torch.linspace(-3.0, 0.0, 12)  # label 0's top 3 are slices 9, 10, 11

    def slice5(changed: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(torch.randn(1, 14, 4), changed, mask)[0, 5, 0] - changed[0, 5, 0]

    reference = slice5(base)
    for slot, label, counts in [(7, 0, True), (3, 0, True), (11, 0, True), (8, 0, False), (2, 0, False),
                                (5, 1, False), (6, 5, False), (12, 0, False)]:  # fmt: skip
        changed = base.clone()
        changed[0, slot, label] = -2.5 if slot != 11 else -5.0
        assert (not torch.isclose(slice5(changed), reference)) == counts, (slot, label)
    swapped = base.clone()
    swapped[0, [4, 6], 0] = base[0, [6, 4], 0]  # above and below count alike
    assert torch.isclose(slice5(swapped), reference)


def _bad_inputs(data: SeqInputs) -> list[tuple[SeqInputs, str]]:
    overlap = data.stops.copy()
    overlap[0] += 1
    folds = data.study_fold.copy()
    folds[0] = -2
    return [
        (data._replace(logits=data.logits[:, :5]), r"logits has shape .*one column per name"),
        (data._replace(targets=data.targets[1:]), "targets has shape"),
        (data._replace(x=data.x[:, :, None]), r"x has shape .*\(n_slots, D\)"),
        (data._replace(stops=overlap), "overlap"),
        (data._replace(stops=data.stops + 1), "start < stop <="),
        (data._replace(starts=data.starts[1:]), "1-D of one length"),
        (data._replace(study_fold=folds), "-1 for a study in no fold"),
        (data._replace(logits=np.where(np.arange(6) == 2, np.nan, data.logits).astype(np.float32)), "NaN"),
    ]


def test_inputs_are_checked(data):
    for bad, message in _bad_inputs(data):
        with pytest.raises(DataError, match=message):
            fit(bad, np.arange(10), FAST, NAMES)
    with pytest.raises(DataError, match="one column per name"):
        fit(data, np.arange(10), FAST, NAMES[:5])
    with pytest.raises(DataError, match="index the 60 studies"):
        predict(_untrained(data, FAST), data, np.array([60]))
    with pytest.raises(DataError, match="twice"):
        fit(data, np.array([3, 3]), FAST, NAMES)
    with pytest.raises(DataError, match="no labelled slot"):
        fit(data, np.array([0, 1]), FAST, NAMES)  # the two unlabelled studies
    with pytest.raises(DataError, match="at least 2 folds"):
        cross_fit(data._replace(study_fold=np.zeros(60, np.int64)), FAST, NAMES)
    with pytest.raises(DataError, match="reads 16 input features"):
        predict(_untrained(data, FAST), data._replace(x=data.x[:, :8]), np.arange(3))


def test_held_out_studies_keep_stage_1_when_training_only_fits_noise(data):
    """Labels that have nothing to do with the inputs: every trained epoch loses on the held-out studies,
    so fit keeps epoch 0, the untrained model, which is stage 1 itself."""
    rng = np.random.default_rng(5)
    noise = data._replace(
        targets=(rng.random(data.targets.shape) < 0.3).astype(np.float32),
        logits=np.full_like(data.logits, np.log(0.3 / 0.7)),
    )
    cfg = dataclasses.replace(FAST, epochs=6, hidden=32, lr=3e-2, holdout=0.3)
    fitted = fit(noise, np.arange(len(noise.starts)), cfg, NAMES)
    assert fitted.history[-1]["best_epoch"] == 0
    assert all(row["holdout_loss"] is not None for row in fitted.history)
    studies = np.arange(len(noise.starts))
    rows = _slots(noise, studies)
    np.testing.assert_allclose(predict(fitted, noise, studies)[rows], _stage1(noise)[rows], rtol=0, atol=1e-6)
