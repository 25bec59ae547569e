"""The command line as a user meets it: fast help, one-line errors for bad configs."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RAYMETA = [sys.executable, "-m", "raymeta.cli"]


def run(*args, cwd=ROOT):
    return subprocess.run([*RAYMETA, *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_help_is_fast():
    t0 = time.perf_counter()
    res = run("--help")
    assert res.returncode == 0 and "quickstart" in res.stdout
    assert time.perf_counter() - t0 < 2.0


@pytest.mark.parametrize(
    ("patch", "expected"),
    [
        ("meta_train:\n  task:\n    epochz: 3\n", "meta_train.task.epochz: unknown key"),
        (
            "meta_train:\n  task:\n    epochs: -1\n",
            "meta_train.task.epochs: Input should be greater than 0 (got -1)",
        ),
        (
            "meta_train:\n  task:\n    batch_size: 0\n",
            "meta_train.task.batch_size: Input should be greater than 0 (got 0)",
        ),
        (
            "meta_train:\n  task:\n    epochs: many\n",
            "meta_train.task.epochs: Input should be a valid integer",
        ),
        (
            "meta_train:\n  task:\n    meta_per_class: 7000\n",
            "meta_per_class=7000 is larger than class 'T-shirt/top' (6000 training images)",
        ),
        (
            "transfer:\n  methods:\n    - {schedule: stepwise, lr: 0.1}\n",
            "unknown schedule 'stepwise'; accepted: mlrsnet, fixed",
        ),
    ],
)
def test_bad_config_is_one_line_error(tmp_path, patch, expected):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(f"name: bad\noutput_dir: {tmp_path}/out\n{patch}")
    res = run("run", str(cfg), cwd=tmp_path)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("raymeta: error: ") and expected in lines[0], (
        res.stderr
    )


def test_missing_pipeline_file_lists_the_shipped_pipelines(tmp_path):
    res = run("run", "nope.yaml", cwd=tmp_path)
    assert res.returncode == 2 and res.stderr.strip() == (
        "raymeta: error: pipeline file nope.yaml not found, and raymeta ships no pipeline of "
        "that name; shipped: compare_fashion.yaml, mfm_cifar_lt.yaml, mfm_design_search.yaml, "
        "mfm_fashion_lt.yaml, mfm_fashion_lt_if100.yaml, mfm_fashion_lt_reference.yaml, "
        "mlrsnet_paper.yaml, quickstart.yaml, transfer_study.yaml, transfer_study_paper.yaml, "
        "transfer_suite.yaml"
    )


def test_shipped_pipeline_runs_by_name_from_any_folder(tmp_path):
    """``raymeta run NAME.yaml`` in a folder without it reads the shipped pipeline: here the
    CIFAR-10 one, which stops at its first data check (no CIFAR files in the test's cache)."""
    env = {k: v for k, v in os.environ.items() if k != "RAYMETA_DATA_DIR"}
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    res = subprocess.run(
        [*RAYMETA, "run", "mlrsnet_paper.yaml"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120,
    )  # fmt: skip
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.startswith(
        f"raymeta: error: cifar10 not found under {tmp_path}/cache/raymeta/cifar "
    )
