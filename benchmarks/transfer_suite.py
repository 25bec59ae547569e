"""The transfer suite: does the frozen learned schedule beat the best searched hand-designed
schedule on tasks it was not meta-trained on? (issue 10 item 7)

Runs ``raymeta/pipelines/transfer_suite.yaml`` (or ``--config FILE``): meta-training, then a
schedule comparison on each task; prints per task the learned row and the best searched family
(chosen on validation) as mean +- std over seeds, the difference, the family's search compute,
PBT's row for reference (not part of the verdict) and a verdict, then the suite's target line
(:mod:`raymeta.tune.suite`). ``--smoke`` shrinks it to check the plumbing in minutes
(meta-training: 1 epoch on 3,000 training images; every task: 2 epochs on 1,500 training images,
digits on all of its own, 2 trials per family, 1 seed); its numbers mean nothing, and it says
so. ``--resume`` continues an interrupted run: each task's comparison keeps its finished trials
(meta-training runs again). Exit status (0, 2 with one ``raymeta: error:`` line, 130 after
Ctrl+C or SIGTERM), the interrupted line and MLflow's logging are the ``raymeta`` command's
(:func:`raymeta.cli.run_command`).

    .venv/bin/python benchmarks/transfer_suite.py [--smoke] [--resume] [--output-dir DIR]
        [--tracking-uri URI]
"""

from __future__ import annotations

import argparse
import sys

from raymeta.cli import run_command
from raymeta.config import PipelineConfig, load_yaml, parse
from raymeta.pipelines import find_pipeline


def smoke(data: dict) -> dict:
    """The suite shrunk to minutes (same tasks, same code paths)."""
    data["meta_train"]["task"].update(epochs=1, train_subset=3000, val_size=500, meta_per_class=20)
    suite = data["suite"]
    suite["search"].update(trials_per_family=2)
    suite["seeds"] = 1
    suite["smoke"] = True
    for t in suite["tasks"]:
        t["task"].update(epochs=2)
        if t["task"]["dataset"] != "digits":
            t["task"].update(train_subset=1500, val_size=500)
    return data


def run(args: argparse.Namespace) -> None:
    """The suite of ``args.config``, shrunk with ``args.smoke``, with the output folder and
    tracking store given (else the pipeline's).

    Raises:
        RaymetaError: a bad config or input (one line).
    """
    from raymeta.pipeline import run_pipeline

    path = find_pipeline(args.config)
    data = load_yaml(path)
    if args.smoke:
        data = smoke(data)
    if args.output_dir:
        data["output_dir"] = args.output_dir
    if args.tracking_uri:
        data.setdefault("mlflow", {})["tracking_uri"] = args.tracking_uri
    run_pipeline(parse(PipelineConfig, data, str(path)), resume=args.resume)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="transfer_suite.yaml")
    p.add_argument("--smoke", action="store_true", help="shrink every task to check the plumbing")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run (each task's comparison; meta-training runs again)",
    )
    p.add_argument("--output-dir")
    p.add_argument("--tracking-uri")
    args = p.parse_args(argv)
    return run_command(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
