"""A second model for model-roll tests and benchmarks: an exported model with its largest weight
matrix scaled and a new model id, i.e. what a retrained export looks like to the registry."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from fewshot_common.modelmeta import ModelMeta, content_model_id


def rolled_model(source: Path, target: Path, scale: float = 1.05) -> str:
    """Write ``source`` with its largest float weight scaled by ``scale`` and a content-hash model
    id of its own to ``target``; returns the new id."""
    model = onnx.load(str(source))
    weight = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)) if t.data_type == 1 else 0)
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * np.float32(scale), weight.name))
    props = {p.key: p.value for p in model.metadata_props}
    meta = ModelMeta.from_metadata_props(props)
    meta = dataclasses.replace(meta, model_id=content_model_id(meta.arch, model.SerializeToString()))
    onnx.helper.set_model_props(model, {**props, **meta.to_metadata_props()})
    onnx.save(model, str(target))
    return meta.model_id
