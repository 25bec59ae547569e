import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from raymeta.config import TaskConfig
from raymeta.errors import DeadRunError, NonFiniteLossError
from raymeta.meta.lookahead import functional_loss, lookahead_loss, sgd_direction
from raymeta.meta.mlrsnet import MLRSNetMetaTrainer
from raymeta.models import build_model
from raymeta.schedules import HandSchedule, MLRSNet
from raymeta.train.loop import Workers, build_task_model, load_task_data, mean_train_loss, train


def setup_problem(model_name="mlp", momentum=0.9):
    torch.manual_seed(0)
    model = build_model(model_name, 1, 10, 8).double()
    x, y = torch.randn(32, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (32,))
    mx, my = torch.randn(16, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (16,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum, weight_decay=5e-4)
    for _ in range(2):  # fill the momentum buffers
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    opt.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    cell = MLRSNet().double()
    return model, opt, cell, loss.item(), (x, y), (mx, my)


def meta_loss_of(cell, model, opt, loss, meta, gamma=0.5):
    unit, _ = cell(torch.tensor(loss, dtype=torch.float64), cell.initial_state())
    params = {n: p.detach() for n, p in model.named_parameters()}
    return lookahead_loss(model, params, sgd_direction(model, opt), gamma * unit, *meta)


def assert_directional_derivative(cell, grads, f, eps=1e-6) -> None:
    """The analytic gradient ``grads`` of the scalar ``f()`` w.r.t. ``cell``'s parameters, along
    a seeded random direction, equals the central finite difference of ``f`` (rel 1e-5)."""
    torch.manual_seed(1)
    direction = [torch.randn_like(p) for p in cell.parameters()]
    analytic = float(sum((g * v).sum() for g, v in zip(grads, direction, strict=True)))

    def shifted(sign):
        with torch.no_grad():
            for p, v in zip(cell.parameters(), direction, strict=True):
                p += sign * eps * v
        value = f()
        with torch.no_grad():
            for p, v in zip(cell.parameters(), direction, strict=True):
                p -= sign * eps * v
        return value

    numeric = (shifted(1) - shifted(-1)) / (2 * eps)
    assert abs(analytic) > 1e-6
    assert analytic == pytest.approx(numeric, rel=1e-5)


def test_meta_gradient_matches_finite_differences():
    model, opt, cell, loss, _, meta = setup_problem()
    grads = torch.autograd.grad(meta_loss_of(cell, model, opt, loss, meta), list(cell.parameters()))
    torch.manual_seed(1)
    direction = [torch.randn_like(p) for p in cell.parameters()]
    analytic = sum((g * v).sum() for g, v in zip(grads, direction, strict=True))
    eps = 1e-6

    def shifted(sign):
        c = copy.deepcopy(cell)
        with torch.no_grad():
            for p, v in zip(c.parameters(), direction, strict=True):
                p += sign * eps * v
        return meta_loss_of(c, model, opt, loss, meta).item()

    numeric = (shifted(1) - shifted(-1)) / (2 * eps)
    assert abs(float(analytic)) > 1e-6
    assert float(analytic) == pytest.approx(numeric, rel=1e-5)


def test_first_order_meta_gradient_equals_full_second_order_graph():
    """lr only scales a gradient that does not depend on the meta-learner: the create_graph
    computation of the reference gives the same hypergradient."""
    model, opt, cell, loss, (x, y), meta = setup_problem(momentum=0.0)
    ours = torch.autograd.grad(meta_loss_of(cell, model, opt, loss, meta), list(cell.parameters()))
    params = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    train_loss = F.cross_entropy(functional_call(model, {**buffers, **params}, (x,)), y)
    g = torch.autograd.grad(train_loss, list(params.values()), create_graph=True)
    unit, _ = cell(torch.tensor(loss, dtype=torch.float64), cell.initial_state())
    new = {
        n: p - 0.5 * unit * (gi + 5e-4 * p) for (n, p), gi in zip(params.items(), g, strict=True)
    }
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    full_loss = F.cross_entropy(functional_call(model, {**buffers, **new}, (meta[0],)), meta[1])
    full = torch.autograd.grad(full_loss, list(cell.parameters()))
    for a, b in zip(ours, full, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10)


def test_virtual_passes_leave_batchnorm_buffers_untouched():
    model, opt, cell, loss, _, meta = setup_problem("resnet8")
    before = {n: b.clone() for n, b in model.named_buffers()}
    meta_loss_of(cell, model, opt, loss, meta).backward()
    task = TaskConfig(dataset="digits", model="resnet8", val_size=0, meta_per_class=0)
    data = load_task_data(task)
    mean_train_loss(model.float(), data, Workers())
    for name, b in model.named_buffers():
        assert torch.equal(b, before[name].to(b.dtype)), name


def test_same_seed_same_metrics_and_meta_learner():
    task = TaskConfig(
        dataset="digits",
        model="small_cnn",
        batch_size=32,
        epochs=2,
        val_size=200,
        meta_per_class=10,
    )
    data = load_task_data(task)

    def run():
        torch.manual_seed(123)
        meta = MLRSNetMetaTrainer(MLRSNet(), data.num_classes, meta_every=3, meta_batch_size=20)
        state = train(task, data, build_task_model(task, data, "cpu"), meta)
        return state, meta

    (s1, m1), (s2, m2) = run(), run()
    assert s1.history[-1]["test_acc"] > 0.5
    for a, b in zip(s1.history, s2.history, strict=True):
        assert {k: v for k, v in a.items() if not k.endswith("_time_s")} == {
            k: v for k, v in b.items() if not k.endswith("_time_s")
        }
    assert s1.lrs == s2.lrs and m1.meta_steps == (2 * len(s1.lrs) // 2) // 3
    for p, q in zip(m1.cell.parameters(), m2.cell.parameters(), strict=True):
        assert torch.equal(p, q)


def test_diverging_run_stops_with_one_line_error():
    """A huge LR: with the guard off the loss becomes non-finite; with it on (the default) the
    loss's growth past 3 x L0 stops the run first. One line either way."""
    task = TaskConfig(
        dataset="digits", model="mlp", batch_size=64, epochs=2, val_size=0, meta_per_class=0
    )
    data = load_task_data(task)
    off = task.model_copy(update={"guard": task.guard.model_copy(update={"enabled": False})})
    for cfg, error in ((off, NonFiniteLossError), (task, DeadRunError)):
        model = build_task_model(cfg, data, "cpu")
        with pytest.raises(error, match="training diverged") as err:
            train(cfg, data, model, HandSchedule("fixed", 1e12, 40, 20))
        assert "\n" not in str(err.value)
    assert "LR 1e+12" in str(err.value)  # the guard names the LR in use


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_direction_is_the_step_torch_takes(nesterov):
    """The virtual step at LR lr equals the real torch.optim.SGD step at momentum 0.9."""
    model, opt, *_ = setup_problem()
    opt = torch.optim.SGD(
        model.parameters(), lr=0.05, momentum=0.9, nesterov=nesterov, weight_decay=5e-4
    )
    x, y = torch.randn(32, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (32,))
    for _ in range(3):  # the last iteration compares with momentum buffers filled
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        d = sgd_direction(model, opt)
        opt.step()
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), before[n] - 0.05 * d[n])


@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_scaled_meta_gradient_matches_finite_differences(nesterov):
    """The trainer's look-ahead at momentum 0.9 (LR scaled by 1 - beta) has the exact
    hypergradient: central finite differences of its own meta loss."""
    model, _, cell, _, (x, y), meta = setup_problem()
    opt = torch.optim.SGD(
        model.parameters(), lr=0.1, momentum=0.9, nesterov=nesterov, weight_decay=5e-4
    )
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    opt.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    trainer = MLRSNetMetaTrainer(cell, 10, momentum=0.9)
    trainer.gamma = 0.5
    assert trainer.lr_scale == pytest.approx(0.1)

    params = dict(model.named_parameters())
    d = sgd_direction(model, opt)

    def meta_loss_and_grads():
        lr = trainer.virtual_lr(loss.item())
        return trainer.lookahead_meta_grads(model, params, d, lr, *meta)

    def meta_loss():
        return meta_loss_and_grads()[0]

    grads = meta_loss_and_grads()[1]
    assert_directional_derivative(cell, grads, lambda: meta_loss().item())


def test_learned_lr_is_scaled_by_one_minus_momentum():
    """MLR-SNet's output is the effective step: at momentum beta the applied LR is (1 - beta)
    times the output, in meta-training and at meta-test, for the same cell and loss."""
    torch.manual_seed(0)
    cell = MLRSNet()
    lrs = {}
    for beta in (0.0, 0.9):
        trainer = MLRSNetMetaTrainer(copy.deepcopy(cell), 10, momentum=beta)
        trainer.start_epoch(0, lambda: 2.3)
        lrs[beta] = trainer.lr(0, 0, 2.3)
    assert lrs[0.9] == pytest.approx(0.1 * lrs[0.0], rel=1e-6)
    with pytest.raises(ValueError, match="momentum must be in"):
        MLRSNetMetaTrainer(cell, 10, momentum=1.0)


def _checkpoint_bytes(state: dict) -> int:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getbuffer().nbytes


def test_meta_trainer_checkpoint_does_not_grow_with_meta_steps():
    model, opt, cell, loss, _, meta = setup_problem()
    trainer = MLRSNetMetaTrainer(cell, 10, meta_every=1)
    trainer.gamma = 0.5
    sizes = []
    for n in range(1, 13):
        value = trainer.meta_step(model, opt, loss, *meta)
        if n in (2, 12):
            sizes.append(_checkpoint_bytes(trainer.state_dict()))
    assert sizes[0] == sizes[1]
    assert trainer.meta_steps == 12 and trainer.last_meta_loss == value
    restored = MLRSNetMetaTrainer(MLRSNet().double(), 10)
    restored.load_state_dict(trainer.state_dict())
    assert (restored.meta_steps, restored.last_meta_loss, restored.gamma) == (12, value, 0.5)
    for p, q in zip(restored.cell.parameters(), cell.parameters(), strict=True):
        assert torch.equal(p, q)


def run_delayed_window(k=4, meta_every=5, steps=4, momentum=0.9):
    """``steps`` real SGD steps of the double-precision MLP under a delayed-objective trainer
    (meta steps every ``meta_every``, window ``k``); returns, for the last ``k`` steps, what an
    independent check needs: the weights before them, the LSTM state before the first, the
    losses and the directions."""
    model, _, cell, _, _, meta = setup_problem(momentum=momentum)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum, weight_decay=5e-4)
    trainer = MLRSNetMetaTrainer(
        cell, 10, meta_every=meta_every, momentum=momentum, meta_objective="delayed", horizon=k
    )
    trainer.gamma = 0.5
    torch.manual_seed(2)
    weights, states, losses, directions = [], [], [], []
    for step in range(steps):
        x, y = torch.randn(32, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (32,))
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        if trainer.is_meta_step(step):
            trainer.meta_step(model, opt, loss.item(), *meta)
        weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
        states.append(trainer.state)
        lr = trainer.lr(step, 0, loss.item())
        directions.append({n: v.clone() for n, v in sgd_direction(model, opt).items()})
        trainer.observe_step(model, opt, step)
        opt.param_groups[0]["lr"] = lr
        opt.step()
        losses.append(loss.item())
    window = (weights[-k], states[-k], losses[-k:], directions[-k:])
    return model, trainer, window, meta


def test_delayed_window_reproduces_the_real_weights():
    """The window's stored LRs and directions give back the real weights after its k steps."""
    model, trainer, (w0, _, _, directions), _ = run_delayed_window()
    lrs = trainer.window_lrs().detach()
    assert lrs.shape == (4,) and trainer.in_window(3) and not trainer.in_window(4)
    for n, p in model.named_parameters():
        rebuilt = w0[n] - sum(lr * d[n] for lr, d in zip(lrs, directions, strict=True))
        torch.testing.assert_close(p.detach(), rebuilt, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("k", "meta_every", "steps"), [(4, 5, 4), (6, 2, 9)])
def test_delayed_meta_gradient_matches_finite_differences_of_its_surrogate(k, meta_every, steps):
    """The delayed objective's gradient is exact for L_meta(w0 - sum_j lr_j(theta) d_j) with
    the d_j fixed: central finite differences, the LRs recomputed by running the cell over the
    window's losses from the LSTM state before it (independently of the trainer). Also when the
    window spans earlier meta steps (k > meta_every: the cell changed inside it)."""
    model, trainer, (w0, state0, losses, directions), meta = run_delayed_window(
        k, meta_every, steps
    )
    assert trainer.meta_steps == steps // meta_every
    cell = trainer.cell
    _, grads = trainer.delayed_meta_grads(model, *meta)

    def surrogate():
        state, w = state0, dict(w0)
        for loss, d in zip(losses, directions, strict=True):
            unit, state = cell(torch.tensor(loss, dtype=torch.float64), state)
            w = {n: w[n] - 0.1 * 0.5 * unit * d[n] for n in w}
        return functional_loss(model, w, *meta).item()

    assert_directional_derivative(cell, grads, surrogate)


def test_delayed_window_is_the_horizon_before_each_meta_step():
    trainer = MLRSNetMetaTrainer(MLRSNet(), 10, meta_every=5, meta_objective="delayed", horizon=2)
    assert [s for s in range(12) if trainer.in_window(s)] == [2, 3, 7, 8]
    full = MLRSNetMetaTrainer(MLRSNet(), 10, meta_every=5, meta_objective="delayed")
    assert full.horizon == 5 and all(full.in_window(s) for s in range(12))
    long = MLRSNetMetaTrainer(MLRSNet(), 10, meta_every=2, meta_objective="delayed", horizon=7)
    assert all(long.in_window(s) for s in range(12))
    one_step = MLRSNetMetaTrainer(MLRSNet(), 10, meta_every=5)
    assert not any(one_step.in_window(s) for s in range(12))


@pytest.mark.parametrize(
    ("outer", "message"),
    [
        ({"meta_objective": "delayed", "horizon": 0}, "horizon: Input should be greater than 0"),
        ({"horizon": 3}, "horizon=3 applies to meta_objective delayed"),
        ({"meta_objective": "unrolled"}, "meta_objective: Input should be 'lookahead' or"),
    ],
)
def test_meta_objective_config_is_refused_on_one_line(outer, message):
    from raymeta.config import OuterLoopConfig, parse
    from raymeta.errors import ConfigError

    with pytest.raises(ConfigError, match=message) as err:
        parse(OuterLoopConfig, outer, "p.yaml")
    assert "\n" not in str(err.value)


def test_delayed_objective_resumes_mid_window_exactly():
    """A delayed-objective run checkpointed at an epoch end that falls inside a window (saved
    through torch.save / weights_only load, as the Ray Train checkpoints) continues exactly as
    the unbroken run."""
    from raymeta.config import OuterLoopConfig
    from raymeta.spec import meta_train_run
    from raymeta.train.build import build_run
    from raymeta.train.loop import RunState

    task = TaskConfig(
        dataset="digits", model="mlp", batch_size=64, epochs=2, val_size=200, meta_per_class=10
    )
    outer = OuterLoopConfig(meta_every=5, meta_objective="delayed", horizon=3, meta_batch_size=20)
    spec = meta_train_run(outer, task, "delayed")
    whole = build_run(spec)
    saved = {}

    def keep(metrics, state, optimizer):
        if metrics["epoch"] == 1:
            payload = {
                "model": whole.model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "schedule": whole.schedule.state_dict(),
                "run": {k: getattr(state, k) for k in ("epoch", "step", "initial_loss")},
            }
            buf = io.BytesIO()
            torch.save(payload, buf)
            buf.seek(0)
            saved.update(torch.load(buf, weights_only=True))

    end = whole.train(on_epoch_end=keep)
    spe = whole.steps_per_epoch
    assert whole.schedule.in_window(spe - 1) and whole.schedule.in_window(spe)  # mid-window
    assert len(saved["schedule"]["window"]) == 3
    resumed = build_run(spec)
    resumed.model.load_state_dict(saved["model"])
    resumed.schedule.load_state_dict(saved["schedule"])
    state = resumed.train(state=RunState(**saved["run"]), optimizer_state=saved["optimizer"])
    assert state.lrs == end.lrs[spe:]
    cells = [r.schedule.cell.parameters() for r in (whole, resumed, build_run(spec))]
    moved = False
    for p, q, initial in zip(*cells, strict=True):
        assert torch.equal(p, q)
        moved |= not torch.equal(p, initial)
    assert moved  # the delayed objective's meta steps really changed the meta-learner
