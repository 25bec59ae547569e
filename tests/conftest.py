import contextlib
import functools
import os
import shutil
import sqlite3
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

os.environ.setdefault("RAYMETA_QUIET", "1")
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def ray_local():
    """A small local Ray instance for the tests that need one (stopped with ray.shutdown)."""
    import ray

    from raymeta.session import start_local_ray

    start_local_ray(2, include_dashboard=True, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def _migrated_store(tmp_path_factory):
    """One empty MLflow SQLite store with every schema migration applied, made once per session:
    MLflow makes a store by running its Alembic migrations one by one, seconds per store (most of
    it waiting for the disk). Its default experiment is deleted: MLflow adds it again when a copy
    is opened, with its artifact location resolved then, as in a store made there."""
    import mlflow

    path = tmp_path_factory.mktemp("migrated") / "mlflow.db"
    mlflow.MlflowClient(f"sqlite:///{path}").search_experiments()  # makes the store
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute("DELETE FROM experiments")
    return path


@pytest.fixture(scope="session")
def new_store(_migrated_store):
    """``new_store(path)`` puts an empty MLflow SQLite store at ``path`` and returns its URI
    ``sqlite:///{path}``: a copy of ``_migrated_store``, which opens as a store that MLflow makes
    there (tests/test_tracking.py checks it), without the seconds of migrations. For tests whose
    subject is not the making of a store."""

    def make(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_migrated_store, path)
        return f"sqlite:///{path}"

    return make


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # no request lines in the test output
        pass


@pytest.fixture
def http_folder(tmp_path):
    """A real HTTP server on 127.0.0.1 serving a fresh folder: yields ``(folder, base_url)``,
    e.g. ``f"{base_url}/a.txt"`` serves ``folder / "a.txt"`` (the download paths' tests)."""
    folder = tmp_path / "served"
    folder.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
