"""MFM: identity feature modulation, exact meta-gradients, data-parallel equivalence and a
short real run on Fashion-MNIST-LT."""

from __future__ import annotations

import io
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from raymeta.data import load_dataset
from raymeta.data.batches import epoch_batches
from raymeta.data.longtail import longtail_metrics, make_longtail_split
from raymeta.errors import ConfigError
from raymeta.meta.losses import LogitAdjustedLoss, log_prior
from raymeta.meta.mfm import MFMTrainer
from raymeta.models import build_model
from raymeta.models.modulation import (
    DirectModulation,
    ModulatorNet,
    build_modulation,
    default_sites,
)
from raymeta.models.small import SmallCNN


@pytest.mark.parametrize("arch", ["small_cnn", "resnet8"])
@pytest.mark.parametrize("kind", ["direct", "network"])
def test_identity_modulation_reproduces_the_unmodulated_network(arch, kind):
    torch.manual_seed(0)
    model = build_model(arch, 1, 10, 28)
    x = torch.randn(6, 1, 28, 28)
    reference = {n: p.clone() for n, p in model.state_dict().items()}
    with torch.no_grad():
        plain_train = model(x)
        model.eval()
        plain_eval = model(x)
        model.train()
    model.load_state_dict(reference)  # undo the running-statistics update
    n_params = len(list(model.parameters()))
    mod = build_modulation(kind, model, (1, 28, 28))
    assert len(list(model.parameters())) == n_params  # kept out of the classifier
    assert set(model.state_dict()) == set(reference)
    with torch.no_grad():
        assert torch.equal(model(x), plain_train)
        model.eval()
        assert torch.equal(model(x), plain_eval)
    assert mod.sites == default_sites(model)


def test_modulation_is_active_at_test_time_and_switchable():
    torch.manual_seed(0)
    model = SmallCNN(1, 10, 28).eval()
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        plain = model(x)
    mod = build_modulation("direct", model, (1, 28, 28))
    assert isinstance(mod, DirectModulation) and mod.channels == [16, 32]
    with torch.no_grad():
        mod.scale[1].mul_(2.0)
        mod.shift[0].add_(0.1)
        modulated = model(x)
        assert not torch.allclose(modulated, plain)
        with mod.disabled():
            assert torch.equal(model(x), plain)
        mod.remove()
        assert torch.equal(model(x), plain)


def test_modulator_net_maps_channel_statistics():
    mod = ModulatorNet(hidden=4)
    f = torch.randn(3, 5, 4, 4)
    stats = mod.statistics(f)
    assert stats.shape == (3, 5, 2)
    assert torch.allclose(stats[..., 0], f.mean((2, 3)))
    assert torch.allclose(stats[..., 1], (f.var((2, 3), unbiased=False) + mod.eps).sqrt())
    with torch.no_grad():
        mod.mlp[2].bias.copy_(torch.tensor([1.0, 0.5]))  # scale 2, shift 0.5
    assert torch.allclose(mod(f, 0), 2 * f + 0.5)
    assert mod(torch.randn(3, 5), 1).shape == (3, 5)  # features without spatial dimensions


def test_gradient_reaches_the_modulation_through_functional_call():
    torch.manual_seed(0)
    model = SmallCNN(1, 3, 8, width=4)
    mod = build_modulation("network", model, (1, 8, 8))
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    loss = F.cross_entropy(
        functional_call(model, params, (torch.randn(4, 1, 8, 8),)), torch.zeros(4).long()
    )
    grads = torch.autograd.grad(loss, list(mod.parameters()), allow_unused=True)
    assert grads[-1] is not None and grads[-1].abs().sum() > 0  # last (zero-init) layer's bias


def test_bad_sites_raise_config_errors():
    model = SmallCNN(1, 10, 28)
    with pytest.raises(ConfigError, match="'features.9'"):
        build_modulation("network", model, (1, 28, 28), sites=["features.9"])
    with pytest.raises(ConfigError, match="'film'"):
        build_modulation("film", model, (1, 28, 28))
    with pytest.raises(ConfigError, match="pass sites"):
        default_sites(build_model("mlp", 1, 10, 28))


def _tiny(kind, seed=1, sites=None):
    """A double-precision SmallCNN with a modulation of ``kind`` (``network_prior``: the network
    with class statistics, estimated from a few tracked batches) away from the identity."""
    torch.manual_seed(seed)
    model = SmallCNN(1, 3, 8, width=4).double()
    prior = kind == "network_prior"
    extra = {"class_statistics": True, "statistics_momentum": 0.5} if prior else {}
    mod = build_modulation("network" if prior else kind, model, (1, 8, 8), sites=sites, **extra)
    if prior:
        mod.set_class_counts([5, 3, 2])
        with torch.no_grad(), mod.tracking(torch.tensor([0, 0, 1, 2])):
            model(torch.randn(4, 1, 8, 8, dtype=torch.float64))
    with torch.no_grad():  # move away from the identity so every path has a gradient
        for p in mod.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model, mod


LOG_PRIOR = log_prior([5, 3, 2]).double()  # the module's float32 values


def _la(logits, y):
    """The logit-adjusted loss at tau 1 for class counts 5 / 3 / 2, written out."""
    return F.cross_entropy(logits + LOG_PRIOR, y)


def _meta_loss_by_plain_autograd(
    model, opt, x, y, mx, my, lr, mu, wd, loss=F.cross_entropy, meta_loss=F.cross_entropy
):
    """meta_loss(w - lr * (mu * buf + grad loss + wd * w)) computed without the code under
    test."""
    params = list(model.parameters())
    grads = torch.autograd.grad(loss(model(x), y), params)
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, g in zip(params, grads, strict=True):
            buf = opt.state[p]["momentum_buffer"] if mu else 0.0
            p.sub_(lr * (mu * buf + g + wd * p))
        out = float(meta_loss(model(mx), my))
        for p, s in zip(params, saved, strict=True):
            p.copy_(s)
    return out


@pytest.mark.parametrize(
    ("kind", "sites", "composed"),
    [
        ("direct", None, False),
        ("network", None, False),
        ("network_prior", None, False),
        ("direct", "stages+embedding", True),
        ("network_prior", "embedding", True),
    ],
)
def test_meta_gradient_matches_finite_differences(kind, sites, composed):
    """The exact look-ahead's meta-gradient is the gradient of the meta objective after one
    SGD step of the base loss; ``composed``: the logit-adjusted loss as both the base loss and
    the meta objective (MFM + LA)."""
    model, mod = _tiny(kind, sites=sites)
    mu, wd, lr = 0.9, 1e-3, 0.5
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=mu, weight_decay=wd)
    torch.manual_seed(2)
    x, y = torch.randn(6, 1, 8, 8, dtype=torch.float64), torch.randint(0, 3, (6,))
    mx, my = torch.randn(5, 1, 8, 8, dtype=torch.float64), torch.randint(0, 3, (5,))
    with mod.no_meta_grad():  # one real step, so the virtual step includes a momentum buffer
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    losses = {"loss": _la, "meta_loss": _la} if composed else {}
    trainer_losses = {k: LogitAdjustedLoss([5, 3, 2]).double() for k in losses}
    trainer = MFMTrainer(mod, **trainer_losses)
    meta_loss, grads = trainer.meta_gradient(model, opt, x, y, mx, my, lr)

    def objective():
        return _meta_loss_by_plain_autograd(model, opt, x, y, mx, my, lr, mu, wd, **losses)

    assert float(meta_loss) == pytest.approx(objective(), rel=1e-12)
    eps, checked = 1e-6, 0
    for p, g in zip(mod.parameters(), grads, strict=True):
        for j in range(0, p.numel(), max(1, p.numel() // 4)):
            with torch.no_grad():
                p.view(-1)[j] += eps
            up = objective()
            with torch.no_grad():
                p.view(-1)[j] -= 2 * eps
            down = objective()
            with torch.no_grad():
                p.view(-1)[j] += eps
            assert float(g.view(-1)[j]) == pytest.approx(
                (up - down) / (2 * eps), rel=1e-5, abs=1e-9
            )
            checked += abs(float(g.view(-1)[j])) > 1e-8
    assert checked >= 3  # not vacuous


def test_meta_step_leaves_batchnorm_statistics_and_classifier_untouched():
    torch.manual_seed(0)
    model = build_model("resnet8", 1, 3, 8)
    mod = build_modulation("network", model, (1, 8, 8))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = MFMTrainer(mod, meta_lr=1e-2)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))
    trainer.meta_step(model, opt, x, y, x[:4], y[:4], lr=0.1)
    for n, t in model.state_dict().items():
        assert torch.equal(t, before[n]), n
    assert mod.mlp[2].weight.abs().sum() > 0  # the modulator moved
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.parameters())


class _ThreadMean:
    """An all-reduce mean across threads (a stand-in for torch.distributed in one process)."""

    def __init__(self, n):
        self.n, self.slots = n, [None] * n
        self.barrier = threading.Barrier(n, timeout=60)

    def for_rank(self, r):
        def average(t):
            self.slots[r] = t.detach().clone()
            self.barrier.wait()
            out = torch.stack(self.slots).mean(0)
            self.barrier.wait()
            return out

        return average


@pytest.mark.parametrize("kind", ["direct", "network"])
def test_two_workers_give_the_meta_gradient_of_the_global_batch(kind):
    torch.manual_seed(3)
    x, y = torch.randn(8, 1, 8, 8, dtype=torch.float64), torch.randint(0, 3, (8,))
    mx, my = torch.randn(6, 1, 8, 8, dtype=torch.float64), torch.randint(0, 3, (6,))

    def make(average):
        model, mod = _tiny(kind)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=1e-3)
        return model, opt, MFMTrainer(mod, average=average)

    model, opt, trainer = make(lambda t: t)
    ref_loss, ref = trainer.meta_gradient(model, opt, x, y, mx, my, 0.3)
    fake, results = _ThreadMean(2), [None, None]

    replicas = [make(fake.for_rank(r)) for r in range(2)]  # built here: the RNG is global

    def worker(r):
        m, o, t = replicas[r]
        h, mh = slice(4 * r, 4 * r + 4), slice(3 * r, 3 * r + 3)
        results[r] = t.meta_gradient(m, o, x[h], y[h], mx[mh], my[mh], 0.3)

    threads = [threading.Thread(target=worker, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert torch.allclose((results[0][0] + results[1][0]) / 2, ref_loss)
    for k, g in enumerate(ref):
        mean = (results[0][1][k] + results[1][1][k]) / 2
        assert torch.allclose(mean, g, rtol=1e-9, atol=1e-12), k


def test_frozen_mode_and_missing_meta_batch():
    torch.manual_seed(0)
    model = SmallCNN(1, 3, 8, width=4)
    mod = build_modulation("network", model, (1, 8, 8))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))
    with pytest.raises(ConfigError, match="meta batch"):
        MFMTrainer(mod).train_step(model, opt, x, y, lr=0.1, step=0)
    before = {n: t.clone() for n, t in mod.state_dict().items()}
    frozen = MFMTrainer(mod, frozen=True)
    assert not frozen.needs_meta and not frozen.is_meta_step(0)
    out = frozen.train_step(model, opt, x, y, lr=0.1, step=0)
    assert out.meta_loss is None and torch.isfinite(out.loss)
    assert all(torch.equal(t, before[n]) for n, t in mod.state_dict().items())
    assert MFMTrainer(mod, meta_every=3).is_meta_step(2)
    with pytest.raises(ConfigError, match="meta_every=0"):
        MFMTrainer(mod, meta_every=0)


def test_short_mfm_run_on_fashion_mnist_lt():
    ds = load_dataset("fashion_mnist")
    split = make_longtail_split(
        ds.train_y, 10, imbalance_factor=10, n_max=300, class_order="permuted", seed=0
    )
    tx, ty = ds.train_x[split.train], ds.train_y[split.train]
    mx, my = ds.train_x[split.meta], ds.train_y[split.meta]
    torch.manual_seed(0)
    model = SmallCNN(1, 10, 28)
    mod = build_modulation("network", model, (1, 28, 28))
    before = [p.clone() for p in mod.parameters()]
    lr = 0.05
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    trainer = MFMTrainer(mod, meta_lr=1e-3, meta_every=2)
    losses, step, gen = [], 0, torch.Generator().manual_seed(0)
    for epoch in range(3):
        for idx in epoch_batches(len(ty), 64, seed=0, epoch=epoch):
            if step == 36:
                break
            midx = torch.randperm(len(my), generator=gen)[:50]
            out = trainer.train_step(
                model, opt, tx[idx], ty[idx], lr=lr, step=step, meta_x=mx[midx], meta_y=my[midx]
            )
            losses.append(float(out.loss))
            step += 1
    assert trainer.meta_steps == 18
    assert np.mean(losses[-6:]) < np.mean(losses[:6])
    assert any(not torch.equal(a, b) for a, b in zip(before, mod.parameters(), strict=True))
    test_idx = torch.arange(0, 10_000, 5)
    model.eval()
    with torch.no_grad():
        preds = model(ds.test_x[test_idx]).argmax(1)
    metrics = longtail_metrics(preds, ds.test_y[test_idx], split.counts)
    assert metrics.top1 > 0.3, metrics


def test_checkpoint_does_not_grow_with_meta_steps():
    torch.manual_seed(0)
    model = SmallCNN(1, 3, 8, width=4)
    mod = build_modulation("network", model, (1, 8, 8))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))
    trainer = MFMTrainer(mod)
    sizes = []
    for step in range(12):
        out = trainer.train_step(model, opt, x, y, lr=0.1, step=step, meta_x=x, meta_y=y)
        if step in (1, 11):
            buf = io.BytesIO()
            torch.save(trainer.state_dict(), buf)
            sizes.append(buf.getbuffer().nbytes)
    assert sizes[0] == sizes[1]
    assert trainer.meta_steps == 12 and trainer.last_meta_loss == out.meta_loss
    state = trainer.state_dict()
    assert (state["meta_steps"], state["last_meta_loss"]) == (12, out.meta_loss)


def test_class_statistics_measure_how_a_channel_follows_class_frequency():
    """Channel 0 fires only for the head class, channel 1 only for the tail class: a = +1, -1
    (counts 8 / 2: rho = +1 / -1, class weights 1 / (K pi) = 0.625 / 2.5)."""
    mod = ModulatorNet(hidden=4, class_statistics=True, statistics_momentum=1.0)
    mod.set_class_counts([8, 2])
    f = torch.zeros(4, 2, 3, 3)
    f[:3, 0] = 1.0  # three head images
    f[3, 1] = 1.0  # one tail image
    labels = torch.tensor([0, 0, 0, 1])
    assert torch.equal(mod(f, 0), f)  # identity at initialisation, whatever the statistic
    assert mod.class_alignment(f.mean((2, 3)), 0).tolist() == [0.0, 0.0]  # nothing tracked
    seen = []
    mod.average = lambda t: seen.append(t.clone()) or t  # the all-reduce of the update
    with mod.tracking(labels):
        mod(f, 0)
    assert torch.allclose(seen[0], torch.tensor([[0.46875, -0.625], [0.46875, 0.625]]))
    a = mod.class_alignment(f.mean((2, 3)), 0)
    assert torch.allclose(a, torch.tensor([1.0, -1.0]))
    assert mod.class_alignment(f.mean((2, 3)), 1).tolist() == [0.0, 0.0]  # per site
    with torch.no_grad():  # scale = 1 + 0.5 relu(a): the head channel is amplified
        mod.mlp[0].weight.zero_()
        mod.mlp[0].bias.zero_()
        mod.mlp[0].weight[0, 2] = 1.0
        mod.mlp[2].weight[0, 0] = 0.5
    out = mod(f, 0)
    assert torch.allclose(out[:3, 0], 1.5 * f[:3, 0]) and torch.equal(out[3, 1], f[3, 1])

    copy = ModulatorNet(hidden=4, class_statistics=True, statistics_momentum=1.0)
    copy.load_state_dict(mod.state_dict())  # the buffers come back with their shapes
    assert torch.equal(copy.class_alignment(f.mean((2, 3)), 0), a)
    restored = torch.load(io.BytesIO(_pickled(mod)), weights_only=False)
    assert restored.average(torch.ones(1)).tolist() == [1.0] and not seen[1:]
    assert torch.equal(restored.class_alignment(f.mean((2, 3)), 0), a)
    mod.set_class_counts([2, 8])  # a new task: the estimate restarts
    assert sorted(n for n, _ in mod.named_buffers()) == ["class_coef"]
    assert torch.allclose(mod.class_coef, torch.tensor([[-2.5, 0.625], [2.5, 0.625]]))
    mod.set_class_counts([2, 8], balanced_batches=True)  # re-sampled batches: no re-weighting
    assert torch.allclose(mod.class_coef, torch.tensor([[-1.0, 1.0], [1.0, 1.0]]))
    assert ModulatorNet().state_dict().keys() == {
        "mlp.0.weight",
        "mlp.0.bias",
        "mlp.2.weight",
        "mlp.2.bias",
    }
    fresh = ModulatorNet(class_statistics=True)
    with pytest.raises(ConfigError, match="needs set_class_counts"), fresh.tracking(labels):
        fresh(f, 0)


def _pickled(module) -> bytes:
    buf = io.BytesIO()
    torch.save(module, buf)
    return buf.getvalue()
