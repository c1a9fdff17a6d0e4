"""Training runs end to end: exact resume, the command line, a short real run on tiny-imagenet."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from fewshot_common.cli import main as fewshot_main
from fewshot_trainer.checkpoint import load_checkpoint, save_checkpoint
from fewshot_trainer.config import MaskingConfig, TrainConfig, deep_update, load_config
from fewshot_trainer.metrics import CollapseMeter
from fewshot_trainer.train import TrainOptions, build_networks, train
from fewshot_trainer.vit import build_vit, get_arch

TINY: dict[str, Any] = {
    "model": {"arch": "vit_test_p8_32", "hidden_dim": 64, "output_dim": 32, "num_prototypes": 16},
    "data": {"batch_size": 8, "num_workers": 0, "random_size": 32, "focal_size": 16, "focal_views": 2},
    "masking": {"ratio": 0.5},
    "optimization": {"epochs": 2, "warmup_epochs": 0.5},
    "logging": {"log_every": 1},
}


def tiny_config(**overrides: Any) -> TrainConfig:
    return TrainConfig.model_validate(deep_update(TINY, overrides))


def write_images(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        # Smooth random blobs rather than pure noise, so crops differ in content.
        small = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
        Image.fromarray(small).resize((48, 48), Image.BICUBIC).save(folder / f"{i:04d}.png")
    return folder


def read_metrics(output: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


STATE_KEYS = ("target_encoder", "encoder", "target_head", "head")


def assert_same_weights(a: dict[str, Any], b: dict[str, Any]) -> None:
    for key in STATE_KEYS:
        for name, tensor in a[key].items():
            torch.testing.assert_close(b[key][name], tensor, rtol=0, atol=1e-6, msg=f"{key}.{name}")
    torch.testing.assert_close(b["prototypes"], a["prototypes"], rtol=0, atol=1e-6)


def test_interrupted_and_resumed_run_matches_an_uninterrupted_one(tmp_path: Path) -> None:
    data = write_images(tmp_path / "data", 24)  # 3 steps per epoch, 6 in all
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(tiny_config(), TrainOptions(data=data, output=straight, progress=False))
    # Stop mid-epoch 1, then resume with a loader worker: batches and augmentations must match.
    train(tiny_config(), TrainOptions(data=data, output=split, max_steps=4, progress=False))
    assert load_checkpoint(split / "checkpoint.pt")["step"] == 4
    result = train(
        tiny_config(data={"num_workers": 1}),
        TrainOptions(data=data, output=split, resume=True, progress=False),
    )
    assert result.step == 6
    a, b = load_checkpoint(straight / "checkpoint.pt"), load_checkpoint(split / "checkpoint.pt")
    assert a["step"] == b["step"] == 6 and a["epoch"] == b["epoch"] == 2
    assert_same_weights(a, b)
    for state_a, state_b in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        torch.testing.assert_close(state_b["exp_avg"], state_a["exp_avg"], rtol=0, atol=1e-6)
    # The weights did move: this is not comparing two untouched initialisations.
    torch.manual_seed(tiny_config().seed)
    initial, _, _ = build_networks(tiny_config())
    moved = (initial.backbone.pos_embed - a["encoder"]["pos_embed"]).abs().max()
    assert moved > 1e-4
    steps = [r["step"] for r in read_metrics(split) if r["event"] == "step"]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_checkpoint_holds_what_export_reads(tmp_path: Path) -> None:
    data = write_images(tmp_path / "data", 16)
    out = tmp_path / "run"
    train(
        tiny_config(optimization={"epochs": 1}, logging={"keep_epoch_checkpoints": True}),
        TrainOptions(data=data, output=out, progress=False),
    )
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert (out / "checkpoint_epoch001.pt").is_file()
    vit = build_vit(get_arch(ckpt["arch"]["name"]))
    vit.load_state_dict(ckpt["target_encoder"], strict=True)
    assert set(ckpt["target_head"]) >= {"fc1.weight", "bn1.running_mean", "fc3.bias"}
    assert ckpt["prototypes"].shape == (16, 32)
    assert ckpt["preprocess"] == {
        "input_size": 32,
        "resize_size": 32,
        "interpolation": "bicubic",
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
    }
    assert TrainConfig.model_validate(ckpt["config"]) == tiny_config(
        optimization={"epochs": 1}, logging={"keep_epoch_checkpoints": True}
    )
    epoch = [r for r in read_metrics(out) if r["event"] == "epoch"]
    assert len(epoch) == 1
    for key in ("target_mean_entropy", "prototypes_in_use", "embedding_std", "max_target_prob"):
        assert key in epoch[0]


def test_init_from_a_checkpoint_loads_weights_with_fresh_optimizer(tmp_path: Path) -> None:
    data = write_images(tmp_path / "data", 16)
    first, second = tmp_path / "first", tmp_path / "second"
    train(tiny_config(optimization={"epochs": 1}), TrainOptions(data=data, output=first, progress=False))
    source = load_checkpoint(first / "checkpoint.pt")
    result = train(
        tiny_config(optimization={"epochs": 1}),
        TrainOptions(data=data, output=second, init=first / "checkpoint.pt", max_steps=1, progress=False),
    )
    assert result.step == 1  # fresh schedule, not the source's step
    after = load_checkpoint(second / "checkpoint.pt")
    # One small step away from the source, far from a fresh random init.
    drift = (after["target_encoder"]["pos_embed"] - source["target_encoder"]["pos_embed"]).abs().max()
    assert drift < 1e-3


def test_init_from_an_incompatible_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    data = write_images(tmp_path / "data", 16)
    first = tmp_path / "first"
    train(tiny_config(optimization={"epochs": 1}), TrainOptions(data=data, output=first, progress=False))
    wider_head = tiny_config(model={"hidden_dim": 48})
    with pytest.raises(ValueError, match="hidden_dim"):
        train(wider_head, TrainOptions(data=data, output=tmp_path / "x", init=first / "checkpoint.pt"))
    ckpt = load_checkpoint(first / "checkpoint.pt")
    ckpt["arch"] = {**ckpt["arch"], "name": "imported", "depth": 3}
    save_checkpoint(ckpt, tmp_path / "deeper.pt")
    with pytest.raises(ValueError, match="depth 3"):
        train(tiny_config(), TrainOptions(data=data, output=tmp_path / "y", init=tmp_path / "deeper.pt"))


def _cli(tmp_path: Path, *extra: str) -> list[str]:
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    return ["train", "--config", str(config), "--no-progress", *extra]


def test_cli_runs_skips_unreadable_files_and_saves_resolved_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_images(tmp_path / "data", 16)
    (data / "corrupt.jpg").write_bytes(b"\xff\xd8 broken")
    (data / "sub").mkdir()
    (data / "sub" / "zero.png").write_bytes(b"")
    out = tmp_path / "run"
    code = fewshot_main(
        _cli(
            tmp_path,
            "--data",
            str(data),
            "--output",
            str(out),
            "--max-steps",
            "2",
            "--batch-size",
            "4",
            "--seed",
            "5",
            "--workers",
            "auto",
        )
    )
    assert code == 0
    assert "2 unreadable files skipped" in capsys.readouterr().out
    start = read_metrics(out)[0]
    assert start["event"] == "start" and start["skipped_files"] == 2 and start["images"] == 16
    assert start["loader_workers"] == 0  # auto, on a CPU: loading stays in the training process
    saved = load_config(out / "config.yaml")
    assert saved.data.batch_size == 4 and saved.seed == 5 and saved.model.arch == "vit_test_p8_32"
    assert saved.data.num_workers == "auto"  # the setting is kept, not what it resolved to here
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 2


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--arch", "vit_nope"], "unknown arch"),
        (["--batch-size", "1"], "batch_size"),
        (["--resume"], "--resume but no"),
    ],
)
def test_cli_bad_settings_exit_2_with_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    data = write_images(tmp_path / "data", 4)
    code = fewshot_main(_cli(tmp_path, "--data", str(data), "--output", str(tmp_path / "o"), *extra))
    assert code == 2
    assert message in capsys.readouterr().err


def test_cli_workers_takes_a_count_or_auto(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        fewshot_main(
            _cli(tmp_path, "--data", str(tmp_path), "--output", str(tmp_path / "o"), "--workers", "-1")
        )
    assert exited.value.code == 2
    assert "--workers: must be >= 0 or auto" in capsys.readouterr().err


def test_cli_missing_data_dir_and_misspelt_config_key(tmp_path: Path, capsys) -> None:
    assert (
        fewshot_main(_cli(tmp_path, "--data", str(tmp_path / "nope"), "--output", str(tmp_path / "o"))) == 2
    )
    assert "is not a directory" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("optimization:\n  learning_rate: 0.1\n")
    code = fewshot_main(
        ["train", "--config", str(bad), "--data", str(tmp_path), "--output", str(tmp_path / "o")]
    )
    assert code == 2
    assert "learning_rate" in capsys.readouterr().err


def test_packaged_configs_validate() -> None:
    tiny = load_config(arch="vit_tiny_p8_64")
    assert (tiny.data.random_size, tiny.data.focal_size) == (64, 32)
    small = load_config(arch="vit_small_p16_224")
    assert small.masking.ratio == 0.15 and small.data.focal_views == 10
    assert small.preprocess_dict()["resize_size"] == 256
    base = load_config(arch="vit_base_p16_224")  # no YAML: reference defaults for its size
    assert base.masking.ratio == 0.3 and base.data.focal_size == 96


def test_bf16_autocast_step_agrees_with_fp32(tmp_path: Path) -> None:
    data = write_images(tmp_path / "data", 8)
    losses = {}
    for bf16 in (False, True):
        out = tmp_path / f"bf16_{bf16}"
        result = train(
            tiny_config(optimization={"bf16": bf16}),
            TrainOptions(data=data, output=out, max_steps=1, progress=False),
        )
        losses[bf16] = result.last["loss"]
    assert np.isfinite(losses[True])
    assert losses[True] == pytest.approx(losses[False], rel=0.02)


@pytest.mark.slow
def test_short_real_run_on_tiny_imagenet_learns_without_collapse(tmp_path: Path, shared_data: Path) -> None:
    data = tmp_path / "pool"
    data.mkdir()
    for path in sorted((shared_data / "pretrain").iterdir())[:256]:
        (data / path.name).symlink_to(path)
    out = tmp_path / "run"
    config = tiny_config(
        model={"num_prototypes": 64},
        data={"batch_size": 32},
        optimization={"epochs": 3, "warmup_epochs": 1, "lr": 2e-3, "start_lr": 5e-4},
        logging={"log_every": 1},
    )
    train(config, TrainOptions(data=data, output=out, progress=False))
    records = read_metrics(out)
    losses = [r["loss"] for r in records if r["event"] == "step"]
    assert len(losses) == 24
    # Measured here: about 5.4 over the first steps, 4.3 over the last.
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.2
    last_epoch = [r for r in records if r["event"] == "epoch"][-1]
    assert last_epoch["prototypes_in_use"] > 1
    assert last_epoch["embedding_std"] > 1e-3


# --- masking.focal, --set, --resume ------------------------------------------------------------


def _tokens_per_block_call(config: TrainConfig, tmp_path: Path) -> list[int]:
    """Tokens entering the online encoder's first block, per call, over one training step."""
    from fewshot_trainer.train import MSNTrainer

    trainer = MSNTrainer(
        config, TrainOptions(data=write_images(tmp_path / "data", 8), output=tmp_path / "run", progress=False)
    )
    seen: list[int] = []
    trainer.online_module.backbone.blocks[0].register_forward_pre_hook(
        lambda _module, inputs: seen.append(inputs[0].shape[1])
    )
    trainer.train_step(next(iter(trainer._loader(0, 0))), CollapseMeter(16))
    return seen


@pytest.mark.parametrize(("focal", "focal_tokens"), [(False, 1 + 4), (True, 1 + 2)])
def test_masking_focal_drops_focal_view_patches_too(tmp_path: Path, focal: bool, focal_tokens: int) -> None:
    # 32-px anchor: 16 patches, ratio 0.5 keeps 8; 16-px focal views: 4 patches, keeps 2 when on.
    seen = _tokens_per_block_call(tiny_config(masking={"ratio": 0.5, "focal": focal}), tmp_path)
    assert seen == [1 + 8, focal_tokens]


def test_shipped_recipe_pins_unmasked_focal_views_as_trained() -> None:
    recipe = Path(__file__).resolve().parents[1] / "models" / "default.recipe.yaml"
    assert yaml.safe_load(recipe.read_text())["masking"]["focal"] is False
    assert load_config(recipe).masking.focal is False
    assert MaskingConfig().focal is False  # the reference's default


def test_cli_set_overrides_any_setting_after_the_flags(tmp_path: Path) -> None:
    data = write_images(tmp_path / "data", 8)
    out = tmp_path / "run"
    code = fewshot_main(
        _cli(
            tmp_path,
            "--data",
            str(data),
            "--output",
            str(out),
            "--max-steps",
            "1",
            "--batch-size",
            "4",
            "--set",
            "data.batch_size=8",
            "--set",
            "masking.ratio=0.25",
            "--set",
            "masking.focal=true",
            "--set",
            "data.focal_scale=[0.1, 0.2]",
        )
    )
    assert code == 0
    saved = load_config(out / "config.yaml")
    assert saved.data.batch_size == 8 and saved.masking.ratio == 0.25 and saved.masking.focal
    assert saved.data.focal_scale == (0.1, 0.2)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("masking.ratoi=0.5", "section 'masking' has no setting 'ratoi'; it has: ratio, focal"),
        ("mask.ratio=0.5", "the config has no setting 'mask'"),
        ("seed.x=1", "'seed' is a value, not a section"),
        ("masking.ratio", "expected section.key=value"),
        ("masking.ratio=lots", "masking.ratio"),  # the typed config refuses the value
    ],
)
def test_cli_set_bad_key_or_value_exits_2_with_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], setting: str, message: str
) -> None:
    data = write_images(tmp_path / "data", 4)
    code = fewshot_main(
        _cli(tmp_path, "--data", str(data), "--output", str(tmp_path / "o"), "--set", setting)
    )
    assert code == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_cli_resume_reads_the_checkpoint_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = write_images(tmp_path / "data", 8)
    out = tmp_path / "run"
    args = _cli(tmp_path, "--data", str(data), "--output", str(out), "--batch-size", "4")
    assert fewshot_main([*args, "--max-steps", "1"]) == 0
    loads: list[object] = []
    real_load = torch.load

    def counting_load(*a: Any, **kw: Any) -> Any:
        loads.append(a[0])
        return real_load(*a, **kw)

    monkeypatch.setattr(torch, "load", counting_load)
    assert fewshot_main([*args, "--max-steps", "2", "--resume", "--set", "seed=0"]) == 0
    assert len(loads) == 1
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 2
