"""Ray Jobs: submit a raymeta pipeline or study to a Ray cluster and watch it.

A thin layer over Ray's :class:`ray.job_submission.JobSubmissionClient` (the REST API of the
head node's dashboard, port 8265 by default). The job's entrypoint is
``python -m raymeta.cli SUBCOMMAND FILE [ARGS...]``, run by the cluster in the job's working
directory: with a local ``working_dir`` in the runtime_env (the default is the current
directory, minus the ``.gitignore``'d files and :data:`DEFAULT_EXCLUDES`), Ray uploads it and
the job imports that copy of raymeta, so the cluster runs exactly the submitted code.

Address: ``address`` argument, else ``$RAY_API_SERVER_ADDRESS``, else ``$RAY_ADDRESS``, else
``http://127.0.0.1:8265``. An explicit address wins over the environment (Ray's client
would otherwise let ``RAY_ADDRESS`` override it).

Authentication: Ray 2.52+ clusters may require a token (on by default for local clusters since
Ray 2.59). Unless ``RAY_AUTH_MODE=disabled``, the client sends the token Ray itself would use
(``$RAY_AUTH_TOKEN``, ``$RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``) as a bearer header, so
``RAY_AUTH_MODE=token`` is not needed on the client; a server without auth ignores it.

Every failure a user can cause (unreachable address, unknown job id, missing token, bad
runtime_env) is a one-line :class:`~raymeta.errors.RaymetaError`.

CLI (wired by :func:`add_job_commands`)::

    raymeta submit FILE [--address URL] [--runtime-env YAML] [--subcommand run|study]
                        [--tracking-uri URI] [--job-args 'ARGS'] [--follow]
    raymeta jobs list|status ID|logs ID [--follow]|stop ID|wait ID  [--address URL]
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from raymeta.errors import ConfigError, RaymetaError

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
SUBCOMMANDS = ("run", "compare", "study")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
DEFAULT_EXCLUDES = [
    ".git",
    ".venv",
    "**/__pycache__",
    "outputs",
    "ray_results",
    "mlruns",
    "mlartifacts",
    "*.db",
    "*.egg-info",
]
PIPELINE_KEYS = {"meta_train", "transfer", "mfm"}  # sections `raymeta run` handles


def resolve_address(address: str | None = None) -> str:
    """The Jobs API address: ``address``, ``$RAY_API_SERVER_ADDRESS``, ``$RAY_ADDRESS`` or
    :data:`DEFAULT_ADDRESS`, without a trailing slash."""
    address = (
        address
        or os.environ.get("RAY_API_SERVER_ADDRESS")
        or os.environ.get("RAY_ADDRESS")
        or DEFAULT_ADDRESS
    )
    return address.rstrip("/")


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _auth_headers() -> dict[str, str]:
    """``{"authorization": "Bearer <token>"}`` from Ray's token sources, or ``{}``."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return {}
    try:
        from ray._raylet import AuthenticationTokenLoader
    except ImportError:  # a Ray without token auth
        return {}
    try:
        return dict(AuthenticationTokenLoader.instance().get_token_for_http_header(True))
    except Exception:  # unreadable token file: let the server answer 401 with Ray's message
        return {}


def _probe(url: str, timeout: float = 5.0) -> None:
    """Fail fast (one line) if an http(s) address does not accept TCP connections."""
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        return
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise RaymetaError(
            f"cannot reach the Ray dashboard at {url} ({reason}); is the cluster up? "
            "(for a `ray up` cluster run `ray dashboard cluster/gpu-cluster.yaml` and use "
            "http://127.0.0.1:8265; for KubeRay `kubectl port-forward svc/CLUSTER-head-svc 8265:8265`)"
        ) from None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) < 400 else text[:400] + "..."


def client(address: str | None = None):
    """A connected :class:`JobSubmissionClient` for ``address`` (see :func:`resolve_address`).

    Raises:
        RaymetaError: the address is unreachable, not a Ray dashboard, or refuses the token.
    """
    from ray.job_submission import JobSubmissionClient

    url = resolve_address(address)
    _probe(url)
    try:
        with _env("RAY_API_SERVER_ADDRESS", url):  # an explicit address beats $RAY_ADDRESS
            return JobSubmissionClient(url, headers=_auth_headers() or None)
    except Exception as exc:  # ConnectionError, AuthenticationError, RuntimeError, ...
        raise RaymetaError(f"cannot use the Ray Jobs API at {url}: {_one_line(exc)}") from None


def _call(address: str | None, job_id: str | None, fn):
    """Run ``fn(client)``; turn Ray's errors into one-line RaymetaErrors."""
    c = client(address)
    try:
        return fn(c)
    except RaymetaError:
        raise
    except Exception as exc:
        text = _one_line(exc)
        if job_id is not None and ("404" in text or "does not exist" in text):
            raise RaymetaError(
                f"no job {job_id!r} on the Ray cluster at {resolve_address(address)} "
                "(list them with `raymeta jobs list`)"
            ) from None
        raise RaymetaError(f"Ray Jobs API at {resolve_address(address)}: {text}") from None


def load_runtime_env(source: str | Path | dict | None = None) -> dict[str, Any]:
    """A runtime_env dict from a YAML file (e.g. ``cluster/runtime_env.yaml``) or a dict.

    ``None`` gives the default: the current directory as ``working_dir`` with
    :data:`DEFAULT_EXCLUDES`. A file's relative local ``working_dir`` is taken relative to the
    current directory (as ``ray job submit --runtime-env`` does). The result is checked with
    Ray's own :class:`ray.runtime_env.RuntimeEnv`.

    Raises:
        ConfigError: the file is missing or malformed, or Ray rejects a field.
    """
    if source is None:
        env: dict[str, Any] = {"working_dir": ".", "excludes": list(DEFAULT_EXCLUDES)}
    elif isinstance(source, dict):
        env = dict(source)
    else:
        from raymeta.config import load_yaml

        env = load_yaml(source)
        if not isinstance(env, dict):
            raise ConfigError(
                f"{source}: a runtime_env must be a mapping (got {type(env).__name__})"
            )
    try:
        from ray.runtime_env import RuntimeEnv

        RuntimeEnv(**env)
    except Exception as exc:
        raise ConfigError(
            f"runtime_env{f' {source}' if source else ''}: {_one_line(exc)}"
        ) from None
    return env


def _local_working_dir(env: dict[str, Any]) -> Path | None:
    wd = env.get("working_dir")
    if not wd or "://" in str(wd):
        return None
    return Path(wd).expanduser().resolve()


def guess_subcommand(file: str | Path) -> str:
    """The ``raymeta`` subcommand for a pipeline file: ``study`` for a file with a ``study``
    section, ``compare`` for one with only a ``compare`` section, else ``run``. A file that does
    not exist here is assumed to be a ``run`` pipeline."""
    path = Path(file)
    if not path.is_file():
        return "run"
    from raymeta.config import load_yaml

    data = load_yaml(path)
    keys = set(data) if isinstance(data, dict) else set()
    if "study" in keys:
        return "study"
    if "compare" in keys and not keys & PIPELINE_KEYS:
        return "compare"
    return "run"


def entrypoint_for(file: str, subcommand: str, extra_args: Sequence[str] = ()) -> str:
    """The shell command the cluster runs: ``python -m raymeta.cli SUBCOMMAND FILE ARGS...``."""
    return shlex.join(["python", "-m", "raymeta.cli", subcommand, file, *extra_args])


def _job_file(file: str | Path, working_dir: Path | None) -> str:
    """``file`` as the job will see it: relative to the uploaded working_dir when it lies in
    it; a path that does not exist here is passed through (a path on the cluster)."""
    path = Path(file)
    if working_dir is None or not path.exists():
        return str(file)
    resolved = path.resolve()
    try:
        return resolved.relative_to(working_dir).as_posix()
    except ValueError:
        raise ConfigError(
            f"{file} is outside the runtime_env working_dir {working_dir}, so the job cannot "
            "read it; move it into that directory or use a runtime_env with another working_dir"
        ) from None


def submit(
    file: str | Path,
    address: str | None = None,
    *,
    subcommand: str | None = None,
    runtime_env: str | Path | dict | None = None,
    extra_args: Sequence[str] = (),
    tracking_uri: str | None = None,
    submission_id: str | None = None,
    entrypoint_num_cpus: float | None = None,
    entrypoint_num_gpus: float | None = None,
) -> str:
    """Submit ``raymeta SUBCOMMAND FILE EXTRA_ARGS`` as a Ray job; return its submission id.

    Args:
        file: the pipeline or study YAML; a local file inside the working_dir is sent with it
            (and, for ``run``, validated here first).
        address: the Jobs API address (see :func:`resolve_address`).
        subcommand: ``run``, ``compare`` or ``study``; None guesses from the file
            (:func:`guess_subcommand`).
        runtime_env: a runtime_env YAML path or dict (see :func:`load_runtime_env`).
        extra_args: more arguments for the raymeta command, e.g. ``["--output-dir", "/data"]``.
        tracking_uri: sets ``MLFLOW_TRACKING_URI`` in the job's environment (a tracking
            server, e.g. ``http://HEAD_IP:5000``), overriding the runtime_env's.
        submission_id: a chosen job id (Ray generates ``raysubmit_...`` otherwise).
        entrypoint_num_cpus, entrypoint_num_gpus: resources reserved for the driver.

    Raises:
        ConfigError: bad subcommand, file outside the working_dir, invalid pipeline or
            runtime_env, or a placeholder ``MLFLOW_TRACKING_URI`` left in the runtime_env.
        RaymetaError: the cluster is unreachable or refuses the job.
    """
    subcommand = subcommand or guess_subcommand(file)
    if subcommand not in SUBCOMMANDS:
        raise ConfigError(f"unknown subcommand {subcommand!r}; accepted: {', '.join(SUBCOMMANDS)}")
    env = load_runtime_env(runtime_env)
    env_vars = dict(env.get("env_vars") or {})
    if tracking_uri:
        env_vars["MLFLOW_TRACKING_URI"] = tracking_uri
    uri = env_vars.get("MLFLOW_TRACKING_URI", "")
    if "<" in uri or "HEAD_IP" in uri:
        raise ConfigError(
            f"MLFLOW_TRACKING_URI is still the placeholder {uri!r}; set it in the runtime_env "
            "or pass --tracking-uri http://HEAD_ADDRESS:5000"
        )
    if env_vars:
        env["env_vars"] = env_vars
    if subcommand == "run" and Path(file).is_file():
        from raymeta.config import load_pipeline

        load_pipeline(file)  # fail here, not minutes later on the cluster
    job_file = _job_file(file, _local_working_dir(env))
    entrypoint = entrypoint_for(job_file, subcommand, extra_args)
    return _call(
        address,
        None,
        lambda c: c.submit_job(
            entrypoint=entrypoint,
            runtime_env=env,
            submission_id=submission_id,
            metadata={"raymeta.file": job_file, "raymeta.subcommand": subcommand},
            entrypoint_num_cpus=entrypoint_num_cpus,
            entrypoint_num_gpus=entrypoint_num_gpus,
        ),
    )


def submit_entrypoint(
    entrypoint: str,
    address: str | None = None,
    *,
    runtime_env: str | Path | dict | None = None,
    submission_id: str | None = None,
) -> str:
    """Submit any shell command as a Ray job (what :func:`submit` does for raymeta commands)."""
    env = load_runtime_env(runtime_env) if runtime_env is not None else None
    return _call(
        address,
        None,
        lambda c: c.submit_job(entrypoint=entrypoint, runtime_env=env, submission_id=submission_id),
    )


def info(job_id: str, address: str | None = None):
    """Ray's ``JobDetails`` of a job (status, message, entrypoint, start/end times in ms)."""
    return _call(address, job_id, lambda c: c.get_job_info(job_id))


def status(job_id: str, address: str | None = None) -> str:
    """The job's status: ``PENDING``, ``RUNNING``, ``SUCCEEDED``, ``FAILED`` or ``STOPPED``."""
    return str(info(job_id, address).status.value)


def logs(job_id: str, address: str | None = None) -> str:
    """Everything the job's driver printed so far (stdout and stderr)."""
    return _call(address, job_id, lambda c: c.get_job_logs(job_id))


def follow_logs(job_id: str, address: str | None = None, out=None) -> str:
    """Stream the job's logs to ``out`` (default stdout) until it ends; return its status."""
    out = out or sys.stdout

    async def _tail(c):
        async for chunk in c.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    info(job_id, address)  # one-line error for an unknown id before streaming
    _call(address, job_id, lambda c: asyncio.run(_tail(c)))
    return wait(job_id, address, timeout=30)


def stop(job_id: str, address: str | None = None) -> bool:
    """Ask the job to stop (SIGTERM, then SIGKILL); True if it was running."""
    return bool(_call(address, job_id, lambda c: c.stop_job(job_id)))


def list_jobs(address: str | None = None) -> list:
    """All jobs of the cluster (Ray's ``JobDetails``), oldest first."""
    jobs = _call(address, None, lambda c: c.list_jobs())
    return sorted(jobs, key=lambda j: j.start_time or 0)


def wait(
    job_id: str, address: str | None = None, timeout: float | None = None, poll_s: float = 1.0
) -> str:
    """Poll until the job is SUCCEEDED, FAILED or STOPPED; return that status.

    Raises:
        RaymetaError: ``timeout`` seconds passed first (the job keeps running).
    """
    c = client(address)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        try:
            state = str(c.get_job_status(job_id).value)
        except Exception as exc:
            raise RaymetaError(f"job {job_id!r}: {_one_line(exc)}") from None
        if state in TERMINAL:
            return state
        if deadline is not None and time.monotonic() > deadline:
            raise RaymetaError(f"job {job_id} is still {state} after {timeout:g} s")
        time.sleep(poll_s)


# --- CLI ---------------------------------------------------------------------------------


def _add_address(p) -> None:
    p.add_argument(
        "--address",
        help=f"Ray Jobs API address, e.g. http://HEAD:8265 (default $RAY_API_SERVER_ADDRESS, "
        f"$RAY_ADDRESS or {DEFAULT_ADDRESS})",
    )


def _fmt_time(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "-"


def _cmd_submit(args) -> None:
    env_vars = load_runtime_env(args.runtime_env).get("env_vars") or {}
    if not (args.tracking_uri or env_vars.get("MLFLOW_TRACKING_URI")):
        print(
            "raymeta: warning: no MLFLOW_TRACKING_URI (--tracking-uri or the runtime_env's "
            "env_vars): the job logs to a SQLite file in its working directory on the head, "
            "which Ray deletes later",
            file=sys.stderr,
        )
    job_id = submit(
        args.file,
        args.address,
        subcommand=None if args.subcommand == "auto" else args.subcommand,
        runtime_env=args.runtime_env,
        extra_args=shlex.split(args.job_args),
        tracking_uri=args.tracking_uri,
        submission_id=args.submission_id,
        entrypoint_num_gpus=args.num_gpus,
    )
    where = f" --address {args.address}" if args.address else ""
    print(f"submitted {job_id} to {resolve_address(args.address)}")
    if not args.follow:
        print(f"watch it: raymeta jobs logs {job_id} --follow{where}")
        print(f"status:   raymeta jobs status {job_id}{where}")
        print(f"stop it:  raymeta jobs stop {job_id}{where}")
        return
    final = follow_logs(job_id, args.address)
    if final != "SUCCEEDED":
        raise RaymetaError(f"job {job_id} ended {final}: {info(job_id, args.address).message}")


def _cmd_status(args) -> None:
    d = info(args.job_id, args.address)
    print(f"{d.submission_id}  {d.status.value}  {d.message or ''}".rstrip())
    print(f"  entrypoint: {d.entrypoint}")
    print(f"  started {_fmt_time(d.start_time)}  ended {_fmt_time(d.end_time)}")


def _cmd_logs(args) -> None:
    if args.follow:
        follow_logs(args.job_id, args.address)
    else:
        print(logs(args.job_id, args.address), end="")


def _cmd_stop(args) -> None:
    was_running = stop(args.job_id, args.address)
    print(f"{args.job_id}: {'stop requested' if was_running else 'was not running'}")
    if args.wait:
        print(f"{args.job_id}: {wait(args.job_id, args.address, timeout=120)}")


def _cmd_wait(args) -> None:
    final = wait(args.job_id, args.address, timeout=args.timeout)
    print(f"{args.job_id}: {final}")
    if final != "SUCCEEDED":
        raise RaymetaError(f"job {args.job_id} ended {final}")


def _cmd_list(args) -> None:
    jobs = list_jobs(args.address)
    if not jobs:
        print(f"no jobs on {resolve_address(args.address)}")
    for d in jobs:
        name = d.submission_id or d.job_id
        print(f"{name}  {d.status.value:9s}  {_fmt_time(d.start_time)}  {d.entrypoint}")


def add_job_commands(subparsers) -> None:
    """Add ``submit`` and ``jobs {list,status,logs,stop,wait}`` to the ``raymeta`` parser's
    subparsers (``cli.build_parser``: ``add_job_commands(sub)``). Each sets ``func``."""
    p = subparsers.add_parser(
        "submit",
        help="submit a pipeline or study to a Ray cluster as a Ray job",
        description="Submit `raymeta run|study FILE` as a Ray job (entrypoint "
        "`python -m raymeta.cli run|study FILE ARGS`) and print its id.",
    )
    p.add_argument("file", help="pipeline or study YAML (inside the working_dir)")
    p.add_argument(
        "--job-args",
        default="",
        metavar="'ARGS'",
        help="more arguments for the raymeta command on the cluster, one quoted string, "
        "e.g. --job-args '--output-dir /mnt/shared/outputs'",
    )
    _add_address(p)
    p.add_argument(
        "--runtime-env",
        help="runtime_env YAML, e.g. cluster/runtime_env.yaml (default: upload the current "
        "directory as working_dir)",
    )
    p.add_argument(
        "--subcommand",
        choices=("auto", *SUBCOMMANDS),
        default="auto",
        help="raymeta subcommand the job runs (default: run for pipelines, study otherwise)",
    )
    p.add_argument("--tracking-uri", help="MLFLOW_TRACKING_URI for the job (a tracking server)")
    p.add_argument("--submission-id", help="job id to use (default: generated by Ray)")
    p.add_argument("--num-gpus", type=float, help="GPUs reserved for the driver (default 0)")
    p.add_argument("--follow", action="store_true", help="stream the logs until the job ends")
    p.set_defaults(func=_cmd_submit)

    jobs = subparsers.add_parser("jobs", help="list, watch and stop Ray jobs")
    jsub = jobs.add_subparsers(dest="jobs_command", required=True)
    q = jsub.add_parser("list", help="all jobs of the cluster")
    _add_address(q)
    q.set_defaults(func=_cmd_list)
    for name, fn, text in (
        ("status", _cmd_status, "status, message and times of a job"),
        ("logs", _cmd_logs, "the job's driver output"),
        ("stop", _cmd_stop, "stop a running job"),
        ("wait", _cmd_wait, "wait until a job ends (exit 2 unless it SUCCEEDED)"),
    ):
        q = jsub.add_parser(name, help=text)
        q.add_argument("job_id", help="submission id, e.g. raysubmit_...")
        _add_address(q)
        if name == "logs":
            q.add_argument("--follow", action="store_true", help="stream until the job ends")
        if name == "stop":
            q.add_argument("--wait", action="store_true", help="wait until it has stopped")
        if name == "wait":
            q.add_argument("--timeout", type=float, help="give up after this many seconds")
        q.set_defaults(func=fn)
