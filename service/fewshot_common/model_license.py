"""Where a served model's licence statement comes from (``/v1/info`` shows it).

Two sources, first found wins:

1. ``license`` in the model's own metadata (``ModelMeta.extra["license"]``), for models exported
   with one;
2. a sidecar text file next to the model, ``NAME.onnx.license`` -- for models already shipped
   without it (``models/default.onnx`` is not re-exported: its model id is part of the contract).
   A precision variant (``default.int8.onnx``) uses its own sidecar, else its fp32 parent's.
"""

from __future__ import annotations

from pathlib import Path

from .modelmeta import ModelMeta

LICENSE_KEY = "license"
SIDECAR_SUFFIX = ".license"
# A sidecar is a statement, not a document: more than this is cut (keeps /v1/info small).
MAX_LICENSE_CHARS = 4000


def sidecar_paths(model_path: Path, meta: ModelMeta) -> list[Path]:
    """The sidecar files that may hold the licence of ``model_path``, most specific first."""
    paths = [model_path.with_name(model_path.name + SIDECAR_SUFFIX)]
    variant_suffix = f".{meta.precision}"
    if meta.is_variant and model_path.stem.endswith(variant_suffix):
        parent = model_path.with_name(model_path.stem[: -len(variant_suffix)] + model_path.suffix)
        paths.append(parent.with_name(parent.name + SIDECAR_SUFFIX))
    return paths


def model_license(model_path: Path, meta: ModelMeta) -> str | None:
    """The licence statement of a model, or None when neither source has one."""
    stated = meta.extra.get(LICENSE_KEY, "").strip()
    if stated:
        return stated[:MAX_LICENSE_CHARS]
    for path in sidecar_paths(model_path, meta):
        if path.is_file():
            text = path.read_text(encoding="utf-8", errors="replace").strip()
            if text:
                return text[:MAX_LICENSE_CHARS]
    return None
