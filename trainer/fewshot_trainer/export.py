"""Export a ViT encoder to ONNX: float NCHW in (dynamic batch), one embedding out, metadata inside.

The exported graph is an :class:`EmbeddingHead`: the timm encoder plus the choice of output
vector (``pool``) and optional feature centering, so the server runs one graph and needs nothing
but the metadata to preprocess its input. Every export is checked against PyTorch.
"""

from __future__ import annotations

import dataclasses
import io
import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import onnx
import onnxruntime as ort
import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from fewshot_common.image_files import preprocessed_batches
from fewshot_common.modelmeta import (
    INPUT_NAME,
    OUTPUT_NAME,
    ModelMeta,
    Preprocess,
    content_model_id,
)

from .checkpoint import load_checkpoint
from .vit import ArchSpec, build_vit

OPSET = 17
# float32 rounding grows with the size of the values, so the bound is relative to the largest
# reference value once that exceeds 1 (HF MSN CLS vectors reach tens).
PARITY_TOLERANCE = 1e-4
PARITY_BATCH_SIZES = (1, 3, 8)

Pool = Literal["cls", "cls_prenorm", "cls_mean"]
POOLS: tuple[str, ...] = get_args(Pool)
POOL_DESCRIPTIONS: dict[str, str] = {
    "cls": "cls after final norm",
    "cls_prenorm": "cls of the last block before the final norm",
    "cls_mean": "cls after final norm, concatenated with the mean of patch tokens after final norm",
}
EncoderRole = Literal["target", "anchor"]
# Checkpoint key of each encoder: the EMA target is the one MSN evaluates.
ENCODER_KEYS: dict[str, str] = {"target": "target_encoder", "anchor": "encoder"}


class ExportError(Exception):
    """Export cannot produce a faithful model: bad checkpoint, bad option, or a parity failure."""


class EmbeddingHead(nn.Module):
    """A timm ViT followed by the vector the server returns, exported as one graph.

    - ``cls``: the CLS token after the final norm (timm's and Hugging Face's embedding).
    - ``cls_prenorm``: the CLS token of the last block without the final norm (MSN's own
      low-shot evaluation uses this one).
    - ``cls_mean``: ``cls`` concatenated with the mean of the patch tokens after the final norm.

    ``blocks`` > 1 pools the output of each of the last ``blocks`` blocks that way (through the
    final norm, as DINO's linear evaluation does with the last 4 blocks) and concatenates them,
    last block first: the first part is the ``blocks=1`` vector, earlier blocks add lower-level
    cues (colour, texture) that a briefly trained network has not yet folded into its last block.

    ``center``, when given, is subtracted from that vector; ``projection`` (``[D, k]``), when given,
    then maps it to ``k`` dimensions (the whitening of :func:`whitening_projection`). The server
    L2-normalises the result.
    """

    def __init__(
        self,
        encoder: VisionTransformer,
        pool: Pool = "cls",
        center: torch.Tensor | None = None,
        blocks: int = 1,
        projection: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if pool not in POOLS:
            raise ExportError(f"unknown pool {pool!r}; choose one of {', '.join(POOLS)}")
        depth = len(encoder.blocks)
        if not 1 <= blocks <= depth:
            raise ExportError(f"blocks must be between 1 and the encoder's depth {depth}, got {blocks}")
        self.encoder = encoder
        self.pool = pool
        self.blocks = blocks
        self.center: torch.Tensor | None
        self.register_buffer("center", None if center is None else center.detach().float().clone())
        self.projection: torch.Tensor | None
        self.register_buffer(
            "projection", None if projection is None else projection.detach().float().clone()
        )

    def _block_tokens(self, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(patch tokens, prefix tokens)`` of each of the last ``blocks`` blocks, last block
        first, through the final norm unless the pool is ``cls_prenorm``."""
        # timm's public API for per-block outputs: it runs the same patch embedding, position
        # embedding and blocks as forward_features, and splits off the CLS (prefix) tokens.
        intermediates = self.encoder.forward_intermediates(
            x,
            indices=self.blocks,  # an int: the last `blocks` blocks
            norm=self.pool != "cls_prenorm",
            output_fmt="NLC",  # keep tokens as a sequence: cls_mean averages them
            intermediates_only=True,  # the final output is the last intermediate already
            return_prefix_tokens=True,
        )
        return intermediates[::-1]

    def _pool_tokens(self, patches: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        cls = prefix[:, 0]
        if self.pool != "cls_mean":
            return cls
        return torch.cat([cls, patches.mean(dim=1)], dim=-1)

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """The uncentred vector."""
        parts = [self._pool_tokens(patches, prefix) for patches, prefix in self._block_tokens(x)]
        # One block: no Concat node, so the graph is the one exported before `blocks` existed.
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.pooled(x)
        if self.center is not None:
            out = out - self.center
        if self.projection is not None:
            out = out @ self.projection
        return out


def default_preprocess(spec: ArchSpec) -> Preprocess:
    """The evaluation transform for an architecture.

    224-px (and larger) models: resize the shorter side to 256/224 of the input, centre crop,
    bicubic, ImageNet mean/std, as MSN's evaluation does. Small models (64-px data) see the
    whole image: resize to the input size, crop nothing.
    """
    if spec.img_size >= 224:
        return Preprocess(input_size=spec.img_size, resize_size=round(spec.img_size * 256 / 224))
    return Preprocess(input_size=spec.img_size, resize_size=spec.img_size)


# --- loading ------------------------------------------------------------------------------------


def encoder_from_checkpoint(
    path: str | os.PathLike[str], role: EncoderRole = "target"
) -> tuple[ArchSpec, VisionTransformer, Preprocess]:
    """The ``role`` encoder of a fewshot checkpoint with its arch and preprocessing."""
    try:
        ckpt = load_checkpoint(path)
    except (FileNotFoundError, ValueError) as exc:
        raise ExportError(str(exc)) from None
    key = ENCODER_KEYS[role]
    state = ckpt.get(key)
    if not state:
        present = [k for k, v in ENCODER_KEYS.items() if ckpt.get(v)]
        raise ExportError(
            f"{path} has no {role} encoder (checkpoint key {key!r}); it has: {present or 'none'}"
        )
    try:
        spec = ArchSpec.from_dict(ckpt["arch"])
    except (TypeError, KeyError) as exc:
        raise ExportError(f"{path}: 'arch' is not an ArchSpec dict ({exc})") from None
    preprocess = (
        Preprocess.from_dict(ckpt["preprocess"]) if ckpt.get("preprocess") else default_preprocess(spec)
    )
    with torch.device("meta"):  # no random init of weights that are overwritten next (seconds for ViT-L)
        encoder = build_vit(spec)
    missing, unexpected = encoder.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise ExportError(
            f"{path}: {key} does not fit {spec.name}: missing {sorted(missing)}, "
            f"unexpected {sorted(unexpected)}"
        )
    return spec, encoder, preprocess


def at_input_size(
    encoder: VisionTransformer, spec: ArchSpec, preprocess: Preprocess, size: int
) -> tuple[ArchSpec, VisionTransformer, Preprocess]:
    """The same weights on ``size``-px inputs: more patches of the same pixel size.

    The position embedding is resampled (bicubic, timm's ``resample_abs_pos_embed``) to the new
    patch grid, as DeiT and FixRes do for a higher test resolution, and the resize step scales
    with the input so the crop keeps its share of the image. The graph stays fixed-size (no
    interpolation in it).
    """
    if size == spec.img_size:
        return spec, encoder, preprocess
    if size < spec.patch_size or size % spec.patch_size:
        raise ExportError(
            f"input size must be a positive multiple of the patch size {spec.patch_size}, got {size}"
        )
    resized = dataclasses.replace(spec, img_size=size)
    state = dict(encoder.state_dict())
    state["pos_embed"] = resample_abs_pos_embed(
        state["pos_embed"],
        new_size=(resized.grid_size, resized.grid_size),
        num_prefix_tokens=encoder.num_prefix_tokens,
    )
    with torch.device("meta"):
        moved = build_vit(resized)
    moved.load_state_dict(state, assign=True)
    resize = round(preprocess.resize_size * size / spec.img_size)
    return resized, moved.eval(), dataclasses.replace(preprocess, input_size=size, resize_size=resize)


# --- centering ----------------------------------------------------------------------------------


def pooled_embeddings(
    head: EmbeddingHead, images: Iterable[Path], preprocess: Preprocess, *, batch_size: int = 64
) -> tuple[np.ndarray, int]:
    """Uncentred outputs of ``head`` (``[N, D]`` float64) for ``images``, read and preprocessed
    exactly as the server does (so the statistics are of the vectors the server sees), and the
    number of images skipped as unreadable."""
    paths = list(images)
    head = head.eval()
    outputs: list[np.ndarray] = []
    for pixels, _ in preprocessed_batches(paths, preprocess, batch_size, skip_unreadable=True):
        with torch.no_grad():
            outputs.append(head.pooled(torch.from_numpy(pixels)).double().numpy())
    used = sum(len(chunk) for chunk in outputs)
    if not outputs:
        raise ExportError(
            f"no readable images to compute the centering statistics from ({len(paths)} skipped)"
        )
    return np.concatenate(outputs), len(paths) - used


def mean_embedding(
    head: EmbeddingHead, images: Iterable[Path], preprocess: Preprocess, *, batch_size: int = 64
) -> tuple[torch.Tensor, int, int]:
    """Mean uncentred output of ``head`` over ``images``, preprocessed exactly as the server does.

    Returns the mean, the number of images used and the number skipped as unreadable.
    """
    embeddings, skipped = pooled_embeddings(head, images, preprocess, batch_size=batch_size)
    return torch.from_numpy(embeddings.mean(axis=0)).float(), len(embeddings), skipped


def whitening_projection(
    embeddings: np.ndarray, *, shrinkage: float = 0.3, dim: int | None = None
) -> torch.Tensor:
    """``[D, k]`` PCA whitening of ``embeddings`` (``[N, D]``, rows of unlabelled images).

    Column ``i`` is the ``i``-th principal direction divided by ``sqrt(var_i + shrinkage *
    mean_var)``: directions a few dominant factors (brightness, colour cast) inflate are scaled
    down, weak ones are not blown up (the shrinkage toward the identity keeps noise directions from
    counting as much as signal, and makes the estimate stable with fewer images than dimensions).
    ``dim`` keeps the ``k`` leading directions (default: all). Cosine similarity after this map
    equals that after ZCA whitening with the same shrinkage, restricted to those directions.
    """
    if embeddings.ndim != 2 or len(embeddings) < 2:
        raise ExportError(f"whitening needs at least 2 embeddings, got shape {embeddings.shape}")
    if shrinkage <= 0:
        raise ExportError(f"whitening shrinkage must be > 0, got {shrinkage}")
    width = embeddings.shape[1]
    dim = width if dim is None else dim
    if not 1 <= dim <= width:
        raise ExportError(f"whitening dim must be between 1 and the embedding size {width}, got {dim}")
    variances, directions = np.linalg.eigh(np.cov(embeddings, rowvar=False))
    order = np.argsort(variances)[::-1][:dim]  # eigh sorts ascending; keep the largest
    variances = np.clip(variances, 0.0, None)
    scale = np.sqrt(variances[order] + shrinkage * variances.mean())
    return torch.from_numpy(directions[:, order] / scale).float()


# --- ONNX ---------------------------------------------------------------------------------------


def _onnx_bytes(encoder: nn.Module, spec: ArchSpec) -> bytes:
    dummy = torch.randn(2, 3, spec.img_size, spec.img_size)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # timm asserts the input size while tracing; a fixed size is exactly what we export.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            encoder,
            (dummy,),
            buffer,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
        )
    return buffer.getvalue()


def parity_max_abs_diff(
    module: nn.Module,
    onnx_model: bytes | str | Path,
    spec: ArchSpec,
    batch_sizes: Sequence[int] = PARITY_BATCH_SIZES,
    seed: int = 0,
) -> tuple[float, float]:
    """Largest ``|onnx - torch|`` over random batches of each size, and the largest ``|torch|``."""
    source = str(onnx_model) if isinstance(onnx_model, (str, Path)) else onnx_model
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(seed)
    worst, scale = 0.0, 0.0
    for size in batch_sizes:
        x = torch.randn(size, 3, spec.img_size, spec.img_size, generator=generator)
        with torch.no_grad():
            expected = module(x).numpy()
        (got,) = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})
        if got.shape != expected.shape:
            raise ExportError(f"ONNX output shape {got.shape} != PyTorch {expected.shape}")
        worst = max(worst, float(np.max(np.abs(got - expected))))
        scale = max(scale, float(np.max(np.abs(expected))))
    return worst, scale


def export_onnx(
    encoder: nn.Module,
    spec: ArchSpec,
    preprocess: Preprocess,
    output: str | Path,
    *,
    embedding: str = POOL_DESCRIPTIONS["cls"],
    extra: dict[str, str] | None = None,
    tolerance: float = PARITY_TOLERANCE,
) -> ModelMeta:
    """Write ``encoder`` (in eval mode, on CPU) as ONNX with its :class:`ModelMeta`; return the meta.

    Before writing, the graph is run in ONNX Runtime on random batches of sizes 1, 3 and 8 (the
    batch axis is dynamic) and compared with PyTorch; the max abs difference is printed and an
    :class:`ExportError` raised when it exceeds ``tolerance`` (relative once values exceed 1).

    The model id hashes the graph and weights together with the metadata, so two exports
    differ in id exactly when they can give different embeddings.
    """
    encoder = encoder.eval().cpu()
    with torch.no_grad():
        graph = _onnx_bytes(encoder, spec)
        embedding_dim = int(encoder(torch.zeros(1, 3, spec.img_size, spec.img_size)).shape[-1])
    diff, scale = parity_max_abs_diff(encoder, graph, spec)
    bound = tolerance * max(1.0, scale)
    print(
        f"parity ONNX Runtime vs PyTorch, batch sizes {', '.join(map(str, PARITY_BATCH_SIZES))}: "
        f"max abs diff {diff:.3g} (bound {bound:.3g}, largest value {scale:.3g})"
    )
    if not diff <= bound:  # also catches NaN
        raise ExportError(f"ONNX output differs from PyTorch by {diff:.3g} > {bound:.3g}")

    model = onnx.load_from_string(graph)
    meta_probe = ModelMeta("", spec.name, embedding_dim, preprocess, embedding, dict(extra or {}))
    model_id = content_model_id(spec.name, graph + meta_probe.to_json().encode())
    meta = ModelMeta(model_id, spec.name, embedding_dim, preprocess, embedding, dict(extra or {}))
    onnx.helper.set_model_props(model, meta.to_metadata_props())
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_suffix(output.suffix + ".tmp")
    onnx.save(model, tmp)
    tmp.replace(output)
    return meta
