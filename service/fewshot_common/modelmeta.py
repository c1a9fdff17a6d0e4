"""The contract between trainer and server: what an exported ONNX model says about itself.

The exporter writes a :class:`ModelMeta` into the ONNX ``metadata_props`` under the key
``fewshot``; the server reads it back and needs nothing else to preprocess images and label its
answers. Keep this module free of heavy imports: the trainer and the server both load it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

METADATA_KEY = "fewshot"
SCHEMA_VERSION = 1

# ONNX graph names, fixed so clients and the server can rely on them.
INPUT_NAME = "pixel_values"
OUTPUT_NAME = "embedding"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Interpolation = Literal["bicubic", "bilinear", "nearest", "lanczos"]
# Numeric precision of a graph's weights and arithmetic. A variant (int8, fp16, bf16) is derived
# from an fp32 export by `fewshot export --precision` and checked against it before it is written.
Precision = Literal["fp32", "int8", "fp16", "bf16"]
PRECISIONS: tuple[str, ...] = ("fp32", "int8", "fp16", "bf16")


@dataclass(frozen=True)
class Preprocess:
    """How to turn a decoded RGB image into the model's float NCHW input.

    Resize the *shorter* side to ``resize_size`` (aspect ratio kept), centre-crop
    ``input_size`` x ``input_size``, scale to [0, 1], then subtract ``mean`` and divide by ``std``.
    """

    input_size: int
    resize_size: int
    interpolation: Interpolation = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.input_size <= 0 or self.resize_size < self.input_size:
            raise ValueError(f"need 0 < input_size <= resize_size, got {self.input_size}, {self.resize_size}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError("mean and std need three values each, std > 0")

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Preprocess:
        """From its dict form as JSON, YAML or a checkpoint hold it (mean/std as lists)."""
        return cls(**{**raw, "mean": tuple(raw["mean"]), "std": tuple(raw["std"])})


@dataclass(frozen=True)
class ModelMeta:
    """Everything the server needs to know about an exported embedding model.

    ``model_id`` names the *embedding space*: the registry refuses to mix embeddings of two ids.
    A precision variant keeps its fp32 parent's ``model_id`` (its embeddings passed a cosine and
    few-shot check against the parent's, so fp32 and int8 replicas can share classes) and gets
    its own content hash in ``variant_id``; ``variant_check`` records what that check measured.
    """

    model_id: str
    arch: str
    embedding_dim: int
    preprocess: Preprocess
    # What the output vector is, for humans (e.g. "cls after final norm, centred").
    embedding: str = "cls"
    extra: dict[str, str] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    precision: Precision = "fp32"
    variant_id: str = ""  # content hash of a variant's graph; "" for the fp32 export itself
    variant_check: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; expected one of {PRECISIONS}")
        if self.precision != "fp32" and not self.variant_id:
            raise ValueError(f"a {self.precision} variant needs a variant_id")

    @property
    def is_variant(self) -> bool:
        return self.precision != "fp32"

    @property
    def file_id(self) -> str:
        """Names this exact file (logs, metrics): the variant's hash, or the model id for fp32."""
        return self.variant_id or self.model_id

    def to_json(self) -> str:
        raw = asdict(self)
        if not self.is_variant:
            # An fp32 export writes exactly the fields it always did, so its content-hash id (and
            # what older readers accept) does not change.
            for key in ("precision", "variant_id", "variant_check"):
                raw.pop(key)
        return json.dumps(raw, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelMeta:
        raw = json.loads(text)
        if raw.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(
                f"unsupported fewshot metadata schema {raw.get('schema_version')!r}; "
                f"this build reads version {SCHEMA_VERSION}"
            )
        return cls(preprocess=Preprocess.from_dict(raw.pop("preprocess")), **raw)

    def to_metadata_props(self) -> dict[str, str]:
        return {METADATA_KEY: self.to_json()}

    @classmethod
    def from_metadata_props(cls, props: Mapping[str, str]) -> ModelMeta:
        if METADATA_KEY not in props:
            raise ValueError(f"ONNX model has no '{METADATA_KEY}' metadata; export it with `fewshot export`")
        return cls.from_json(props[METADATA_KEY])


def content_model_id(arch: str, payload: bytes) -> str:
    """A model id that changes whenever the weights or preprocessing change: ``arch-<sha12>``."""
    return f"{arch}-{hashlib.sha256(payload).hexdigest()[:12]}"
