import functools
import os
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
