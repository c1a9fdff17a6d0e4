"""Hugging Face ViTMSN folders -> fewshot checkpoint -> ONNX, compared with transformers itself.

Models are built from a ``ViTMSNConfig`` with random weights (nothing is downloaded). To keep CI
fast they keep the real widths, head counts and patch sizes of ViT-S/16 and ViT-L/7 but have 2
blocks instead of 12/24 and a small image (64 px, 28 px). Every parameter is perturbed after
init, because transformers initialises LayerNorms to (1, 0) and biases to 0, which would hide a
wrong mapping of exactly those tensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import ViTMSNConfig, ViTMSNForImageClassification, ViTMSNModel

from fewshot_common.cli import main
from fewshot_common.modelmeta import INPUT_NAME, OUTPUT_NAME, ModelMeta
from fewshot_trainer.checkpoint import load_checkpoint
from fewshot_trainer.importers import CheckpointImportError, read_hf

# name: (width, heads, patch, image size, depth) -- real width/heads/patch, reduced depth and image.
SIZES = {
    "vit_small_p16": (384, 6, 16, 64, 2),
    "vit_large_p7": (1024, 16, 7, 28, 2),
}


def hf_config(name: str, **overrides) -> ViTMSNConfig:
    width, heads, patch, image, depth = SIZES[name]
    settings = dict(
        hidden_size=width,
        num_attention_heads=heads,
        patch_size=patch,
        image_size=image,
        num_hidden_layers=depth,
        intermediate_size=4 * width,
    )
    return ViTMSNConfig(**{**settings, **overrides})


def random_hf_model(name: str, seed: int = 0, model_class=ViTMSNModel, **overrides) -> ViTMSNModel:
    torch.manual_seed(seed)
    model = model_class(hf_config(name, **overrides)).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model


def hf_cls(model: ViTMSNModel, pixels: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(pixel_values=pixels).last_hidden_state[:, 0].numpy()


def onnx_embed(path: Path, pixels: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run([OUTPUT_NAME], {INPUT_NAME: pixels.numpy()})[0]


def import_and_export(fmt: str, source: Path, tmp_path: Path, *extra: str) -> Path:
    """The user's two commands; returns the ONNX path."""
    ckpt, onnx_path = tmp_path / f"{fmt}.pt", tmp_path / f"{fmt}.onnx"
    assert main(["import-checkpoint", "--format", fmt, str(source), "--output", str(ckpt), *extra]) == 0
    assert main(["export", "--checkpoint", str(ckpt), "--output", str(onnx_path)]) == 0
    return onnx_path


def pixels_for(name: str, batch: int = 3) -> torch.Tensor:
    image = SIZES[name][3]
    return torch.randn(batch, 3, image, image, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", list(SIZES))
def test_imported_hf_model_matches_transformers_cls_embedding(name: str, tmp_path: Path) -> None:
    model = random_hf_model(name)
    model.save_pretrained(tmp_path / "hf")
    onnx_path = import_and_export("hf", tmp_path / "hf", tmp_path)

    pixels = pixels_for(name)
    diff = np.abs(onnx_embed(onnx_path, pixels) - hf_cls(model, pixels)).max()
    assert diff <= 1e-4, f"{name}: max abs diff {diff}"

    width, heads, patch, image, depth = SIZES[name]
    arch = load_checkpoint(tmp_path / "hf.pt")["arch"]
    assert (
        arch["embed_dim"],
        arch["num_heads"],
        arch["patch_size"],
        arch["img_size"],
        arch["depth"],
    ) == (
        width,
        heads,
        patch,
        image,
        depth,
    )


def test_heads_come_from_config_json_and_matter(tmp_path: Path) -> None:
    # The same weights with 12 heads in config.json instead of 6: import follows config.json, and
    # the embedding changes -- which is why heads are never guessed when the source states them.
    model = random_hf_model("vit_small_p16")
    other = ViTMSNModel(hf_config("vit_small_p16", num_attention_heads=12)).eval()
    other.load_state_dict(model.state_dict())
    other.save_pretrained(tmp_path / "hf12")
    assert read_hf(tmp_path / "hf12").spec.num_heads == 12
    pixels = pixels_for("vit_small_p16")
    onnx12 = import_and_export("hf", tmp_path / "hf12", tmp_path)
    np.testing.assert_allclose(onnx_embed(onnx12, pixels), hf_cls(other, pixels), atol=1e-4)
    assert np.abs(hf_cls(other, pixels) - hf_cls(model, pixels)).max() > 1e-2


def test_bin_sharded_and_classifier_checkpoints_give_the_same_weights(tmp_path: Path) -> None:
    model = random_hf_model("vit_small_p16")
    model.save_pretrained(tmp_path / "plain")
    reference = read_hf(tmp_path / "plain").target_encoder

    # pytorch_model.bin with the same tensors.
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "plain" / "config.json").read_text())
    torch.save(load_file(tmp_path / "plain" / "model.safetensors"), tmp_path / "bin" / "pytorch_model.bin")
    # Sharded safetensors with an index.
    model.save_pretrained(tmp_path / "sharded", max_shard_size="2MB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    # A classification model: the backbone under `vit.`, plus a classifier that is not imported.
    classifier = random_hf_model("vit_small_p16", model_class=ViTMSNForImageClassification, num_labels=3)
    classifier.vit.load_state_dict(model.state_dict())
    classifier.save_pretrained(tmp_path / "cls")

    # transformers 5's in-memory module names (layers.N.attention.q_proj, ...), as a plain
    # save_file(model.state_dict()) writes them.
    (tmp_path / "memory").mkdir()
    (tmp_path / "memory" / "config.json").write_text((tmp_path / "plain" / "config.json").read_text())
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        tmp_path / "memory" / "model.safetensors",
    )
    assert any(".q_proj." in k for k in load_file(tmp_path / "memory" / "model.safetensors"))

    for folder in ("bin", "sharded", "cls", "memory"):
        state = read_hf(tmp_path / folder).target_encoder
        assert state.keys() == reference.keys(), folder
        for key, value in reference.items():
            assert torch.equal(state[key], value), f"{folder}: {key}"


def test_preprocessing_follows_msn_eval_and_the_saved_processor(tmp_path: Path) -> None:
    model = random_hf_model("vit_small_p16", image_size=224, num_hidden_layers=1)
    model.save_pretrained(tmp_path / "hf")
    ckpt_path = tmp_path / "c.pt"
    import_hf = ["import-checkpoint", "--format", "hf", str(tmp_path / "hf"), "--output", str(ckpt_path)]
    assert main(import_hf) == 0
    pre = load_checkpoint(ckpt_path)["preprocess"]
    assert (pre["input_size"], pre["resize_size"], pre["interpolation"]) == (224, 256, "bicubic")
    assert tuple(pre["mean"]) == (0.485, 0.456, 0.406) and tuple(pre["std"]) == (
        0.229,
        0.224,
        0.225,
    )

    (tmp_path / "hf" / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]})
    )
    onnx_path = tmp_path / "m.onnx"
    assert main(import_hf) == 0  # again, now with the saved processor config
    assert main(["export", "--checkpoint", str(ckpt_path), "--output", str(onnx_path)]) == 0
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    meta = ModelMeta.from_metadata_props(session.get_modelmeta().custom_metadata_map)
    assert meta.preprocess.mean == (0.5, 0.5, 0.5) and meta.preprocess.resize_size == 256
    assert meta.arch == "vit_w384_d1_h6_p16_224"


# --- errors -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("hf") / "small"
    random_hf_model("vit_small_p16").save_pretrained(folder)
    return folder


def _copy_with(src: Path, dst: Path, *, config: dict | None = None, edit=None) -> Path:
    dst.mkdir(parents=True)
    cfg = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, **(config or {})}))
    state = load_file(src / "model.safetensors")
    if edit:
        edit(state)
    save_file(state, dst / "model.safetensors")
    return dst


def _fails(source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> str:
    out = tmp_path / "never.pt"
    assert main(["import-checkpoint", "--format", "hf", str(source), "--output", str(out), *extra]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fewshot import-checkpoint: ") and "Traceback" not in err
    assert not out.exists()
    return err


def test_missing_unexpected_and_misshapen_keys_are_named(
    saved_small: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def drop(state):
        del state["encoder.layer.1.layernorm_after.weight"]

    def add(state):
        state["encoder.layer.0.attention.attention.extra.weight"] = torch.zeros(2)

    def reshape(state):
        state["encoder.layer.1.output.dense.weight"] = torch.zeros(384, 1000)

    def drop_key(state):
        del state["encoder.layer.0.attention.attention.key.bias"]

    err = _fails(_copy_with(saved_small, tmp_path / "a", edit=drop), tmp_path, capsys)
    assert "missing ['encoder.layer.1.layernorm_after.weight']" in err
    err = _fails(_copy_with(saved_small, tmp_path / "b", edit=add), tmp_path, capsys)
    assert "unexpected keys" in err and "encoder.layer.0.attention.attention.extra.weight" in err
    err = _fails(_copy_with(saved_small, tmp_path / "c", edit=reshape), tmp_path, capsys)
    assert "encoder.layer.1.output.dense.weight (384, 1000) (expected (384, 1536))" in err
    err = _fails(_copy_with(saved_small, tmp_path / "d", edit=drop_key), tmp_path, capsys)
    assert "block 0 attention bias lacks key" in err


def test_config_that_timm_cannot_reproduce_is_refused(
    saved_small: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = _fails(
        _copy_with(saved_small, tmp_path / "eps", config={"layer_norm_eps": 1e-12}),
        tmp_path,
        capsys,
    )
    assert "layer_norm_eps 1e-12" in err
    err = _fails(_copy_with(saved_small, tmp_path / "act", config={"hidden_act": "relu"}), tmp_path, capsys)
    assert "hidden_act 'relu'" in err
    err = _fails(_copy_with(saved_small, tmp_path / "bert", config={"model_type": "bert"}), tmp_path, capsys)
    assert "model_type is 'bert'" in err
    err = _fails(_copy_with(saved_small, tmp_path / "size", config={"image_size": 96}), tmp_path, capsys)
    assert "image_size 96 but the weights give 64" in err


def test_wrong_source_and_wrong_options_are_refused(
    saved_small: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert "is not a folder" in _fails(tmp_path / "nowhere", tmp_path, capsys)
    (tmp_path / "empty").mkdir()
    assert "no config.json" in _fails(tmp_path / "empty", tmp_path, capsys)
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text((saved_small / "config.json").read_text())
    assert "no model.safetensors" in _fails(tmp_path / "noweights", tmp_path, capsys)
    err = _fails(saved_small, tmp_path, capsys, "--arch", "vit_small_p16_224")
    assert "does not fit the weights" in err and "img_size 224 (--arch) vs 64 (weights)" in err
    assert "msn only" in _fails(saved_small, tmp_path, capsys, "--encoder", "anchor")
    with pytest.raises(CheckpointImportError, match="no config.json"):
        read_hf(tmp_path / "empty")
