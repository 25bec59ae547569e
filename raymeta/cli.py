"""The ``raymeta`` command. Heavy imports (torch, Ray, MLflow) happen inside the subcommands so
that ``raymeta --help`` answers at once."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from raymeta.errors import RaymetaError
from raymeta.pipelines import find_pipeline


def _run(args) -> None:
    from raymeta.config import load_pipeline
    from raymeta.pipeline import run_pipeline

    run_pipeline(_override(load_pipeline(find_pipeline(args.file)), args), resume=args.resume)


def _section(args) -> None:
    """``raymeta compare`` / ``raymeta study``: one section of a pipeline file."""
    from raymeta.config import load_pipeline
    from raymeta.pipeline import run_pipeline

    cfg = _override(load_pipeline(find_pipeline(args.file)), args)
    run_pipeline(cfg, [args.section], resume=args.resume)


def _report(args) -> None:
    from raymeta.tune.study import read_results, write_report

    source = args.dir if "://" in args.dir else str(Path(args.dir) / "results")
    if "://" not in args.dir and not Path(source).is_dir():
        source = args.dir
    table = read_results(source) if "://" in source or Path(source).is_dir() else None
    if table is None or table.empty:
        raise RaymetaError(f"no study results (Parquet rows) found in {args.dir}")
    out = Path(args.out or (args.dir if "://" not in args.dir else "report"))
    paths = write_report(table, out)
    print((out / "report.md").read_text())
    print(f"{len(table)} rows; wrote {', '.join(str(p) for p in paths)}")


def _override(cfg, args):
    """Apply the common flags (output dir, tracking URI, Ray address) to a pipeline config."""
    update = {}
    if getattr(args, "output_dir", None):
        update["output_dir"] = args.output_dir
    mlflow = _given(args, ["tracking_uri", "allow_pickle"])
    if mlflow:
        update["mlflow"] = cfg.mlflow.model_copy(update=mlflow)
    if getattr(args, "address", None):
        update["ray"] = cfg.ray.model_copy(update={"address": args.address})
    return cfg.model_copy(update=update)


def _given(args, keys) -> dict:
    """The flags among ``keys`` given on the command line (the others keep the config's
    defaults)."""
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}


TASK_FLAGS = ("dataset", "model", "batch_size", "epochs", "momentum", "train_subset", "seed")


def _ray(args) -> dict:
    return _given(args, ["use_gpu"]) | (
        {"num_workers": args.workers} if args.workers is not None else {}
    )


def _meta_train(args) -> None:
    from raymeta.config import PipelineConfig, parse
    from raymeta.pipeline import run_pipeline

    data = {
        "name": "meta-train",
        "output_dir": args.output_dir or "outputs/meta-train",
        "ray": _ray(args),
        "mlflow": _given(args, ["experiment"]),
        "meta_train": {"task": _given(args, TASK_FLAGS)}
        | _given(args, ["meta_every", "registered_model", "alias"]),
    }
    run_pipeline(_override(parse(PipelineConfig, data, "meta-train"), args))


def _transfer(args) -> None:
    from raymeta.config import PipelineConfig, TransferConfig, parse
    from raymeta.pipeline import run_pipeline

    methods = [{"name": "MLR-SNet", "schedule": "mlrsnet", "model_uri": args.model_uri}]
    for spec in args.baseline:
        family, _, lr = spec.partition(":")
        try:
            methods.append({"schedule": family, "lr": float(lr or 0.1)})
        except ValueError:
            raise RaymetaError(
                f"--baseline {spec!r}: expected FAMILY:LR, e.g. multistep:0.1"
            ) from None
    task = _config_default(TransferConfig, "task").model_dump() | _given(args, TASK_FLAGS)
    data = {
        "name": "transfer",
        "output_dir": args.output_dir or "outputs/transfer",
        "ray": _ray(args),
        "mlflow": _given(args, ["experiment"]),
        "transfer": {"task": task, "methods": methods},
    }
    run_pipeline(_override(parse(PipelineConfig, data, "transfer"), args))


def _import_reference(args) -> None:
    from raymeta.config import check_alias, check_registered_model_name

    for flag, check, value in (
        ("--registered-model", check_registered_model_name, args.registered_model),
        ("--alias", check_alias, args.alias),
    ):
        try:
            check(value)
        except ValueError as exc:
            raise RaymetaError(f"{flag}: {exc}") from None
    import mlflow  # once the names are checked: a refusal needs neither MLflow nor torch
    import torch

    from raymeta.schedules.reference import load_reference
    from raymeta.session import nested_run
    from raymeta.tracking import log_meta_learner, setup

    bundle = load_reference(args.dir, args.layout)
    source = args.dir or "the checkpoints shipped with raymeta"
    _, experiment_id = setup(args.tracking_uri, args.experiment)
    with nested_run(experiment_id=experiment_id, run_name="import-reference"):
        mlflow.log_params({"layout": args.layout, "dir": str(source)})
        version = log_meta_learner(bundle, args.registered_model, args.alias)
    losses = [2.3, 1.5, 1.0, 0.6, 0.3]
    units = [f"{u:.4f}" for u in bundle(torch.tensor(losses)).tolist()]
    print(
        f"registered {args.registered_model} version {version} (alias {args.alias}) from {source}"
    )
    print(f"unit LR (before gamma) of the last checkpoint on losses {losses}: {units}")
    print(f"use it with model_uri: models:/{args.registered_model}@{args.alias}")


LONGTAIL_TASK_FLAGS = (
    "dataset",
    "model",
    "profile",
    "class_order",
    "order_seed",
    "n_max",
    "meta_per_class",
    "epochs",
    "batch_size",
)
TRANSFER_IMBALANCE_FACTOR = 50.0  # `mfm transfer`: a milder tail than meta-training's


def _mfm(args) -> None:
    """``raymeta mfm train|transfer``: a pipeline with a ``longtail`` section
    (:mod:`raymeta.longtail_study`)."""
    from raymeta.config import DEFAULT_LONGTAIL_SCHEDULE, PipelineConfig, parse
    from raymeta.pipeline import run_pipeline

    section = _given(args, ["seeds"])
    if args.lr is not None:
        section["schedule"] = DEFAULT_LONGTAIL_SCHEDULE | {"lr": args.lr}
    task = _given(args, LONGTAIL_TASK_FLAGS)
    if args.mfm_command == "train":
        mfm_params = _given(args, ["meta_every", "lookahead"])
        section |= {
            "task": task,
            "methods": [
                {"method": m, "params": mfm_params if m.startswith("mfm_") else {}}
                for m in args.methods
            ],
        } | _given(args, ["registered_model", "alias"])
        if args.imbalance_factor:
            section["imbalance_factors"] = args.imbalance_factor
    else:
        factors = args.imbalance_factor or [TRANSFER_IMBALANCE_FACTOR]
        task = {"meta_per_class": 0} | task | {"imbalance_factor": factors[0]}
        section["transfer"] = [
            {
                "name": f"{task.get('dataset', _default_longtail('dataset'))}-LT",
                "task": task,
                "model_uri": args.model_uri,
                "baselines": [{"method": m} for m in args.baselines],
            }
        ]
    data = {
        "name": f"mfm-{args.mfm_command}",
        "output_dir": args.output_dir or f"outputs/mfm-{args.mfm_command}",
        "ray": _ray(args),
        "mlflow": {"experiment": args.experiment},
        "longtail": section,
    }
    run_pipeline(_override(parse(PipelineConfig, data, f"mfm {args.mfm_command}"), args))


def _config_default(model, name: str):
    """The default of field ``name`` of config model ``model``: what the CLI falls back to and
    states in its help, never written twice."""
    return model.model_fields[name].get_default(call_default_factory=True)


def _default_longtail(name: str):
    from raymeta.config import LongTailTaskConfig

    return _config_default(LongTailTaskConfig, name)


def _choices(model, name: str) -> str:
    """A ``Literal`` field's accepted values, as ``a | b | c``."""
    import typing

    return " | ".join(typing.get_args(model.model_fields[name].annotation))


def _add_mfm(sub) -> None:
    from raymeta.config import DEFAULT_LONGTAIL_SCHEDULE, LongTailStudyConfig, LongTailTaskConfig

    def d(name):
        return _config_default(LongTailTaskConfig, name)

    study = {
        k: _config_default(LongTailStudyConfig, k) for k in ("seeds", "registered_model", "alias")
    }
    mfm = sub.add_parser(
        "mfm", help="long-tailed recognition: MFM and baselines, register and transfer a modulator"
    )
    commands = mfm.add_subparsers(dest="mfm_command", required=True)
    train = commands.add_parser(
        "train", help="train MFM and baselines on a long-tailed task; register the modulator"
    )
    transfer = commands.add_parser(
        "transfer", help="train a classifier with a registered modulator, frozen (no meta set)"
    )
    warmup = DEFAULT_LONGTAIL_SCHEDULE["params"]["warmup_fraction"]
    for p in (train, transfer):
        p.add_argument(
            "--dataset",
            help=f"{_choices(LongTailTaskConfig, 'dataset')} (default {d('dataset')})",
        )
        p.add_argument("--model", help=f"backbone (default {d('model')}; resnet32 for CIFAR)")
        p.add_argument(
            "--imbalance-factor",
            type=float,
            nargs="+",
            metavar="IF",
            help=f"head/tail ratio(s) >= 1 (default: train {d('imbalance_factor'):g}, "
            f"transfer {TRANSFER_IMBALANCE_FACTOR:g})",
        )
        p.add_argument(
            "--profile", help=f"{_choices(LongTailTaskConfig, 'profile')} (default {d('profile')})"
        )
        p.add_argument(
            "--class-order",
            help=f"{_choices(LongTailTaskConfig, 'class_order')} (default {d('class_order')})",
        )
        p.add_argument(
            "--order-seed", type=int, help="seed of the class permutation (default: the run's seed)"
        )
        p.add_argument(
            "--n-max",
            type=int,
            help="head-class size (default: the smallest class after the meta set; smaller: quicker)",
        )
        p.add_argument(
            "--meta-per-class",
            type=int,
            help=f"balanced meta images per class (default: train {d('meta_per_class')}, "
            "transfer 0 = no meta set)",
        )
        p.add_argument("--epochs", type=int, help=f"epochs (default {d('epochs')})")
        p.add_argument(
            "--batch-size", type=int, help=f"global batch size (default {d('batch_size')})"
        )
        p.add_argument(
            "--lr",
            type=float,
            help=f"peak LR (default {DEFAULT_LONGTAIL_SCHEDULE['lr']}; linear warm-up over "
            f"{warmup:.0%} of the steps, then cosine)".replace("%", "%%"),
        )
        p.add_argument(
            "--seeds",
            type=int,
            nargs="+",
            help=f"seeds (default {' '.join(map(str, study['seeds']))})",
        )
        _add_ray_flags(p)
        p.add_argument(
            "--experiment", default="raymeta-mfm", help="MLflow experiment (default raymeta-mfm)"
        )
        _add_common(p)
        p.set_defaults(func=_mfm)
    train.add_argument(
        "--methods",
        nargs="+",
        default=["mfm_direct", "mfm_network", "ce"],
        help="long-tail methods to train (default: mfm_direct mfm_network ce); an unknown name "
        "is refused with the list of accepted ones",
    )
    train.add_argument(
        "--meta-every",
        type=int,
        help="MFM: a look-ahead meta step every K steps (default: the method's own)",
    )
    train.add_argument(
        "--lookahead", help="MFM look-ahead: fast | exact (default: the method's own)"
    )
    train.add_argument(
        "--registered-model",
        help=f"registry name of the modulator network (default {study['registered_model']})",
    )
    train.add_argument("--alias", help=f"alias set on the new version (default {study['alias']})")
    uri = f"models:/{study['registered_model']}@{study['alias']}"
    transfer.add_argument(
        "--model-uri",
        default=uri,
        help=f"registered modulator (default {uri}, what `raymeta mfm train` registers)",
    )
    transfer.add_argument(
        "--baselines", nargs="*", default=["ce"], help="methods trained beside it (default ce)"
    )


def _ui(args) -> None:
    """``raymeta ui``: the MLflow UI on 127.0.0.1, started with this interpreter
    (``sys.executable -m mlflow``), so it works from a venv that is not activated."""
    from raymeta.tracking import resolve_tracking_uri

    if args.workers < 1:
        raise RaymetaError(f"--workers {args.workers}: expected an integer >= 1")
    uri = resolve_tracking_uri(args.tracking_uri)
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        uri,
        "--host",
        "127.0.0.1",
        "--port",
        str(args.port),
        "--workers",
        str(args.workers),
    ]
    print(" ".join(cmd), flush=True)
    os.execv(cmd[0], cmd)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--output-dir",
        help="where tables and plots go (default: the pipeline's output_dir; for `mfm train` / "
        "`mfm transfer`: outputs/mfm-train, outputs/mfm-transfer)",
    )
    p.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or ./mlflow.db)"
    )
    p.add_argument(
        "--address", help="Ray address of an existing cluster (default: $RAY_ADDRESS or local)"
    )
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        default=None,
        help="also load registered meta-learners stored as pickles by an older raymeta "
        "(runs code from the store: only for stores you trust)",
    )


def _add_resume(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--resume",
        action="store_true",
        help=f"continue {what}; the config may change only as the error line says",
    )


def _add_ray_flags(p: argparse.ArgumentParser) -> None:
    from raymeta.config import RayConfig

    p.add_argument(
        "--workers",
        type=int,
        help="Ray Train data-parallel workers "
        f"(default {_config_default(RayConfig, 'num_workers')})",
    )
    p.add_argument("--use-gpu", action="store_true", default=None, help="one GPU per worker (NCCL)")


def _add_task(p: argparse.ArgumentParser, task) -> None:
    """Flags of a command's task; ``task``: the config's default task of that command."""
    from raymeta.config import MlflowConfig, TaskConfig

    p.add_argument("--dataset", help=f"{_choices(TaskConfig, 'dataset')} (default {task.dataset})")
    p.add_argument("--model", help=f"model registry name (default {task.model})")
    p.add_argument("--epochs", type=int, help=f"epochs (default {task.epochs})")
    p.add_argument("--batch-size", type=int, help=f"global batch size (default {task.batch_size})")
    p.add_argument("--momentum", type=float, help=f"SGD momentum (default {task.momentum:g})")
    p.add_argument("--train-subset", type=int, help="cap the training split (for quick runs)")
    p.add_argument("--seed", type=int, help=f"seed (default {task.seed})")
    _add_ray_flags(p)
    experiment = _config_default(MlflowConfig, "experiment")
    p.add_argument("--experiment", help=f"MLflow experiment name (default {experiment})")
    _add_common(p)


def build_parser() -> argparse.ArgumentParser:
    from raymeta.config import MetaTrainConfig, MlflowConfig, TransferConfig

    parser = argparse.ArgumentParser(
        prog="raymeta",
        description="Meta-train learned LR schedules (MLR-SNet) on Ray, register them in MLflow, transfer them.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "quickstart", help="run the shipped quickstart.yaml pipeline (about 5 minutes on 2 CPUs)"
    )
    _add_resume(
        p,
        "an interrupted quickstart: its comparison resumes, a finished meta-training's "
        "registered version is reused, the other stages rerun",
    )
    _add_common(p)
    p.set_defaults(func=_run, file="quickstart.yaml")

    p = sub.add_parser("run", help="run a pipeline YAML file")
    p.add_argument("file", help="pipeline file, or the name of a shipped one, e.g. quickstart.yaml")
    _add_resume(
        p,
        "an interrupted pipeline: compare, study and suite resume, a finished meta-training's "
        "registered version is reused, the others rerun",
    )
    _add_common(p)
    p.set_defaults(func=_run)

    p = sub.add_parser(
        "compare",
        help="search hand-designed schedules (Ray Tune + Optuna) and compare with learned ones",
    )
    p.add_argument(
        "file", help="pipeline with a 'compare' section, e.g. compare_fashion.yaml (shipped)"
    )
    _add_resume(
        p,
        "an interrupted comparison (finished trials are kept; a larger "
        "search.trials_per_family runs only the missing trials)",
    )
    _add_common(p)
    p.set_defaults(func=_section, section="compare")

    p = sub.add_parser(
        "study", help="run a transfer study (a grid of tasks) as one Ray Tune experiment"
    )
    p.add_argument(
        "file", help="pipeline with a 'study' section, e.g. transfer_study.yaml (shipped)"
    )
    _add_resume(
        p, "an interrupted study (finished tasks are kept; a grown grid runs only the new tasks)"
    )
    _add_common(p)
    p.set_defaults(func=_section, section="study")

    p = sub.add_parser(
        "report", help="render a study's Parquet results as Markdown pivot tables and plots"
    )
    p.add_argument(
        "dir", help="the study's output_dir (or its results location, e.g. s3://bucket/study)"
    )
    p.add_argument("--out", help="where to write report.md and the PNGs (default: DIR)")
    p.set_defaults(func=_report)

    meta = {
        k: _config_default(MetaTrainConfig, k)
        for k in ("task", "meta_every", "registered_model", "alias")
    }
    p = sub.add_parser("meta-train", help="meta-train MLR-SNet and register it in MLflow")
    _add_task(p, meta["task"])
    p.add_argument(
        "--meta-every",
        "--t-val",
        type=int,
        help=f"a look-ahead meta step every K optimisation steps (default {meta['meta_every']})",
    )
    p.add_argument(
        "--registered-model",
        help=f"MLflow registered model name (default {meta['registered_model']})",
    )
    p.add_argument("--alias", help=f"alias set on the new version (default {meta['alias']})")
    p.set_defaults(func=_meta_train)

    p = sub.add_parser(
        "transfer", help="train a task with a frozen registered MLR-SNet (and baselines)"
    )
    uri = f"models:/{meta['registered_model']}@{meta['alias']}"
    p.add_argument(
        "--model-uri",
        default=uri,
        help=f"registered meta-learner (default {uri}, what `raymeta meta-train` registers)",
    )
    p.add_argument(
        "--baseline",
        action="append",
        default=[],
        metavar="FAMILY:LR",
        help="also train with a hand-designed schedule, e.g. multistep:0.1 (repeatable)",
    )
    _add_task(p, _config_default(TransferConfig, "task"))
    p.set_defaults(func=_transfer)

    p = sub.add_parser(
        "import-reference", help="import and register the released MLR-SNet checkpoints"
    )
    p.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="folder with mlr_snet_{1,100,200}.pth (default: the copies shipped with raymeta)",
    )
    p.add_argument("--layout", default="meta-test", help="meta-test (released files) | meta-train")
    p.add_argument("--registered-model", default="mlrsnet-reference")
    p.add_argument("--alias", default="reference")
    p.add_argument("--experiment", default=_config_default(MlflowConfig, "experiment"))
    p.add_argument("--tracking-uri")
    p.set_defaults(func=_import_reference)

    _add_mfm(sub)

    from raymeta.jobs import add_job_commands

    add_job_commands(sub)

    p = sub.add_parser("ui", help="start the MLflow UI on 127.0.0.1 for the local store")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument(
        "--tracking-uri", help="MLflow store (default $MLFLOW_TRACKING_URI or ./mlflow.db)"
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="server worker processes (default 1: several keep restarting on a loaded machine)",
    )
    p.set_defaults(func=_ui)
    return parser


INTERRUPTED = 130  # the exit status of a command stopped by Ctrl+C (128 + SIGINT) or SIGTERM


def interrupted_line(exc: KeyboardInterrupt) -> str:
    """What an interrupted command prints last: the resume hint only when ``--resume`` would
    continue it (a pipeline's :class:`~raymeta.interrupts.Interrupted` says so)."""
    from raymeta.interrupts import Interrupted

    if not isinstance(exc, Interrupted):
        return "raymeta: interrupted"
    if exc.resumable:
        return "raymeta: interrupted; resume with --resume"
    return "raymeta: interrupted; nothing saved to resume; run the command again to start over"


def run_command(command: Callable[[], None]) -> int:
    """Run ``command`` as every raymeta command line runs (``raymeta`` and the benchmarks):
    MLflow logs warnings only, SIGTERM is handled as Ctrl+C.

    Returns the exit status: 0 done; 2 after printing a :class:`RaymetaError` as one line
    ``raymeta: error: ...`` (bad input, nothing of earlier work lost); 130 (:data:`INTERRUPTED`)
    after Ctrl+C or SIGTERM, printing :func:`interrupted_line` (the command stops whole, its
    Ray shut down, its MLflow runs KILLED).
    """
    from raymeta.interrupts import sigterm_as_sigint

    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # no store-creation chatter
    try:
        with sigterm_as_sigint():
            command()
    except RaymetaError as exc:
        print(f"raymeta: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(interrupted_line(exc), file=sys.stderr, flush=True)
        return INTERRUPTED
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run one command (:func:`run_command`: exit status 0, 2 or 130)."""
    args = build_parser().parse_args(argv)
    return run_command(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
