"""Every device choice of raymeta: the torch device of a process and what a Ray Train worker
or a Ray Tune trial reserves.

Inside Ray (a Ray Train worker or a Tune trial that was given a GPU) the device is the GPU that
Ray assigned (``ray.train.torch.get_device``, which maps ``ray.get_gpu_ids()`` into
``CUDA_VISIBLE_DEVICES``); elsewhere (a benchmark, the driver) it is the current CUDA device.
On a machine without a GPU, ``use_gpu`` is refused on one line instead of failing inside a worker.
"""

from __future__ import annotations

import os

import torch

from raymeta.errors import ConfigError


def resolve_device(use_gpu: bool) -> torch.device:
    """The torch device this process trains on.

    Args:
        use_gpu: train on a GPU (``ray.use_gpu``, ``--use-gpu``, ``gpus_per_trial > 0``).

    Returns:
        ``cpu`` without ``use_gpu``; with it, the GPU Ray assigned to this worker or trial, or
        the current CUDA device outside Ray.

    Raises:
        ConfigError: ``use_gpu`` is set but this process sees no CUDA GPU.
    """
    if not use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(
            "use_gpu is set but this process sees no CUDA GPU (torch.cuda.is_available() is "
            "False); accepted: use_gpu false, or a machine (or Ray node) with a GPU"
        )
    import ray

    if ray.is_initialized() and ray.get_gpu_ids():  # a Ray worker or trial holding a GPU
        from ray.train.torch import get_device

        return get_device()
    return torch.device("cuda", torch.cuda.current_device())


def worker_resources(use_gpu: bool) -> dict[str, float]:
    """Ray resources one Ray Train worker reserves: one CPU, plus one GPU with ``use_gpu``
    (NCCL between workers then; gloo on CPU)."""
    return {"CPU": 1.0, "GPU": 1.0} if use_gpu else {"CPU": 1.0}


def trial_resources(cpus: float, gpus: float) -> dict[str, float]:
    """Ray resources one Ray Tune trial reserves (``cpus_per_trial``/``gpus_per_trial``, or a
    transfer study's ``cpus_per_task``/``gpus_per_task``); a trial trains on the GPU when it
    reserves one (:func:`trial_uses_gpu`)."""
    return {"cpu": cpus, "gpu": gpus}


def trial_uses_gpu(gpus: float) -> bool:
    """Whether a trial reserving ``gpus`` GPUs trains on a GPU (a fraction shares one)."""
    return gpus > 0


def torch_threads(use_gpu: bool, num_workers: int) -> int:
    """torch intra-op threads per Ray Train worker: this machine's CPUs shared among the
    workers on CPU, one on GPU (the GPU does the work)."""
    if use_gpu:
        return 1
    return max(1, (os.cpu_count() or 1) // num_workers)
