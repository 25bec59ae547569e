"""Long-tailed protocol (meta set first, exponential / step profiles), shot-group metrics and
the long-tail baselines (losses, re-sampling, Meta-Weight-Net) on real Fashion-MNIST-LT."""

from __future__ import annotations

import inspect
import math
import re
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from raymeta.data import load_dataset
from raymeta.data.batches import epoch_batches
from raymeta.data.longtail import (
    longtail_metrics,
    longtail_profile,
    make_longtail_split,
    shot_groups,
)
from raymeta.errors import ConfigError
from raymeta.meta.losses import (
    ClassBalancedLoss,
    CrossEntropyLoss,
    FocalLoss,
    LDAMLoss,
    LogitAdjustedLoss,
    NormedLinear,
    class_balanced_indices,
    effective_number_weights,
)
from raymeta.meta.methods import (
    BASE_LOSSES,
    METHODS,
    MFM_DEFAULTS,
    build_method,
    check_params,
    method_label,
)
from raymeta.meta.mfm import MFMTrainer
from raymeta.meta.mwn import MetaWeightNetTrainer, WeightNet
from raymeta.models.modulation import ModulatorNet, resolve_sites
from raymeta.models.small import SmallCNN

CIFAR_LIKE = torch.arange(50_000) % 10  # 5000 images per class, like CIFAR-10


def test_exponential_profile_matches_the_reference_formula():
    expected = np.floor(4990 * 100.0 ** (-np.arange(10) / 9)).astype(int).tolist()
    assert expected[0] == 4990 and expected[-1] == 49
    assert longtail_profile(10, 4990, 100) == expected
    split = make_longtail_split(CIFAR_LIKE, 10, imbalance_factor=100, meta_per_class=10)
    assert split.n_max == 4990  # default: smallest class minus the meta set
    assert split.counts == expected
    assert torch.bincount(CIFAR_LIKE[split.train], minlength=10).tolist() == expected


@pytest.mark.parametrize("imbalance", [1, 10, 20, 50, 200])
def test_profile_for_other_imbalance_factors(imbalance):
    expected = np.floor(4990 * float(imbalance) ** (-np.arange(10) / 9)).astype(int).tolist()
    assert longtail_profile(10, 4990, imbalance) == expected


def test_step_profile():
    assert longtail_profile(10, 1000, 10, "step") == [1000] * 5 + [100] * 5
    assert longtail_profile(5, 1000, 4, "step") == [1000] * 2 + [250] * 3


def test_meta_set_is_taken_first_balanced_and_disjoint():
    split = make_longtail_split(CIFAR_LIKE, 10, imbalance_factor=50, meta_per_class=10, seed=3)
    assert torch.bincount(CIFAR_LIKE[split.meta], minlength=10).tolist() == [10] * 10
    train, meta = set(split.train.tolist()), set(split.meta.tolist())
    assert len(train) == len(split.train) and not train & meta
    # the meta set does not depend on the imbalance factor, profile or class order
    other = make_longtail_split(
        CIFAR_LIKE, 10, imbalance_factor=2, profile="step", class_order="permuted", seed=3
    )
    assert torch.equal(other.meta, split.meta)
    val = make_longtail_split(CIFAR_LIKE, 10, imbalance_factor=10, val_per_class=20, seed=3)
    assert torch.bincount(CIFAR_LIKE[val.val], minlength=10).tolist() == [20] * 10
    assert not set(val.val.tolist()) & (set(val.train.tolist()) | set(val.meta.tolist()))
    assert val.n_max == 5000 - 30


def test_seeded_permutation_is_reproducible():
    a = make_longtail_split(CIFAR_LIKE, 10, imbalance_factor=100, class_order="permuted", seed=5)
    b = make_longtail_split(CIFAR_LIKE, 10, imbalance_factor=100, class_order="permuted", seed=5)
    c = make_longtail_split(
        CIFAR_LIKE, 10, imbalance_factor=100, class_order="permuted", seed=5, order_seed=6
    )
    assert a.class_order == b.class_order and a.counts == b.counts
    assert torch.equal(a.train, b.train) and torch.equal(a.meta, b.meta)
    assert sorted(a.class_order) == list(range(10)) and a.class_order != list(range(10))
    assert c.class_order != a.class_order and torch.equal(c.meta, a.meta)
    profile = longtail_profile(10, 4990, 100)
    assert [a.counts[cls] for cls in a.class_order] == profile


@pytest.mark.parametrize(
    ("kwargs", "names"),
    [
        ({"imbalance_factor": 0.5}, "imbalance_factor=0.5"),
        ({"imbalance_factor": float("nan")}, "imbalance_factor=nan"),
        ({"imbalance_factor": 10, "meta_per_class": 5001}, "meta_per_class=5001"),
        ({"imbalance_factor": 10, "num_classes": 12}, "num_classes=12"),
        ({"imbalance_factor": 10, "num_classes": 8}, "num_classes=8"),
        ({"imbalance_factor": 10, "profile": "linear"}, "'linear'"),
        ({"imbalance_factor": 10, "class_order": "random"}, "'random'"),
        ({"imbalance_factor": 10, "n_max": 4995}, "n_max=4995"),
        ({"imbalance_factor": 1e5}, "imbalance_factor=100000"),
    ],
)
def test_bad_longtail_values_raise_one_line_config_errors(kwargs, names):
    kwargs = {"num_classes": 10, **kwargs}
    with pytest.raises(ConfigError) as info:
        make_longtail_split(CIFAR_LIKE, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg and names in msg and "accepted" in msg


def test_shot_groups_and_metrics():
    counts = longtail_profile(10, 4990, 100)  # 4990 ... 49
    groups = shot_groups(counts)
    assert groups == {"many": [0, 1, 2, 3], "medium": [4, 5, 6], "few": [7, 8, 9]}
    # OLTR's absolute thresholds reproduced at n_max = 500
    assert shot_groups([500, 101, 100, 20, 19]) == {"many": [0, 1], "medium": [2, 3], "few": [4]}
    assert shot_groups([500, 150, 50], many_threshold=200, few_threshold=100)["few"] == [2]
    with pytest.raises(ConfigError):
        shot_groups(counts, many_threshold=10, few_threshold=20)

    targets = torch.tensor([0, 0, 1, 1, 2, 2, 2, 2])
    preds = torch.tensor([0, 0, 1, 0, 0, 0, 2, 2])
    m = longtail_metrics(preds, targets, [100, 10, 1], many_threshold=50, few_threshold=5)
    assert m.top1 == pytest.approx(5 / 8)
    assert m.per_class == pytest.approx([1.0, 0.5, 0.5])
    assert (m.many, m.medium, m.few) == pytest.approx((1.0, 0.5, 0.5))
    d = m.to_dict("test_")
    assert d["test_top1"] == m.top1 and d["test_acc_class_2"] == 0.5
    balanced = longtail_metrics(preds, targets, [10, 10, 10])
    assert balanced.many == pytest.approx(2 / 3) and math.isnan(balanced.few)


def test_effective_number_weights_and_losses():
    counts = [1000, 100, 10]
    n = np.array(counts, dtype=float)
    w = (1 - 0.999) / (1 - 0.999**n)
    w = w / w.sum() * 3
    assert effective_number_weights(counts, 0.999).numpy() == pytest.approx(w, rel=1e-6)
    assert effective_number_weights(counts, 0.0).tolist() == [1.0, 1.0, 1.0]

    torch.manual_seed(0)
    logits, y = torch.randn(16, 3), torch.randint(0, 3, (16,))
    ce = F.cross_entropy(logits, y)
    assert torch.allclose(FocalLoss(gamma=0.0)(logits, y), ce)
    assert FocalLoss(gamma=2.0)(logits, y) < ce
    cb = ClassBalancedLoss(counts, beta=0.999)(logits, y)
    wt = torch.tensor(w, dtype=torch.float32)
    assert torch.allclose(cb, F.cross_entropy(logits, y, weight=wt))
    assert torch.allclose(
        LogitAdjustedLoss(counts)(logits, y),
        F.cross_entropy(logits + torch.log(torch.tensor(n / n.sum())).float(), y),
    )
    ldam = LDAMLoss(counts, max_m=0.5, s=1.0, drw_epoch=2)
    m = 1 / n**0.25
    m = m * 0.5 / m.max()
    shifted = logits - F.one_hot(y, 3) * torch.tensor(m, dtype=torch.float32)[y][:, None]
    assert torch.allclose(ldam(logits, y), F.cross_entropy(shifted, y))
    ldam.start_epoch(2)  # deferred re-weighting switches on
    drw = F.cross_entropy(shifted, y, weight=effective_number_weights(counts))
    assert torch.allclose(ldam(logits, y), drw)


def test_weighted_mean_matches_across_workers():
    """Two workers with half batches average to the one-worker loss gradient (weighted mean)."""
    counts = [500, 50, 5]
    torch.manual_seed(1)
    logits = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 0, 0, 0, 0, 1, 1, 2])
    full = ClassBalancedLoss(counts).double()
    (g_full,) = torch.autograd.grad(full(logits, y), logits)
    halves = [slice(0, 4), slice(4, 8)]
    w = full.class_weight.double()[y]
    mean_w = torch.stack([w[h].mean() for h in halves]).mean()
    grads = []
    for h in halves:
        loss = ClassBalancedLoss(counts).double()
        loss.average = lambda t, m=mean_w: m  # what an all-reduce mean returns
        (g,) = torch.autograd.grad(loss(logits[h], y[h]), logits)
        grads.append(g)
    assert torch.allclose((grads[0] + grads[1]) / 2, g_full)


def test_class_balanced_resampling():
    labels = torch.tensor([0] * 900 + [1] * 90 + [2] * 10)
    a = class_balanced_indices(labels, seed=0, epoch=0)
    b = class_balanced_indices(labels, seed=0, epoch=0)
    assert torch.equal(a, b) and not torch.equal(a, class_balanced_indices(labels, seed=0, epoch=1))
    freq = torch.bincount(labels[a], minlength=3) / len(a)
    assert torch.allclose(freq, torch.full((3,), 1 / 3), atol=0.05)


def _fashion_lt(imbalance=10, n_max=300, seed=0):
    ds = load_dataset("fashion_mnist")
    split = make_longtail_split(
        ds.train_y,
        10,
        imbalance_factor=imbalance,
        n_max=n_max,
        class_order="permuted",
        seed=seed,
        class_names=ds.class_names,
    )
    test_idx = torch.arange(0, 10_000, 5)  # 2000 balanced-ish test images
    return ds, split, ds.test_x[test_idx], ds.test_y[test_idx]


def _run(method, model, ds, split, steps, batch=64, lr=0.05, meta_batch=50):
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    tx, ty = ds.train_x[split.train], ds.train_y[split.train]
    mx, my = ds.train_x[split.meta], ds.train_y[split.meta]
    losses, step, epoch = [], 0, 0
    gen = torch.Generator().manual_seed(0)
    while step < steps:
        method.start_epoch(epoch)
        for idx in epoch_batches(len(ty), batch, seed=0, epoch=epoch):
            if step == steps:
                break
            midx = torch.randperm(len(my), generator=gen)[:meta_batch]
            out = method.train_step(
                model,
                optimizer,
                tx[idx],
                ty[idx],
                lr=lr,
                step=step,
                meta_x=mx[midx],
                meta_y=my[midx],
            )
            losses.append(float(out.loss))
            step += 1
        epoch += 1
    return losses


def _accuracy(model, x, y):
    model.eval()
    with torch.no_grad():
        preds = model(x).argmax(1)
    model.train()
    return preds


def test_short_baseline_and_mwn_runs_on_fashion_mnist_lt():
    ds, split, test_x, test_y = _fashion_lt()
    for name, steps in (("logit_adjust", 40), ("mwn", 20)):
        torch.manual_seed(0)
        model = SmallCNN(1, 10, 28)
        method = build_method(name, split.counts, model, epochs=2)
        losses = _run(method, model, ds, split, steps)
        assert np.mean(losses[-5:]) < np.mean(losses[:5]), (name, losses)
        metrics = longtail_metrics(_accuracy(model, test_x, test_y), test_y, split.counts)
        assert metrics.top1 > 0.3, (name, metrics)
        if name == "mwn":
            assert method.meta_steps == steps


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


def test_mwn_meta_gradient_of_two_workers_matches_one_worker():
    torch.manual_seed(0)
    x, y = torch.randn(8, 1, 8, 8, dtype=torch.float64), torch.randint(0, 3, (8,))
    mx, my = torch.randn(6, 1, 8, 8, dtype=torch.float64), torch.randint(0, 3, (6,))

    def make(average):
        torch.manual_seed(1)
        model = SmallCNN(1, 3, 8, width=4).double()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=1e-3)
        return model, opt, MetaWeightNetTrainer(WeightNet(8).double(), average=average)

    model, opt, trainer = make(lambda t: t)
    ref_loss, ref = trainer.meta_gradient(model, opt, x, y, mx, my, 0.3)
    fake = _ThreadMean(2)
    results = [None, None]

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
        assert torch.allclose((results[0][1][k] + results[1][1][k]) / 2, g, rtol=1e-9, atol=1e-12)


COUNTS = [5, 3, 2]


def _tiny_cnn():
    torch.manual_seed(0)
    return SmallCNN(1, 3, 8, width=4)


def test_method_registry_accepts_exactly_the_constructors_keywords():
    meta = ["meta_every", "meta_lr", "meta_lr_follows_lr", "meta_optimizer", "meta_weight_decay"]
    assert METHODS["ce"].params == METHODS["cb_resample"].params == []
    assert METHODS["focal"].params == ["class_weight", "gamma", "reduction"]
    assert METHODS["ldam_drw"].params == ["beta", "drw_epoch", "max_m", "reduction", "s"]
    assert METHODS["logit_adjust"].params == ["tau"]
    assert METHODS["balanced_softmax"].params == []
    assert METHODS["mwn"].params == sorted(["hidden", "normalise", *meta])
    design = ["base_loss", "base_params", "lookahead", "meta_objective", "sites"]
    assert METHODS["mfm_direct"].params == sorted([*design, *meta])
    network = ["class_statistics", "eps", "hidden", "statistics_momentum"]
    assert METHODS["mfm_network"].params == sorted([*design, *network, *meta])
    assert METHODS["mfm_network"].defaults == {
        **MFM_DEFAULTS["network"],
        "hidden": 16,
        "eps": 1e-5,
        "statistics_momentum": 0.02,
        "meta_lr_follows_lr": True,
        "meta_optimizer": "adam",
        "meta_weight_decay": 0.0,
        "lookahead": "fast",
    }
    assert [n for n, m in METHODS.items() if m.needs_meta_set] == [
        "mwn",
        "mfm_direct",
        "mfm_network",
    ]
    assert METHODS["mfm_network"].label == "MFM (network)"


@pytest.mark.parametrize("name", list(METHODS))
def test_every_accepted_parameter_reaches_its_constructor(name):
    info = METHODS[name]
    defaults = {
        p.name: p.default
        for fn in info.takes
        for p in inspect.signature(fn).parameters.values()
        if p.default is not p.empty
    }
    for key in info.params:
        method = build_method(
            name, COUNTS, _tiny_cnn(), input_shape=(1, 8, 8), epochs=2, **{key: defaults[key]}
        )
        assert method.needs_meta == info.needs_meta_set
    assert build_method("mwn", COUNTS, _tiny_cnn(), hidden=7).wnet.net[0].out_features == 7
    net = build_method("mfm_network", COUNTS, _tiny_cnn(), input_shape=(1, 8, 8), hidden=5)
    lr = net.optimizer.param_groups[0]["lr"]
    assert net.modulation.mlp[0].out_features == 5 and lr == MFM_DEFAULTS["network"]["meta_lr"]


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        (
            "ldam_drw",
            {"max_margin": 0.5},
            "method 'ldam_drw' has no parameter 'max_margin'; "
            "accepted: beta, drw_epoch, max_m, reduction, s",
        ),
        ("ce", {"reduction": "mean"}, "method 'ce' has no parameter 'reduction'; accepted: none"),
        (
            "mfm_direct",
            {"hidden": 8, "frozen": True},
            "method 'mfm_direct' has no parameter 'hidden', 'frozen'; accepted: base_loss, "
            "base_params, lookahead, meta_every, meta_lr, meta_lr_follows_lr, meta_objective, "
            "meta_optimizer, meta_weight_decay, sites",
        ),
        ("svm", {}, "unknown long-tail method 'svm'; accepted: ce, cb_reweight, cb_resample"),
    ],
)
def test_bad_method_parameters_are_refused_on_one_line_before_building(name, params, message):
    with pytest.raises(ConfigError) as err:
        check_params(name, params)
    assert "\n" not in str(err.value) and str(err.value).startswith(message), str(err.value)
    model = _tiny_cnn()
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        build_method(name, COUNTS, model, input_shape=(1, 8, 8), **params)
    assert isinstance(model.classifier[-1], nn.Linear)  # ldam_drw: nothing built, no NormedLinear
    assert not any(m._forward_hooks for m in model.modules())  # mfm: no modulation hooks


def test_transfer_refuses_the_registered_network_s_own_parameters():
    with pytest.raises(ConfigError, match="^hidden: set by the registered modulator network"):
        build_method("mfm_network", COUNTS, _tiny_cnn(), modulation=ModulatorNet(), hidden=8)
    method = build_method("mfm_network", COUNTS, _tiny_cnn(), modulation=ModulatorNet(4))
    assert method.frozen and not method.needs_meta and method.optimizer is None


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        (
            "cb_reweight",
            {"beta": "0.9"},
            "parameter beta='0.9' has the wrong type; accepted: a float",
        ),
        ("ldam_drw", {"s": True}, "parameter s=True has the wrong type; accepted: a float"),
    ],
)
def test_wrongly_typed_method_parameters_are_one_line_errors(name, params, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        build_method(name, COUNTS, _tiny_cnn(), **params)
    assert "\n" not in str(err.value)


def test_a_type_error_inside_a_constructor_propagates_unchanged(monkeypatch):
    import raymeta.meta.losses as losses

    def broken(counts, beta):
        raise TypeError("raised inside the constructor")

    monkeypatch.setattr(losses, "effective_number_weights", broken)
    with pytest.raises(TypeError, match="raised inside the constructor") as err:
        build_method("cb_reweight", COUNTS, _tiny_cnn(), beta=0.9)
    assert not isinstance(err.value, ConfigError)


def test_balanced_softmax_is_the_logit_adjusted_loss_at_tau_1():
    """Ren et al.'s form, log n_c added to the logits, equals Menon et al.'s tau = 1 (the
    constant log sum n cancels); the registry builds both from one class."""
    torch.manual_seed(0)
    logits, y = torch.randn(16, 3), torch.randint(0, 3, (16,))
    ren = F.cross_entropy(logits + torch.tensor(COUNTS, dtype=torch.float32).log(), y)
    bs = build_method("balanced_softmax", COUNTS, _tiny_cnn()).loss
    la = build_method("logit_adjust", COUNTS, _tiny_cnn()).loss
    assert type(bs) is type(la) is LogitAdjustedLoss
    assert torch.equal(bs.adjustment, la.adjustment)
    assert torch.allclose(bs(logits, y), ren)
    la2 = build_method("logit_adjust", COUNTS, _tiny_cnn(), tau=2.0).loss
    assert torch.allclose(la2.adjustment, 2 * bs.adjustment)
    with pytest.raises(ConfigError, match="^method 'balanced_softmax' has no parameter 'tau'"):
        build_method("balanced_softmax", COUNTS, _tiny_cnn(), tau=2.0)
    assert METHODS["balanced_softmax"].label == "Balanced Softmax"


def test_mfm_trains_with_the_chosen_base_loss_and_meta_objective():
    assert BASE_LOSSES == (
        "ce",
        "cb_reweight",
        "cb_resample",
        "focal",
        "ldam_drw",
        "logit_adjust",
        "balanced_softmax",
    )
    shape = {"input_shape": (1, 8, 8), "epochs": 5}
    la = build_method(
        "mfm_direct",
        COUNTS,
        _tiny_cnn(),
        base_loss="logit_adjust",
        base_params={"tau": 2.0},
        meta_objective="ce",
        **shape,
    )
    assert isinstance(la, MFMTrainer) and isinstance(la.loss, LogitAdjustedLoss)
    assert torch.allclose(la.loss.adjustment, 2 * LogitAdjustedLoss(COUNTS).adjustment)
    assert isinstance(la.meta_loss, CrossEntropyLoss) and not la.resample
    model = _tiny_cnn()
    ldam = build_method(
        "mfm_network", COUNTS, model, base_loss="ldam_drw", meta_objective="logit_adjust", **shape
    )
    assert isinstance(model.classifier[-1], NormedLinear) and isinstance(ldam.loss, LDAMLoss)
    assert isinstance(ldam.meta_loss, LogitAdjustedLoss) and ldam.modulation.sites == [
        "features.2",
        "features.5",
        "classifier.2",
    ]  # the network's default sites, stages+embedding (MFM_DEFAULTS)
    ldam.start_epoch(4)  # DRW from int(0.8 * 5)
    assert ldam.loss.reweight
    rs = build_method("mfm_direct", COUNTS, _tiny_cnn(), base_loss="cb_resample", **shape)
    assert rs.resample and isinstance(rs.loss, CrossEntropyLoss)
    prior = build_method(
        "mfm_network", COUNTS, _tiny_cnn(), base_loss="cb_resample", class_statistics=True, **shape
    )
    assert prior.modulation.class_statistics and prior.modulation.class_coef[1].tolist() == [1] * 3
    emb = build_method("mfm_direct", COUNTS, _tiny_cnn(), sites="embedding", **shape)
    assert emb.modulation.sites == ["classifier.2"] and emb.modulation.channels == [64]
    assert method_label("mfm_direct", {"base_loss": "balanced_softmax"}) == "MFM (direct) + BS"
    assert method_label("mfm_network", {"base_loss": "ce"}) == "MFM (network)"
    assert method_label("logit_adjust") == "logit adjustment"


def test_site_presets_name_the_stages_and_the_classifier_input():
    model = _tiny_cnn()
    assert (
        resolve_sites(model, None)
        == resolve_sites(model, "stages")
        == [
            "features.2",
            "features.5",
        ]
    )
    assert resolve_sites(model, "last_stage") == ["features.5"]
    assert resolve_sites(model, "stages+embedding") == ["features.2", "features.5", "classifier.2"]
    assert resolve_sites(model, ["features.0"]) == ["features.0"]
    from raymeta.models import build_model

    assert resolve_sites(build_model("resnet8", 1, 3, 8), "embedding") == ["pool"]
    with pytest.raises(ConfigError, match="^unknown modulation sites 'head'; accepted: stages"):
        resolve_sites(model, "head")


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"base_loss": "mwn"}, "unknown base_loss 'mwn'; accepted: ce, cb_reweight"),
        (
            {"base_loss": "logit_adjust", "base_params": {"beta": 0.9}},
            "base_params: method 'logit_adjust' has no parameter 'beta'; accepted: tau",
        ),
        ({"base_params": [1]}, "base_params=[1] is invalid; accepted: a mapping"),
        ({"meta_objective": "focal"}, "unknown meta_objective 'focal'; accepted: ce, logit_adjust"),
        ({"sites": 3}, "method 'mfm_direct' parameter sites=3 has the wrong type"),
    ],
)
def test_bad_mfm_design_values_are_one_line_errors_before_anything_is_attached(params, message):
    model = _tiny_cnn()
    with pytest.raises(ConfigError, match="^" + re.escape(message)) as err:
        build_method("mfm_direct", COUNTS, model, input_shape=(1, 8, 8), **params)
    assert "\n" not in str(err.value)
    assert not any(m._forward_hooks for m in model.modules())
