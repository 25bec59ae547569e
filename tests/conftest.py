import os

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
