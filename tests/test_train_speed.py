"""Speed settings of the trainer: ``optimization.bf16: auto`` and ``optimization.compile``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError

import fewshot_trainer.train as train_module
from fewshot_trainer.checkpoint import load_checkpoint
from fewshot_trainer.hardware import (
    MAX_GPU_WORKERS,
    CpuInfo,
    has_native_bf16,
    parse_cpuinfo,
    resolve_bf16,
    resolve_num_workers,
)
from fewshot_trainer.train import MSNTrainer, TrainOptions, train

from test_train import STATE_KEYS, assert_same_weights, tiny_config, write_images

AVX2_ONLY = {"sse4_2", "avx", "avx2", "fma"}
ZEN4 = AVX2_ONLY | {"avx512f", "avx512bw", "avx512_bf16"}
SAPPHIRE_RAPIDS = AVX2_ONLY | {"avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"}


@pytest.mark.parametrize(
    ("flags", "native"),
    [
        (AVX2_ONLY, False),
        (ZEN4, True),
        (SAPPHIRE_RAPIDS, True),
        ({"avx512f"}, False),  # AVX-512 without its bf16 extension multiplies bf16 no faster
        ({"amx_bf16"}, True),
        (set(), False),
    ],
)
def test_auto_bf16_follows_the_cpu_flags(flags: set[str], native: bool) -> None:
    assert has_native_bf16(flags) is native
    assert resolve_bf16("auto", device_type="cpu", cpu_flags=flags) is native
    # An explicit setting is obeyed whatever the CPU.
    assert resolve_bf16(True, device_type="cpu", cpu_flags=flags) is True
    assert resolve_bf16(False, device_type="cpu", cpu_flags=flags) is False


def test_auto_bf16_on_a_gpu_asks_the_gpu_not_the_cpu() -> None:
    assert resolve_bf16("auto", device_type="cuda", cpu_flags=AVX2_ONLY, cuda_bf16=True) is True
    assert resolve_bf16("auto", device_type="cuda", cpu_flags=SAPPHIRE_RAPIDS, cuda_bf16=False) is False


def test_auto_workers_load_in_process_on_a_cpu_and_feed_a_gpu_from_the_spare_cores() -> None:
    # CPU: the compute threads take every core, so no loader process, however many cores.
    for cores in (1, 2, 64):
        assert resolve_num_workers("auto", device_type="cpu", cores=cores) == 0
    # GPU: every core but the training process's own, capped; shared among local processes.
    assert resolve_num_workers("auto", device_type="cuda", cores=16) == 14 == MAX_GPU_WORKERS
    assert resolve_num_workers("auto", device_type="cuda", cores=8) == 7
    assert resolve_num_workers("auto", device_type="cuda", cores=64) == MAX_GPU_WORKERS
    assert resolve_num_workers("auto", device_type="cuda", cores=16, local_processes=4) == 3
    assert resolve_num_workers("auto", device_type="cuda", cores=1) == 0
    # A number is obeyed whatever the device.
    assert resolve_num_workers(3, device_type="cpu", cores=2) == 3
    assert resolve_num_workers(0, device_type="cuda", cores=16) == 0


def test_num_workers_setting_accepts_a_count_or_auto_only() -> None:
    assert tiny_config(data={"num_workers": "auto"}).data.num_workers == "auto"
    assert tiny_config(data={"num_workers": 3}).data.num_workers == 3
    for bad in (-1, "many"):
        with pytest.raises(ValidationError):
            tiny_config(data={"num_workers": bad})


def test_parse_cpuinfo_reads_the_first_processor() -> None:
    text = (
        "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9R14\n"
        "flags\t\t: fpu avx2 avx512f avx512_bf16\n\n"
        "processor\t: 1\nmodel name\t: other\nflags\t\t: fpu\n"
    )
    info = parse_cpuinfo(text)
    assert info.model_name == "AMD EPYC 9R14"
    assert info.reported_flags() == {"avx2": True, "avx512f": True, "avx512_bf16": True, "amx_bf16": False}
    assert parse_cpuinfo("") == CpuInfo()


def test_bf16_setting_accepts_true_false_auto_only() -> None:
    for value, expected in ((True, True), (False, False), ("auto", "auto"), ("true", True)):
        assert tiny_config(optimization={"bf16": value}).optimization.bf16 == expected
    with pytest.raises(ValidationError):
        tiny_config(optimization={"bf16": "sometimes"})


@pytest.mark.parametrize(("flags", "bf16"), [(AVX2_ONLY, False), (SAPPHIRE_RAPIDS, True)])
def test_trainer_resolves_auto_from_this_machines_cpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flags: set[str], bf16: bool
) -> None:
    monkeypatch.setattr(train_module, "cpu_info", lambda: CpuInfo("test cpu", frozenset(flags)))
    trainer = MSNTrainer(
        tiny_config(optimization={"bf16": "auto"}),
        TrainOptions(data=write_images(tmp_path / "data", 8), output=tmp_path / "run", progress=False),
    )
    assert trainer.bf16 is bf16


def _run(tmp_path: Path, name: str, steps: int, **optimization: Any) -> tuple[dict, list[dict]]:
    data = tmp_path / "data"
    if not data.is_dir():
        write_images(data, 16)
    out = tmp_path / name
    train(
        tiny_config(optimization=optimization),
        TrainOptions(data=data, output=out, max_steps=steps, progress=False),
    )
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return load_checkpoint(out / "checkpoint.pt"), records


def _losses(records: list[dict]) -> list[float]:
    return [r["loss"] for r in records if r["event"] == "step"]


@pytest.mark.slow  # compiling: ~10 s with inductor's cache warm, ~90 s cold on 2 busy cores
def test_compiled_steps_match_eager_and_keep_the_checkpoint_format(tmp_path: Path) -> None:
    eager, eager_log = _run(tmp_path, "eager", 2)
    compiled, compiled_log = _run(tmp_path, "compiled", 2, compile=True)
    assert [r for r in compiled_log if r["event"] == "compile_failed"] == []
    assert next(r for r in compiled_log if r["event"] == "start")["compile"] is True
    # Same losses (inductor reorders float sums: close, not bitwise); the second step's loss
    # is computed with the weights the first compiled backward and AdamW step produced.
    assert _losses(compiled_log) == pytest.approx(_losses(eager_log), rel=1e-4)
    for key in STATE_KEYS:
        assert list(compiled[key]) == list(eager[key])  # no "_orig_mod." prefix
        for name, tensor in eager[key].items():
            # Adam moves each weight by ~lr * sign(grad): where a gradient is ~0 its rounding
            # noise flips the sign, so weights agree to a few lr (1e-3), not to float precision.
            torch.testing.assert_close(compiled[key][name], tensor, rtol=0, atol=4e-3)


def _failing_forward_backend(gm: torch.fx.GraphModule, example_inputs: list) -> Any:
    raise RuntimeError("no C++ compiler here")


def _failing_backward_backend() -> Any:
    # Forward compiles (runs as traced), backward fails: the forward has already run when it does.
    from torch._dynamo.backends.common import aot_autograd

    def fail(gm: torch.fx.GraphModule, example_inputs: list) -> Any:
        raise RuntimeError("no C++ compiler here")

    return aot_autograd(fw_compiler=lambda gm, _inputs: gm, bw_compiler=fail)


@pytest.mark.parametrize(
    "backend", [_failing_forward_backend, _failing_backward_backend()], ids=["forward", "backward"]
)
@pytest.mark.slow
def test_a_failing_compiler_falls_back_to_exactly_the_eager_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backend: Any
) -> None:
    torch._dynamo.reset()
    eager, eager_log = _run(tmp_path, "eager", 2)
    monkeypatch.setattr(train_module, "COMPILE_BACKEND", backend)
    fallback, fallback_log = _run(tmp_path, "fallback", 2, compile=True)
    failed = [r for r in fallback_log if r["event"] == "compile_failed"]
    assert len(failed) == 1 and "no C++ compiler here" in failed[0]["error"]
    assert _losses(fallback_log) == _losses(eager_log)
    assert_same_weights(eager, fallback)
    # BatchNorm running statistics too: a failed backward must not leave the forward's update.
    for key in ("head", "target_head"):
        for name, tensor in eager[key].items():
            assert torch.equal(fallback[key][name], tensor), f"{key}.{name}"
