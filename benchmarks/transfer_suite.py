"""The transfer suite: does the frozen learned schedule beat the best searched hand-designed
schedule on tasks it was not meta-trained on? (issue 10 item 7)

Runs ``raymeta/pipelines/transfer_suite.yaml`` (or ``--config FILE``): meta-training, then a
schedule comparison on each task; prints per task the learned row and the best searched family
(chosen on validation) as mean +- std over seeds, the difference, the family's search compute,
and a verdict, then the suite's target line. ``--smoke`` shrinks every task (1,500 training
images, 2 epochs, 2 trials per family, 1 seed, 1 meta-training epoch) to check the plumbing in
minutes; its numbers mean nothing.

    .venv/bin/python benchmarks/transfer_suite.py [--smoke] [--output-dir DIR] [--tracking-uri URI]
"""

from __future__ import annotations

import argparse
import sys

from raymeta.config import PipelineConfig, load_yaml, parse
from raymeta.errors import RaymetaError
from raymeta.pipelines import find_pipeline


def smoke(data: dict) -> dict:
    """The suite shrunk to minutes (same tasks, same code paths)."""
    data["meta_train"]["task"].update(epochs=1, train_subset=3000, val_size=500, meta_per_class=20)
    suite = data["suite"]
    suite["search"].update(trials_per_family=2)
    suite["seeds"] = 1
    for t in suite["tasks"]:
        t["task"].update(epochs=2)
        if t["task"]["dataset"] != "digits":
            t["task"].update(train_subset=1500, val_size=500)
    return data


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="transfer_suite.yaml")
    p.add_argument("--smoke", action="store_true", help="shrink every task to check the plumbing")
    p.add_argument("--output-dir")
    p.add_argument("--tracking-uri")
    args = p.parse_args(argv)
    from raymeta.pipeline import run_pipeline

    try:
        path = find_pipeline(args.config)
        data = load_yaml(path)
        if args.smoke:
            data = smoke(data)
        if args.output_dir:
            data["output_dir"] = args.output_dir
        if args.tracking_uri:
            data.setdefault("mlflow", {})["tracking_uri"] = args.tracking_uri
        run_pipeline(parse(PipelineConfig, data, str(path)))
    except RaymetaError as exc:
        print(f"raymeta: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
