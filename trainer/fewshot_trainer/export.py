"""Export a ViT encoder to ONNX: float NCHW in (dynamic batch), CLS embedding out, metadata inside."""

from __future__ import annotations

import io
from pathlib import Path

import onnx
import torch
from torch import nn

from fewshot_service.modelmeta import INPUT_NAME, OUTPUT_NAME, ModelMeta, Preprocess, content_model_id

from .vit import ArchSpec

OPSET = 17


def _onnx_bytes(encoder: nn.Module, spec: ArchSpec) -> bytes:
    dummy = torch.randn(2, 3, spec.img_size, spec.img_size)
    buffer = io.BytesIO()
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


def export_onnx(
    encoder: nn.Module,
    spec: ArchSpec,
    preprocess: Preprocess,
    output: str | Path,
    *,
    embedding: str = "cls after final norm",
    extra: dict[str, str] | None = None,
) -> ModelMeta:
    """Write ``encoder`` (in eval mode, on CPU) as ONNX with its :class:`ModelMeta`; return the meta.

    The model id hashes the graph and weights together with the preprocessing, so two exports
    differ in id exactly when they can give different embeddings.
    """
    encoder = encoder.eval().cpu()
    with torch.no_grad():
        graph = _onnx_bytes(encoder, spec)
        embedding_dim = int(encoder(torch.zeros(1, 3, spec.img_size, spec.img_size)).shape[-1])
    model = onnx.load_from_string(graph)
    meta_probe = ModelMeta("", spec.name, embedding_dim, preprocess, embedding, dict(extra or {}))
    model_id = content_model_id(spec.name, graph + meta_probe.to_json().encode())
    meta = ModelMeta(model_id, spec.name, embedding_dim, preprocess, embedding, dict(extra or {}))
    for key, value in meta.to_metadata_props().items():
        onnx.helper.set_model_props(model, {key: value})
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_suffix(output.suffix + ".tmp")
    onnx.save(model, tmp)
    tmp.replace(output)
    return meta
