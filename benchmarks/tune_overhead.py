"""Ray Tune overhead per trial: N trials of a near-empty function trainable through a Tuner
(the way ``raymeta compare`` runs its search: OptunaSearch, ASHA, per-trial resources), wall
time divided by N, minus the trainable's own time. Target: below 1 s per trial.

Usage: .venv/bin/python benchmarks/tune_overhead.py [--trials 40] [--concurrent 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time

SLEEP_S = 0.05


def trainable(config):
    from ray import tune

    time.sleep(SLEEP_S)
    tune.report({"val_acc": config["x"]})


def main():
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--concurrent", type=int, default=2)
    args = parser.parse_args()
    ray.init(address="local", num_cpus=2, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as storage:
            tuner = tune.Tuner(
                tune.with_resources(trainable, {"cpu": 1}),
                param_space={"x": tune.uniform(0, 1)},
                tune_config=tune.TuneConfig(
                    reuse_actors=True,  # trials share resources: skip an actor start per trial
                    search_alg=OptunaSearch(metric="val_acc", mode="max", seed=0),
                    scheduler=ASHAScheduler(metric="val_acc", mode="max", max_t=1),
                    num_samples=args.trials,
                    max_concurrent_trials=args.concurrent,
                ),
                run_config=tune.RunConfig(storage_path=storage, verbose=0),
            )
            t0 = time.perf_counter()
            grid = tuner.fit()
            wall = time.perf_counter() - t0
    finally:
        ray.shutdown()
    assert len(grid) == args.trials and not grid.errors
    own = SLEEP_S * args.trials / args.concurrent
    per_trial = (wall - own) / args.trials
    print(f"{args.trials} trials, {args.concurrent} at once: wall {wall:.1f} s")
    print(
        f"Tune overhead per trial = {per_trial:.3f} s (wall time / N minus the trainable's own time)"
    )


if __name__ == "__main__":
    main()
