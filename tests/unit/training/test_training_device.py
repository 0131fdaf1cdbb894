"""Evaluation and attention maps run where the training ran: a Ray task with a GPU when training used GPUs."""

import os

import pytest

from tasks.config import build_config
from tasks.training.train import on_training_device

pytestmark = pytest.mark.slow


@pytest.fixture
def ray_with_a_gpu():
    import ray

    # One logical GPU: Ray schedules on it, and hands it to the task, whether or not CUDA is there.
    ray.init(address="local", num_cpus=2, num_gpus=1)
    yield
    ray.shutdown()


def test_gpu_trainings_send_the_work_to_a_gpu_task_cpu_trainings_keep_it_here(ray_with_a_gpu):
    import ray

    gpu = build_config({"scaling": {"use_gpu": True, "gpus_per_worker": 1, "cpus_per_worker": 1}})
    assert on_training_device(gpu, os.getpid) != os.getpid()
    assert on_training_device(gpu, ray.get_gpu_ids) == [0]
    cpu = build_config({"scaling": {"use_gpu": False}})
    assert on_training_device(cpu, os.getpid) == os.getpid()
