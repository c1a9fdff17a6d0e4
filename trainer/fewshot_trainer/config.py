"""Training settings: nested YAML validated into typed objects, with per-model defaults.

Sections follow the reference recipe (msn.md §1): ``model``, ``data`` (with the views),
``masking``, ``criterion``, ``optimization``, ``logging``. Resolution order, later wins:
built-in defaults -> the packaged ``configs/<arch>.yaml`` (or ``--config FILE``) -> command line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .hardware import Bf16Setting
from .vit import get_arch

CONFIG_DIR = Path(__file__).with_name("configs")
DEFAULT_ARCH = "vit_tiny_p8_64"


class _Section(BaseModel):
    # A misspelt key is an error, not a silently ignored setting.
    model_config = ConfigDict(extra="forbid")


class ModelConfig(_Section):
    arch: str = DEFAULT_ARCH
    # Projection head Linear(D,h)-BN-GELU-Linear(h,h)-BN-GELU-Linear(h,out), as the reference.
    hidden_dim: int = Field(2048, gt=0)
    output_dim: int = Field(256, gt=0)
    num_prototypes: int = Field(1024, gt=1)


class DataConfig(_Section):
    batch_size: int = Field(64, gt=1, description="images per process (per rank), as the reference")
    # Loader processes per training process; "auto": none on a CPU, the spare cores on a GPU
    # (hardware.resolve_num_workers).
    num_workers: Annotated[int, Field(ge=0)] | Literal["auto"] = 2
    random_size: int = Field(224, gt=0, description="target and masked anchor view size")
    focal_size: int = Field(96, gt=0)
    focal_views: int = Field(10, ge=0)
    random_scale: tuple[float, float] = (0.3, 1.0)
    focal_scale: tuple[float, float] = (0.05, 0.3)
    color_jitter_strength: float = Field(0.5, ge=0)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    # Shorter-side resize the exported model should use before its centre crop; None: 256/224
    # of random_size at 224 px and up (the reference eval), else random_size (small images).
    export_resize_size: int | None = None


class MaskingConfig(_Section):
    ratio: float = Field(0.15, ge=0.0, lt=1.0, description="fraction of anchor patches dropped")
    # The reference drops patches of the random anchor only (its first resolution group); a focal
    # view is itself the "mask", a small independent crop (msn.md section 1). True also drops
    # `ratio` of every focal view's patches (one subset per batch), as lightly's examples do.
    focal: bool = Field(False, description="also mask the focal views at the same ratio")


class CriterionConfig(_Section):
    temperature: float = Field(0.1, gt=0, description="anchor softmax temperature tau")
    sharpen_temperature: float = Field(0.25, gt=0, description="T: target = p^(1/T), renormalised")
    memax_weight: float = Field(1.0, ge=0)
    use_sinkhorn: bool = True
    sinkhorn_iterations: int = Field(3, ge=1)
    label_smoothing: float = Field(0.0, ge=0, lt=1)


class OptimizationConfig(_Section):
    epochs: int = Field(800, gt=0)
    lr: float = Field(1e-3, gt=0)
    start_lr: float = Field(2e-4, ge=0)
    final_lr: float = Field(1e-6, ge=0)
    warmup_epochs: float = Field(15, ge=0)
    weight_decay: float = Field(0.04, ge=0)
    final_weight_decay: float = Field(0.4, ge=0)
    clip_grad: float = Field(3.0, ge=0, description="encoder grad-norm clip; 0 disables")
    ema_start: float = Field(0.996, ge=0, le=1)
    ema_end: float = Field(1.0, ge=0, le=1)
    # The reference stretches the lr/wd/EMA schedules over 1.25x the real run (msn.md §1).
    schedule_horizon: float = Field(1.25, ge=1.0)
    # bf16 autocast of the networks (loss, Sinkhorn and optimiser state stay fp32). "auto": on only
    # where the CPU has AMX-BF16 or AVX512-BF16 (or the GPU supports bf16), see hardware.py.
    bf16: Bf16Setting = False
    # torch.compile (inductor) the forward passes and the loss; backward is compiled with them.
    # Falls back to eager, with a warning, where compiling fails (e.g. no C++ compiler).
    compile: bool = False


class LoggingConfig(_Section):
    log_every: int = Field(10, gt=0, description="steps between metrics.jsonl lines")
    checkpoint_every_steps: int = Field(0, ge=0, description="0: only at epoch ends")
    keep_epoch_checkpoints: bool = False
    probe_episodes: int = Field(200, gt=0)


class TrainConfig(_Section):
    seed: int = 0
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    masking: MaskingConfig = MaskingConfig()
    criterion: CriterionConfig = CriterionConfig()
    optimization: OptimizationConfig = OptimizationConfig()
    logging: LoggingConfig = LoggingConfig()

    @model_validator(mode="after")
    def _check_consistent(self) -> TrainConfig:
        spec = get_arch(self.model.arch)
        for name in ("random_size", "focal_size"):
            size = getattr(self.data, name)
            if size % spec.patch_size:
                raise ValueError(f"data.{name}={size} is not a multiple of patch {spec.patch_size}")
        if self.data.random_size != spec.img_size:
            # The exported model runs at the arch's size; training at another would need resampling.
            raise ValueError(
                f"data.random_size={self.data.random_size} must equal {spec.name}'s img_size {spec.img_size}"
            )
        return self

    def preprocess_dict(self) -> dict[str, Any]:
        """The ``fewshot_common.modelmeta.Preprocess`` (as a dict) the exported model should use."""
        size = self.data.random_size
        resize = self.data.export_resize_size or (size * 256 // 224 if size >= 224 else size)
        return {
            "input_size": size,
            "resize_size": resize,
            "interpolation": "bicubic",
            "mean": tuple(self.data.mean),
            "std": tuple(self.data.std),
        }


def deep_update(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_update(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_overrides(assignments: list[str]) -> dict[str, Any]:
    """``["masking.ratio=0.6", "data.focal_scale=[0.05, 0.3]"]`` -> a nested override dict.

    Values are read as YAML (numbers, booleans, lists); keys must name a setting of
    :class:`TrainConfig` (the types are checked when the config is validated).
    """
    nested: dict[str, Any] = {}
    for assignment in assignments:
        key, sep, raw = assignment.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {assignment!r}: expected section.key=value")
        *parents, leaf = key.strip().split(".")
        _check_setting_name([*parents, leaf])
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(raw)
    return nested


def _check_setting_name(keys: list[str]) -> None:
    """Refuse a dotted key that names no setting, with the names that would be valid."""
    section: type[BaseModel] = TrainConfig
    for depth, part in enumerate(keys):
        fields = section.model_fields
        if part not in fields:
            where = f"section {'.'.join(keys[:depth])!r}" if depth else "the config"
            raise ValueError(f"--set: {where} has no setting {part!r}; it has: {', '.join(fields)}")
        if depth < len(keys) - 1:
            annotation = fields[part].annotation
            if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
                raise ValueError(f"--set: {'.'.join(keys[: depth + 1])!r} is a value, not a section")
            section = annotation


def read_yaml(path: str | Path) -> dict[str, Any]:
    raw = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a config must be a YAML mapping, got {type(raw).__name__}")
    return raw


def arch_defaults(arch: str) -> dict[str, Any]:
    """Settings for an arch with no packaged YAML: the reference recipe scaled to its size."""
    spec = get_arch(arch)
    # Paper A.1 mask ratios: small models mask little, patch-4/7 models mask most.
    if spec.patch_size <= 8 and spec.img_size >= 224:
        ratio = 0.7
    elif spec.embed_dim >= 768:
        ratio = 0.3
    else:
        ratio = 0.15
    focal = 96 if spec.img_size >= 224 else max(spec.patch_size, spec.img_size // 2)
    focal -= focal % spec.patch_size
    return {
        "model": {"arch": arch},
        "data": {"random_size": spec.img_size, "focal_size": focal},
        "masking": {"ratio": ratio},
    }


def load_config(
    config_file: str | Path | None = None,
    arch: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> TrainConfig:
    """Resolve a config: YAML file (or the arch's packaged one), then ``overrides`` (nested dict)."""
    if config_file is not None:
        raw = read_yaml(config_file)
        if arch is not None:
            raw = deep_update(raw, {"model": {"arch": arch}})
    else:
        arch = arch or DEFAULT_ARCH
        packaged = CONFIG_DIR / f"{arch}.yaml"
        raw = read_yaml(packaged) if packaged.is_file() else arch_defaults(arch)
    return TrainConfig.model_validate(deep_update(raw, overrides or {}))


def save_config(config: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
