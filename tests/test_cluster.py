"""cluster/: Ray's own validation of the launcher YAML and KubeRay manifests, the runtime_env,
raymeta.jobs without a cluster, and real Ray jobs on a local two-node cluster (head and worker,
each its own `ray start` process on 127.0.0.1, in their own process groups and temp dirs)."""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import pytest
import yaml

from raymeta import jobs
from raymeta.errors import ConfigError, RaymetaError
from raymeta.pipelines import packaged_pipelines

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
PINS = {
    "torch==2.14.1",
    "torchvision==0.29.1",
    "ray[default,tune,train]==2.60.0",
    "optuna==5.0.0",
    "mlflow==3.17.2",
}

# Field names of the KubeRay ray.io/v1 types (ray-operator/apis/ray/v1/*_types.go, KubeRay
# v1.5+ for authOptions): a typo in a manifest would be silently dropped by the API server.
RAYJOB_SPEC = {
    "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate",
    "metadata", "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy",
    "entrypoint", "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources",
    "entrypointNumCpus", "entrypointNumGpus", "ttlSecondsAfterFinished",
    "shutdownAfterJobFinishes", "suspend", "schedule",
}  # fmt: skip
RAYCLUSTER_SPEC = {
    "headGroupSpec", "workerGroupSpecs", "rayVersion", "enableInTreeAutoscaling",
    "autoscalerOptions", "headServiceAnnotations", "suspend", "authOptions",
    "gcsFaultToleranceOptions", "managedBy", "upgradeStrategy",
}  # fmt: skip
HEAD_GROUP = {"serviceType", "headService", "enableIngress", "rayStartParams", "template"}
WORKER_GROUP = {
    "groupName", "replicas", "minReplicas", "maxReplicas", "numOfHosts", "rayStartParams",
    "template", "scaleStrategy", "idleTimeoutSeconds", "suspend",
}  # fmt: skip


def load(path: Path):
    return yaml.safe_load(path.read_text())


def pins_of(packages) -> set[str]:
    return {p for p in packages if "==" in p}


# --- cluster launcher --------------------------------------------------------------------


def test_cluster_launcher_yaml_passes_ray_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = load(CLUSTER / "gpu-cluster.yaml")
    config = prepare_config(copy.deepcopy(raw))  # what `ray up` does before provider calls
    validate_config(config)  # Ray's JSON schema (ray-schema.json) and cross-field checks
    assert config["head_node_type"] == "head" and config["max_workers"] == 4
    gpu = config["available_node_types"]["gpu_worker"]
    assert gpu["resources"] == {"CPU": 8, "GPU": 1} and (
        gpu["min_workers"],
        gpu["max_workers"],
    ) == (1, 4)
    assert config["docker"]["image"] == "rayproject/ray:2.60.0-py311-gpu"
    setup = " ".join(raw["setup_commands"])
    assert all(f'"{pin}"' in setup for pin in PINS) and "pip install --no-cache-dir -e" in setup
    for command in raw["head_start_ray_commands"][1:] + raw["worker_start_ray_commands"][1:]:
        assert "RAY_AUTH_MODE=token" in command
    # every file mount's local source exists, relative to the repository root (`ray up` cwd),
    # but the user's token folder, made by `ray get-auth-token --generate` before `ray up`
    assert raw["file_mounts"].pop("/home/ray/.ray") == "~/.ray"
    for remote, local in raw["file_mounts"].items():
        assert (ROOT / local).exists(), f"{remote}: {local} missing"


def test_ray_validation_rejects_a_typo():
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = load(CLUSTER / "gpu-cluster.yaml")
    raw["available_node_types"]["gpu_worker"]["min_wokers"] = 1
    with pytest.raises(jsonschema.ValidationError, match="min_wokers"):
        validate_config(prepare_config(raw))


# --- KubeRay -----------------------------------------------------------------------------


def derive_autoscaling_config(cr: dict) -> dict:
    """Ray's KubeRay autoscaler conversion of a RayCluster CR, with its validate_config."""
    from ray.autoscaler._private.kuberay.autoscaling_config import (
        _derive_autoscaling_config_from_ray_cr,
    )

    cr = copy.deepcopy(cr)
    cr["metadata"].setdefault("namespace", "default")  # the API server fills it in
    return _derive_autoscaling_config_from_ray_cr(cr)


def check_cluster_spec(spec: dict) -> None:
    assert set(spec) <= RAYCLUSTER_SPEC, set(spec) - RAYCLUSTER_SPEC
    assert set(spec["headGroupSpec"]) <= HEAD_GROUP
    for group in spec["workerGroupSpecs"]:
        assert set(group) <= WORKER_GROUP, set(group) - WORKER_GROUP
    assert spec["rayVersion"] == "2.60.0" and spec["authOptions"] == {"mode": "token"}
    images = [spec["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]]
    images += [g["template"]["spec"]["containers"][0]["image"] for g in spec["workerGroupSpecs"]]
    assert len(set(images)) == 1  # one image, so driver and workers run the same code


def test_kuberay_raycluster_passes_ray_autoscaler_conversion():
    cr = load(CLUSTER / "kuberay" / "raycluster.yaml")
    assert (cr["apiVersion"], cr["kind"]) == ("ray.io/v1", "RayCluster")
    check_cluster_spec(cr["spec"])
    config = derive_autoscaling_config(cr)
    head, gpu = config["available_node_types"]["headgroup"], config["available_node_types"]["gpu"]
    assert head["resources"]["CPU"] == 0  # training stays off the head
    assert gpu["resources"]["CPU"] == 8 and gpu["resources"]["GPU"] == 1
    assert gpu["resources"]["memory"] == 32 * 2**30
    assert (gpu["min_workers"], gpu["max_workers"]) == (0, 4) and config["max_workers"] == 4


def test_kuberay_rayjob_runs_a_study_with_the_runtime_env():
    from ray.runtime_env import RuntimeEnv

    job = load(CLUSTER / "kuberay" / "rayjob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    assert set(spec) <= RAYJOB_SPEC, set(spec) - RAYJOB_SPEC
    words = spec["entrypoint"].split()
    assert words[:3] == ["python", "-m", "raymeta.cli"] and words[3] in jobs.SUBCOMMANDS
    assert words[4] in packaged_pipelines()  # a pipeline shipped in the image's raymeta
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    RuntimeEnv(**env)  # Ray's own runtime_env validation
    assert pins_of(env["pip"]["packages"]) == PINS
    assert env["env_vars"]["MLFLOW_TRACKING_URI"] == "http://raymeta-mlflow:5000"
    assert spec["shutdownAfterJobFinishes"] is True and spec["submissionMode"] == "K8sJobMode"
    check_cluster_spec(spec["rayClusterSpec"])
    cr = {"metadata": {"name": job["metadata"]["name"]}, "spec": spec["rayClusterSpec"]}
    config = derive_autoscaling_config(cr)
    assert config["available_node_types"]["gpu"]["resources"]["GPU"] == 1


def test_kuberay_services_mlflow_accepts_the_cluster_host_header():
    from mlflow.server.security_utils import is_allowed_host_header

    docs = list(yaml.safe_load_all((CLUSTER / "kuberay" / "services.yaml").read_text()))
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert kinds == {
        ("PersistentVolumeClaim", "raymeta-shared"),
        ("PersistentVolumeClaim", "raymeta-mlflow"),
        ("Deployment", "raymeta-mlflow"),
        ("Service", "raymeta-mlflow"),
    }
    shared = next(d for d in docs if d["metadata"]["name"] == "raymeta-shared")
    assert shared["spec"]["accessModes"] == ["ReadWriteMany"]
    deploy = next(d for d in docs if d["kind"] == "Deployment")
    args = deploy["spec"]["template"]["spec"]["containers"][0]["args"]
    allowed = next(a for a in args if a.startswith("--allowed-hosts=")).split("=", 1)[1].split(",")
    for host in ("raymeta-mlflow:5000", "raymeta-mlflow.default.svc.cluster.local:5000"):
        assert is_allowed_host_header(allowed, host)  # MLflow's own host check
    assert not is_allowed_host_header(allowed, "evil.example.com")


def test_runtime_env_yaml_and_dockerfile_match_the_project_pins():
    env = jobs.load_runtime_env(CLUSTER / "runtime_env.yaml")  # Ray's RuntimeEnv accepts it
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert pins_of(env["pip"]["packages"]) == pins_of(project) == PINS
    assert set(env["pip"]["packages"]) == set(project)
    assert env["working_dir"] == "." and env["excludes"] == jobs.DEFAULT_EXCLUDES
    docker = (CLUSTER / "Dockerfile").read_text()
    assert "FROM rayproject/ray:2.60.0-py311-gpu" in docker
    assert all(f'"{pin}"' in docker for pin in PINS)


# --- raymeta.jobs without a cluster ------------------------------------------------------


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on 127.0.0.1 right now."""
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def cli_error(capsys, argv: list[str]) -> str:
    """Run ``raymeta ARGV``; assert exit 2 and one stderr line; return that line."""
    from raymeta.cli import main

    capsys.readouterr()
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("raymeta: error: "), lines
    return lines[0].removeprefix("raymeta: error: ")


def test_address_precedence_and_scheme(monkeypatch, capsys):
    for var in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    assert jobs.resolve_address() == "http://127.0.0.1:8265"
    monkeypatch.setenv("RAY_ADDRESS", "http://a:8265")
    assert jobs.resolve_address() == "http://a:8265"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "https://b:8265/")
    assert jobs.resolve_address() == "https://b:8265"
    assert jobs.resolve_address("http://c:8265") == "http://c:8265"
    accepted = "accepted: http://HOST:PORT or https://HOST:PORT"
    # checked before the file is read or anything is sent
    assert cli_error(capsys, ["submit", "nofile.yaml", "--address", "127.0.0.1:8265"]) == (
        f"--address '127.0.0.1:8265' needs a scheme; {accepted}"
    )
    assert cli_error(capsys, ["jobs", "list", "--address", "localhost:8265"]) == (
        f"--address 'localhost:8265' needs a scheme; {accepted}"
    )
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "ray://head:10001")
    assert cli_error(capsys, ["jobs", "status", "raysubmit_1"]) == (
        f"$RAY_API_SERVER_ADDRESS 'ray://head:10001' needs a scheme; {accepted}"
    )


def test_unreachable_address_is_one_line_error_within_the_timeout(monkeypatch, capsys):
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "t" * 64)
    (port,) = free_ports(1)  # nothing listens: refused at once
    message = cli_error(capsys, ["jobs", "status", "raysubmit_x", "--address", f"http://127.0.0.1:{port}"])  # fmt: skip
    assert message.startswith(f"cannot reach the Ray dashboard at http://127.0.0.1:{port} (")
    # a TEST-NET-1 address (RFC 5737): dropped or unroutable, never answered
    t0 = time.perf_counter()
    with pytest.raises(
        RaymetaError, match=r"cannot reach the Ray dashboard at http://192.0.2.1:8265"
    ):
        jobs.client("http://192.0.2.1:8265")
    assert time.perf_counter() - t0 < jobs.CONNECT_TIMEOUT_S + 2
    # the token would have gone unencrypted to a host that is not this one: one warning line
    assert capsys.readouterr().err.strip().splitlines() == [
        "raymeta: warning: the Ray token goes unencrypted over plain http to "
        "http://192.0.2.1:8265; use https:// or a tunnel to 127.0.0.1 (`ray dashboard "
        "CLUSTER.yaml`, `kubectl port-forward`)"
    ]


def test_token_in_clear():
    exposed = {
        "http://10.0.12.34:8265": True,
        "http://head.example.com:8265": True,
        "http://[2001:db8::1]:8265": True,
        "http://127.0.0.1:8265": False,
        "http://127.3.2.1:8265": False,
        "http://localhost:8265": False,
        "http://[::1]:8265": False,
        "https://10.0.12.34:8265": False,
    }
    assert {url: jobs.token_in_clear(url) for url in exposed} == exposed


def test_token_sources_in_rays_order(tmp_path, monkeypatch):
    monkeypatch.setattr(Path, "home", lambda: tmp_path)  # ~/.ray/auth_token under tmp_path
    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    assert jobs._token() is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("home-token\n")
    assert jobs._token() == "home-token"
    (tmp_path / "t").write_text("path-token")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "t"))
    assert jobs._token() == "path-token"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "env-token")
    assert jobs._token() == "env-token"
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert jobs._token() is None
    monkeypatch.delenv("RAY_AUTH_MODE")
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(RaymetaError, match=r"RAY_AUTH_TOKEN_PATH .*missing: No such file"):
        jobs._token()


def git_ignored(patterns: list[str], paths: list[str], tmp_path: Path) -> set[str]:
    """Which of ``paths`` the gitignore ``patterns`` exclude, as git itself matches them (Ray
    matches runtime_env ``excludes`` with the same gitwildmatch rules)."""
    repo = tmp_path / "repo"
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / ".git" / "info" / "exclude").write_text("\n".join(patterns) + "\n")
    out = subprocess.run(
        ["git", "check-ignore", "--no-index", "--stdin"],
        cwd=repo, input="\n".join(paths), capture_output=True, text=True,
    ).stdout  # fmt: skip
    return set(out.split())


def test_default_excludes_keep_secrets_and_outputs_out(tmp_path):
    secrets_and_outputs = [
        ".env", ".env.local", "cluster/.env.prod", "id_rsa", "id_rsa.pub", "keys/id_ed25519",
        "tls/server.pem", "tls/server.key", "cert.p12", ".git", ".git/config", ".venv/bin/python",
        "venv/lib/x.py", "raymeta/__pycache__/jobs.cpython-311.pyc", "raymeta.egg-info",
        "outputs", "outputs/quickstart/results.parquet", "ray_results/run/x", "mlflow.db",
        "mlartifacts/1/a", "mlruns/0/meta.yaml",
    ]  # fmt: skip
    needed = [
        "raymeta/pipelines/quickstart.yaml", "raymeta/jobs.py", "raymeta/keys.py", "environment.yml",
        ".envrc", ".gitignore", "docs/outputs.md", "cluster/runtime_env.yaml", "README.md",
    ]  # fmt: skip
    env = jobs.load_runtime_env(None)
    assert env == {"working_dir": ".", "excludes": jobs.DEFAULT_EXCLUDES}
    assert git_ignored(env["excludes"], secrets_and_outputs + needed, tmp_path) == set(
        secrets_and_outputs
    )
    # a runtime_env's own excludes come after the defaults: they add, and `!` re-includes
    env = jobs.load_runtime_env({"working_dir": ".", "excludes": ["data", "!outputs"]})
    assert env["excludes"] == [*jobs.DEFAULT_EXCLUDES, "data", "!outputs"]
    ignored = git_ignored(env["excludes"], ["data/x.npz", "outputs", ".env"], tmp_path / "b")
    assert ignored == {"data/x.npz", ".env"}
    # a remote working_dir is not uploaded from here: nothing to filter
    remote = jobs.load_runtime_env({"working_dir": "s3://bucket/project.zip"})
    assert "excludes" not in remote
    with pytest.raises(ConfigError, match="excludes must be a list of gitignore patterns"):
        jobs.load_runtime_env({"working_dir": ".", "excludes": "outputs"})


def test_submit_checks_before_contacting_the_cluster(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    (port,) = free_ports(1)  # nothing listens: every check below must fail before connecting
    address = f"http://127.0.0.1:{port}"
    quickstart = "raymeta/pipelines/quickstart.yaml"
    with pytest.raises(ConfigError, match="MLFLOW_TRACKING_URI is still the placeholder") as err:
        jobs.job_request(quickstart, runtime_env=CLUSTER / "runtime_env.yaml")
    assert "\n" not in str(err.value)
    outside = tmp_path / "p.yaml"
    shutil.copy(ROOT / quickstart, outside)
    with pytest.raises(ConfigError, match="is outside the runtime_env working_dir"):
        jobs.job_request(outside)
    with pytest.raises(ConfigError, match="unknown subcommand 'train'"):
        jobs.job_request(quickstart, subcommand="train")
    with pytest.raises(ConfigError, match="runtime_env"):
        jobs.load_runtime_env({"pip": 3})
    # through the CLI: one line, exit 2, before any connection (the port is closed)
    monkeypatch.chdir(tmp_path)
    Path("bad.yaml").write_text((ROOT / quickstart).read_text() + "\nnot_a_section: 1\n")
    message = cli_error(capsys, ["submit", "bad.yaml", "--address", address])
    assert message == "bad.yaml: not_a_section: unknown key"
    assert cli_error(capsys, ["submit", "nope.yaml", "--address", address]).startswith(
        "pipeline file nope.yaml not found, and raymeta ships no pipeline of that name; shipped: "
    )
    # a shipped pipeline by name, from any folder: checked here, read by the job's raymeta
    shipped = jobs.job_request("transfer_study.yaml")
    assert shipped["entrypoint"] == "python -m raymeta.cli study transfer_study.yaml"
    assert shipped["metadata"] == {
        "raymeta.file": "transfer_study.yaml",
        "raymeta.subcommand": "study",
    }
    monkeypatch.chdir(ROOT)
    request = jobs.job_request(quickstart, extra_args=["--output-dir", "/x"], tracking_uri="http://m:5000")  # fmt: skip
    assert request["entrypoint"] == (
        "python -m raymeta.cli run raymeta/pipelines/quickstart.yaml --output-dir /x"
    )
    assert request["runtime_env"] == {
        "working_dir": ".",
        "excludes": jobs.DEFAULT_EXCLUDES,
        "env_vars": {"MLFLOW_TRACKING_URI": "http://m:5000"},
    }
    assert jobs.job_request("tests/data/tiny_study.yaml")["metadata"] == {
        "raymeta.file": "tests/data/tiny_study.yaml",
        "raymeta.subcommand": "study",
    }
    assert jobs.entrypoint_for("pipelines/a b.yaml", "study", ["--output-dir", "/x"]) == (
        "python -m raymeta.cli study 'pipelines/a b.yaml' --output-dir /x"
    )


def test_job_commands_parse():
    parser = argparse.ArgumentParser(prog="raymeta")
    jobs.add_job_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(
        ["submit", "pipelines/quickstart.yaml", "--address", "http://h:8265", "--job-args",
         "--output-dir /mnt/shared/out", "--follow"]
    )  # fmt: skip
    assert args.func is jobs._cmd_submit and args.follow and args.address == "http://h:8265"
    assert args.job_args == "--output-dir /mnt/shared/out" and args.subcommand == "auto"
    for argv in (["jobs", "status", "raysubmit_1"], ["jobs", "logs", "raysubmit_1", "--follow"]):
        assert parser.parse_args(argv).job_id == "raysubmit_1"
    assert parser.parse_args(["jobs", "list"]).func is jobs._cmd_list


# --- a real local two-node cluster -------------------------------------------------------


def _kill_group(proc: subprocess.Popen, marker: str) -> None:
    """Stop one `ray start --block` process and everything it started (its process group), then
    any stray process whose command line names this cluster's private temp dir."""
    import psutil

    if proc.poll() is None:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # the group of `ray start` (new session)
    proc.wait(timeout=10)
    for p in psutil.process_iter(["pid", "cmdline"]):
        if marker in " ".join(p.info["cmdline"] or []):
            p.kill()


@pytest.fixture(scope="module")
def two_node_cluster():
    """A head and a worker node, 1 CPU each, all ports free ones on 127.0.0.1, a private temp
    dir (so no other Ray on this host sees them) and token authentication with a fresh token
    in that dir. Yields ``(dashboard URL, token file)``.

    The worker gets its own temp dir inside it, as a node on another host has its own disk: a
    worker started without one uses the head's session dir, so both nodes' runtime_env agents
    share one ``runtime_resources`` folder, and when a job's tasks reach the worker its agent
    deletes and unpacks again the working_dir that the job's driver is importing from on the
    head (Ray re-creates a working_dir it has not cached with ``overwrite=True``); a lazy
    import in the driver then fails with ModuleNotFoundError."""
    tmp = tempfile.mkdtemp(prefix="rmjob", dir="/tmp")  # short: Unix socket paths <= 107 chars
    token_file = Path(tmp) / "auth_token"
    token_file.write_text(secrets.token_hex(32))  # what `ray get-auth-token --generate` makes
    ports = free_ports(16)
    gcs, dash = ports[0], ports[1]
    ray_bin = str(Path(sys.executable).with_name("ray"))
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"  # `python` in jobs
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file))
    for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN"):
        env.pop(var, None)
    common = ["--block", "--node-ip-address=127.0.0.1", "--num-cpus=1", "--disable-usage-stats",
              "--object-store-memory=100000000"]  # fmt: skip

    def node_ports(p):
        return [f"--node-manager-port={p[0]}", f"--object-manager-port={p[1]}",
                f"--dashboard-agent-listen-port={p[2]}", f"--dashboard-agent-grpc-port={p[3]}",
                f"--metrics-export-port={p[4]}", f"--runtime-env-agent-port={p[5]}"]  # fmt: skip

    head_cmd = [ray_bin, "start", "--head", f"--port={gcs}", f"--temp-dir={tmp}",
                "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dash}", f"--ray-client-server-port={ports[2]}",
                *common, *node_ports(ports[3:9])]  # fmt: skip
    worker_cmd = [ray_bin, "start", f"--address=127.0.0.1:{gcs}", f"--temp-dir={tmp}/w",
                  *common, *node_ports(ports[9:15])]  # fmt: skip
    procs = []
    url = f"http://127.0.0.1:{dash}"
    try:
        head_log = open(Path(tmp) / "head.out", "w")  # noqa: SIM115
        procs.append(subprocess.Popen(head_cmd, env=env, stdout=head_log, stderr=subprocess.STDOUT, start_new_session=True))  # fmt: skip
        deadline = time.monotonic() + 45
        while True:
            try:
                with socket.create_connection(("127.0.0.1", dash), timeout=1):
                    break
            except OSError:
                if procs[0].poll() is not None or time.monotonic() > deadline:
                    pytest.fail(
                        f"head did not start: {(Path(tmp) / 'head.out').read_text()[-2000:]}"
                    )
                time.sleep(0.5)
        worker_log = open(Path(tmp) / "worker.out", "w")  # noqa: SIM115
        procs.append(subprocess.Popen(worker_cmd, env=env, stdout=worker_log, stderr=subprocess.STDOUT, start_new_session=True))  # fmt: skip
        yield url, token_file
    finally:
        for proc in reversed(procs):
            _kill_group(proc, tmp)
        shutil.rmtree(tmp, ignore_errors=True)


def use_cluster(monkeypatch, cluster) -> str:
    """Point this process at the test cluster (address and token, nothing else); its URL."""
    url, token_file = cluster
    monkeypatch.setenv("RAY_ADDRESS", url)  # explicit, whatever other Ray runs on this host
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token_file))
    for var in ("RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_MODE"):
        monkeypatch.delenv(var, raising=False)
    return url


PROBE = """
import json, time, ray, raymeta
ray.init()
t0 = time.time()
while len([n for n in ray.nodes() if n["Alive"]]) < 2 and time.time() - t0 < 40:
    time.sleep(0.5)

@ray.remote(num_cpus=1)
def where():
    import raymeta
    time.sleep(1)
    return ray.get_runtime_context().get_node_id(), raymeta.__file__

nodes, files = zip(*ray.get([where.remote() for _ in range(2)]))
print("NODES", len(set(nodes)), "CPU", ray.cluster_resources()["CPU"])
print("RAYMETA", json.dumps(sorted(set(files))))
"""


@pytest.mark.ray
def test_jobs_on_a_local_two_node_cluster(two_node_cluster, tmp_path, monkeypatch, capsys):
    from raymeta.cli import main

    url = use_cluster(monkeypatch, two_node_cluster)
    monkeypatch.chdir(ROOT)
    t0 = time.perf_counter()
    c = jobs.client()  # address: $RAY_ADDRESS; the token from $RAY_AUTH_TOKEN_PATH

    # 1. any entrypoint (Ray's client): two 1-CPU tasks land on the two nodes and import the
    # uploaded raymeta
    (tmp_path / "probe.py").write_text(PROBE)
    env = {"working_dir": str(tmp_path), "py_modules": [str(ROOT / "raymeta")]}
    probe = c.submit_job(entrypoint="python probe.py", runtime_env=env)
    # 2. a long job to stop
    sleeper = c.submit_job(entrypoint="sleep 120")
    # 3. a raymeta command, the way users submit: the project as working_dir, the file in it
    capsys.readouterr()
    assert main(["submit", "quickstart.yaml", "--job-args=--help", "--follow"]) == 0
    out = capsys.readouterr().out
    cli = out.split()[1]  # "submitted raysubmit_... to URL"
    assert out.startswith(f"submitted {cli} to {url}\n") and out.endswith(f"{cli}: SUCCEEDED\n")
    assert "usage: raymeta run [-h]" in out  # the job's logs, streamed by tail_job_logs
    detail = c.get_job_info(cli)
    assert detail.entrypoint == "python -m raymeta.cli run quickstart.yaml --help"
    assert detail.metadata["raymeta.subcommand"] == "run"
    assert main(["jobs", "status", cli, "--address", url]) == 0
    assert f"{cli}  SUCCEEDED" in capsys.readouterr().out
    assert main(["jobs", "logs", cli]) == 0
    assert "usage: raymeta run [-h]" in capsys.readouterr().out

    assert jobs.wait(c, probe, timeout=60) == "SUCCEEDED", c.get_job_logs(probe)
    out = c.get_job_logs(probe)
    assert "NODES 2 CPU 2.0" in out
    # raymeta was imported from the uploaded py_module, unpacked on each node in its own folder
    files = json.loads(next(line for line in out.splitlines() if line.startswith("RAYMETA "))[8:])
    assert len(files) == 2 and all("/runtime_resources/py_modules_files/" in f for f in files)

    while c.get_job_status(sleeper).value == "PENDING":
        time.sleep(0.5)
    assert main(["jobs", "stop", sleeper, "--wait"]) == 0
    assert capsys.readouterr().out == f"{sleeper}: stop requested\n{sleeper}: STOPPED\n"
    assert cli_error(capsys, ["jobs", "wait", sleeper]) == f"job {sleeper} ended STOPPED: " + (
        c.get_job_info(sleeper).message
    )

    assert main(["jobs", "list"]) == 0
    listed = capsys.readouterr().out
    assert all(job in listed for job in (probe, cli, sleeper))
    assert cli_error(capsys, ["jobs", "status", "raysubmit_nope"]) == (
        f"no job 'raysubmit_nope' on the Ray cluster at {url} (list them with `raymeta jobs list`)"
    )
    # token authentication is on: a wrong token or none is refused, on one line
    monkeypatch.setenv("RAY_AUTH_TOKEN", "wrong")
    assert cli_error(capsys, ["jobs", "list"]).startswith(
        f"cannot use the Ray Jobs API at {url}: Authentication failed"
    )
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert cli_error(capsys, ["jobs", "list"]).startswith(
        f"cannot use the Ray Jobs API at {url}: Authentication required"
    )
    assert time.perf_counter() - t0 < 90


LIST_FILES = (
    "import json, os; print('FILES', json.dumps(sorted(os.path.relpath(os.path.join(d, f)) "
    "for d, _, fs in os.walk('.') for f in fs)))"
)


@pytest.mark.ray
def test_submit_uploads_only_what_the_job_needs(two_node_cluster, tmp_path, monkeypatch):
    """A project holding secrets, a .gitignore'd file, outputs and an MLflow store is submitted
    to the cluster; the job lists its working directory: only the pipeline, the notes and the
    .gitignore arrived, even with Ray's switch to upload .gitignore'd files set."""
    url = use_cluster(monkeypatch, two_node_cluster)
    project = tmp_path / "project"
    files = {
        "pipelines/tiny_study.yaml": (ROOT / "tests" / "data" / "tiny_study.yaml").read_text(),
        "notes.md": "kept",
        ".gitignore": "private_notes.txt\n",
        "private_notes.txt": "gitignored",
        ".env": "MLFLOW_TRACKING_PASSWORD=secret",
        ".env.local": "secret",
        "id_rsa": "-----BEGIN OPENSSH PRIVATE KEY-----",
        "id_rsa.pub": "ssh-ed25519 AAAA",
        "tls/server.pem": "cert",
        ".git/config": "[core]",
        "outputs/tiny_study/results.parquet": "rows",
        "mlflow.db": "sqlite",
        "scratch/big.bin": "excluded by the runtime_env's own excludes",
    }
    for name, text in files.items():
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text(text)
    monkeypatch.chdir(project)
    monkeypatch.setenv("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "1")
    request = jobs.job_request(
        "pipelines/tiny_study.yaml",
        runtime_env={"working_dir": ".", "excludes": ["scratch"]},
        extra_args=["--help"],
    )
    request["entrypoint"] = f"{shlex.join(['python', '-c', LIST_FILES])} && {request['entrypoint']}"
    job = jobs.submit(request)
    c = jobs.client(url)
    assert jobs.wait(c, job, timeout=60) == "SUCCEEDED", c.get_job_logs(job)
    out = c.get_job_logs(job)
    listed = json.loads(next(line for line in out.splitlines() if line.startswith("FILES "))[6:])
    assert listed == [".gitignore", "notes.md", "pipelines/tiny_study.yaml"]
    assert "usage: raymeta study [-h]" in out  # the raymeta entrypoint ran in that directory


@pytest.mark.ray
def test_study_submitted_as_a_job_to_a_two_node_cluster(two_node_cluster, tmp_path, monkeypatch):
    """A tiny real study, submitted through the Ray Jobs API as a user would, runs its tasks
    across both nodes; its Parquet rows are read back here."""
    from raymeta.tune.study import read_results

    url = use_cluster(monkeypatch, two_node_cluster)
    monkeypatch.chdir(ROOT)
    out = tmp_path / "study"
    request = jobs.job_request(
        "tests/data/tiny_study.yaml",
        extra_args=["--output-dir", str(out)],
        tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
    )
    job = jobs.submit(request, url)
    c = jobs.client(url)
    assert c.get_job_info(job).entrypoint.startswith(
        "python -m raymeta.cli study tests/data/tiny_study.yaml"
    )
    assert jobs.wait(c, job, timeout=240) == "SUCCEEDED", c.get_job_logs(job)[-3000:]
    table = read_results(str(out / "results"))
    assert len(table) == 3 and (table["test_acc"] > 0.5).all()
    assert sorted(zip(table["batch_size"], table["method"], strict=True)) == [
        (32, "cosine"),
        (32, "fixed"),
        (64, "fixed"),
    ]


@pytest.mark.ray
def test_state_api_in_a_local_ray_beside_another_ray_instance(ray_local, two_node_cluster):
    """What Ray Train V2's PlacementGroupCleaner does (State API, no address) inside the local
    Ray of :func:`raymeta.pipeline.start_local_ray` while another Ray runs on the host: without
    the exported RAY_ADDRESS this fails with "Found multiple active Ray instances"."""
    ray = ray_local

    @ray.remote(num_cpus=0)
    def state_api(env: dict | None):
        import os

        from ray.util.state import list_nodes

        saved = dict(os.environ)
        if env is not None:  # restored below: this worker process serves later tasks
            os.environ.clear()
            os.environ.update(env)
        try:
            return len(list_nodes()), os.environ.get("RAY_ADDRESS")
        except ConnectionError as exc:
            return -1, str(exc)
        finally:
            os.environ.clear()
            os.environ.update(saved)

    n_nodes, address = ray.get(state_api.remote(None))
    assert n_nodes == 1 and address == ray.get_runtime_context().gcs_address
    without = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    n_nodes, message = ray.get(state_api.remote(without))  # the failure this guards against
    assert n_nodes == -1 and "multiple active Ray instances" in message


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("compare: {}\n", "compare"),
        ("study: {}\n", "study"),
        ("longtail: {}\ncompare: {}\n", "run"),
        ("mfm: {}\ncompare: {}\n", "run"),
        ("meta_train: {}\nstudy: {}\n", "run"),
        ("meta_train: {}\n", "run"),
    ],
)
def test_submitted_subcommand_runs_every_section(tmp_path, body, expected):
    path = tmp_path / "p.yaml"
    path.write_text("name: p\n" + body)
    assert jobs.guess_subcommand(path) == expected
