"""Precision variants: `fewshot export --precision int8` writes a checked variant that shares its
parent's embedding space, refuses one that fails the check, and the server serves the fastest."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from fewshot_client import FewShotClient
from fewshot_common.cli import main
from fewshot_common.embedder import Embedder
from fewshot_common.modelmeta import ModelMeta, Preprocess
from fewshot_common.variants import VariantError, choose_model_file, variant_path
from fewshot_service.app import ServerStack

import image_samples as samples
from conftest import stack_settings

CPU = ["CPUExecutionProvider"]


@pytest.fixture(scope="module")
def model_with_int8(tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny test model with its int8 variant written next to it by the CLI."""
    parent = tmp_path_factory.mktemp("variants") / "tiny.onnx"
    shutil.copy(tiny_model_path, parent)
    assert main(["export", "--from-onnx", str(parent), "--precision", "int8"]) == 0
    return parent


def test_int8_variant_records_its_precision_and_keeps_the_embedding_space(
    model_with_int8: Path,
) -> None:
    fp32 = Embedder(model_with_int8)
    int8 = Embedder(variant_path(model_with_int8, "int8"))
    assert (fp32.meta.precision, int8.meta.precision) == ("fp32", "int8")
    assert int8.model_id == fp32.model_id  # replicas on either share classes in the registry
    assert int8.meta.variant_id and int8.meta.variant_id != fp32.model_id
    assert int8.meta.variant_check["cosine_min"] >= 0.98
    images = [samples.noise_png(seed, size=(64, 64)) for seed in range(8)]
    cosines = np.sum(fp32.embed_images(images) * int8.embed_images(images), axis=1)
    assert cosines.min() > 0.99


def test_dynamic_int8_quantizes_the_matmuls_and_keeps_the_patch_convolution_fp32(
    model_with_int8: Path,
) -> None:
    """ORT's ConvInteger was slower than the fp32 Conv it replaced (variants.py), so the patch
    embedding stays fp32 while every MatMul with weights goes int8."""
    import onnx

    fp32_ops = [node.op_type for node in onnx.load(model_with_int8).graph.node]
    int8_ops = [node.op_type for node in onnx.load(variant_path(model_with_int8, "int8")).graph.node]
    assert "Conv" in fp32_ops and "Conv" in int8_ops and "ConvInteger" not in int8_ops
    quantized = sum(op in ("MatMulInteger", "DynamicQuantizeMatMul") for op in int8_ops)
    weight_matmuls = len(onnx.load(model_with_int8).graph.initializer)  # an upper bound
    assert 0 < quantized <= weight_matmuls


def test_a_variant_that_fails_its_check_is_not_written(
    tiny_model_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parent = tmp_path / "tiny.onnx"
    shutil.copy(tiny_model_path, parent)
    # int8 rounding cannot reproduce fp32 exactly, so a cosine bound of 1 fails.
    code = main(["export", "--from-onnx", str(parent), "--precision", "int8", "--min-cosine", "1"])
    assert code == 1
    assert not variant_path(parent, "int8").exists()
    assert not list(tmp_path.glob("*.tmp"))
    assert "failed its check against fp32" in capsys.readouterr().err


def test_check_data_runs_the_few_shot_protocol_on_both(tiny_model_path: Path, tmp_path: Path) -> None:
    data = tmp_path / "labelled"
    for label in range(5):  # 5-way 5-shot episodes need 5 + 15 images per class
        folder = data / f"class{label}"
        folder.mkdir(parents=True)
        for index in range(20):
            (folder / f"{index}.png").write_bytes(samples.noise_png(100 * label + index, size=(40, 40)))
    parent = tmp_path / "tiny.onnx"
    shutil.copy(tiny_model_path, parent)
    args = ["export", "--from-onnx", str(parent), "--precision", "int8", "--check-data", str(data)]
    assert main([*args, "--max-accuracy-drop", "100"]) == 0
    check = Embedder(variant_path(parent, "int8")).meta.variant_check
    assert check["check_images"] == 100
    for protocol in ("5way5shot", "allway5shot"):
        assert 0 <= check[f"{protocol}_variant"] <= 100 and 0 <= check[f"{protocol}_fp32"] <= 100


def test_server_chooses_the_fastest_checked_variant(model_with_int8: Path) -> None:
    assert choose_model_file(model_with_int8, "auto", CPU).meta.precision == "int8"
    assert choose_model_file(model_with_int8, "fp32", CPU).path == model_with_int8
    with pytest.raises(VariantError, match="no checked fp16 variant"):
        choose_model_file(model_with_int8, "fp16", CPU)
    # A variant file given directly is served as given.
    int8_file = variant_path(model_with_int8, "int8")
    assert choose_model_file(int8_file, "auto", CPU).path == int8_file


def test_a_sibling_of_another_model_is_not_taken_for_a_variant(
    other_model_path: Path, model_with_int8: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other.onnx"
    shutil.copy(other_model_path, other)
    # The tiny model's int8 variant under the other model's variant name: another embedding space.
    shutil.copy(variant_path(model_with_int8, "int8"), variant_path(other, "int8"))
    assert choose_model_file(other, "auto", CPU).path == other
    variant_path(other, "int8").write_bytes(b"not an onnx file")  # a broken sibling: ignored too
    assert choose_model_file(other, "auto", CPU).path == other


def test_served_stack_uses_the_int8_variant_unless_told_otherwise(
    model_with_int8: Path, redis_url: str
) -> None:
    image = samples.noise_png(7, size=(64, 64))
    expected = {
        precision: Embedder(choose_model_file(model_with_int8, precision, CPU).path).embed_images([image])
        for precision in ("int8", "fp32")
    }
    for precision, served in (("auto", "int8"), ("fp32", "fp32")):
        settings = stack_settings(model_with_int8, redis_url, precision=precision)
        with ServerStack(settings) as stack:
            assert stack.core is not None
            assert stack.core.embedder.meta.precision == served
            with FewShotClient(f"127.0.0.1:{stack.grpc_port}") as client:
                np.testing.assert_allclose(client.embed([image]), expected[served], atol=1e-5)


def test_fp32_metadata_is_written_as_before_and_variants_round_trip() -> None:
    preprocess = Preprocess(input_size=32, resize_size=32)
    fp32 = ModelMeta("arch-abc", "arch", 8, preprocess)
    assert not {"precision", "variant_id", "variant_check"} & set(json.loads(fp32.to_json()))
    variant = ModelMeta(
        "arch-abc",
        "arch",
        8,
        preprocess,
        precision="int8",
        variant_id="arch-def",
        variant_check={"cosine_min": 0.999},
    )
    assert ModelMeta.from_json(variant.to_json()) == variant
    with pytest.raises(ValueError, match="needs a variant_id"):
        ModelMeta("arch-abc", "arch", 8, preprocess, precision="int8")
