import math

import pytest
import torch

from raymeta.errors import ConfigError, NonFiniteLossError
from raymeta.schedules import HandSchedule, MLRSNet, MLRSNetBundle, MLRSNetSchedule, gamma_scale


def lrs(family, lr=0.1, total=100, spe=10, **params):
    s = HandSchedule(family, lr, total, spe, **params)
    return [s.lr(step, step // spe, 1.0) for step in range(total)]


def test_multistep_decays_at_milestone_fractions():
    out = lrs("multistep", 0.2, milestones=[0.5, 0.75], decay=0.1)
    assert out[49] == pytest.approx(0.2) and out[50] == pytest.approx(0.02)
    assert out[74] == pytest.approx(0.02) and out[75] == pytest.approx(0.002)


def test_cosine_exponential_sgdr_warmup_values():
    assert lrs("cosine")[50] == pytest.approx(0.05)
    assert lrs("exponential", decay=0.5)[10] == pytest.approx(0.05)
    assert lrs("exponential", decay=0.5)[5] == pytest.approx(0.1 * 0.5**0.5)
    sgdr = lrs("sgdr", first_cycle_epochs=1, cycle_mult=2)
    assert sgdr[5] == pytest.approx(0.05) and sgdr[10] == pytest.approx(0.1)
    assert sgdr[20] == pytest.approx(0.05)  # middle of the second, twice longer cycle
    warm = lrs("warmup_cosine", warmup_fraction=0.1)
    assert warm[0] == pytest.approx(0.01) and warm[10] == pytest.approx(0.1)
    assert warm[55] == pytest.approx(0.05)
    assert lrs("fixed", 0.3) == pytest.approx([0.3] * 100)


def test_onecycle_peaks_at_warmup_fraction():
    out = lrs("onecycle", 0.1, warmup_fraction=0.3)
    assert out[0] == pytest.approx(0.1 / 25)
    assert max(out) == pytest.approx(0.1, rel=1e-3) and 28 <= out.index(max(out)) <= 30
    assert out[-1] < 1e-3


def test_hand_schedule_errors():
    with pytest.raises(ConfigError, match="unknown schedule family 'step'; accepted: fixed"):
        HandSchedule("step", 0.1, 10, 1)
    with pytest.raises(ConfigError, match="lr must be > 0"):
        HandSchedule("fixed", 0.0, 10, 1)
    with pytest.raises(ConfigError, match="schedule cosine"):
        HandSchedule("cosine", 0.1, 10, 1, bogus=1)


def test_gamma_rule_matches_formula_and_abs_below_one_over_c():
    l0, c = math.log(10), 10
    expected = math.sqrt(l0) * math.log(l0 * c) / (4 * c**0.25)
    assert gamma_scale(l0, c) == pytest.approx(expected) and expected == pytest.approx(
        0.6691, abs=1e-4
    )
    # L0 < 1/C (a pre-trained model): ln(L0*C) < 0; raymeta uses |ln(L0*C)|
    assert gamma_scale(0.01, 10) == pytest.approx(0.1 * math.log(10) / (4 * 10**0.25))
    assert gamma_scale(0.01, 10) > 0
    with pytest.raises(ValueError, match="L0\\*C == 1"):
        gamma_scale(0.1, 10)
    for bad in (float("nan"), float("inf"), 0.0, -1.0):
        with pytest.raises(ValueError, match="finite positive"):
            gamma_scale(bad, 10)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_loss_is_a_clear_error(bad):
    with pytest.raises(NonFiniteLossError, match=f"training loss is {bad} at step 7 \\(epoch 1\\)"):
        HandSchedule("fixed", 0.1, 10, 10).lr(7, 0, bad)
    torch.manual_seed(0)
    bundle = MLRSNetBundle([MLRSNet().state_dict()], [1])
    sched = MLRSNetSchedule(bundle, 10, epochs=1)
    sched.start_epoch(0, lambda: 2.3)
    with pytest.raises(NonFiniteLossError):
        sched.lr(7, 0, bad)


def test_three_checkpoint_protocol_swaps_and_recomputes_gamma():
    torch.manual_seed(0)
    cells = [MLRSNet().state_dict() for _ in range(3)]
    bundle = MLRSNetBundle(cells, [1, 2, 3])
    sched = MLRSNetSchedule(bundle, 10, epochs=6)
    losses = [2.0, 1.9, 1.0, 0.9, 0.5, 0.4]
    calls = []
    first_lrs = []
    for epoch, l0 in enumerate(losses):
        sched.start_epoch(epoch, lambda l0=l0: calls.append(l0) or l0)
        first_lrs.append(sched.lr(epoch * 10, epoch, 0.7))
    assert calls == [2.0, 1.0, 0.5]  # gamma recomputed only at 0, 1/3 and 2/3 of the run
    assert sched.gammas == pytest.approx([gamma_scale(v, 10) for v in calls])
    for phase, epoch in enumerate((0, 2, 4)):  # the swapped-in cell starts from zero state
        cell = bundle.cells[phase]
        unit, _ = cell(torch.tensor(0.7), cell.initial_state())
        assert first_lrs[epoch] == pytest.approx(gamma_scale(losses[epoch], 10) * float(unit))


def test_learned_schedule_validation():
    bundle = MLRSNetBundle([MLRSNet().state_dict()], [1])
    with pytest.raises(ConfigError, match="checkpoints \\[3\\] invalid"):
        MLRSNetSchedule(bundle, 10, epochs=3, checkpoints=[3])
    with pytest.raises(ConfigError, match="gamma must be > 0"):
        MLRSNetSchedule(bundle, 10, epochs=3, fixed_gamma=-1.0)
