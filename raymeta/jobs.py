"""Ray Jobs: submit a raymeta pipeline or study to a Ray cluster and watch it.

Everything that talks to the cluster is Ray's public
:class:`ray.job_submission.JobSubmissionClient` (the REST API of the head node's dashboard, port
8265 by default). raymeta adds what Ray cannot know: it validates the pipeline file here before
anything is sent, builds the entrypoint (``python -m raymeta.cli run|compare|study FILE ARGS``,
run in the job's working directory, so the job imports the uploaded copy of raymeta), and
filters the upload (:data:`DEFAULT_EXCLUDES` plus the working directory's ``.gitignore`` and
``.rayignore`` files).

Address: the ``address`` argument, else ``$RAY_API_SERVER_ADDRESS``, else ``$RAY_ADDRESS``, else
:data:`DEFAULT_ADDRESS`; it must be ``http://HOST:PORT`` or ``https://HOST:PORT``. An explicit
address wins over the environment (Ray's client alone would let ``RAY_ADDRESS`` override it).

Authentication: clusters with ``RAY_AUTH_MODE=token`` (the default for local clusters since Ray
2.59) refuse requests without the cluster's token. Ray's client sends it only when the client's
own environment has ``RAY_AUTH_MODE=token``; raymeta sends it whenever one is configured, found
where Ray documents it (``$RAY_AUTH_TOKEN``, the file ``$RAY_AUTH_TOKEN_PATH``, else
``~/.ray/auth_token``), unless ``RAY_AUTH_MODE=disabled``. A server without auth ignores it.

CLI (wired by :func:`add_job_commands`)::

    raymeta submit FILE [--address URL] [--runtime-env YAML] [--subcommand run|compare|study]
                        [--tracking-uri URI] [--job-args 'ARGS'] [--follow]
    raymeta jobs list|status ID|logs ID [--follow]|stop ID|wait ID  [--address URL]
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import os
import shlex
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from raymeta.errors import ConfigError, RaymetaError

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
CONNECT_TIMEOUT_S = 5.0  # an unreachable address fails after this, on one line
SUBCOMMANDS = ("run", "compare", "study")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
DEFAULT_EXCLUDES = [  # gitignore patterns, matched at any depth of the working_dir
    ".env", ".env.*", "*.pem", "*.key", "*.p12", "id_rsa*", "id_ed25519*",  # secrets
    ".git", ".venv", "venv", "__pycache__", "*.egg-info",  # version control, environments
    "outputs", "ray_results", "mlflow.db", "mlartifacts", "mlruns",  # results, MLflow stores
]  # fmt: skip
"""What ``raymeta submit`` never uploads: secrets, version control, virtualenvs, outputs and
MLflow stores. A runtime_env's own ``excludes`` come after these, so ``!PATTERN`` there
re-includes one (gitignore negation)."""


def resolve_address(address: str | None = None) -> str:
    """The Jobs API URL: ``address``, ``$RAY_API_SERVER_ADDRESS``, ``$RAY_ADDRESS`` or
    :data:`DEFAULT_ADDRESS`, without a trailing slash.

    Raises:
        ConfigError: the address is not ``http://HOST:PORT`` or ``https://HOST:PORT``.
    """
    source, value = "--address", address
    for var in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        if value is None and os.environ.get(var):
            source, value = f"${var}", os.environ[var]
    value = (value or DEFAULT_ADDRESS).rstrip("/")
    parsed = urlparse(value)
    if "://" not in value or parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ConfigError(
            f"{source} {value!r} needs a scheme; accepted: http://HOST:PORT or https://HOST:PORT"
        )
    return value


def _token() -> str | None:
    """The cluster token from Ray's documented sources, or None (none, or auth disabled).

    Raises:
        RaymetaError: ``$RAY_AUTH_TOKEN_PATH`` names a file that cannot be read.
    """
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None
    if token := os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return token
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    try:
        return (Path(path) if path else Path.home() / ".ray" / "auth_token").read_text().strip()
    except OSError as exc:
        if path:
            raise RaymetaError(f"$RAY_AUTH_TOKEN_PATH {path}: {exc.strerror}") from None
        return None


def token_in_clear(url: str) -> bool:
    """True if a request to ``url`` would carry a token unencrypted off this host: plain
    ``http`` to a host that is not ``localhost`` or a loopback IP (hostnames are not resolved)."""
    parsed = urlparse(url)
    if parsed.scheme != "http" or parsed.hostname == "localhost":
        return False
    try:
        return not ipaddress.ip_address(parsed.hostname).is_loopback
    except ValueError:  # a host name
        return True


@functools.cache
def _warn_token_in_clear(url: str) -> None:
    print(
        f"raymeta: warning: the Ray token goes unencrypted over plain http to {url}; use "
        "https:// or a tunnel to 127.0.0.1 (`ray dashboard CLUSTER.yaml`, `kubectl port-forward`)",
        file=sys.stderr,
    )


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) < 400 else text[:400] + "..."


def client(address: str | None = None):
    """A connected :class:`JobSubmissionClient` for ``address`` (see :func:`resolve_address`),
    sending the cluster token (see the module docstring).

    Raises:
        ConfigError: the address has no http(s) scheme.
        RaymetaError: no TCP connection within :data:`CONNECT_TIMEOUT_S`, not a Ray dashboard,
            or the token is refused.
    """
    from ray.job_submission import JobSubmissionClient

    url = resolve_address(address)
    token = _token()
    if token and token_in_clear(url):
        _warn_token_in_clear(url)
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:  # Ray's client has no connect timeout: a silent host would hang it for minutes
        socket.create_connection((parsed.hostname, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise RaymetaError(
            f"cannot reach the Ray dashboard at {url} ({exc.strerror or type(exc).__name__}); "
            "is the cluster up? (for a `ray up` cluster run `ray dashboard "
            "cluster/gpu-cluster.yaml` and use http://127.0.0.1:8265; for KubeRay "
            "`kubectl port-forward svc/CLUSTER-head-svc 8265:8265`)"
        ) from None
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        # Ray's client prefers $RAY_API_SERVER_ADDRESS and $RAY_ADDRESS to its argument
        with _env(RAY_API_SERVER_ADDRESS=url):
            return JobSubmissionClient(url, headers=headers)
    except Exception as exc:  # ConnectionError, AuthenticationError, RuntimeError, ...
        raise RaymetaError(f"cannot use the Ray Jobs API at {url}: {_one_line(exc)}") from None


@contextlib.contextmanager
def _env(**values: str):
    """Set environment variables for the duration of a block, restoring the previous values."""
    previous = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in previous.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _call(address: str | None, job_id: str | None, fn):
    """``fn(client(address))`` with Ray's errors turned into one-line RaymetaErrors (the CLI's
    way to use the client)."""
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


def _local_working_dir(env: dict[str, Any]) -> Path | None:
    wd = env.get("working_dir")
    if not wd or "://" in str(wd):
        return None
    return Path(wd).expanduser().resolve()


def load_runtime_env(source: str | Path | dict | None = None) -> dict[str, Any]:
    """A runtime_env dict from a YAML file (e.g. ``cluster/runtime_env.yaml``) or a dict.

    ``None`` gives the current directory as ``working_dir``. With a local ``working_dir``
    (relative paths are taken from the current directory, as ``ray job submit`` does),
    ``excludes`` becomes :data:`DEFAULT_EXCLUDES` followed by the source's own. The result is
    checked with Ray's :class:`ray.runtime_env.RuntimeEnv`.

    Raises:
        ConfigError: the file is missing or malformed, or Ray rejects a field.
    """
    if source is None:
        env: dict[str, Any] = {"working_dir": "."}
    elif isinstance(source, dict):
        env = dict(source)
    else:
        from raymeta.config import load_yaml

        env = load_yaml(source)
        if not isinstance(env, dict):
            raise ConfigError(
                f"{source}: a runtime_env must be a mapping (got {type(env).__name__})"
            )
    where = f"runtime_env{f' {source}' if source else ''}"
    if _local_working_dir(env) is not None:
        excludes = env.get("excludes") or []
        if not isinstance(excludes, list) or not all(isinstance(e, str) for e in excludes):
            raise ConfigError(f"{where}: excludes must be a list of gitignore patterns")
        env["excludes"] = [*DEFAULT_EXCLUDES, *excludes]
    try:
        from ray.runtime_env import RuntimeEnv

        RuntimeEnv(**env)
    except Exception as exc:
        raise ConfigError(f"{where}: {_one_line(exc)}") from None
    return env


def guess_subcommand(file: str | Path) -> str:
    """The ``raymeta`` subcommand for a pipeline file: ``study`` or ``compare`` for a file with
    only that section (their commands take ``--resume``), else ``run`` (which runs every
    section, :data:`raymeta.config.SECTIONS`)."""
    from raymeta.config import SECTIONS, load_yaml

    data = load_yaml(file)
    keys = set(data) if isinstance(data, dict) else set()
    sections = keys & set(SECTIONS) | ({"longtail"} if "mfm" in keys else set())
    if sections in ({"study"}, {"compare"}):
        return sections.pop()
    return "run"


def entrypoint_for(file: str, subcommand: str, extra_args: Sequence[str] = ()) -> str:
    """The shell command the cluster runs: ``python -m raymeta.cli SUBCOMMAND FILE ARGS...``."""
    return shlex.join(["python", "-m", "raymeta.cli", subcommand, file, *extra_args])


def job_request(
    file: str | Path,
    *,
    subcommand: str | None = None,
    runtime_env: str | Path | dict | None = None,
    extra_args: Sequence[str] = (),
    tracking_uri: str | None = None,
    submission_id: str | None = None,
    entrypoint_num_cpus: float | None = None,
    entrypoint_num_gpus: float | None = None,
) -> dict[str, Any]:
    """Check a pipeline file here and build its Ray job; nothing is sent.

    Args:
        file: the pipeline or study YAML, inside the runtime_env's local ``working_dir`` (it
            travels with it); the name of a pipeline shipped with raymeta (e.g.
            ``quickstart.yaml``: checked here, and the job's raymeta reads its own copy); with
            no local working_dir, a path on the cluster.
        subcommand: ``run``, ``compare`` or ``study``; None guesses from the file
            (:func:`guess_subcommand`).
        runtime_env: a runtime_env YAML path or dict (see :func:`load_runtime_env`).
        extra_args: more arguments for the raymeta command, e.g. ``["--output-dir", "/data"]``.
        tracking_uri: sets ``MLFLOW_TRACKING_URI`` in the job's environment (a tracking
            server, e.g. ``http://HEAD_IP:5000``), overriding the runtime_env's.
        submission_id: a chosen job id (Ray generates ``raysubmit_...`` otherwise).
        entrypoint_num_cpus, entrypoint_num_gpus: resources reserved for the driver.

    Returns:
        The keyword arguments of ``JobSubmissionClient.submit_job`` (for :func:`submit`).

    Raises:
        ConfigError: the file is missing, outside the working_dir or not a valid pipeline; a
            bad subcommand or runtime_env; a placeholder ``MLFLOW_TRACKING_URI``.
    """
    from raymeta.config import load_pipeline
    from raymeta.pipelines import find_pipeline, shipped_pipeline

    env = load_runtime_env(runtime_env)
    working_dir = _local_working_dir(env)
    path = Path(file)
    job_file = str(file)
    shipped = None if path.exists() else shipped_pipeline(file)
    if working_dir is not None or path.is_file() or shipped is not None:
        path = find_pipeline(file)  # a miss is one line listing the shipped pipelines
        load_pipeline(path)  # fail here, not minutes later on the cluster
        subcommand = subcommand or guess_subcommand(path)
    if working_dir is not None and shipped is None:
        try:
            job_file = path.resolve().relative_to(working_dir).as_posix()
        except ValueError:
            raise ConfigError(
                f"{file} is outside the runtime_env working_dir {working_dir}, so the job "
                "cannot read it; move it into that directory or use another working_dir"
            ) from None
    subcommand = subcommand or "run"
    if subcommand not in SUBCOMMANDS:
        raise ConfigError(f"unknown subcommand {subcommand!r}; accepted: {', '.join(SUBCOMMANDS)}")
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
    return {
        "entrypoint": entrypoint_for(job_file, subcommand, extra_args),
        "runtime_env": env,
        "submission_id": submission_id,
        "metadata": {"raymeta.file": job_file, "raymeta.subcommand": subcommand},
        "entrypoint_num_cpus": entrypoint_num_cpus,
        "entrypoint_num_gpus": entrypoint_num_gpus,
    }


def submit(request: dict[str, Any], address: str | None = None) -> str:
    """Upload the local working_dir and submit a :func:`job_request`; return the job's id.

    The working_dir's ``.gitignore`` files are honoured even where Ray's switch to upload
    them, ``RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1``, is set.

    Raises:
        RaymetaError: the cluster is unreachable or refuses the job.
    """
    with _env(RAY_RUNTIME_ENV_IGNORE_GITIGNORE="0"):
        return _call(address, None, lambda c: c.submit_job(**request))


def wait(c, job_id: str, timeout: float | None = None, poll_s: float = 1.0) -> str:
    """Poll the client ``c`` every ``poll_s`` seconds until the job is SUCCEEDED, FAILED or
    STOPPED; return that status (``JobSubmissionClient`` has no wait).

    Raises:
        RaymetaError: ``timeout`` seconds passed first (the job keeps running).
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    while (state := c.get_job_status(job_id).value) not in TERMINAL:
        if deadline is not None and time.monotonic() > deadline:
            raise RaymetaError(f"job {job_id} is still {state} after {timeout:g} s")
        time.sleep(poll_s)
    return state


def follow_logs(c, job_id: str, out=None) -> str:
    """Stream the job's logs from the client ``c`` to ``out`` (default stdout) until it ends
    (Ray's ``tail_job_logs``); return its final status."""
    out = out or sys.stdout

    async def _tail():
        async for chunk in c.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    c.get_job_info(job_id)  # an unknown id fails here, before streaming
    asyncio.run(_tail())
    return wait(c, job_id, timeout=30)


# --- CLI ---------------------------------------------------------------------------------


def _add_address(p) -> None:
    p.add_argument(
        "--address",
        help=f"Ray Jobs API address, http(s)://HOST:PORT (default $RAY_API_SERVER_ADDRESS, "
        f"$RAY_ADDRESS or {DEFAULT_ADDRESS})",
    )


def _fmt_time(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "-"


def _cmd_submit(args) -> None:
    url = resolve_address(args.address)
    try:
        extra_args = shlex.split(args.job_args)
    except ValueError as exc:
        raise ConfigError(f"--job-args {args.job_args!r}: {exc}") from None
    request = job_request(
        args.file,
        subcommand=None if args.subcommand == "auto" else args.subcommand,
        runtime_env=args.runtime_env,
        extra_args=extra_args,
        tracking_uri=args.tracking_uri,
        submission_id=args.submission_id,
        entrypoint_num_gpus=args.num_gpus,
    )
    if "MLFLOW_TRACKING_URI" not in request["runtime_env"].get("env_vars", {}):
        print(
            "raymeta: warning: no MLFLOW_TRACKING_URI (--tracking-uri or the runtime_env's "
            "env_vars): the job logs to a SQLite file in its working directory on the head, "
            "which Ray deletes later",
            file=sys.stderr,
        )
    job_id = submit(request, url)
    where = f" --address {url}" if args.address else ""
    print(f"submitted {job_id} to {url}")
    if not args.follow:
        print(f"watch it: raymeta jobs logs {job_id} --follow{where}")
        print(f"status:   raymeta jobs status {job_id}{where}")
        print(f"stop it:  raymeta jobs stop {job_id}{where}")
        return
    _until_end(url, job_id, lambda c: follow_logs(c, job_id))


def _cmd_status(args) -> None:
    d = _call(args.address, args.job_id, lambda c: c.get_job_info(args.job_id))
    print(f"{d.submission_id}  {d.status.value}  {d.message or ''}".rstrip())
    print(f"  entrypoint: {d.entrypoint}")
    print(f"  started {_fmt_time(d.start_time)}  ended {_fmt_time(d.end_time)}")


def _cmd_logs(args) -> None:
    if args.follow:
        _call(args.address, args.job_id, lambda c: follow_logs(c, args.job_id))
    else:
        print(_call(args.address, args.job_id, lambda c: c.get_job_logs(args.job_id)), end="")


def _cmd_stop(args) -> None:
    was_running = _call(args.address, args.job_id, lambda c: c.stop_job(args.job_id))
    print(f"{args.job_id}: {'stop requested' if was_running else 'was not running'}")
    if args.wait:
        final = _call(args.address, args.job_id, lambda c: wait(c, args.job_id, timeout=120))
        print(f"{args.job_id}: {final}")


def _cmd_wait(args) -> None:
    _until_end(args.address, args.job_id, lambda c: wait(c, args.job_id, timeout=args.timeout))


def _until_end(address: str | None, job_id: str, fn) -> None:
    """Run ``fn(client)`` (a wait or a follow), print the final status; exit 2 (a RaymetaError)
    unless it SUCCEEDED."""
    final, message = _call(address, job_id, lambda c: (fn(c), c.get_job_info(job_id).message))
    print(f"{job_id}: {final}")
    if final != "SUCCEEDED":
        raise RaymetaError(f"job {job_id} ended {final}: {message}")


def _cmd_list(args) -> None:
    jobs = sorted(
        _call(args.address, None, lambda c: c.list_jobs()), key=lambda d: d.start_time or 0
    )
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
        description="Check FILE here, then submit `raymeta run|compare|study FILE` as a Ray job "
        "(entrypoint `python -m raymeta.cli SUBCOMMAND FILE ARGS`) and print its id. The "
        "working_dir is uploaded without its .gitignore'd files, secrets (.env*, private keys), "
        ".git, virtualenvs, outputs and MLflow stores.",
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
        help="runtime_env YAML, e.g. cluster/runtime_env.yaml; its `excludes` add to the "
        "default ones (default: upload the current directory as working_dir)",
    )
    p.add_argument(
        "--subcommand",
        choices=("auto", *SUBCOMMANDS),
        default="auto",
        help="raymeta subcommand the job runs (default: from the file's sections)",
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
