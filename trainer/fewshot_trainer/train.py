"""MSN pretraining: build the networks, then run ``train_step`` over epochs with exact resume.

One step (msn.md §1, reference ``msn_train.py``):
1. target view -> EMA target encoder + head (no grad); anchor view (masked) + focal views ->
   online encoder + head;
2. MSN loss (CE to the sharpened target assignment + ME-MAX);
3. backward; prototype gradient summed over ranks; clip the encoder's gradient; AdamW step;
4. EMA update of the target from the online encoder.
"""

from __future__ import annotations

import copy
import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from fewshot_common.cores import usable_cores

from . import distributed as dist_utils
from .checkpoint import CHECKPOINT_NAME, load_checkpoint, make_checkpoint, save_checkpoint
from .config import TrainConfig, save_config
from .data import EpochIndexSampler, UnlabelledImages, sample_seed
from .ema import ema_update
from .hardware import cpu_info, resolve_bf16, resolve_num_workers
from .loss import LossParts, msn_loss
from .masking import random_keep_indices
from .metrics import CollapseMeter, JsonlLog, batch_indicators
from .model import MSNEncoder, ProjectionHead, init_prototypes
from .schedules import ema_momentum, learning_rate, weight_decay
from .transforms import MSNViews
from .vit import ArchSpec, build_vit, get_arch

log = logging.getLogger(__name__)

METRICS_NAME = "metrics.jsonl"
# torch.compile backend of ``optimization.compile`` (a name or a callable; tests swap in failing ones).
COMPILE_BACKEND: Any = "inductor"
CONFIG_NAME = "config.yaml"


@dataclass
class TrainOptions:
    """What the command line says beyond the config: where, how long, how to start."""

    data: Path
    output: Path
    max_steps: int | None = None
    resume: bool = False
    # The checkpoint to resume from, when the caller has already read it (the CLI does, for its
    # config); else ``output/CHECKPOINT_NAME`` is read.
    resume_checkpoint: dict[str, Any] | None = None
    init: Path | None = None
    eval_dir: Path | None = None
    progress: bool = True


@dataclass
class TrainResult:
    step: int
    epoch: int
    skipped_files: int
    last: dict[str, Any] = field(default_factory=dict)


def build_networks(config: TrainConfig) -> tuple[MSNEncoder, MSNEncoder, nn.Parameter]:
    """Online encoder, its EMA target (a copy, no gradients) and the prototypes."""
    spec = get_arch(config.model.arch)
    backbone = build_vit(spec, dynamic_img_size=True)  # focal views run on their own grid
    head = ProjectionHead(spec.embed_dim, config.model.hidden_dim, config.model.output_dim)
    online = MSNEncoder(backbone, head)
    target = copy.deepcopy(online)
    for p in target.parameters():
        p.requires_grad_(False)
    prototypes = init_prototypes(config.model.num_prototypes, config.model.output_dim)
    return online, target, prototypes


def load_init_weights(
    path: Path, online: MSNEncoder, target: MSNEncoder, prototypes: nn.Parameter
) -> list[str]:
    """Start from a checkpoint's weights (whatever parts it has); returns the parts loaded."""
    ckpt = load_checkpoint(path)
    _check_same_shape(path, ckpt, online)
    loaded = []
    parts = (
        ("target_encoder", target.backbone),
        ("encoder", online.backbone),
        ("target_head", target.head),
        ("head", online.head),
    )
    for key, module in parts:
        if ckpt.get(key) is not None:
            try:
                module.load_state_dict(ckpt[key])
            except RuntimeError as exc:  # shape mismatch: say which setting to change
                raise ValueError(
                    f"{path}: {key} does not fit this config (model.hidden_dim/output_dim or "
                    f"arch differ): {str(exc).splitlines()[-1].strip()}"
                ) from None
            loaded.append(key)
    # An imported checkpoint may hold only the target: the online network starts from it too.
    if "encoder" not in loaded and "target_encoder" in loaded:
        online.backbone.load_state_dict(ckpt["target_encoder"])
    if "head" not in loaded and "target_head" in loaded:
        online.head.load_state_dict(ckpt["target_head"])
    if ckpt.get("prototypes") is not None:
        if ckpt["prototypes"].shape != prototypes.shape:
            raise ValueError(
                f"{path}: prototypes {tuple(ckpt['prototypes'].shape)} do not match the config's "
                f"{tuple(prototypes.shape)}"
            )
        with torch.no_grad():
            prototypes.copy_(ckpt["prototypes"])
        loaded.append("prototypes")
    return loaded


def _check_same_shape(path: Path, ckpt: dict[str, Any], online: MSNEncoder) -> None:
    """Imported checkpoints may name their arch differently; the shape is what must agree."""
    if not ckpt.get("arch"):
        return
    theirs = ArchSpec.from_dict(ckpt["arch"])
    vit = online.backbone
    ours = (vit.patch_embed.patch_size[0], vit.embed_dim, len(vit.blocks), vit.blocks[0].attn.num_heads)
    if (theirs.patch_size, theirs.embed_dim, theirs.depth, theirs.num_heads) != ours:
        raise ValueError(
            f"{path} holds a {theirs.name} (patch {theirs.patch_size}, dim {theirs.embed_dim}, depth "
            f"{theirs.depth}, heads {theirs.num_heads}); the config's model is patch {ours[0]}, "
            f"dim {ours[1]}, depth {ours[2]}, heads {ours[3]}: pass the matching --arch"
        )


def make_optimizer(online: MSNEncoder, prototypes: nn.Parameter) -> torch.optim.AdamW:
    """AdamW; no weight decay on biases, BatchNorm, 1-D tensors, or the prototypes (reference)."""
    decay, no_decay = [], []
    for name, p in online.named_parameters():
        if "bias" in name or "bn" in name or p.ndim == 1:
            no_decay.append(p)
        else:
            decay.append(p)
    return torch.optim.AdamW(
        [
            {"params": decay, "apply_wd": True},
            {"params": no_decay, "apply_wd": False, "weight_decay": 0.0},
            {"params": [prototypes], "apply_wd": False, "weight_decay": 0.0},
        ]
    )


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def describe_error(exc: BaseException) -> str:
    """One line: the exception and its root cause (torch wraps compiler errors in its own)."""
    root = exc
    # BackendCompilerFailed keeps the compiler's own error in ``inner_exception``.
    while (inner := getattr(root, "inner_exception", None) or root.__cause__) is not None:
        root = inner
    first_line = (str(root).strip().splitlines() or [""])[0]
    chain = type(exc).__name__ if root is exc else f"{type(exc).__name__} <- {type(root).__name__}"
    return f"{chain}: {first_line}"[:500]


class MSNTrainer:
    def __init__(self, config: TrainConfig, options: TrainOptions) -> None:
        self.config = config
        self.options = options
        self.device = dist_utils.init_from_env()
        self.rank, self.world = dist_utils.rank(), dist_utils.world_size()
        self.spec = get_arch(config.model.arch)
        self.focal_patches = (config.data.focal_size // self.spec.patch_size) ** 2
        torch.manual_seed(config.seed)  # identical initial weights on every rank
        random.seed(config.seed)
        np.random.seed(config.seed)

        views = MSNViews(
            random_size=config.data.random_size,
            focal_size=config.data.focal_size,
            focal_views=config.data.focal_views,
            random_scale=config.data.random_scale,
            focal_scale=config.data.focal_scale,
            color_jitter_strength=config.data.color_jitter_strength,
            mean=config.data.mean,
            std=config.data.std,
        )
        self.dataset = UnlabelledImages(options.data, views, seed=config.seed)
        self.steps_per_epoch = self._sampler(0).batches_per_epoch()
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{len(self.dataset)} images is less than one batch of {config.data.batch_size} "
                f"per process x {self.world} processes"
            )
        self.total_steps = config.optimization.epochs * self.steps_per_epoch

        online, self.target, self.prototypes = build_networks(config)
        self.step = 0
        if options.init is not None:
            loaded = load_init_weights(options.init, online, self.target, self.prototypes)
            log.info("initialised from %s: %s", options.init, ", ".join(loaded))
        # BatchNorm statistics over the global batch when world > 1 (reference: both encoders).
        online = dist_utils.sync_batchnorm(online, self.device)
        self.target = dist_utils.sync_batchnorm(self.target, self.device)
        self.online_module = online  # unwrapped: what checkpoints, clipping and EMA see
        online.to(self.device)
        self.target.to(self.device)
        self.prototypes.data = self.prototypes.data.to(self.device)
        self.optimizer = make_optimizer(self.online_module, self.prototypes)
        if options.resume:
            path = options.output / CHECKPOINT_NAME
            self._restore(options.resume_checkpoint or load_checkpoint(path), path)
        # Prototypes stay outside DDP: their gradient is summed over ranks, not averaged.
        self.online: nn.Module = online
        if self.world > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.online = DistributedDataParallel(online, device_ids=device_ids)
        self.log = JsonlLog(options.output / METRICS_NAME) if dist_utils.is_main() else None
        opt = config.optimization
        self.bf16 = resolve_bf16(
            opt.bf16,
            device_type=self.device.type,
            cpu_flags=cpu_info().flags,
            cuda_bf16=self.device.type == "cuda" and torch.cuda.is_bf16_supported(),
        )
        self.num_workers = resolve_num_workers(
            config.data.num_workers,
            device_type=self.device.type,
            cores=usable_cores(),
            local_processes=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
        )
        # A compiled *function* over the unchanged modules: their state_dict keys (checkpoints)
        # stay as they are, with no ``_orig_mod.`` prefix.
        self._compiled_forward_loss = (
            torch.compile(self._forward_loss, backend=COMPILE_BACKEND) if opt.compile else None
        )
        self._compile_checked = False
        self.compile_error: str | None = None  # why compiling failed, when it did

    # -- data -------------------------------------------------------------------------------
    def _sampler(self, epoch: int, skip_batches: int = 0) -> EpochIndexSampler:
        return EpochIndexSampler(
            len(self.dataset),
            epoch=epoch,
            seed=self.config.seed,
            rank=self.rank,
            world_size=self.world,
            batch_size=self.config.data.batch_size,
            skip_batches=skip_batches,
        )

    def _loader(self, epoch: int, skip_batches: int) -> DataLoader:
        workers = self.num_workers
        return DataLoader(
            self.dataset,
            batch_size=self.config.data.batch_size,
            sampler=self._sampler(epoch, skip_batches),
            num_workers=workers,
            drop_last=True,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
            # Its own generator: creating the iterator must not consume the global RNG.
            generator=torch.Generator().manual_seed(self.config.seed + epoch),
        )

    # -- checkpoints ------------------------------------------------------------------------
    def _checkpoint(self, epoch: int) -> dict[str, Any]:
        return make_checkpoint(
            arch=self.spec.to_dict(),
            preprocess=self.config.preprocess_dict(),
            target_encoder=self.target.backbone.state_dict(),
            encoder=self.online_module.backbone.state_dict(),
            target_head=self.target.head.state_dict(),
            head=self.online_module.head.state_dict(),
            prototypes=self.prototypes.detach().cpu().clone(),
            optimizer=self.optimizer.state_dict(),
            step=self.step,
            epoch=epoch,
            config=self.config.model_dump(mode="json"),
            rng=rng_state(),
            extra={
                "skipped_files": len(self.dataset.skipped),
                "world_size": self.world,
                "steps_per_epoch": self.steps_per_epoch,
            },
        )

    def save(self, *, epoch_copy: bool = False) -> None:
        if not dist_utils.is_main():
            return
        epoch = self.step // self.steps_per_epoch  # completed epochs
        ckpt = self._checkpoint(epoch)
        save_checkpoint(ckpt, self.options.output / CHECKPOINT_NAME)
        if epoch_copy:
            save_checkpoint(ckpt, self.options.output / f"checkpoint_epoch{epoch:03d}.pt")

    def _restore(self, ckpt: dict[str, Any], path: Path) -> None:
        self.online_module.backbone.load_state_dict(ckpt["encoder"])
        self.online_module.head.load_state_dict(ckpt["head"])
        self.target.backbone.load_state_dict(ckpt["target_encoder"])
        self.target.head.load_state_dict(ckpt["target_head"])
        with torch.no_grad():
            self.prototypes.copy_(ckpt["prototypes"].to(self.device))
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.step = int(ckpt["step"])
        saved_steps = (ckpt.get("extra") or {}).get("steps_per_epoch")
        if saved_steps not in (None, self.steps_per_epoch):
            log.warning(
                "resuming with %d steps per epoch where the run had %d (other data, batch size or "
                "world size): the data order is no longer the uninterrupted run's",
                self.steps_per_epoch,
                saved_steps,
            )
        if ckpt.get("rng"):
            set_rng_state(ckpt["rng"])
        log.info("resumed from %s at step %d", path, self.step)

    # -- one step ---------------------------------------------------------------------------
    def _apply_schedules(self) -> dict[str, float]:
        opt = self.config.optimization
        warmup = round(opt.warmup_epochs * self.steps_per_epoch)
        lr = learning_rate(
            self.step,
            total_steps=self.total_steps,
            warmup_steps=warmup,
            start_lr=opt.start_lr,
            ref_lr=opt.lr,
            final_lr=opt.final_lr,
            horizon=opt.schedule_horizon,
        )
        wd = weight_decay(
            self.step,
            total_steps=self.total_steps,
            start_wd=opt.weight_decay,
            final_wd=opt.final_weight_decay,
            horizon=opt.schedule_horizon,
        )
        for group in self.optimizer.param_groups:
            group["lr"] = lr
            if group["apply_wd"]:
                group["weight_decay"] = wd
        momentum = ema_momentum(
            self.step,
            total_steps=self.total_steps,
            start=opt.ema_start,
            end=opt.ema_end,
            horizon=opt.schedule_horizon,
        )
        return {"lr": lr, "wd": wd, "momentum": momentum}

    def _forward_loss(
        self, views: list[torch.Tensor], keep: torch.Tensor, focal_keep: torch.Tensor | None
    ) -> tuple[LossParts, torch.Tensor]:
        """Target (EMA, unmasked, no grad) and anchors (masked random view + focal views, masked
        too with ``masking.focal``), then the MSN loss. Shapes are fixed across steps (a fixed
        number of kept tokens), so a compiled version of this compiles once."""
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)
        with autocast:
            with torch.no_grad():
                target_z = self.target([views[0]])
            anchor_z = self.online(views[1:], keep, focal_keep)
        crit = self.config.criterion
        parts = msn_loss(
            anchor_z,
            target_z,
            self.prototypes,
            temperature=crit.temperature,
            sharpen_temperature=crit.sharpen_temperature,
            memax_weight=crit.memax_weight,
            use_sinkhorn=crit.use_sinkhorn,
            sinkhorn_iterations=crit.sinkhorn_iterations,
            label_smoothing=crit.label_smoothing,
        )
        return parts, target_z

    def _forward_backward(
        self,
        fn: Callable[..., tuple[LossParts, torch.Tensor]],
        views: list[torch.Tensor],
        keep: torch.Tensor,
        focal_keep: torch.Tensor | None,
    ) -> tuple[LossParts, torch.Tensor]:
        parts, target_z = fn(views, keep, focal_keep)
        self.optimizer.zero_grad(set_to_none=True)
        parts.total.backward()
        return parts, target_z

    def _first_compiled_step(
        self, views: list[torch.Tensor], keep: torch.Tensor, focal_keep: torch.Tensor | None
    ) -> tuple[LossParts, torch.Tensor]:
        """Forward + backward through the compiled function; on a compiler failure, eager instead.

        Inductor compiles the forward in the first call and the backward in the first backward,
        so a failure (no C++ compiler, an op it cannot lower) can come after the forward ran and
        moved the BatchNorm running statistics: they are put back before the eager retry, which
        then computes exactly the step an uncompiled run would. Only speed depends on compiling,
        so a long run goes on rather than dying on a machine without a toolchain.
        """
        assert self._compiled_forward_loss is not None
        buffers = [
            (b, b.detach().clone()) for module in (self.online_module, self.target) for b in module.buffers()
        ]
        try:
            result = self._forward_backward(self._compiled_forward_loss, views, keep, focal_keep)
        except Exception as exc:  # noqa: BLE001 -- whatever the compiler raised: fall back, say why
            with torch.no_grad():
                for buffer, saved in buffers:
                    buffer.copy_(saved)
            self.compile_error = describe_error(exc)
            log.warning("torch.compile failed, training in eager mode: %s", self.compile_error)
            self._write({"event": "compile_failed", "step": self.step, "error": self.compile_error})
            self._compiled_forward_loss = None
            return self._forward_backward(self._forward_loss, views, keep, focal_keep)
        self._compile_checked = True
        return result

    def train_step(self, views: list[torch.Tensor], meter: CollapseMeter) -> dict[str, float]:
        cfg = self.config
        sched = self._apply_schedules()
        views = [v.to(self.device, non_blocking=True) for v in views]
        # One mask per batch, drawn from (seed, rank, step): reproducible on resume.
        mask_rng = torch.Generator().manual_seed(sample_seed(cfg.seed, self.rank, self.step))
        keep = random_keep_indices(self.spec.num_patches, cfg.masking.ratio, mask_rng)
        # Drawn after `keep`, and only when on, so runs without focal masking are unchanged.
        focal_keep = (
            random_keep_indices(self.focal_patches, cfg.masking.ratio, mask_rng)
            if cfg.masking.focal and cfg.data.focal_views
            else None
        )

        # 1-3. forwards, loss, backward
        if self._compiled_forward_loss is None:
            parts, target_z = self._forward_backward(self._forward_loss, views, keep, focal_keep)
        elif not self._compile_checked:
            parts, target_z = self._first_compiled_step(views, keep, focal_keep)
        else:
            parts, target_z = self._forward_backward(self._compiled_forward_loss, views, keep, focal_keep)
        # 3. prototype grads summed over ranks, clip the encoder, step
        if self.prototypes.grad is not None:
            dist_utils.all_reduce_sum_(self.prototypes.grad)
        grad_norm = float("nan")
        if cfg.optimization.clip_grad > 0:
            grad_norm = float(
                torch.nn.utils.clip_grad_norm_(self.online_module.parameters(), cfg.optimization.clip_grad)
            )
        self.optimizer.step()
        # 4. EMA target
        ema_update(self.target, self.online_module, sched["momentum"])
        self.step += 1

        meter.update(parts.target_probs, target_z)
        return {
            "loss": parts.total.item(),
            "ce": parts.ce.item(),
            "memax": parts.memax.item(),
            "grad_norm": grad_norm,
            **sched,
            **batch_indicators(parts.target_probs),
        }

    # -- the loop ---------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        opts = self.options
        if dist_utils.is_main():
            opts.output.mkdir(parents=True, exist_ok=True)
            save_config(self.config, opts.output / CONFIG_NAME)
            skipped = len(self.dataset.skipped)
            if skipped:
                log.warning("skipped %d unreadable files under %s", skipped, opts.data)
            self._write(
                {
                    "event": "start",
                    "images": len(self.dataset),
                    "skipped_files": skipped,
                    "steps_per_epoch": self.steps_per_epoch,
                    "total_steps": self.total_steps,
                    "world_size": self.world,
                    "start_step": self.step,
                    "bf16": self.bf16,
                    "compile": self._compiled_forward_loss is not None,
                    "loader_workers": self.num_workers,
                }
            )
        limit = self.total_steps if opts.max_steps is None else min(opts.max_steps, self.total_steps)
        self.online.train()
        self.target.train()
        last: dict[str, Any] = {}
        global_batch = self.config.data.batch_size * self.world
        while self.step < limit:
            epoch, done = divmod(self.step, self.steps_per_epoch)
            meter = CollapseMeter(self.config.model.num_prototypes)
            bar = tqdm(
                total=self.steps_per_epoch,
                initial=done,
                desc=f"epoch {epoch}",
                disable=not (opts.progress and dist_utils.is_main()),
                dynamic_ncols=True,
            )
            tick = time.perf_counter()
            for views in self._loader(epoch, done):
                last = self.train_step(views, meter)
                now = time.perf_counter()
                last["img_per_s"] = global_batch / (now - tick)
                tick = now
                bar.update(1)
                bar.set_postfix(
                    loss=f"{last['loss']:.3f}",
                    lr=f"{last['lr']:.2e}",
                    img_s=f"{last['img_per_s']:.1f}",
                    np=last["np"],
                )
                if self.step % self.config.logging.log_every == 0:
                    self._write({"event": "step", "step": self.step, "epoch": epoch, **last})
                every = self.config.logging.checkpoint_every_steps
                if every and self.step % every == 0:
                    self.save()
                if self.step >= limit:
                    break
            bar.close()
            epoch_done = self.step % self.steps_per_epoch == 0
            if epoch_done:
                summary = {"event": "epoch", "epoch": epoch, "step": self.step, **meter.summary()}
                summary.update(self._probe())
                self._write(summary)
                if dist_utils.is_main():
                    log.info("epoch %d: %s", epoch, summary)
                self.save(epoch_copy=self.config.logging.keep_epoch_checkpoints)
            else:
                self.save()
        return TrainResult(
            step=self.step,
            epoch=self.step // self.steps_per_epoch,
            skipped_files=len(self.dataset.skipped),
            last=last,
        )

    def _probe(self) -> dict[str, Any]:
        if self.options.eval_dir is None or not dist_utils.is_main():
            return {}
        from .probe import few_shot_probe

        return {
            "probe": few_shot_probe(
                self.target.backbone,
                self.options.eval_dir,
                self.config.preprocess_dict(),
                device=self.device,
                episodes=self.config.logging.probe_episodes,
            )
        }

    def _write(self, record: dict[str, Any]) -> None:
        if self.log is not None:
            self.log.write(record)


def train(config: TrainConfig, options: TrainOptions) -> TrainResult:
    trainer = MSNTrainer(config, options)
    try:
        return trainer.fit()
    finally:
        dist_utils.shutdown()
