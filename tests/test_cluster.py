"""cluster/: Ray's own validation of the launcher YAML and KubeRay manifests, the runtime_env,
raymeta.jobs without a cluster, and real Ray jobs on a local two-node cluster (head and worker,
each its own `ray start` process on 127.0.0.1, in their own process groups and temp dir)."""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import os
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
    # every file mount's local source exists, relative to the repository root (`ray up` cwd)
    for remote, local in raw["file_mounts"].items():
        assert (ROOT / Path(local).expanduser()).exists(), f"{remote}: {local} missing"


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
    assert words[4].startswith("pipelines/") and words[4].endswith(".yaml")
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
    assert env["working_dir"] == "." and ".venv" in env["excludes"]
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


def test_address_precedence(monkeypatch):
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert jobs.resolve_address() == "http://127.0.0.1:8265"
    monkeypatch.setenv("RAY_ADDRESS", "http://a:8265")
    assert jobs.resolve_address() == "http://a:8265"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://b:8265/")
    assert jobs.resolve_address() == "http://b:8265"
    assert jobs.resolve_address("http://c:8265") == "http://c:8265"


def test_unreachable_address_is_one_line_error():
    (port,) = free_ports(1)
    t0 = time.perf_counter()
    with pytest.raises(
        RaymetaError, match=rf"cannot reach the Ray dashboard at http://127.0.0.1:{port}"
    ) as err:
        jobs.status("raysubmit_x", f"http://127.0.0.1:{port}")
    assert "\n" not in str(err.value) and time.perf_counter() - t0 < 5


def test_submit_checks_before_contacting_the_cluster(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    (port,) = free_ports(1)  # nothing listens: every check below must fail before connecting
    address = f"http://127.0.0.1:{port}"
    with pytest.raises(ConfigError, match="MLFLOW_TRACKING_URI is still the placeholder") as err:
        jobs.submit("pipelines/quickstart.yaml", address, runtime_env=CLUSTER / "runtime_env.yaml")
    assert "\n" not in str(err.value)
    outside = tmp_path / "p.yaml"
    shutil.copy(ROOT / "pipelines" / "quickstart.yaml", outside)
    with pytest.raises(ConfigError, match="is outside the runtime_env working_dir"):
        jobs.submit(outside, address)
    bad = ROOT / "pipelines" / "quickstart.yaml"
    with pytest.raises(ConfigError, match="unknown subcommand 'train'"):
        jobs.submit(bad, address, subcommand="train")
    with pytest.raises(ConfigError, match="runtime_env"):
        jobs.load_runtime_env({"pip": 3})
    assert jobs.guess_subcommand(ROOT / "pipelines" / "quickstart.yaml") == "run"
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


def _ray_token_available() -> bool:
    from ray._raylet import AuthenticationTokenLoader

    return AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True)


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
    """A head and a worker node, 1 CPU each, all ports free ones on 127.0.0.1 and a private
    temp dir (so no other Ray on this host sees them). Yields the dashboard URL."""
    if not _ray_token_available():
        from ray._private.authentication.authentication_token_setup import (
            generate_and_save_token,
        )

        generate_and_save_token()  # what a first local `ray.init()` does
    tmp = tempfile.mkdtemp(prefix="rmjob", dir="/tmp")  # short: Unix socket paths <= 107 chars
    ports = free_ports(16)
    gcs, dash = ports[0], ports[1]
    ray_bin = str(Path(sys.executable).with_name("ray"))
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"  # `python` in jobs
    env["RAY_AUTH_MODE"] = "token"
    for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
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
    worker_cmd = [ray_bin, "start", f"--address=127.0.0.1:{gcs}", *common,
                  *node_ports(ports[9:15])]  # fmt: skip
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
        yield url
    finally:
        for proc in reversed(procs):
            _kill_group(proc, tmp)
        shutil.rmtree(tmp, ignore_errors=True)


PROBE = """
import time, ray, raymeta
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
print("RAYMETA", sorted(set(files)))
"""


@pytest.mark.ray
def test_jobs_on_a_local_two_node_cluster(two_node_cluster, tmp_path, monkeypatch, capsys):
    url = two_node_cluster
    monkeypatch.setenv("RAY_ADDRESS", url)  # explicit, whatever other Ray runs on this host
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.chdir(ROOT)
    t0 = time.perf_counter()

    # 1. any entrypoint: two 1-CPU tasks land on the two nodes and import the uploaded raymeta
    (tmp_path / "probe.py").write_text(PROBE)
    env = {"working_dir": str(tmp_path), "py_modules": [str(ROOT / "raymeta")]}
    probe = jobs.submit_entrypoint("python probe.py", url, runtime_env=env)
    # 2. a raymeta command, the way users submit: the project as working_dir, the file in it
    cli = jobs.submit("pipelines/quickstart.yaml", extra_args=["--help"])  # address: $RAY_ADDRESS
    # 3. a long job to stop
    sleeper = jobs.submit_entrypoint("sleep 120", url)

    assert jobs.wait(probe, url, timeout=60) == "SUCCEEDED", jobs.logs(probe, url)
    out = jobs.logs(probe, url)
    assert "NODES 2 CPU 2.0" in out
    assert "runtime_resources" in out  # raymeta was imported from the uploaded py_module

    assert jobs.wait(cli, url, timeout=60) == "SUCCEEDED", jobs.logs(cli, url)
    assert "usage: raymeta run [-h]" in jobs.logs(cli, url)
    detail = jobs.info(cli, url)
    assert detail.entrypoint == "python -m raymeta.cli run pipelines/quickstart.yaml --help"
    assert detail.metadata["raymeta.subcommand"] == "run"
    streamed = io.StringIO()  # `raymeta jobs logs ID --follow`: the websocket tail
    assert jobs.follow_logs(cli, url, out=streamed) == "SUCCEEDED"
    assert "usage: raymeta run [-h]" in streamed.getvalue()
    parser = argparse.ArgumentParser(prog="raymeta")  # the CLI layer, as cli.py will wire it
    jobs.add_job_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["jobs", "status", cli, "--address", url])
    args.func(args)
    assert f"{cli}  SUCCEEDED" in capsys.readouterr().out

    while jobs.status(sleeper, url) == "PENDING":
        time.sleep(0.5)
    assert jobs.stop(sleeper, url) is True
    assert jobs.wait(sleeper, url, timeout=30) == "STOPPED"

    ids = {d.submission_id for d in jobs.list_jobs(url)}
    assert {probe, cli, sleeper} <= ids
    with pytest.raises(RaymetaError, match="no job 'raysubmit_nope' on the Ray cluster") as err:
        jobs.status("raysubmit_nope", url)
    assert "\n" not in str(err.value)
    # token authentication is on: a wrong token is refused, on one line
    monkeypatch.setattr(jobs, "_auth_headers", lambda: {"authorization": "Bearer wrong"})
    with pytest.raises(RaymetaError, match="cannot use the Ray Jobs API") as err:
        jobs.list_jobs(url)
    assert "\n" not in str(err.value)
    assert time.perf_counter() - t0 < 60


@pytest.mark.ray
def test_study_submitted_as_a_job_to_a_two_node_cluster(two_node_cluster, tmp_path, monkeypatch):
    """A tiny real study, submitted through the Ray Jobs API as a user would, runs its tasks
    across both nodes; its Parquet rows are read back here."""
    from raymeta.tune.study import read_results

    url = two_node_cluster
    monkeypatch.setenv("RAY_ADDRESS", url)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.chdir(ROOT)
    out = tmp_path / "study"
    job = jobs.submit(
        "tests/data/tiny_study.yaml",
        url,
        extra_args=["--output-dir", str(out)],
        tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
    )
    assert jobs.info(job, url).entrypoint.startswith(
        "python -m raymeta.cli study tests/data/tiny_study.yaml"
    )
    assert jobs.wait(job, url, timeout=240) == "SUCCEEDED", jobs.logs(job, url)[-3000:]
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
