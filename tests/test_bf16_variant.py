"""The bf16 variant: bf16 weights in a file any ONNX runtime runs, served through OpenVINO in bf16
arithmetic where the CPU has it, and chosen first on a CPU with AMX-BF16."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from fewshot_client import FewShotClient
from fewshot_common import embedder as embedder_module
from fewshot_common.cli import main
from fewshot_common.cores import usable_cores
from fewshot_common.embedder import Embedder
from fewshot_common.modelmeta import INPUT_NAME, OUTPUT_NAME
from fewshot_common.openvino_engine import OpenVinoRunner, bf16_is_fastest, cpu_flags, openvino_available
from fewshot_common.variants import choose_model_file, variant_path
from fewshot_service.app import ServerStack
from fewshot_trainer.variants import to_bfloat16_bits

import image_samples as samples
from conftest import stack_settings

CPU = ["CPUExecutionProvider"]


@pytest.fixture(scope="module")
def model_with_bf16(tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny test model with its int8 and bf16 variants written by the CLI."""
    parent = tmp_path_factory.mktemp("bf16") / "tiny.onnx"
    shutil.copy(tiny_model_path, parent)
    for precision in ("int8", "bf16"):
        assert main(["export", "--from-onnx", str(parent), "--precision", precision]) == 0
    return parent


def images(count: int, seed: int = 0) -> list[bytes]:
    return [samples.noise_png(seed + index, size=(48, 48)) for index in range(count)]


def test_rounding_to_bfloat16_is_to_nearest_even() -> None:
    values = np.array([1.0, -2.5, 0.0], dtype=np.float32)
    assert to_bfloat16_bits(values).tolist() == [0x3F80, 0xC020, 0x0000]  # exact in bf16
    halfway_down = np.array([0x3F808000], dtype=np.uint32).view(np.float32)  # 1 + 2^-8: tie, even below
    halfway_up = np.array([0x3F818000], dtype=np.uint32).view(np.float32)  # tie, even above
    above = np.array([0x3F808001], dtype=np.uint32).view(np.float32)  # past the tie: up
    assert to_bfloat16_bits(halfway_down).tolist() == [0x3F80]
    assert to_bfloat16_bits(halfway_up).tolist() == [0x3F82]
    assert to_bfloat16_bits(above).tolist() == [0x3F81]


def test_the_multiplied_weights_are_stored_as_bfloat16_and_the_rest_stays_float32(
    model_with_bf16: Path,
) -> None:
    parent = onnx.load(model_with_bf16)
    variant = onnx.load(variant_path(model_with_bf16, "bf16"))
    weights = {node.input[1] for node in parent.graph.node if node.op_type in ("MatMul", "Gemm", "Conv")}
    parent_inits = {t.name: t for t in parent.graph.initializer}
    weights &= set(parent_inits)
    assert weights  # the model multiplies by stored weights
    casts = {node.output[0]: node for node in variant.graph.node if node.op_type == "Cast"}
    stored = {t.name: t for t in variant.graph.initializer}
    for name in weights:
        cast = casts[name]  # the weight is now a Cast of a bf16 initializer
        source = stored[cast.input[0]]
        assert source.data_type == onnx.TensorProto.BFLOAT16
        expected = to_bfloat16_bits(onnx.numpy_helper.to_array(parent_inits[name]))
        assert np.frombuffer(source.raw_data, dtype=np.uint16).tolist() == expected.ravel().tolist()
    others = set(parent_inits) - weights
    assert others and all(stored[name].data_type == parent_inits[name].data_type for name in others)
    assert variant_path(model_with_bf16, "bf16").stat().st_size < 0.7 * model_with_bf16.stat().st_size


def test_onnx_runtime_runs_the_file_as_fp32_on_rounded_weights(model_with_bf16: Path) -> None:
    """Any runtime can serve the file: ONNX Runtime casts the weights back and multiplies in fp32."""
    pixels = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    outputs = [
        ort.InferenceSession(str(path), providers=CPU).run([OUTPUT_NAME], {INPUT_NAME: pixels})[0]
        for path in (model_with_bf16, variant_path(model_with_bf16, "bf16"))
    ]
    fp32, bf16 = (o / np.linalg.norm(o, axis=1, keepdims=True) for o in outputs)
    cosines = np.sum(fp32 * bf16, axis=1)
    assert cosines.min() > 0.999 and not np.array_equal(outputs[0], outputs[1])


def test_the_bf16_variant_runs_on_openvino_and_agrees_with_fp32(model_with_bf16: Path) -> None:
    fp32 = Embedder(model_with_bf16)
    bf16 = Embedder(variant_path(model_with_bf16, "bf16"))
    assert bf16.engine.startswith("openvino CPU") and bf16.session_options is None
    assert bf16.model_id == fp32.model_id  # one embedding space: replicas share classes
    if "amx_bf16" in cpu_flags():
        assert bf16.compute_precision == "bf16"
    assert bf16.compute_precision in ("bf16", "f32")
    # The check it passed says which arithmetic it ran: this host's.
    assert bf16.meta.variant_check["bf16_arithmetic"] == float(bf16.compute_precision == "bf16")
    batch = images(8)
    vectors = bf16.embed_images(batch)
    assert vectors.dtype == np.float32 and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    assert np.sum(vectors * fp32.embed_images(batch), axis=1).min() > 0.99


def test_concurrent_runs_each_get_their_own_request_and_the_answers_of_runs_alone(
    model_with_bf16: Path,
) -> None:
    embedder = Embedder(variant_path(model_with_bf16, "bf16"), intra_op_threads=1, concurrent_runs=2)
    batches = [embedder.load_images(images(5, seed=10 * index)) for index in range(4)]
    alone = [embedder.embed_array(batch) for batch in batches]
    together: dict[int, np.ndarray] = {}
    start = threading.Barrier(len(batches))

    def embed(index: int) -> None:
        start.wait()
        for _ in range(5):
            together[index] = embedder.embed_array(batches[index])

    threads = [threading.Thread(target=embed, args=(index,)) for index in range(len(batches))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index, expected in enumerate(alone):
        np.testing.assert_allclose(together[index], expected, atol=1e-5)
    runner = embedder._openvino
    assert runner is not None and 1 <= runner._idle.qsize() <= len(batches)
    assert runner.copies == 2


def test_each_concurrent_run_has_its_own_copy_with_its_share_of_the_cores(
    model_with_bf16: Path,
) -> None:
    """One compiled copy (one stream) per run; without a thread count, the cores are shared out."""
    runner = OpenVinoRunner(variant_path(model_with_bf16, "bf16"), threads_per_run=None, concurrent_runs=2)
    assert runner.copies == 2
    for compiled in runner._copies:
        assert int(compiled.get_property("NUM_STREAMS")) == 1
        assert int(compiled.get_property("INFERENCE_NUM_THREADS")) == max(1, usable_cores() // 2)
    with pytest.raises(ValueError, match="concurrent_runs"):
        OpenVinoRunner(variant_path(model_with_bf16, "bf16"), threads_per_run=1, concurrent_runs=0)


def test_without_openvino_onnx_runtime_serves_the_file(
    model_with_bf16: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """openvino is an optional import (x86 only): without it the bf16 file still serves."""
    monkeypatch.setattr(embedder_module, "openvino_available", lambda: False)
    bf16 = Embedder(variant_path(model_with_bf16, "bf16"))
    assert bf16.engine == "onnxruntime CPUExecutionProvider" and bf16.compute_precision == "fp32"
    fp32 = Embedder(model_with_bf16)
    batch = images(4)
    assert np.sum(bf16.embed_images(batch) * fp32.embed_images(batch), axis=1).min() > 0.999


def test_if_openvino_cannot_compile_the_file_onnx_runtime_serves_it_and_says_so(
    model_with_bf16: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A host where OpenVINO fails (an odd CPU plugin, a sandbox) still serves the variant."""

    def cannot_compile(*args: object, **kwargs: object) -> None:
        raise RuntimeError("Exception from src/inference/src/cpp/core.cpp: no CPU plugin\nmore")

    monkeypatch.setattr(embedder_module, "OpenVinoRunner", cannot_compile)
    with caplog.at_level("WARNING", logger="fewshot_common.embedder"):
        bf16 = Embedder(variant_path(model_with_bf16, "bf16"))
    assert bf16.engine == "onnxruntime CPUExecutionProvider" and bf16.compute_precision == "fp32"
    assert "OpenVINO cannot compile tiny.bf16.onnx (Exception from" in caplog.text
    assert "more" not in caplog.text  # one line of OpenVINO's message, not its whole dump
    assert bf16.embed_images(images(2)).shape == (2, bf16.embedding_dim)


@pytest.mark.filterwarnings("ignore:Specified provider .CUDAExecutionProvider.")
def test_auto_serves_bf16_first_only_where_the_cpu_runs_it_fastest(model_with_bf16: Path) -> None:
    choose = choose_model_file
    assert choose(model_with_bf16, "auto", CPU, cpu_bf16=True).meta.precision == "bf16"
    assert choose(model_with_bf16, "auto", CPU, cpu_bf16=False).meta.precision == "int8"
    assert choose(model_with_bf16, "bf16", CPU, cpu_bf16=False).meta.precision == "bf16"  # asked for
    expected = "bf16" if bf16_is_fastest() else "int8"  # this host, by its own CPU flags
    assert choose(model_with_bf16, "auto", CPU).meta.precision == expected
    gpu = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose(model_with_bf16, "auto", gpu, cpu_bf16=True).meta.precision == "fp32"


def test_without_int8_a_cpu_without_bf16_units_prefers_fp32_to_bf16(
    model_with_bf16: Path, tmp_path: Path
) -> None:
    """Without bf16 units a bf16 variant is fp32 arithmetic on rounded weights: no faster."""
    parent = tmp_path / "tiny.onnx"
    shutil.copy(model_with_bf16, parent)
    shutil.copy(variant_path(model_with_bf16, "bf16"), variant_path(parent, "bf16"))
    assert choose_model_file(parent, "auto", CPU, cpu_bf16=False).path == parent
    assert choose_model_file(parent, "auto", CPU, cpu_bf16=True).meta.precision == "bf16"


def test_cpu_flags_are_read_from_cpuinfo(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx512f amx_bf16 amx_tile\n\nflags\t\t: other\n")
    assert cpu_flags(cpuinfo) == {"fpu", "avx512f", "amx_bf16", "amx_tile"}
    assert cpu_flags(tmp_path / "missing") == frozenset()
    # bf16 goes first only with AMX-BF16 tiles (measured) and OpenVINO to run it; AVX-512 BF16
    # alone (an AMD EPYC) keeps int8 first until a benchmark there says otherwise.
    assert bf16_is_fastest(frozenset({"avx512f", "amx_bf16"})) == openvino_available()
    assert not bf16_is_fastest(frozenset({"avx512f", "avx512_bf16"}))


def test_a_server_told_bf16_serves_it_through_openvino(model_with_bf16: Path, redis_url: str) -> None:
    image = samples.noise_png(7, size=(64, 64))
    expected = Embedder(variant_path(model_with_bf16, "bf16")).embed_images([image])
    with ServerStack(stack_settings(model_with_bf16, redis_url, precision="bf16")) as stack:
        assert stack.core is not None and stack.core.embedder.meta.precision == "bf16"
        info = httpx.get(f"http://127.0.0.1:{stack.http_port}/v1/info").json()
        assert info["precision"] == "bf16" and info["engine"].startswith("openvino CPU")
        with FewShotClient(f"127.0.0.1:{stack.grpc_port}") as client:
            served = client.embed([image])
    # Another thread layout may order bf16 sums differently: equal to rounding, not to the bit.
    assert float(np.sum(served * expected)) > 0.9999
