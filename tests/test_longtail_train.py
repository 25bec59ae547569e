"""MFM's fast look-ahead, the long-tailed update rule in the common training loop, the study
config and its one-line errors (no Ray: milliseconds to seconds)."""

from __future__ import annotations

import copy
import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from raymeta.config import LongTailStudyConfig, LongTailTaskConfig, PipelineConfig, parse
from raymeta.data.longtail import longtail_metrics
from raymeta.errors import ConfigError
from raymeta.meta.lookahead import averaged_gradients, trainable_params
from raymeta.meta.losses import LogitAdjustedLoss, log_prior
from raymeta.meta.methods import build_method
from raymeta.meta.mfm import MFMTrainer
from raymeta.models.modulation import build_modulation, parameters_after
from raymeta.models.small import SmallCNN
from raymeta.report import summarise, summary_markdown
from raymeta.schedules import HandSchedule
from raymeta.train.loop import build_task_model, evaluate, load_task_data, train
from raymeta.train.rules import MethodRule

MU, WD, LR = 0.9, 1e-3, 0.5


def _problem(kind, seed=1, sites=None):
    torch.manual_seed(seed)
    model = SmallCNN(1, 3, 8, width=4).double()
    prior = kind == "network_prior"
    extra = {"class_statistics": True, "statistics_momentum": 0.5} if prior else {}
    mod = build_modulation("network" if prior else kind, model, (1, 8, 8), sites=sites, **extra)
    if prior:  # class statistics estimated from a few tracked batches
        mod.set_class_counts(COUNTS)
        with torch.no_grad(), mod.tracking(torch.tensor([0, 0, 1, 2])):
            model(torch.randn(4, 1, 8, 8, dtype=torch.float64))
    with torch.no_grad():  # away from the identity, so every path carries a gradient
        for p in mod.parameters():
            p.add_(0.1 * torch.randn_like(p))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=MU, weight_decay=WD)
    torch.manual_seed(2)
    x, y = torch.randn(6, 1, 8, 8, dtype=torch.float64), torch.randint(0, 3, (6,))
    mx, my = torch.randn(5, 1, 8, 8, dtype=torch.float64), torch.randint(0, 3, (5,))
    with mod.no_meta_grad():  # one real step: the virtual step then includes momentum
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model, mod, opt, (x, y, mx, my)


COUNTS = [5, 3, 2]
LOG_PRIOR = log_prior(COUNTS).double()  # the module's float32 values


def _la(logits, y):
    """The logit-adjusted loss at tau 1, written out."""
    return F.cross_entropy(logits + LOG_PRIOR, y)


def _sgd_directions(model, opt, x, y, loss=F.cross_entropy):
    """``mu * buf + g + wd * w`` of every parameter, by plain autograd."""
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(loss(model(x), y), list(params.values()))
    return {
        n: MU * opt.state[p]["momentum_buffer"] + g + WD * p.detach()
        for (n, p), g in zip(params.items(), grads, strict=True)
    }


def _fast_objective(
    model, opt, batch, frozen_backbone, site, loss=F.cross_entropy, meta_loss=F.cross_entropy
):
    """meta_loss(w_head - lr * D_head(phi), w_bb - lr * D_bb(phi_0); phi), plain autograd;
    the head: the parameters after the last site, D: a step of ``loss``."""
    x, y, mx, my = batch
    head = set(parameters_after(model, site))
    direction = _sgd_directions(model, opt, x, y, loss)
    params = dict(model.named_parameters())
    saved = {n: p.detach().clone() for n, p in params.items()}
    with torch.no_grad():
        for n, p in params.items():
            p.sub_(LR * (direction[n] if n in head else frozen_backbone[n]))
        out = float(meta_loss(model(mx), my))
        for n, p in params.items():
            p.copy_(saved[n])
    return out


@pytest.mark.parametrize(
    ("kind", "sites", "composed"),
    [
        ("direct", None, False),
        ("network", None, False),
        ("network_prior", None, False),
        ("direct", "embedding", True),
        ("network", "stages+embedding", True),
        ("network_prior", "last_stage", True),
    ],
)
def test_fast_meta_gradient_matches_finite_differences_of_its_objective(kind, sites, composed):
    """``composed``: MFM + LA, the logit-adjusted loss as the base loss (the real and virtual
    step) and as the meta objective."""
    model, mod, opt, batch = _problem(kind, sites=sites)
    assert parameters_after(model, "features.5") == [
        "classifier.1.weight",
        "classifier.1.bias",
        "classifier.3.weight",
        "classifier.3.bias",
    ]
    assert parameters_after(model, "classifier.2") == ["classifier.3.weight", "classifier.3.bias"]
    losses = {"loss": _la, "meta_loss": _la} if composed else {}
    base = losses.get("loss", F.cross_entropy)
    frozen = {k: v.detach() for k, v in _sgd_directions(model, opt, *batch[:2], base).items()}
    trainer_losses = {k: LogitAdjustedLoss(COUNTS).double() for k in losses}
    trainer = MFMTrainer(mod, lookahead="fast", **trainer_losses)
    loss, meta_loss, grads, meta_grads = trainer.fast_meta_gradient(model, opt, *batch, LR)

    def objective():
        return _fast_objective(model, opt, batch, frozen, mod.sites[-1], **losses)

    assert float(meta_loss) == pytest.approx(objective(), rel=1e-12)
    with torch.no_grad():
        assert float(loss) == pytest.approx(float(base(model(batch[0]), batch[1])))
    eps, checked = 1e-6, 0
    for p, g in zip(mod.parameters(), meta_grads, strict=True):
        for j in range(0, p.numel(), max(1, p.numel() // 3)):
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


@pytest.mark.parametrize("follows", [True, False])
def test_meta_lr_follows_the_classifier_schedule(follows):
    model, mod, opt, (x, y, mx, my) = _problem("direct")
    trainer = MFMTrainer(mod, meta_lr=0.01, meta_lr_follows_lr=follows)
    used, moved = [], []
    for step, lr in enumerate([0.05, 0.1, 0.05, 0.0]):
        before = [p.detach().clone() for p in mod.parameters()]
        trainer.train_step(model, opt, x, y, lr=lr, step=step, meta_x=mx, meta_y=my)
        used.append(trainer.optimizer.param_groups[0]["lr"])
        moved.append(
            any(not torch.equal(b, p) for b, p in zip(before, mod.parameters(), strict=True))
        )
    # peak so far: 0.05, 0.1, 0.1, 0.1
    assert used == pytest.approx([0.01, 0.01, 0.005, 0.0] if follows else [0.01] * 4)
    assert moved == [True, True, True, not follows]
    assert trainer.state_dict()["peak_lr"] == (0.1 if follows else 0.0)


def test_only_the_second_order_entries_of_the_averaged_gradient_carry_a_graph():
    """A constant entry left attached made every fast meta backward run the virtual backbone's
    full backward (weight gradients of every conv) for a zero contribution."""
    model, _, _, (x, y, _, _) = _problem("direct")
    params = trainable_params(model)
    head = parameters_after(model, "features.5")
    grads = averaged_gradients(F.cross_entropy(model(x), y), params, second_order=head)
    assert list(grads) == list(params)
    assert {n for n, g in grads.items() if g.requires_grad} == set(head)
    reference = torch.autograd.grad(F.cross_entropy(model(x), y), list(params.values()))
    for g, r in zip(grads.values(), reference, strict=True):
        torch.testing.assert_close(g.detach(), r, rtol=0, atol=0)


def test_fast_step_is_the_sgd_step_with_the_current_modulation_then_updates_it():
    model, mod, opt, (x, y, mx, my) = _problem("network")
    direction = _sgd_directions(model, opt, x, y)
    expected = {n: p.detach() - LR * direction[n] for n, p in model.named_parameters()}
    before = [p.detach().clone() for p in mod.parameters()]
    trainer = MFMTrainer(mod, meta_lr=1e-2, lookahead="fast")
    out = trainer.train_step(model, opt, x, y, lr=LR, step=0, meta_x=mx, meta_y=my)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[n], rtol=1e-12, atol=1e-14)
    assert out.meta_loss == trainer.last_meta_loss and trainer.meta_steps == 1
    assert any(not torch.equal(a, b) for a, b in zip(before, mod.parameters(), strict=True))
    with pytest.raises(ConfigError, match="unknown lookahead 'slow'"):
        MFMTrainer(mod, lookahead="slow")


def _tiny_task(**kw):
    base = {"dataset": "digits", "n_max": 60, "imbalance_factor": 10, "epochs": 2}
    return LongTailTaskConfig(**{**base, **kw, "batch_size": 50, "class_order": "permuted"})


def _run(task, data, name, *, state=None, optimizer_state=None, method_state=None, **params):
    model = build_task_model(task, data, "cpu")
    method = build_method(
        name, data.class_counts, model, input_shape=(1, 8, 8), epochs=task.epochs, **params
    )
    rule = MethodRule(method, meta_batch_size=50)
    if method_state is not None:
        model.load_state_dict(method_state[0])
        rule.load_state_dict(method_state[1])
    n = len(data.train_y) // task.batch_size
    schedule = HandSchedule("multistep", 0.1, task.epochs * n, n, milestones=[0.8, 0.9])
    saved = {}

    def keep(metrics, run_state, optimizer):
        saved[metrics["epoch"]] = copy.deepcopy(  # what a checkpoint would hold
            (model.state_dict(), rule.state_dict(), optimizer.state_dict())
        )

    out = train(
        task,
        data,
        model,
        schedule,
        rule=rule,
        state=state,
        optimizer_state=optimizer_state,
        on_epoch_end=keep,
    )
    return out, model, method, saved


def test_loop_reports_longtail_metrics_that_match_the_predictions():
    task = _tiny_task()
    data = load_task_data(task)
    assert data.class_counts == [
        int(n) for n in torch.bincount(data.train_y, minlength=10).tolist()
    ]
    assert max(data.class_counts) == 60 and min(data.class_counts) == 6  # IF 10
    assert len(data.meta_y) == 100 and len(data.val_y) == 0
    state, model, method, _ = _run(task, data, "mfm_network")
    last = state.history[-1]
    model.eval()
    with torch.no_grad():
        preds = model(data.test_x).argmax(1)
    ref = longtail_metrics(preds, data.test_y, data.class_counts)
    assert last["test_acc"] == pytest.approx(ref.top1, abs=1e-12)
    assert last["test_acc"] == pytest.approx(evaluate(model, data.test_x, data.test_y, _W())[0])
    for group in ("many", "medium", "few"):
        got, want = last[f"test_{group}_acc"], getattr(ref, group)
        assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want)
    for c in range(10):
        assert last[f"test_acc_class_{c}"] == pytest.approx(ref.per_class[c])
    steps = 2 * (sum(data.class_counts) // 50)
    meta_steps = sum((s + 1) % method.meta_every == 0 for s in range(steps))
    assert method.meta_steps == meta_steps > 0 and "meta_loss" in last


class _W:
    rank, world_size = 0, 1

    @staticmethod
    def sum(t):
        return t


def test_resumed_longtail_run_continues_exactly():
    task = _tiny_task(meta_per_class=5)
    data = load_task_data(task)
    full, model, _, saved = _run(task, data, "mfm_direct", lookahead="exact", meta_every=2)
    from raymeta.train.loop import RunState

    first = RunState(**{**full.__dict__, "history": full.history[:1]})
    first.epoch, first.step = 1, len(full.lrs) // 2
    first.lrs = full.lrs[: first.step]
    model_sd, rule_sd, opt_sd = saved[1]
    resumed, model2, _, _ = _run(
        task,
        data,
        "mfm_direct",
        lookahead="exact",
        meta_every=2,
        state=first,
        optimizer_state=opt_sd,
        method_state=(model_sd, rule_sd),
    )
    assert resumed.lrs == full.lrs
    for k, v in model.state_dict().items():
        assert torch.equal(model2.state_dict()[k], v), k
    assert resumed.history[-1]["test_acc"] == full.history[-1]["test_acc"]


def test_class_balanced_resampling_in_the_loop_draws_balanced_batches():
    task = _tiny_task(epochs=1)
    data = load_task_data(task)
    seen = []
    model = build_task_model(task, data, "cpu")
    rule = MethodRule(build_method("cb_resample", data.class_counts, model))
    original = rule.step

    def spy(model, optimizer, x, y, **kw):
        seen.append(y)
        return original(model, optimizer, x, y, **kw)

    rule.step = spy
    n = len(data.train_y) // 50
    train(task, data, model, HandSchedule("fixed", 0.05, n, n), rule=rule)
    freq = torch.bincount(torch.cat(seen), minlength=10).double()
    assert freq.min() / freq.max() > 0.4  # plain batches: 6 / 60 = 0.1
    plain = torch.bincount(data.train_y, minlength=10).double()
    assert plain.min() / plain.max() == pytest.approx(0.1)


def test_learned_lr_schedule_is_refused_for_longtail_steps():
    from raymeta.schedules import MLRSNet, MLRSNetBundle, MLRSNetSchedule

    task = _tiny_task(epochs=1)
    data = load_task_data(task)
    model = build_task_model(task, data, "cpu")
    rule = MethodRule(build_method("ce", data.class_counts, model))
    bundle = MLRSNetBundle([MLRSNet().state_dict()], [1])
    with pytest.raises(ConfigError, match="hand-designed schedule") as err:
        train(task, data, model, MLRSNetSchedule(bundle, 10, 1, fixed_gamma=0.1), rule=rule)
    assert "\n" not in str(err.value)


STUDY = {
    "task": {"dataset": "digits", "n_max": 60, "imbalance_factor": 10},
    "methods": [{"method": "mfm_network"}],
}


@pytest.mark.parametrize(
    ("patch", "names"),
    [
        ({"task": {"imbalance_factor": 0.5}}, "task.imbalance_factor: Input should be greater"),
        ({"task": {"imbalance_factor": "inf"}}, "task.imbalance_factor: Input should be a finite"),
        ({"task": {"profile": "linear"}}, "(got 'linear')"),
        ({"task": {"class_order": "random"}}, "(got 'random')"),
        ({"task": {"meta_per_class": -1}}, "task.meta_per_class"),
        ({"imbalance_factors": [100, 0]}, "imbalance_factors.1"),
        ({"methods": [{"method": "svm"}]}, "unknown long-tail method 'svm'"),
        ({"methods": [{"method": "ce", "model_uri": "models:/x@y"}]}, "model_uri"),
        ({"task": {"meta_per_class": 0}}, "meta_per_class is 0 but MFM (network) + CB-RS needs"),
        ({"schedule": {"schedule": "mlrsnet"}}, "hand-designed schedule"),
        ({"register_seed": 7}, "register_seed=7"),
        ({"profiles": ["exp", "linear"]}, "profiles.1: Input should be 'exp' or 'step'"),
        ({"register_profile": "step"}, "register_profile='step' is not one of profiles ['exp']"),
        ({"transfer": [{"name": "t", "task": {}}], "methods": [{"method": "ce"}]}, "model_uri"),
    ],
)
def test_bad_study_values_are_one_line_config_errors(patch, names):
    data = {**STUDY, **patch}
    if "task" in patch:
        data["task"] = {**STUDY["task"], **patch["task"]}
    with pytest.raises(ConfigError) as err:
        parse(PipelineConfig, {"name": "x", "mfm": data}, "p.yaml")
    assert "\n" not in str(err.value) and names in str(err.value), str(err.value)
    assert str(err.value).startswith("p.yaml: mfm")


@pytest.mark.parametrize(
    ("patch", "names"),
    [
        ({"task": {"dataset": "digits", "imbalance_factor": 500}}, "imbalance_factor=500"),
        ({"task": {"dataset": "digits", "n_max": 1000}}, "n_max=1000"),
        ({"task": {"dataset": "digits", "meta_per_class": 200}}, "meta_per_class=200"),
        ({"methods": [{"method": "focal", "params": {"gamma": -1}}]}, "focal gamma=-1"),
        ({"methods": [{"method": "mfm_network", "params": {"wings": 2}}]}, "'wings'"),
        ({"methods": [{"method": "mwn", "meta_batch_size": 200}]}, "meta_batch_size=200"),
        ({"schedule": {"schedule": "multistep", "lr": 0.1, "params": {"step": 3}}}, "multistep"),
    ],
)
def test_data_dependent_values_fail_in_the_driver_on_one_line(patch, names):
    from raymeta.longtail_study import check_longtail_study

    cfg = parse(LongTailStudyConfig, {**STUDY, **patch})
    with pytest.raises(ConfigError) as err:
        check_longtail_study(cfg, 1)
    assert "\n" not in str(err.value) and names in str(err.value), str(err.value)


SEARCH = {
    "task": {
        "dataset": "digits",
        "n_max": 60,
        "imbalance_factor": 10,
        "meta_per_class": 5,
        "val_per_class": 10,
        "batch_size": 50,
    },
    "meta_batch_size": 50,
}


@pytest.mark.parametrize(
    ("patch", "names"),
    [
        ({"task": {"val_per_class": 0}}, "task.val_per_class must be > 0: the search selects"),
        ({"task": {"meta_per_class": 0}}, "task.meta_per_class must be > 0"),
        ({"space": {"sites": ["stages", "head"]}}, "space: sites: unknown ['head']; accepted:"),
        ({"space": {"base_loss": ["mwn"]}}, "space: base_loss: unknown ['mwn']"),
        ({"space": {"meta_objective": ["focal"]}}, "space: meta_objective: unknown ['focal']"),
        ({"space": {"modulation": ["film"]}}, "space.modulation.0: Input should be 'direct'"),
        ({"space": {"meta_every": [1, 1]}}, "space: meta_every: a choice is listed twice"),
        ({"space": {"meta_every": [0]}}, "space.meta_every.0: Input should be greater than 0"),
        ({"space": {"meta_lr": [1e-2, 1e-3]}}, "space: meta_lr: empty range"),
        ({"space": {"sites": []}}, "space.sites: List should have at least 1 item"),
        ({"trials_per_variant": 0}, "mfm_search.trials_per_variant: Input should be greater"),
        ({"trials": 16}, "mfm_search.trials: renamed trials_per_variant (each variant now"),
        ({"confirm_top": -1}, "mfm_search.confirm_top: Input should be greater than or equal"),
        ({"repeats": 0}, "mfm_search.repeats: Input should be greater than 0"),
        ({"schedule": {"schedule": "mlrsnet"}}, "hand-designed schedule"),
    ],
)
def test_bad_design_search_values_are_one_line_config_errors(patch, names):
    data = {**SEARCH, **patch}
    if "task" in patch:
        data["task"] = {**SEARCH["task"], **patch["task"]}
    with pytest.raises(ConfigError) as err:
        parse(PipelineConfig, {"name": "x", "mfm_search": data}, "p.yaml")
    assert "\n" not in str(err.value) and names in str(err.value), str(err.value)
    assert str(err.value).startswith("p.yaml: mfm_search")


@pytest.mark.parametrize(
    ("patch", "names"),
    [
        ({"meta_batch_size": 80}, "meta_batch_size=80 is larger than the meta set (50 images)"),
        ({"task": {"val_per_class": 200}}, "val_per_class=200"),
        (
            {"baselines": [{"method": "logit_adjust", "params": {"beta": 1}}]},
            "logit adjustment",
        ),
    ],
)
def test_design_search_values_that_do_not_fit_the_data_fail_in_the_driver(patch, names):
    from raymeta.tune.mfm_search import check_mfm_search

    data = {**SEARCH, **patch}
    if "task" in patch:
        data["task"] = {**SEARCH["task"], **patch["task"]}
    cfg = parse(PipelineConfig, {"name": "x", "mfm_search": data}).mfm_search
    with pytest.raises(ConfigError) as err:
        check_mfm_search(cfg)
    assert "\n" not in str(err.value) and names in str(err.value), str(err.value)


def test_the_validation_split_is_balanced_and_disjoint_and_leaves_old_splits_unchanged():
    task = _tiny_task(meta_per_class=5)
    plain = load_task_data(task)
    with_val = load_task_data(task.model_copy(update={"val_per_class": 7}))
    assert len(plain.val_y) == 0
    assert torch.bincount(with_val.val_y, minlength=10).tolist() == [7] * 10
    assert torch.equal(with_val.meta_x, plain.meta_x)  # the meta set is taken first
    assert with_val.class_counts == plain.class_counts
    images = [tuple(x.flatten().tolist()) for x in (*with_val.val_x, *with_val.meta_x)]
    train_images = {tuple(x.flatten().tolist()) for x in with_val.train_x}
    assert len(set(images)) == len(images) and not train_images & set(images)


def test_choice_takes_each_variant_s_best_final_validation_accuracy():
    from raymeta.tune.mfm_search import choose

    common = {"sites": "stages", "base_loss": "ce", "meta_objective": "ce", "meta_lr": 1e-3}
    trials = pd.DataFrame(
        [
            {**common, "modulation": "direct", "meta_every": 1, "val_acc": 0.7, "epochs": 3},
            {**common, "modulation": "direct", "meta_every": 2, "val_acc": 0.9, "epochs": 1},
            {**common, "modulation": "network", "meta_every": 1, "val_acc": 0.6, "epochs": 3},
            {
                **common,
                "modulation": "network+class_statistics",
                "meta_every": 4,
                "val_acc": 0.65,
                "epochs": 3,
            },
        ]
    ).assign(trial_id=["a", "b", "c", "d"])
    chosen = choose(trials, epochs=3)
    assert chosen["direct"]["trial"] == "a"  # b was stopped early by ASHA
    assert chosen["network"]["trial"] == "d"
    assert chosen["network"]["params"]["class_statistics"] is True
    assert chosen["network"]["params"]["meta_every"] == 4 and chosen["network"]["val_acc"] == 0.65
    assert choose(trials[trials.modulation == "network"], 3).keys() == {"network"}
    # a tie in validation accuracy (float sums of equal image counts) goes to fewer look-aheads
    tied = trials.assign(val_acc=[0.7, 0.9, (0.831 + 0.802 + 0.812) / 3, 0.815])
    assert (0.831 + 0.802 + 0.812) / 3 != 0.815  # the means differ in the last float bits
    assert choose(tied, epochs=3)["network"]["trial"] == "d"  # meta_every 4 over 1
    assert choose(tied.assign(epochs=3), 3)["direct"]["trial"] == "b"  # 0.9, not the tie rule


def test_summary_gives_mean_and_sample_std_over_seeds():
    df = pd.DataFrame(
        {
            "target": ["a"] * 4,
            "imbalance_factor": [100.0] * 4,
            "method": ["CE", "CE", "MFM", "MFM"],
            "top1_acc": [0.80, 0.84, 0.85, 0.85],
            "many_acc": [0.9, 0.9, 0.9, 0.9],
            "medium_acc": [0.7, 0.8, 0.8, 0.8],
            "few_acc": [0.5, 0.6, float("nan"), 0.7],
        }
    )
    s = summarise(df, ["target", "imbalance_factor", "method"])
    ce = s[s.method == "CE"].iloc[0]
    assert ce["seeds"] == 2 and ce["acc_overall_mean"] == pytest.approx(0.82)
    assert ce["acc_overall_std"] == pytest.approx(math.sqrt(2 * 0.02**2))  # ddof=1
    assert s[s.method == "MFM"].iloc[0]["acc_few_mean"] == pytest.approx(0.7)  # NaN skipped
    md = summary_markdown(s, ["target", "imbalance_factor"], title=lambda t, f: f"{t} IF {f:g}")
    assert "#### a IF 100" in md and "| CE       | 82.00 ± 2.83 |" in md


def test_summary_of_dead_runs_is_over_the_live_seeds_with_a_count():
    nan = float("nan")
    df = pd.DataFrame(
        {
            "imbalance_factor": [100.0] * 5,
            "method": ["CE", "CE", "CE", "CB", "CB"],
            "top1_acc": [0.80, nan, 0.84, nan, nan],
            "many_acc": [0.9, nan, 0.9, nan, nan],
            "medium_acc": [0.7, nan, 0.8, nan, nan],
            "few_acc": [0.5, nan, 0.6, nan, nan],
            "dead": [False, True, False, True, True],
        }
    )
    s = summarise(df, ["imbalance_factor", "method"])
    assert list(s.seeds) == [3, 2] and list(s.dead) == [1, 2]
    ce = s.iloc[0]
    assert ce.acc_overall_mean == pytest.approx(0.82)  # the two live seeds
    assert ce.acc_overall_std == pytest.approx(math.sqrt(2 * 0.02**2))
    assert math.isnan(s.iloc[1].acc_overall_mean)  # every seed dead
    md = summary_markdown(s, ["imbalance_factor"])
    assert "mean ± std over 2, 3 seeds, dead runs left out" in md
    assert "| CE       | 82.00 ± 2.83 |" in md and md.count("| 1 of 3 |") == 1
    assert md.count("| 2 of 2 |") == 1
    live = summary_markdown(
        summarise(df[~df.dead], ["imbalance_factor", "method"]), ["imbalance_factor"]
    )
    assert "dead" not in live  # no dead run: no column, the heading as before


@pytest.mark.parametrize(
    ("argv", "names"),
    [
        (["train", "--imbalance-factor", "0.5"], "imbalance_factors.0: Input should be greater"),
        (["train", "--methods", "svm"], "unknown long-tail method 'svm'"),
        (["train", "--dataset", "digits", "--imbalance-factor", "500"], "imbalance_factor=500"),
        (["transfer", "--class-order", "random"], "(got 'random')"),
    ],
)
def test_mfm_command_reports_bad_values_on_one_line(argv, names, capsys, tmp_path, monkeypatch):
    from raymeta.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["mfm", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("raymeta: error:") and "\n" not in err and names in err, err
