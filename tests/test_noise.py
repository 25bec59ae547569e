"""Label-noise corruption: rates, structure, reproducibility, records and one-line errors."""

import json
import math

import pytest
import torch

from raymeta.data.noise import corrupt_labels, transition_matrix
from raymeta.errors import ConfigError

C = 10
N = 60_000


@pytest.fixture(scope="module")
def labels():
    """Balanced labels in a seeded order (the shape of Fashion-MNIST's training labels)."""
    gen = torch.Generator().manual_seed(0)
    return (torch.arange(N) % C)[torch.randperm(N, generator=gen)]


def binomial_tol(p: float, n: int, sigmas: float = 4.0) -> float:
    return sigmas * math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("noise_type", ["uniform", "pair"])
@pytest.mark.parametrize("rate", [0.2, 0.45])
def test_flipped_fraction_matches_rate(labels, noise_type, rate):
    noisy, rec = corrupt_labels(labels, C, noise_type, rate, seed=1)
    frac = float((noisy != labels).float().mean())
    assert abs(frac - rate) < binomial_tol(rate, N)  # 4 binomial sigmas: 0.0065 at r=0.2
    assert rec.flipped_fraction == pytest.approx(frac)
    assert torch.equal(rec.flipped, (noisy != labels).nonzero().flatten())
    # per class too: every clean class is corrupted at the requested rate
    n_c = N // C
    for c in range(C):
        row = rec.counts[c]
        assert int(row.sum()) == n_c
        assert abs(1 - float(row[c]) / n_c - rate) < binomial_tol(rate, n_c)


def test_pair_flip_goes_to_the_next_class_only(labels):
    noisy, rec = corrupt_labels(labels, C, "pair", 0.3, seed=2)
    changed = noisy != labels
    assert torch.equal(noisy[changed], (labels[changed] + 1) % C)
    allowed = torch.eye(C, dtype=torch.bool) | torch.eye(C, dtype=torch.bool).roll(1, dims=1)
    assert int(rec.counts[~allowed].sum()) == 0
    assert int(rec.counts[9, 0]) > 0  # wraps around: the last class flips to class 0


def test_uniform_noise_spreads_over_the_other_classes(labels):
    rate = 0.4
    noisy, rec = corrupt_labels(labels, C, "uniform", rate, seed=3)
    assert int(rec.counts.diagonal().sum()) == int((noisy == labels).sum())
    n_c, p_cell = N // C, rate / (C - 1)
    off = rec.counts[~torch.eye(C, dtype=torch.bool)].double() / n_c
    assert len(off) == C * (C - 1) and bool((off > 0).all())
    assert float((off - p_cell).abs().max()) < binomial_tol(p_cell, n_c)  # 0.0105 per cell


def test_transition_matrices():
    t_u = transition_matrix("uniform", 0.3, 4)
    t_p = transition_matrix("pair", 0.3, 4)
    for t in (t_u, t_p):
        torch.testing.assert_close(t.sum(1), torch.ones(4, dtype=torch.float64))
        torch.testing.assert_close(t.diagonal(), torch.full((4,), 0.7, dtype=torch.float64))
    assert t_u[0, 1] == pytest.approx(0.1) and t_u[2, 0] == pytest.approx(0.1)
    assert t_p[0, 1] == pytest.approx(0.3) and t_p[3, 0] == pytest.approx(0.3)
    assert t_p[0, 2] == 0 and t_p[1, 0] == 0


def test_reproducible_by_seed_and_input_untouched(labels):
    before = labels.clone()
    a, rec_a = corrupt_labels(labels, C, "uniform", 0.3, seed=7)
    b, rec_b = corrupt_labels(labels, C, "uniform", 0.3, seed=7)
    c, _ = corrupt_labels(labels, C, "uniform", 0.3, seed=8)
    assert torch.equal(a, b) and torch.equal(rec_a.flipped, rec_b.flipped)
    assert torch.equal(rec_a.counts, rec_b.counts)
    assert not torch.equal(a, c)
    assert torch.equal(labels, before)


def test_rate_zero_is_identity(labels):
    noisy, rec = corrupt_labels(labels, C, "pair", 0.0, seed=0)
    assert torch.equal(noisy, labels) and len(rec.flipped) == 0 and rec.flipped_fraction == 0


def test_record_serialises_for_mlflow(labels):
    noisy, rec = corrupt_labels(labels[:1000], C, "pair", 0.25, seed=4)
    d = json.loads(json.dumps(rec.to_dict()))
    assert d["noise_type"] == "pair" and d["rate"] == 0.25 and d["seed"] == 4
    assert len(d["flipped_indices"]) == int((noisy != labels[:1000]).sum())
    assert rec.params()["label_noise.flipped"] == len(d["flipped_indices"])
    assert sum(map(sum, d["counts"])) == 1000


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"noise_type": "asymmetric"}, "unknown label noise type 'asymmetric'; accepted: uniform"),
        ({"rate": 1.0}, r"rate must be a number in \[0, 1\) \(got 1.0\)"),
        ({"rate": -0.1}, r"rate must be a number in \[0, 1\) \(got -0.1\)"),
        ({"rate": "0.2"}, r"rate must be a number in \[0, 1\) \(got '0.2'\)"),
        ({"num_classes": 1}, "at least 2 classes"),
        (
            {"labels": torch.tensor([0, 3, 10])},
            r"labels must lie in \[0, 10\) \(got min 0, max 10\)",
        ),
        ({"labels": torch.tensor([0.0, 1.0])}, "labels must be a 1-D integer tensor"),
    ],
)
def test_bad_input_is_one_line_config_error(kwargs, message):
    args = {
        "labels": torch.tensor([0, 1, 2]),
        "num_classes": C,
        "noise_type": "uniform",
        "rate": 0.2,
        "seed": 0,
    } | kwargs
    with pytest.raises(ConfigError, match=message) as err:
        corrupt_labels(**args)
    assert "\n" not in str(err.value)
