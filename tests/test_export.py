"""``fewshot export``: real ONNX graphs run in ONNX Runtime against the PyTorch modules they came from."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from fewshot_common.cli import main
from fewshot_common.modelmeta import INPUT_NAME, OUTPUT_NAME, ModelMeta, Preprocess
from fewshot_trainer.checkpoint import make_checkpoint, save_checkpoint
from fewshot_trainer.export import (
    EmbeddingHead,
    ExportError,
    default_preprocess,
    export_onnx,
    mean_embedding,
    whitening_projection,
)
from fewshot_trainer.vit import ArchSpec, build_vit, get_arch

SPEC = get_arch("vit_test_p8_32")


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _embed(path: Path, x: np.ndarray) -> np.ndarray:
    return _session(path).run([OUTPUT_NAME], {INPUT_NAME: x.astype(np.float32)})[0]


def _meta(path: Path) -> ModelMeta:
    return ModelMeta.from_metadata_props(_session(path).get_modelmeta().custom_metadata_map)


def _random_encoder(seed: int):
    torch.manual_seed(seed)
    return build_vit(SPEC).eval()


@pytest.fixture
def pixels() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(5, 3, 32, 32)).astype(np.float32)


# --- graph, metadata, parity ----------------------------------------------------------------------


def test_cli_random_export_has_contract_names_dynamic_batch_metadata_and_prints_parity(
    tmp_path: Path, pixels: np.ndarray, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "m.onnx"
    assert main(["export", "--output", str(out), "--arch", "vit_test_p8_32", "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    match = re.search(r"max abs diff ([0-9.e+-]+)", printed)
    assert match and float(match.group(1)) < 1e-4, printed

    session = _session(out)
    (inp,), (outp,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, outp.name) == (INPUT_NAME, OUTPUT_NAME)
    assert inp.shape[1:] == [3, 32, 32] and isinstance(inp.shape[0], str)  # symbolic batch axis
    # No interpolation of the position embedding in the graph: the input size is fixed.
    assert not any(node.op_type == "Resize" for node in onnx.load(out).graph.node)

    meta = _meta(out)
    assert meta.arch == "vit_test_p8_32" and meta.embedding_dim == 64
    assert meta.preprocess == default_preprocess(SPEC)
    assert meta.embedding == "cls after final norm"
    assert meta.model_id.startswith("vit_test_p8_32-") and meta.model_id in printed

    # Same seed: same weights, same vectors as PyTorch, same batch-independent outputs.
    expected = _random_encoder(3)(torch.from_numpy(pixels)).detach().numpy()
    np.testing.assert_allclose(_embed(out, pixels), expected, atol=1e-4)
    np.testing.assert_allclose(_embed(out, pixels[:1]), expected[:1], atol=1e-4)


@pytest.mark.slow
def test_model_id_is_a_content_hash(tmp_path: Path) -> None:
    pre = default_preprocess(SPEC)
    first = export_onnx(_random_encoder(0), SPEC, pre, tmp_path / "a.onnx")
    again = export_onnx(_random_encoder(0), SPEC, pre, tmp_path / "b.onnx")
    other_weights = export_onnx(_random_encoder(1), SPEC, pre, tmp_path / "c.onnx")
    other_pre = export_onnx(
        _random_encoder(0), SPEC, Preprocess(input_size=32, resize_size=40), tmp_path / "d.onnx"
    )
    assert first.model_id == again.model_id
    assert len({first.model_id, other_weights.model_id, other_pre.model_id}) == 3


@pytest.mark.parametrize("pool", ["cls", "cls_prenorm", "cls_mean"])
def test_pool_heads_export_the_vector_they_name(tmp_path: Path, pixels: np.ndarray, pool: str) -> None:
    encoder = _random_encoder(0)
    out = tmp_path / f"{pool}.onnx"
    meta = export_onnx(EmbeddingHead(encoder, pool), SPEC, default_preprocess(SPEC), out)
    got = _embed(out, pixels)

    x = torch.from_numpy(pixels)
    with torch.no_grad():
        after_norm = encoder.forward_features(x)  # timm's own path: blocks then final norm
        cls = encoder(x).numpy()
    if pool == "cls":
        np.testing.assert_allclose(got, cls, atol=1e-4)
    elif pool == "cls_prenorm":
        assert meta.embedding_dim == 64
        # Applying the final norm to the pre-norm CLS gives timm's CLS; the vector itself differs.
        normed = encoder.norm(torch.from_numpy(got)).detach().numpy()
        np.testing.assert_allclose(normed, cls, atol=1e-4)
        assert np.abs(got - cls).max() > 1e-2
    else:
        assert meta.embedding_dim == 128
        np.testing.assert_allclose(got[:, :64], cls, atol=1e-4)
        np.testing.assert_allclose(got[:, 64:], after_norm[:, 1:].mean(dim=1).numpy(), atol=1e-4)


def test_blocks_concatenates_the_pooled_vector_of_each_of_the_last_blocks(
    tmp_path: Path, pixels: np.ndarray
) -> None:
    encoder = _random_encoder(0)  # 2 blocks
    out = tmp_path / "blocks.onnx"
    meta = export_onnx(EmbeddingHead(encoder, "cls_mean", blocks=2), SPEC, default_preprocess(SPEC), out)
    got = _embed(out, pixels)
    assert meta.embedding_dim == 2 * 2 * 64

    x = torch.from_numpy(pixels)
    with torch.no_grad():
        last = encoder.forward_features(x)  # timm's own path through both blocks and the norm
        tokens = encoder.norm_pre(encoder._pos_embed(encoder.patch_embed(x)))
        first = encoder.norm(encoder.blocks[0](tokens))  # block 0's output through the final norm
    # Last block first: the leading part is exactly the one-block vector.
    np.testing.assert_allclose(got[:, :64], last[:, 0].numpy(), atol=1e-4)
    np.testing.assert_allclose(got[:, 64:128], last[:, 1:].mean(dim=1).numpy(), atol=1e-4)
    np.testing.assert_allclose(got[:, 128:192], first[:, 0].numpy(), atol=1e-4)
    np.testing.assert_allclose(got[:, 192:], first[:, 1:].mean(dim=1).numpy(), atol=1e-4)
    assert np.abs(got[:, 128:192] - got[:, :64]).max() > 1e-2  # the two blocks really differ


def _pooled_the_old_way(encoder: torch.nn.Module, pool: str, blocks: int, x: torch.Tensor) -> torch.Tensor:
    """EmbeddingHead.pooled as it was before it used forward_intermediates: timm's private
    forward steps re-run by hand, each of the last ``blocks`` block outputs pooled, last first."""
    tokens = encoder.norm_pre(encoder.patch_drop(encoder._pos_embed(encoder.patch_embed(x))))
    outputs = []
    for block in encoder.blocks:
        tokens = block(tokens)
        outputs.append(tokens)
    parts = []
    for out in outputs[::-1][:blocks]:
        if pool == "cls_prenorm":
            parts.append(out[:, 0])
            continue
        out = encoder.norm(out)
        parts.append(out[:, 0] if pool == "cls" else torch.cat([out[:, 0], out[:, 1:].mean(dim=1)], -1))
    return torch.cat(parts, dim=-1)


@pytest.mark.parametrize("blocks", [1, 2])
@pytest.mark.parametrize("pool", ["cls", "cls_prenorm", "cls_mean"])
def test_forward_intermediates_extraction_equals_the_old_private_forward_and_still_exports(
    tmp_path: Path, pixels: np.ndarray, pool: str, blocks: int
) -> None:
    encoder = _random_encoder(7)
    head = EmbeddingHead(encoder, pool, blocks=blocks).eval()
    x = torch.from_numpy(pixels)
    with torch.no_grad():
        expected = _pooled_the_old_way(encoder, pool, blocks, x)
        got = head(x)
    assert torch.equal(got, expected)  # the same operations in the same order: bit for bit

    # The TorchScript exporter still traces it with a dynamic batch axis (export_onnx checks
    # batch sizes 1, 3 and 8 against PyTorch), and ONNX Runtime gives the old vectors.
    out = tmp_path / "m.onnx"
    export_onnx(head, SPEC, default_preprocess(SPEC), out)
    assert isinstance(_session(out).get_inputs()[0].shape[0], str)
    np.testing.assert_allclose(_embed(out, pixels), expected.numpy(), atol=1e-4)
    np.testing.assert_allclose(_embed(out, pixels[:2]), expected[:2].numpy(), atol=1e-4)


def test_export_calls_no_private_timm_method() -> None:
    """The exporter uses timm's public forward API only: private helpers change between releases."""
    import ast

    import fewshot_trainer.export as export_module

    tree = ast.parse(Path(export_module.__file__).read_text())
    private = sorted(
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and node.attr.startswith("_")
        and not node.attr.startswith("__")
        and not (isinstance(node.value, ast.Name) and node.value.id == "self")
    )
    assert private == []
    assert not any(
        isinstance(node, ast.Attribute) and node.attr in {"patch_drop", "norm_pre", "patch_embed"}
        for node in ast.walk(tree)
    )


def test_cli_blocks_with_centering_records_it_and_refuses_more_blocks_than_the_model_has(
    tmp_path: Path, pixels: np.ndarray, capsys: pytest.CaptureFixture[str]
) -> None:
    _write_images(tmp_path / "imgs", 6, seed=3)
    base = ["export", "--arch", "vit_test_p8_32", "--pool", "cls", "--center-data", str(tmp_path / "imgs")]
    out = tmp_path / "two.onnx"
    assert main([*base, "--blocks", "2", "--output", str(out)]) == 0
    meta = _meta(out)
    assert meta.embedding_dim == 128 and meta.extra["blocks"] == "2"
    assert "last 2 blocks" in meta.embedding and "centred" in meta.embedding
    assert _embed(out, pixels).shape == (5, 128)
    capsys.readouterr()

    refused = tmp_path / "three.onnx"
    assert main([*base, "--blocks", "3", "--output", str(refused)]) == 1
    assert "blocks must be between 1 and the encoder's depth 2, got 3" in capsys.readouterr().err
    assert not refused.exists()


def test_export_fails_loudly_when_onnx_differs_from_pytorch(tmp_path: Path) -> None:
    class BatchDependent(torch.nn.Module):
        """Tracing bakes the Python int batch size into the graph: batch 1 and 3 then differ."""

        def __init__(self) -> None:
            super().__init__()
            self.inner = _random_encoder(0)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x) * float(int(x.shape[0]))

    out = tmp_path / "bad.onnx"
    with pytest.raises(ExportError, match="differs from PyTorch"):
        export_onnx(BatchDependent(), SPEC, default_preprocess(SPEC), out)
    assert not out.exists()


def test_default_preprocess_follows_the_msn_eval_for_224_px_and_keeps_small_images_whole() -> None:
    big = default_preprocess(get_arch("vit_small_p16_224"))
    assert (big.input_size, big.resize_size, big.interpolation) == (224, 256, "bicubic")
    assert big.mean == (0.485, 0.456, 0.406) and big.std == (0.229, 0.224, 0.225)
    small = default_preprocess(get_arch("vit_tiny_p8_64"))
    assert (small.input_size, small.resize_size) == (64, 64)


def test_input_size_resamples_the_position_embedding_like_timms_dynamic_size(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    encoder = _random_encoder(5)
    ckpt = tmp_path / "c.pt"
    save_checkpoint(make_checkpoint(arch=SPEC.to_dict(), target_encoder=encoder.state_dict()), ckpt)
    out = tmp_path / "m48.onnx"
    assert main(["export", "--checkpoint", str(ckpt), "--input-size", "48", "--output", str(out)]) == 0
    meta = _meta(out)
    assert (meta.preprocess.input_size, meta.preprocess.resize_size) == (48, 48)
    assert meta.extra["input_size"] == "48 (trained at 32; position embedding resampled)"

    # timm resamples the same way on the fly when built with dynamic_img_size.
    dynamic = build_vit(SPEC, dynamic_img_size=True).eval()
    dynamic.load_state_dict(encoder.state_dict())
    x = np.random.default_rng(1).normal(size=(3, 3, 48, 48)).astype(np.float32)
    with torch.no_grad():
        expected = dynamic(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(_embed(out, x), expected, atol=1e-4)

    refused = tmp_path / "bad.onnx"
    assert main(["export", "--checkpoint", str(ckpt), "--input-size", "44", "--output", str(refused)]) == 1
    assert "multiple of the patch size 8, got 44" in capsys.readouterr().err
    assert not refused.exists()


# --- centering ------------------------------------------------------------------------------------


def _write_images(folder: Path, count: int, seed: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        mode = "L" if i % 4 == 0 else "RGB"  # grey images must be converted, not refused
        shape = (40, 48) if mode == "L" else (40, 48, 3)
        path = folder / f"sub{i % 2}" / f"{i:03d}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8), mode).save(path)
        paths.append(path)
    return paths


def test_centering_subtracts_the_mean_embedding_inside_the_graph(
    tmp_path: Path, pixels: np.ndarray, capsys: pytest.CaptureFixture[str]
) -> None:
    from fewshot_common.images import decode_image, preprocess

    paths = _write_images(tmp_path / "imgs", 12, seed=1)
    (tmp_path / "imgs" / "broken.png").write_bytes(b"not an image")
    plain, centred = tmp_path / "plain.onnx", tmp_path / "centred.onnx"
    base = ["export", "--arch", "vit_test_p8_32", "--seed", "2", "--pool", "cls_prenorm"]
    assert main([*base, "--output", str(plain)]) == 0
    assert main([*base, "--output", str(centred), "--center-data", str(tmp_path / "imgs")]) == 0
    assert "1 unreadable, skipped" in capsys.readouterr().out

    # The mean, computed independently: the uncentred ONNX model over the server-preprocessed images.
    pre = _meta(plain).preprocess
    batch = np.stack([preprocess(decode_image(p.read_bytes(), 0), pre) for p in paths])
    mean = _embed(plain, batch).mean(axis=0)
    assert np.abs(mean).max() > 1e-2  # centering is not a no-op here
    np.testing.assert_allclose(_embed(centred, pixels), _embed(plain, pixels) - mean, atol=1e-4)
    np.testing.assert_allclose(_embed(centred, batch).mean(axis=0), 0.0, atol=1e-4)

    meta = _meta(centred)
    assert "centred" in meta.embedding and "12 images" in meta.embedding
    assert meta.extra["center_images"] == "12"
    assert meta.model_id != _meta(plain).model_id


def test_center_samples_draws_that_many_images(tmp_path: Path) -> None:
    _write_images(tmp_path / "imgs", 10, seed=2)
    head = EmbeddingHead(_random_encoder(0))
    _, used, skipped = mean_embedding(
        head, sorted((tmp_path / "imgs").rglob("*.png"))[:4], default_preprocess(SPEC)
    )
    assert (used, skipped) == (4, 0)
    out = tmp_path / "m.onnx"
    args = ["export", "--arch", "vit_test_p8_32", "--output", str(out)]
    assert main([*args, "--center-data", str(tmp_path / "imgs"), "--center-samples", "3"]) == 0
    assert _meta(out).extra["center_images"] == "3"


def test_whitening_decorrelates_the_centring_images_inside_the_graph(
    tmp_path: Path, pixels: np.ndarray, capsys: pytest.CaptureFixture[str]
) -> None:
    from fewshot_common.images import decode_image, preprocess

    paths = _write_images(tmp_path / "imgs", 40, seed=3)
    plain, white = tmp_path / "plain.onnx", tmp_path / "white.onnx"
    base = ["export", "--arch", "vit_test_p8_32", "--seed", "2", "--pool", "cls"]
    assert main([*base, "--output", str(plain)]) == 0
    whiten = ["--center-data", str(tmp_path / "imgs"), "--whiten", "--whiten-dim", "8"]
    assert main([*base, "--output", str(white), *whiten, "--whiten-shrinkage", "0.5"]) == 0
    assert "whitening: 8 principal directions, shrinkage 0.5" in capsys.readouterr().out

    # Independently: the covariance of the uncentred model's vectors of the same images.
    pre = _meta(plain).preprocess
    batch = np.stack([preprocess(decode_image(p.read_bytes(), 0), pre) for p in paths])
    raw = _embed(plain, batch).astype(np.float64)
    variances = np.linalg.eigvalsh(np.cov(raw, rowvar=False))[::-1]
    out = _embed(white, batch).astype(np.float64)
    assert out.shape == (40, 8)
    np.testing.assert_allclose(out.mean(axis=0), 0.0, atol=1e-4)
    # Each output direction's variance is var_i / (var_i + 0.5 * mean var), and they are uncorrelated.
    expected = variances[:8] / (variances[:8] + 0.5 * variances.mean())
    np.testing.assert_allclose(np.cov(out, rowvar=False), np.diag(expected), atol=2e-3)
    # A linear map of the centred vector: images outside the centring set follow the same map.
    # Compared as cosines between images (what the server uses): the sign of each principal
    # direction is arbitrary and may differ between two eigendecompositions.
    projection = whitening_projection(raw, shrinkage=0.5, dim=8).double().numpy()
    moved = (_embed(plain, pixels) - raw.mean(axis=0)) @ projection

    def cosines(x: np.ndarray) -> np.ndarray:
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        return x @ x.T

    np.testing.assert_allclose(cosines(_embed(white, pixels)), cosines(moved), atol=1e-4)
    meta = _meta(white)
    assert meta.embedding_dim == 8 and "PCA-whitened" in meta.embedding
    assert (meta.extra["whiten_dim"], meta.extra["whiten_shrinkage"]) == ("8", "0.5")


def test_whitening_refuses_without_images_or_with_bad_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _write_images(tmp_path / "imgs", 6, seed=4)
    base = ["export", "--arch", "vit_test_p8_32", "--output", str(tmp_path / "m.onnx")]
    assert main([*base, "--whiten"]) == 1
    assert "--whiten needs --center-data" in capsys.readouterr().err
    with_images = [*base, "--center-data", str(tmp_path / "imgs"), "--whiten"]
    assert main([*with_images, "--whiten-dim", "65"]) == 1
    assert "between 1 and the embedding size 64, got 65" in capsys.readouterr().err
    assert main([*with_images, "--whiten-shrinkage", "0"]) == 1
    assert "shrinkage must be > 0" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()
    with pytest.raises(ExportError, match="at least 2 embeddings"):
        whitening_projection(np.zeros((1, 4)))


# --- checkpoints ----------------------------------------------------------------------------------


def _checkpoint(tmp_path: Path, *, preprocess: dict | None = None, anchor: bool = True) -> Path:
    target, anchor_enc = _random_encoder(10), _random_encoder(11)
    ckpt = make_checkpoint(
        arch=SPEC.to_dict(),
        preprocess=preprocess,
        target_encoder=target.state_dict(),
        encoder=anchor_enc.state_dict() if anchor else None,
    )
    return save_checkpoint(ckpt, tmp_path / "run" / "ckpt.pt")


@pytest.mark.parametrize(("role", "seed"), [(None, 10), ("target", 10), ("anchor", 11)])
def test_checkpoint_export_uses_the_target_encoder_by_default(
    tmp_path: Path, pixels: np.ndarray, role: str | None, seed: int
) -> None:
    ckpt = _checkpoint(
        tmp_path,
        preprocess={
            "input_size": 32,
            "resize_size": 40,
            "interpolation": "bilinear",
            "mean": [0.5] * 3,
            "std": [0.25] * 3,
        },
    )
    out = tmp_path / "m.onnx"
    args = ["export", "--checkpoint", str(ckpt), "--output", str(out)]
    assert main(args + (["--encoder", role] if role else [])) == 0
    expected = _random_encoder(seed)(torch.from_numpy(pixels)).detach().numpy()
    np.testing.assert_allclose(_embed(out, pixels), expected, atol=1e-4)
    meta = _meta(out)
    assert meta.preprocess == Preprocess(32, 40, "bilinear", (0.5,) * 3, (0.25,) * 3)
    assert meta.arch == SPEC.name


def test_checkpoint_without_preprocess_gets_the_arch_default(tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    assert main(["export", "--checkpoint", str(_checkpoint(tmp_path)), "--output", str(out)]) == 0
    assert _meta(out).preprocess == default_preprocess(SPEC)


def test_bad_checkpoints_and_options_exit_non_zero_with_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "m.onnx"

    def fails(*args: str) -> str:
        assert main(["export", "--output", str(out), *args]) == 1
        return capsys.readouterr().err

    assert "no checkpoint at" in fails("--checkpoint", str(tmp_path / "missing.pt"))

    not_ours = tmp_path / "other.pt"
    torch.save({"target_encoder": {}}, not_ours)
    assert "import-checkpoint" in fails("--checkpoint", str(not_ours))

    no_anchor = _checkpoint(tmp_path, anchor=False)
    assert "no anchor encoder" in fails("--checkpoint", str(no_anchor), "--encoder", "anchor")
    assert "does not match" in fails("--checkpoint", str(no_anchor), "--arch", "vit_tiny_p8_64")

    wrong = make_checkpoint(
        arch=ArchSpec("vit_test_p8_32", 32, 8, 64, 3, 2).to_dict(),  # one block more than the weights
        target_encoder=_random_encoder(0).state_dict(),
    )
    message = fails("--checkpoint", str(save_checkpoint(wrong, tmp_path / "wrong.pt")))
    assert "missing" in message and "blocks.2.attn.qkv.weight" in message

    assert "is not a folder" in fails("--center-data", str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    assert "no image files" in fails("--center-data", str(tmp_path / "empty"))
    assert not out.exists()
