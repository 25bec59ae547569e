"""The MLflow UI as a user sees it, in a real browser: a tiny comparison (digits, MLP, 2 epochs,
two searched families and a registered MLR-SNet) into a fresh store, ``raymeta ui`` on it, and
headless Chromium (Debian's ``chromium``, driven by playwright) clicking through the steps the
README gives: the "Model training" runs, a filter on ``tags.method`` or ``tags.stage``, Group by
``method``, the chart view. What is asserted is read from the page (table rows, chart legends,
the chart's plotted points); MLflow's REST API only cross-checks it.

Set ``RAYMETA_SCREENSHOT=docs/img/compare_lr.png`` to keep the screenshot of the ``lr`` chart
that the README shows."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
import torch

from raymeta.config import PipelineConfig, parse
from raymeta.pipeline import run_pipeline
from raymeta.schedules import MLRSNet, MLRSNetBundle
from raymeta.tracking import log_meta_learner, setup

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = [
    pytest.mark.ray,
    pytest.mark.skipif(
        not Path(CHROMIUM).exists(),
        reason="chromium is not installed (Debian package 'chromium'; setup.sh installs it as root)",
    ),
]
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')"
)

EPOCHS = 2
METHODS = ["MLR-SNet (Test)", "cosine", "multistep"]
COLOURS = ["#8a63bf", "#137dae", "#de7921"]  # one per group, for the screenshot


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rest(base: str, path: str, body: dict | None = None) -> dict:
    """MLflow's REST API (the cross-check of what the page shows)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        f"{base}/api/2.0/mlflow/{path}", data=data, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def _wait_healthy(base: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"raymeta ui exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=5) as response:
                if response.read().strip() == b"OK":
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"raymeta ui did not answer in {timeout:.0f} s: {log.read_text()[-2000:]}")


@pytest.fixture(scope="module")
def comparison_ui(ray_local, tmp_path_factory, new_store):
    """A finished tiny comparison and ``raymeta ui`` serving its store: yields
    ``(base_url, experiment_id)``."""
    root = tmp_path_factory.mktemp("ui")
    uri, experiment_id = setup(new_store(root / "mlflow.db"), "ui-compare")
    torch.manual_seed(0)
    with mlflow.start_run(experiment_id=experiment_id, run_name="register-tiny-mlrsnet"):
        log_meta_learner(MLRSNetBundle([MLRSNet().state_dict()], [1]), "tiny-mlrsnet", "champion")
    port, log = _free_port(), root / "ui.log"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # GenAI job workers
    with open(log, "w") as out:  # the server starts while the comparison runs
        proc = subprocess.Popen(
            [sys.executable, "-m", "raymeta.cli", "ui", "--tracking-uri", uri, "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    try:
        cfg = {
            "name": "ui-compare",
            "output_dir": str(root / "out"),
            "mlflow": {"experiment": "ui-compare", "tracking_uri": uri},
            "compare": {
                "task": {
                    "dataset": "digits",
                    "model": "mlp",
                    "batch_size": 32,
                    "epochs": EPOCHS,
                    "val_size": 300,
                    "meta_per_class": 0,
                },
                "search": {
                    "families": ["multistep", "cosine"],
                    "trials_per_family": 1,
                    "max_concurrent": 2,
                    "seed": 7,
                    "ranges": {"multistep": {"lr": [0.1, 0.5]}, "cosine": {"lr": [0.05, 0.5]}},
                },
                "seeds": 1,
                "learned": [
                    {
                        "name": "MLR-SNet (Test)",
                        "schedule": "mlrsnet",
                        "model_uri": "models:/tiny-mlrsnet@champion",
                    }
                ],
            },
        }
        run_pipeline(parse(PipelineConfig, cfg, "ui-compare"), ["compare"])
        base = f"http://127.0.0.1:{port}"
        _wait_healthy(base, proc, log)
        yield base, experiment_id
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        mlflow.set_tracking_uri(None)


def _open_runs(page, base: str, experiment_id: str) -> None:
    """The experiment's page, "Model training", its runs (the UI opens in the GenAI view)."""
    page.goto(f"{base}/#/experiments/{experiment_id}")
    page.get_by_text("Model training", exact=True).wait_for()
    got_it = page.get_by_role("button", name="Got it")  # a first-visit hint over the page
    with contextlib.suppress(sync_api.TimeoutError):  # when it is not shown
        got_it.click(timeout=10_000)
    page.get_by_text("Model training", exact=True).click()
    page.locator("input[data-testid=search-box]").wait_for()
    close = page.get_by_role("button", name="Close")  # the assistant's side panel
    if close.count() and close.first.is_visible():
        close.first.click()


def _filter(page, expression: str) -> None:
    box = page.locator("input[data-testid=search-box]")
    box.fill(expression)
    box.press("Enter")
    page.wait_for_function(
        "e => document.querySelector('input[data-testid=search-box]').value === e", arg=expression
    )
    page.wait_for_timeout(1500)


def _group_by_method(page) -> None:
    page.get_by_role("button", name="Group by").click()
    page.get_by_role("menuitemcheckbox").filter(has_text="method").first.click()
    page.keyboard.press("Escape")
    page.get_by_text("Group: ", exact=False).first.wait_for()


def _grouped_rows(page) -> dict[str, list[str]]:
    """The runs table as shown: group name -> the run names listed under it (collapsed
    groups list none)."""
    rows = page.evaluate(
        """() => [...document.querySelectorAll('.ag-pinned-left-cols-container .ag-row')]
            .sort((a, b) => a.getBoundingClientRect().top - b.getBoundingClientRect().top)
            .map(r => r.innerText.split('\\n').map(s => s.trim()).filter(Boolean))"""
    )
    groups: dict[str, list[str]] = {}
    current = None
    for cells in rows:
        group = next((c for c in cells if c.startswith("Group: ") or c == "Additional runs"), None)
        if group is not None:
            current = group.removeprefix("Group: ")
            groups[current] = []
        elif current is not None:
            groups[current] += [c for c in cells if "/" in c]
    return groups


def test_compare_schedules_in_the_mlflow_ui(comparison_ui, tmp_path):
    base, experiment_id = comparison_ui
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.set_default_timeout(30_000)
        _open_runs(page, base, experiment_id)

        # a filter on tags.method finds exactly that method's runs: its search trial and
        # its final run (the stage runs above them are listed apart, as "Additional runs")
        _filter(page, "tags.method = 'cosine'")
        _group_by_method(page)
        groups = _grouped_rows(page)
        assert sorted(groups) == ["Additional runs", "cosine"], groups
        assert sorted(groups["cosine"]) == ["final/cosine/seed0", "search/cosine/trial0"]
        found = _rest(
            base,
            "runs/search",
            {"experiment_ids": [experiment_id], "filter": "tags.method = 'cosine'"},
        )["runs"]
        assert sorted(r["info"]["run_name"] for r in found) == sorted(groups["cosine"])

        # the final runs, one group per method; every run name shows its method
        _filter(page, "tags.stage = 'final'")
        groups = _grouped_rows(page)
        assert sorted(g for g in groups if g != "Additional runs") == sorted(METHODS), groups
        for method in METHODS:
            assert groups[method] == [f"final/{method}/seed0"]

        # distinct colours per group (MLflow derives them from a hash; two may coincide)
        swatches = page.locator(".ag-pinned-left-cols-container input[type=color]")
        for i in range(min(swatches.count(), len(COLOURS))):
            swatches.nth(i).fill(COLOURS[i], force=True)  # the swatch hides its input

        # the chart view: the lr chart has one line per method, with a point per step
        page.locator("label:has(input[value=CHART])").click()
        page.get_by_placeholder("Search metric charts").fill("lr")
        card = page.locator("h4[title=lr]").locator(
            "xpath=ancestor::*[.//*[contains(@class,'js-plotly-plot')]][1]"
        )
        card.locator(".js-plotly-plot").wait_for()
        page.wait_for_timeout(1500)
        legend = [t.strip() for t in card.locator("text=(lr)").all_inner_texts()]
        assert sorted(e for e in legend if not e.startswith("Unassigned")) == sorted(
            f"{m} (lr)" for m in METHODS
        ), legend
        traces = card.locator(".js-plotly-plot").evaluate(
            """el => el.data.filter(t => t.line && t.line.color !== 'transparent')
                .map(t => ({x: Array.from(t.x || []), y: Array.from(t.y || [])}))"""
        )
        lines = {tuple(t["y"]): t["x"] for t in traces if len(t["x"]) > EPOCHS}
        assert len(lines) == len(METHODS), len(lines)  # one line per method
        steps = {len(x) for x in lines.values()}
        assert min(steps) > 10 * EPOCHS  # the LR of every step, not one point per epoch

        # the plotted multistep line is the run's logged LR, and shows its drops
        final = _rest(
            base,
            "runs/search",
            {
                "experiment_ids": [experiment_id],
                "filter": "tags.method = 'multistep' and tags.stage = 'final'",
            },
        )["runs"][0]
        history = _rest(
            base,
            f"metrics/get-history?run_id={final['info']['run_id']}&metric_key=lr&max_results=5000",
        )["metrics"]
        logged = tuple(m["value"] for m in sorted(history, key=lambda m: m["step"]))
        plotted = next(
            y for y in lines if tuple(round(v, 9) for v in y) == tuple(round(v, 9) for v in logged)
        )
        assert len(set(plotted)) >= 2  # its drops, at fractions of the run

        shot = Path(os.environ.get("RAYMETA_SCREENSHOT") or tmp_path / "compare_lr.png")
        shot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(shot))
        assert shot.stat().st_size > 20_000
        browser.close()
