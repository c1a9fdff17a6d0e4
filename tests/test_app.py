"""The composition root hands every setting to the part that enforces it."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest

from fewshot_client import FewShotClient
from fewshot_service.app import ServerStack

import image_samples as samples
from conftest import stack_settings


def test_max_request_bytes_limits_grpc_messages(tiny_model_path: Path, redis_url: str) -> None:
    limit = 256 * 1024
    with ServerStack(stack_settings(tiny_model_path, redis_url, max_request_bytes=limit)) as stack:
        with FewShotClient(f"127.0.0.1:{stack.grpc_port}") as client:
            assert client.embed([samples.noise_png(0)]).shape[0] == 1  # a small request passes
            too_big = samples.noise_png(1, size=(400, 400))  # ~480 KB: over the limit
            assert len(too_big) > limit
            with pytest.raises(grpc.RpcError) as refused:
                client.embed([too_big])
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_batching_can_be_switched_off_from_the_environment(
    tiny_model_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEWSHOT_BATCHING", "false")
    monkeypatch.setenv("FEWSHOT_BATCH_WORKERS", "3")
    with ServerStack(stack_settings(tiny_model_path, redis_url)) as stack:
        assert stack.core is not None
        config = stack.core.batch_config
        assert (config.enabled, config.workers) == (False, 3)
        with FewShotClient(f"127.0.0.1:{stack.grpc_port}") as client:
            images = [samples.noise_png(seed) for seed in range(3)]
            together = client.embed(images)
            alone = np.stack([client.embed([image])[0] for image in images])
            np.testing.assert_allclose(together, alone, atol=1e-5)


def test_a_cpu_server_shares_the_cores_among_batch_workers_and_does_not_spin(
    tiny_model_path: Path, redis_url: str
) -> None:
    """The defaults the served benchmark chose: concurrent runs' threads add up to the cores, and
    idle ONNX Runtime threads sleep rather than take cores from decoding."""
    from fewshot_common.cores import usable_cores

    with ServerStack(stack_settings(tiny_model_path, redis_url)) as stack:
        assert stack.core is not None
        options = stack.core.embedder.session_options
        assert stack.core.batch_config.workers == 2
        assert options.intra_op_num_threads == max(1, usable_cores() // 2)
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
        # Runs of at most 8 images on a CPU, merged or of one request.
        assert stack.core.batch_config.max_batch_size == stack.core.embedder.max_batch_size == 8
    with ServerStack(
        stack_settings(
            tiny_model_path,
            redis_url,
            intra_op_threads=3,
            intra_op_spinning=True,
            batch_workers=1,
            max_batch_size=32,
        )
    ) as stack:
        assert stack.core is not None
        options = stack.core.embedder.session_options
        assert options.intra_op_num_threads == 3
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == "1"
        assert stack.core.batch_config.max_batch_size == stack.core.embedder.max_batch_size == 32


def test_a_gpu_server_keeps_large_batches() -> None:
    from fewshot_service.app import default_max_batch_size

    assert default_max_batch_size(["CUDAExecutionProvider", "CPUExecutionProvider"]) == 32
    assert default_max_batch_size(["CPUExecutionProvider"]) == 8


@pytest.mark.parametrize(
    ("cores", "workers", "threads"), [(2, 2, 1), (16, 2, 8), (1, 2, 1), (3, 2, 1), (8, 1, 8)]
)
def test_intra_op_threads_per_batch_is_an_equal_share_of_the_cores(
    cores: int, workers: int, threads: int
) -> None:
    from fewshot_common.cores import intra_op_threads_per_batch

    assert intra_op_threads_per_batch(cores, workers) == threads


def test_usable_cores_follow_the_affinity_mask() -> None:
    """Pinned to one core (as ``taskset`` or a cpuset does), a process counts one."""
    import subprocess
    import sys

    code = "import os; os.sched_setaffinity(0, {0}); from fewshot_common.cores import usable_cores; print(usable_cores())"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "1"
