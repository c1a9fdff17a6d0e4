"""Two-process DistributedDataParallel training on CPU (gloo), and `torchrun fewshot train`."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from test_train import TINY, read_metrics, tiny_config, write_images

pytestmark = pytest.mark.slow  # torchrun and multi-process training: ~30 s

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, data: str, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
    )
    torch.set_num_threads(1)
    from fewshot_trainer import distributed as dist_utils
    from fewshot_trainer.train import MSNTrainer, TrainOptions

    trainer = MSNTrainer(
        tiny_config(optimization={"epochs": 1}),
        TrainOptions(data=Path(data), output=Path(out), progress=False),
    )

    # GlobalBatchNorm1d over two half batches must equal BatchNorm1d over the whole batch.
    torch.manual_seed(123)
    full = torch.randn(8, 5, requires_grad=True)
    weights = torch.randn(8, 5)
    bn = dist_utils.convert_to_global_batchnorm(torch.nn.BatchNorm1d(5))
    rows = slice(rank * 4, (rank + 1) * 4)
    (bn(full[rows]) * weights[rows]).sum().backward()

    trainer.fit()
    state = {
        "online": trainer.online_module.state_dict(),
        "target": trainer.target.state_dict(),
        "prototypes": trainer.prototypes.detach().clone(),
        "bn_running_mean": bn.running_mean.clone(),
        "bn_input_grad": full.grad[rank * 4 : (rank + 1) * 4].clone(),
    }
    torch.save(state, Path(out) / f"rank{rank}.pt")
    dist_utils.shutdown()


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    root = tmp_path_factory.mktemp("ddp")
    data = write_images(root / "data", 32)  # 2 ranks x batch 8: 2 steps
    out = root / "run"
    mp.spawn(_worker, args=(_free_port(), str(data), str(out)), nprocs=WORLD, join=True)
    return out, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def test_ranks_hold_identical_weights_after_training(ddp_run) -> None:
    out, states = ddp_run
    first, second = states
    for part in ("online", "target"):
        assert first[part].keys() == second[part].keys()
        for name, tensor in first[part].items():
            torch.testing.assert_close(second[part][name], tensor, rtol=0, atol=0, msg=f"{part}.{name}")
    torch.testing.assert_close(second["prototypes"], first["prototypes"], rtol=0, atol=0)
    # Only rank 0 wrote the run's files; 2 steps of the global batch 16 happened.
    records = read_metrics(out)
    assert records[0]["world_size"] == 2 and records[0]["steps_per_epoch"] == 2
    assert [r["step"] for r in records if r["event"] == "step"] == [1, 2]
    assert (out / "checkpoint.pt").is_file()


def test_global_batchnorm_matches_full_batch_batchnorm(ddp_run) -> None:
    _, states = ddp_run
    torch.manual_seed(123)
    full = torch.randn(8, 5, requires_grad=True)
    weights = torch.randn(8, 5)
    bn = torch.nn.BatchNorm1d(5)
    (bn(full) * weights).sum().backward()
    torch.testing.assert_close(states[0]["bn_running_mean"], bn.running_mean)
    grads = torch.cat([states[0]["bn_input_grad"], states[1]["bn_input_grad"]])
    # One-pass variance (E[x^2] - mean^2) differs from torch's in float rounding only.
    assert full.grad.abs().max() > 0.5
    torch.testing.assert_close(grads, full.grad, rtol=1e-4, atol=1e-5)


def test_torchrun_runs_the_cli_and_only_rank_0_writes(tmp_path: Path) -> None:
    import yaml

    data = write_images(tmp_path / "data", 32)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({**TINY, "optimization": {"epochs": 1}}))
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
        "-m",
        "fewshot_common.cli",
        "train",
        "--config",
        str(config),
        "--data",
        str(data),
        "--output",
        str(out),
        "--no-progress",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # report.png: drawn once, by rank 0, at the end of `fewshot train`.
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoint.pt",
        "config.yaml",
        "metrics.jsonl",
        "report.png",
    ]
    assert proc.stdout.count("report ") == 1
    start = read_metrics(out)[0]
    assert start["world_size"] == 2
