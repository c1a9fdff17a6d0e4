"""Read published MSN weights into a fewshot checkpoint, exactly.

Two sources:

- ``msn``: a torch pickle from facebookresearch/msn. The released files hold ``target_encoder``
  and ``prototypes``; training checkpoints add ``encoder``, ``opt``, ``epoch`` and more. Encoder
  keys carry DDP's ``module.`` prefix and already use timm's names (the reference ``deit.py`` is
  timm's ViT); the projection head is ``fc.{fc1,bn1,fc2,bn2,fc3}``.
- ``hf``: a folder from transformers' ``ViTMSNModel.save_pretrained`` (``config.json`` plus
  safetensors, possibly sharded, or ``pytorch_model.bin``). Names are mapped to timm's and the
  separate query/key/value projections fused into ``qkv`` (rows q, k, v).

The architecture comes from the weights: patch size from the patch-embedding kernel, width from
its output channels, depth from the block count, image size from the number of position
embeddings. Attention heads never show in a shape, so they come from ``config.json``, ``--arch`` or
the standard width table, with a note saying which.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch

from .checkpoint import make_checkpoint
from .export import default_preprocess
from .vit import ARCHS, ArchSpec, build_vit

Tensor = torch.Tensor
StateDict = dict[str, Tensor]
Format = Literal["msn", "hf"]
EncoderRole = Literal["target", "anchor"]

# The ViT widths of DeiT/MSN and their head counts (64-dim heads), used only when nothing says.
STANDARD_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16}
# Layer norm of the reference backbone and of timm's ViT; another eps would change every output.
TIMM_LAYER_NORM_EPS = 1e-6
_BATCH_NORM = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
# The reference projection head (``fc``), keys as our checkpoint's ``target_head``/``head`` hold them.
MSN_HEAD_KEYS = (
    *(f"fc1.{p}" for p in ("weight", "bias")),
    *(f"bn1.{p}" for p in _BATCH_NORM),
    *(f"fc2.{p}" for p in ("weight", "bias")),
    *(f"bn2.{p}" for p in _BATCH_NORM),
    *(f"fc3.{p}" for p in ("weight", "bias")),
)


class CheckpointImportError(Exception):
    """The source cannot be imported faithfully; the message names the file, keys and shapes."""


@dataclass
class Imported:
    """What was read: the parts of a fewshot checkpoint, plus notes for the person importing."""

    spec: ArchSpec
    source: str  # e.g. "msn target_encoder of vits16_800ep.pth.tar", kept in the checkpoint
    target_encoder: StateDict
    encoder: StateDict | None = None
    target_head: StateDict | None = None
    head: StateDict | None = None
    prototypes: Tensor | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    notes: list[str] = field(default_factory=list)

    def to_checkpoint(self) -> dict[str, Any]:
        # MSN's evaluation transform (resize 256 -> centre crop 224, bicubic) for 224-px models;
        # the source's own mean/std where it records them.
        preprocess = default_preprocess(self.spec)
        if self.mean is not None and self.std is not None:
            preprocess = replace(preprocess, mean=self.mean, std=self.std)
        return make_checkpoint(
            arch=self.spec.to_dict(),
            preprocess=asdict(preprocess),
            target_encoder=self.target_encoder,
            encoder=self.encoder,
            target_head=self.target_head,
            head=self.head,
            prototypes=self.prototypes,
            extra={"imported_from": self.source, "import_notes": list(self.notes)},
        )


# --- architecture -------------------------------------------------------------------------------


def _arch_name(spec_fields: dict[str, Any]) -> str:
    """A registered name when the shape is one of ours (e.g. ``vit_small_p16_224``), else a
    descriptive one."""
    for spec in ARCHS.values():
        if all(getattr(spec, k) == v for k, v in spec_fields.items()):
            return spec.name
    f = spec_fields
    return f"vit_w{f['embed_dim']}_d{f['depth']}_h{f['num_heads']}_p{f['patch_size']}_{f['img_size']}"


def infer_arch(
    state: StateDict, *, source: str, num_heads: int | None, heads_from: str, arch: str | None
) -> tuple[ArchSpec, list[str]]:
    """ArchSpec from timm-named weights; ``num_heads`` from the caller, ``--arch`` or the table."""
    notes: list[str] = []
    for key in ("patch_embed.proj.weight", "pos_embed"):
        if key not in state:
            raise CheckpointImportError(f"{source}: missing key {key!r}; cannot infer the architecture")
    proj, pos = state["patch_embed.proj.weight"], state["pos_embed"]
    if proj.ndim != 4 or proj.shape[1] != 3 or proj.shape[2] != proj.shape[3]:
        raise CheckpointImportError(
            f"{source}: patch embedding weight has shape {tuple(proj.shape)}; need [D, 3, P, P]"
        )
    embed_dim, patch = int(proj.shape[0]), int(proj.shape[2])
    if pos.ndim != 3 or pos.shape[0] != 1 or pos.shape[2] != embed_dim:
        raise CheckpointImportError(
            f"{source}: position embedding has shape {tuple(pos.shape)}; need [1, 1 + N, {embed_dim}]"
        )
    grid = math.isqrt(int(pos.shape[1]) - 1)
    if grid * grid != pos.shape[1] - 1:
        raise CheckpointImportError(
            f"{source}: {pos.shape[1] - 1} position embeddings (+1 for CLS) is not a square grid"
        )
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    if not blocks:
        raise CheckpointImportError(f"{source}: no transformer blocks (keys 'blocks.N.*') found")
    depth = max(blocks) + 1
    fc1 = state.get("blocks.0.mlp.fc1.weight")
    mlp_ratio = float(fc1.shape[0]) / embed_dim if fc1 is not None else 4.0
    inferred = dict(
        img_size=grid * patch,
        patch_size=patch,
        embed_dim=embed_dim,
        depth=depth,
        mlp_ratio=mlp_ratio,
    )

    if arch is not None:
        named = ARCHS.get(arch)
        if named is None:
            raise CheckpointImportError(f"unknown --arch {arch!r}; known: {', '.join(sorted(ARCHS))}")
        differ = {k: (getattr(named, k), v) for k, v in inferred.items() if getattr(named, k) != v}
        if differ:
            detail = ", ".join(f"{k} {a} (--arch) vs {b} (weights)" for k, (a, b) in differ.items())
            raise CheckpointImportError(f"{source}: --arch {arch} does not fit the weights: {detail}")
        if num_heads is not None and num_heads != named.num_heads:
            raise CheckpointImportError(
                f"{source}: --arch {arch} has {named.num_heads} heads but {heads_from} says {num_heads}"
            )
        return named, notes
    if num_heads is None:
        if embed_dim not in STANDARD_HEADS:
            raise CheckpointImportError(
                f"{source}: width {embed_dim} is not a standard ViT width "
                f"({', '.join(map(str, STANDARD_HEADS))}); say the head count with --arch"
            )
        num_heads = STANDARD_HEADS[embed_dim]
        notes.append(
            f"note: attention heads do not show in weight shapes; using the standard {num_heads} "
            f"heads for width {embed_dim} (pass --arch to state it)"
        )
    if embed_dim % num_heads:
        raise CheckpointImportError(f"{source}: width {embed_dim} is not divisible by {num_heads} heads")
    spec_fields = dict(inferred, num_heads=num_heads)
    return ArchSpec(name=_arch_name(spec_fields), **spec_fields), notes


def _check_against_model(
    state: StateDict, spec: ArchSpec, source: str, names: Callable[[str], str]
) -> StateDict:
    """Strict key and shape check against the timm model; ``names`` maps a timm key back to the
    source's name for the message."""
    with torch.device("meta"):  # shapes only: skip the random init
        expected = build_vit(spec).state_dict()
    missing = sorted(names(k) for k in expected.keys() - state.keys())
    unexpected = sorted(names(k) for k in state.keys() - expected.keys())
    if missing or unexpected:
        raise CheckpointImportError(
            f"{source}: keys do not fit {spec.name}: missing {missing or 'none'}, "
            f"unexpected {unexpected or 'none'}"
        )
    wrong = [
        f"{names(k)} {tuple(state[k].shape)} (expected {tuple(v.shape)})"
        for k, v in expected.items()
        if state[k].shape != v.shape
    ]
    if wrong:
        raise CheckpointImportError(f"{source}: shape mismatch for {spec.name}: {'; '.join(wrong)}")
    return {k: state[k].detach().to(torch.float32).contiguous().clone() for k in expected}


# --- facebookresearch/msn -----------------------------------------------------------------------


def _strip_prefix(state: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in state.items()}


def _split_msn_encoder(state: Any, key: str, source: str) -> tuple[StateDict, StateDict | None]:
    """One ``encoder``/``target_encoder`` dict -> (backbone in timm names, head or None)."""
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointImportError(f"{source}: {key!r} is not a state dict of tensors")
    state = _strip_prefix(state, "module.")
    backbone = {k: v for k, v in state.items() if not k.startswith("fc.")}
    head = {k[len("fc.") :]: v for k, v in state.items() if k.startswith("fc.")}
    if not head:
        return backbone, None
    missing = sorted(f"module.fc.{k}" for k in set(MSN_HEAD_KEYS) - head.keys())
    unexpected = sorted(f"module.fc.{k}" for k in head.keys() - set(MSN_HEAD_KEYS))
    if missing or unexpected:
        raise CheckpointImportError(
            f"{source}: {key} projection head keys do not fit fc1,bn1,fc2,bn2,fc3: "
            f"missing {missing or 'none'}, unexpected {unexpected or 'none'}"
        )
    return backbone, {k: head[k].detach().clone() for k in MSN_HEAD_KEYS}


def read_msn(path: str | Path, *, arch: str | None = None, role: EncoderRole = "target") -> Imported:
    """A facebookresearch/msn checkpoint. ``role`` picks the encoder written as the checkpoint's
    ``target_encoder`` (the one ``fewshot export`` serves); with ``target`` the anchor encoder,
    where the file has one, is kept as ``encoder``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointImportError(f"no file at {path}")
    try:
        # weights_only: a downloaded pickle must not run code; MSN files hold only tensors and numbers.
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several unrelated types for a file that is not a pickle
        raise CheckpointImportError(f"{path} is not a readable torch checkpoint ({exc})") from None
    if not isinstance(raw, dict):
        raise CheckpointImportError(f"{path}: expected a dict of checkpoint parts, got {type(raw).__name__}")
    if raw.get("format") == "fewshot-msn":
        raise CheckpointImportError(
            f"{path} is already a fewshot checkpoint; export or train from it directly"
        )
    source_key = {"target": "target_encoder", "anchor": "encoder"}[role]
    if source_key not in raw:
        hint = (
            " (the released MSN files hold only target_encoder and prototypes)"
            if role == "anchor"
            else "; a Hugging Face folder needs --format hf"
            if any(k.startswith("embeddings.") for k in raw)
            else ""
        )
        raise CheckpointImportError(
            f"{path}: not an MSN checkpoint with a {role} encoder: no top-level key {source_key!r}; "
            f"it has {sorted(map(str, raw))[:12]}{hint}"
        )

    backbone, head = _split_msn_encoder(raw[source_key], source_key, str(path))
    spec, notes = infer_arch(backbone, source=str(path), num_heads=None, heads_from="", arch=arch)
    target = _check_against_model(backbone, spec, str(path), lambda k: f"module.{k}")
    imported = Imported(
        spec=spec,
        source=f"msn {source_key} of {path.name}",
        target_encoder=target,
        target_head=head,
        notes=notes,
    )
    if role == "target" and "encoder" in raw:
        anchor, anchor_head = _split_msn_encoder(raw["encoder"], "encoder", str(path))
        imported.encoder = _check_against_model(anchor, spec, f"{path} (encoder)", lambda k: f"module.{k}")
        imported.head = anchor_head

    prototypes = raw.get("prototypes")
    if prototypes is not None:
        if not isinstance(prototypes, Tensor) or prototypes.ndim != 2:
            raise CheckpointImportError(f"{path}: 'prototypes' must be a [K, D] tensor")
        out_dim = head["fc3.weight"].shape[0] if head else None
        if out_dim is not None and prototypes.shape[1] != out_dim:
            raise CheckpointImportError(
                f"{path}: prototypes {tuple(prototypes.shape)} do not match the head's output {out_dim}"
            )
        imported.prototypes = prototypes.detach().float().clone()
    return imported


# --- Hugging Face ViTMSN ------------------------------------------------------------------------

# (source pattern, timm name) for everything but q/k/v. Two spellings of the blocks:
# the saved files (transformers 4.x and the Hub) and transformers 5's in-memory module names.
_HF_RENAMES: tuple[tuple[str, str], ...] = (
    (r"embeddings\.cls_token", "cls_token"),
    (r"embeddings\.position_embeddings", "pos_embed"),
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"layernorm\.(weight|bias)", r"norm.\1"),
    (r"encoder\.layer\.(\d+)\.layernorm_before\.(weight|bias)", r"blocks.\1.norm1.\2"),
    (r"encoder\.layer\.(\d+)\.layernorm_after\.(weight|bias)", r"blocks.\1.norm2.\2"),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (r"encoder\.layer\.(\d+)\.intermediate\.dense\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
    (r"encoder\.layer\.(\d+)\.output\.dense\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
    (r"layers\.(\d+)\.layernorm_before\.(weight|bias)", r"blocks.\1.norm1.\2"),
    (r"layers\.(\d+)\.layernorm_after\.(weight|bias)", r"blocks.\1.norm2.\2"),
    (r"layers\.(\d+)\.attention\.o_proj\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (r"layers\.(\d+)\.mlp\.fc1\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
    (r"layers\.(\d+)\.mlp\.fc2\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
)
_HF_QKV: tuple[str, ...] = (
    r"encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)",
    r"layers\.(\d+)\.attention\.(q|k|v)_proj\.(weight|bias)",
)
_QKV_ORDER = {"query": 0, "key": 1, "value": 2, "q": 0, "k": 1, "v": 2}
# Present in some saved models, unused by the embedding: the mask token of bool_masked_pos (MSN
# drops tokens instead) and a fine-tuned classifier.
_HF_IGNORED = (r"embeddings\.mask_token", r"classifier\..*")


_TIMM_TO_HF: tuple[tuple[str, str], ...] = (
    (r"cls_token", "embeddings.cls_token"),
    (r"pos_embed", "embeddings.position_embeddings"),
    (r"patch_embed\.proj\.(\w+)", r"embeddings.patch_embeddings.projection.\1"),
    (r"norm\.(\w+)", r"layernorm.\1"),
    (r"blocks\.(\d+)\.norm1\.(\w+)", r"encoder.layer.\1.layernorm_before.\2"),
    (r"blocks\.(\d+)\.norm2\.(\w+)", r"encoder.layer.\1.layernorm_after.\2"),
    (
        r"blocks\.(\d+)\.attn\.qkv\.(\w+)",
        r"encoder.layer.\1.attention.attention.{query,key,value}.\2",
    ),
    (r"blocks\.(\d+)\.attn\.proj\.(\w+)", r"encoder.layer.\1.attention.output.dense.\2"),
    (r"blocks\.(\d+)\.mlp\.fc1\.(\w+)", r"encoder.layer.\1.intermediate.dense.\2"),
    (r"blocks\.(\d+)\.mlp\.fc2\.(\w+)", r"encoder.layer.\1.output.dense.\2"),
)


def _hf_name(timm_key: str) -> str:
    """The saved-file (transformers 4.x / Hub) name of a timm key, for error messages."""
    for pattern, template in _TIMM_TO_HF:
        if re.fullmatch(pattern, timm_key):
            return re.sub(pattern, template, timm_key)
    return timm_key


def _read_hf_weights(folder: Path) -> StateDict:
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: StateDict = {}
        for shard in shards:
            state.update(load_file(folder / shard))
        return state
    if (folder / "model.safetensors").is_file():
        return load_file(folder / "model.safetensors")
    if (folder / "pytorch_model.bin").is_file():
        return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise CheckpointImportError(
        f"{folder}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin "
        "(a folder from ViTMSNModel.save_pretrained)"
    )


def _hf_to_timm(state: StateDict, source: str) -> tuple[StateDict, dict[str, str]]:
    """Rename to timm; returns the timm state and, for messages, timm name -> source name."""
    state = _strip_prefix(state, "vit.")  # ViTMSNForImageClassification nests the backbone
    out: StateDict = {}
    origin: dict[str, str] = {}
    qkv: dict[tuple[str, str], dict[int, Tensor]] = {}
    unexpected = []
    for key, value in state.items():
        for pattern, template in _HF_RENAMES:
            if re.fullmatch(pattern, key):
                name = re.sub(pattern, template, key)
                out[name], origin[name] = value, key
                break
        else:
            for pattern in _HF_QKV:
                if m := re.fullmatch(pattern, key):
                    block, part, param = m.groups()
                    qkv.setdefault((block, param), {})[_QKV_ORDER[part]] = value
                    # For messages: "...attention.{query,key,value}.weight".
                    fused = "{query,key,value}" if len(part) > 1 else "{q,k,v}"
                    origin[f"blocks.{block}.attn.qkv.{param}"] = key[: m.start(2)] + fused + key[m.end(2) :]
                    break
            else:
                if not any(re.fullmatch(p, key) for p in _HF_IGNORED):
                    unexpected.append(key)
    if unexpected:
        raise CheckpointImportError(f"{source}: unexpected keys for a ViTMSN model: {sorted(unexpected)}")
    for (block, param), parts in qkv.items():
        if len(parts) != 3:
            names = ["query", "key", "value"]
            lacking = [names[i] for i in range(3) if i not in parts]
            raise CheckpointImportError(
                f"{source}: block {block} attention {param} lacks {', '.join(lacking)}"
            )
        shapes = {tuple(p.shape) for p in parts.values()}
        if len(shapes) != 1:
            raise CheckpointImportError(
                f"{source}: block {block} query/key/value {param} shapes differ: {sorted(shapes)}"
            )
        out[f"blocks.{block}.attn.qkv.{param}"] = torch.cat([parts[0], parts[1], parts[2]], dim=0)
    return out, origin


def read_hf(folder: str | Path, *, arch: str | None = None) -> Imported:
    """A ``ViTMSNModel.save_pretrained`` folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointImportError(f"{folder} is not a folder (--format hf takes a save_pretrained folder)")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointImportError(f"{folder}: no config.json (a folder from ViTMSNModel.save_pretrained)")
    config = json.loads(config_path.read_text())
    model_type = config.get("model_type")
    if model_type not in ("vit_msn", "vit"):
        raise CheckpointImportError(f"{folder}: config.json model_type is {model_type!r}, not 'vit_msn'")
    eps = float(config.get("layer_norm_eps", 1e-12 if model_type == "vit" else TIMM_LAYER_NORM_EPS))
    if not math.isclose(eps, TIMM_LAYER_NORM_EPS, rel_tol=1e-6):
        raise CheckpointImportError(
            f"{folder}: layer_norm_eps {eps} differs from the MSN/timm backbone's {TIMM_LAYER_NORM_EPS}"
        )
    if config.get("hidden_act", "gelu") != "gelu":
        raise CheckpointImportError(
            f"{folder}: hidden_act {config['hidden_act']!r}; only exact 'gelu' matches timm"
        )
    if config.get("num_channels", 3) != 3:
        raise CheckpointImportError(f"{folder}: num_channels {config['num_channels']}; RGB models only")

    state, origin = _hf_to_timm(_read_hf_weights(folder), str(folder))
    if not config.get("qkv_bias", True):
        # No bias tensors saved: the equivalent timm model has zero q/k/v biases.
        for name in [k for k in state if k.endswith("attn.qkv.weight")]:
            state[name.replace("weight", "bias")] = torch.zeros(state[name].shape[0])
    spec, notes = infer_arch(
        state,
        source=str(folder),
        num_heads=config.get("num_attention_heads"),
        heads_from="config.json",
        arch=arch,
    )
    for key, want in (
        ("hidden_size", spec.embed_dim),
        ("num_hidden_layers", spec.depth),
        ("patch_size", spec.patch_size),
        ("image_size", spec.img_size),
    ):
        if key in config and config[key] != want:
            raise CheckpointImportError(
                f"{folder}: config.json {key} {config[key]} but the weights give {want}"
            )
    target = _check_against_model(state, spec, str(folder), lambda k: origin.get(k) or _hf_name(k))
    imported = Imported(spec=spec, source=f"hf {folder.name}", target_encoder=target, notes=notes)
    imported.mean, imported.std = _hf_normalisation(folder)
    return imported


def _hf_normalisation(folder: Path) -> tuple[Any, Any]:
    """mean/std from ``preprocessor_config.json`` where saved (the Hub's MSN models use ImageNet's)."""
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return None, None
    raw = json.loads(path.read_text())
    mean, std = raw.get("image_mean"), raw.get("image_std")
    if isinstance(mean, list) and isinstance(std, list) and len(mean) == len(std) == 3:
        return tuple(float(v) for v in mean), tuple(float(v) for v in std)
    return None, None


def read_source(
    fmt: Format, source: str | Path, *, arch: str | None = None, role: EncoderRole = "target"
) -> Imported:
    if fmt == "msn":
        return read_msn(source, arch=arch, role=role)
    if role != "target":
        raise CheckpointImportError("--format hf holds one encoder; --encoder anchor applies to msn only")
    return read_hf(source, arch=arch)
