"""facebookresearch/msn checkpoints -> fewshot checkpoint -> ONNX.

Checkpoints are written here in the reference layout from known weights: the encoder keys of its
``src/deit.py`` (timm's names: ``cls_token``, ``pos_embed``, ``patch_embed.proj``,
``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``) with the projection head
as ``fc.{fc1,bn1,fc2,bn2,fc3}``, all under DDP's ``module.`` prefix; the released files hold only
``target_encoder`` and ``prototypes``, training checkpoints add ``encoder``, ``opt``, ``epoch``,
``loss``, ``batch_size``, ``world_size``, ``lr`` and ``temperature``. The weights come from a
random transformers ViTMSN model, so the msn and hf paths can be compared on the same weights.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from test_import_hf import SIZES, hf_cls, import_and_export, onnx_embed, pixels_for, random_hf_model
from torch import nn

from fewshot_common.cli import main
from fewshot_trainer.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint
from fewshot_trainer.importers import CheckpointImportError, read_msn


def deit_state_from_hf(hf: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """The reference ``deit.py`` names for a ViTMSN state dict, written out block by block."""
    out = {
        "cls_token": hf["embeddings.cls_token"],
        "pos_embed": hf["embeddings.position_embeddings"],
        "patch_embed.proj.weight": hf["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": hf["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": hf["layernorm.weight"],
        "norm.bias": hf["layernorm.bias"],
    }
    for i in range(depth):
        # transformers 5 names its modules layers.N.{attention.{q,k,v,o}_proj, mlp.fc1/fc2, ...}.
        src, dst = f"layers.{i}.", f"blocks.{i}."
        for param in ("weight", "bias"):
            out[dst + f"attn.qkv.{param}"] = torch.cat(
                [hf[src + f"attention.{p}_proj.{param}"] for p in "qkv"], dim=0
            )
            out[dst + f"attn.proj.{param}"] = hf[src + f"attention.o_proj.{param}"]
            out[dst + f"norm1.{param}"] = hf[src + f"layernorm_before.{param}"]
            out[dst + f"norm2.{param}"] = hf[src + f"layernorm_after.{param}"]
            out[dst + f"mlp.fc1.{param}"] = hf[src + f"mlp.fc1.{param}"]
            out[dst + f"mlp.fc2.{param}"] = hf[src + f"mlp.fc2.{param}"]
    return {k: v.clone() for k, v in out.items()}


def reference_head(width: int, seed: int, hidden: int = 64, out: int = 32) -> nn.Sequential:
    """The reference projection head's module names (hidden 2048/out 256 there; smaller here)."""
    torch.manual_seed(seed)
    head = nn.Sequential(
        OrderedDict(
            fc1=nn.Linear(width, hidden),
            bn1=nn.BatchNorm1d(hidden),
            gelu1=nn.GELU(),
            fc2=nn.Linear(hidden, hidden),
            bn2=nn.BatchNorm1d(hidden),
            gelu2=nn.GELU(),
            fc3=nn.Linear(hidden, out),
        )
    )
    with torch.no_grad():
        for bn in (head.bn1, head.bn2):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
            bn.num_batches_tracked.fill_(7)
    return head


def ddp_encoder(backbone: dict[str, torch.Tensor], head: nn.Module | None) -> dict[str, torch.Tensor]:
    state = dict(backbone)
    if head is not None:
        state.update({f"fc.{k}": v for k, v in head.state_dict().items()})
    return {f"module.{k}": v for k, v in state.items()}


def released_checkpoint(path: Path, name: str = "vit_small_p16", seed: int = 0):
    """A file shaped like dl.fbaipublicfiles.com/msn/*.pth.tar: target_encoder and prototypes."""
    model = random_hf_model(name, seed=seed)
    width, depth = SIZES[name][0], SIZES[name][4]
    head = reference_head(width, seed)
    prototypes = torch.randn(16, 32)
    torch.save(
        {
            "target_encoder": ddp_encoder(deit_state_from_hf(model.state_dict(), depth), head),
            "prototypes": prototypes,
        },
        path,
    )
    return model, head, prototypes


def training_checkpoint(path: Path) -> tuple:
    """A checkpoint as msn_train.py saves it mid-run: both encoders, optimizer and counters."""
    target_model, anchor_model = (
        random_hf_model("vit_small_p16", seed=1),
        random_hf_model("vit_small_p16", seed=2),
    )
    target_head, anchor_head = reference_head(384, 1), reference_head(384, 2)
    depth = SIZES["vit_small_p16"][4]
    anchor_params = list(anchor_model.parameters())
    opt = torch.optim.AdamW(anchor_params)
    anchor_params[0].grad = torch.ones_like(anchor_params[0])
    opt.step()
    torch.save(
        {
            "encoder": ddp_encoder(deit_state_from_hf(anchor_model.state_dict(), depth), anchor_head),
            "target_encoder": ddp_encoder(deit_state_from_hf(target_model.state_dict(), depth), target_head),
            "opt": opt.state_dict(),
            "prototypes": torch.randn(16, 32),
            "epoch": 3,
            "loss": 2.49,
            "batch_size": 64,
            "world_size": 16,
            "lr": 1e-3,
            "temperature": 0.1,
        },
        path,
    )
    return target_model, anchor_model, target_head, anchor_head


def test_released_layout_gives_the_same_embeddings_as_the_hf_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name = "vit_small_p16"
    model, _, _ = released_checkpoint(tmp_path / "msn.pth.tar", name)
    model.save_pretrained(tmp_path / "hf")
    msn_onnx = import_and_export("msn", tmp_path / "msn.pth.tar", tmp_path)
    printed = capsys.readouterr().out
    hf_onnx = import_and_export("hf", tmp_path / "hf", tmp_path)

    pixels = pixels_for(name)
    from_msn, from_hf = onnx_embed(msn_onnx, pixels), onnx_embed(hf_onnx, pixels)
    np.testing.assert_allclose(from_msn, from_hf, atol=1e-5)
    assert np.abs(from_msn - hf_cls(model, pixels)).max() <= 1e-4
    # msn never states the head count: the standard one for the width, and a printed note.
    heads = SIZES[name][1]
    assert f"using the standard {heads} heads for width {SIZES[name][0]}" in printed
    assert load_checkpoint(tmp_path / "msn.pt")["arch"]["num_heads"] == heads


def test_large_p7_gets_its_16_heads_and_patch_7_from_the_weights(tmp_path: Path) -> None:
    # The msn.md pitfall: a loader that assumes 12 heads for ViT-L/7 loads strictly and is wrong.
    released_checkpoint(tmp_path / "l7.pth.tar", "vit_large_p7")
    imported = read_msn(tmp_path / "l7.pth.tar")
    spec = imported.spec
    assert (spec.embed_dim, spec.num_heads, spec.patch_size, spec.img_size, spec.depth) == (
        1024,
        16,
        7,
        28,
        2,
    )
    assert any("standard 16 heads for width 1024" in note for note in imported.notes)


def test_projection_head_and_prototypes_come_along_and_can_seed_training(tmp_path: Path) -> None:
    _, head, prototypes = released_checkpoint(tmp_path / "msn.pth.tar")
    out = tmp_path / "c.pt"
    assert (
        main(
            [
                "import-checkpoint",
                "--format",
                "msn",
                str(tmp_path / "msn.pth.tar"),
                "--output",
                str(out),
            ]
        )
        == 0
    )
    ckpt = load_checkpoint(out)
    assert ckpt["encoder"] is None and ckpt["head"] is None  # the released files have no anchor
    assert torch.equal(ckpt["prototypes"], prototypes)
    assert set(ckpt["target_head"]) == {
        f"{layer}.{p}" for layer in ("fc1", "fc2", "fc3") for p in ("weight", "bias")
    } | {
        f"{bn}.{p}"
        for bn in ("bn1", "bn2")
        for p in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    }

    # The trainer's own projection head loads it strictly and computes what the reference head does.
    from fewshot_trainer.model import ProjectionHead

    ours = ProjectionHead(384, hidden_dim=64, out_dim=32).eval()
    ours.load_state_dict(ckpt["target_head"])
    x = torch.randn(4, 384)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), head.eval()(x))


@pytest.mark.parametrize(("role", "which"), [("target", 0), ("anchor", 1)])
def test_training_checkpoint_exports_the_chosen_encoder(tmp_path: Path, role: str, which: int) -> None:
    models = training_checkpoint(tmp_path / "latest.pth.tar")
    onnx_path = import_and_export("msn", tmp_path / "latest.pth.tar", tmp_path, "--encoder", role)
    pixels = pixels_for("vit_small_p16")
    assert np.abs(onnx_embed(onnx_path, pixels) - hf_cls(models[which], pixels)).max() <= 1e-4

    ckpt = load_checkpoint(tmp_path / "msn.pt")
    head = models[2 + which]
    assert torch.equal(ckpt["target_head"]["fc3.weight"], head.fc3.weight)
    if role == "target":  # the anchor encoder and head are kept too, for continued training
        assert ckpt["encoder"] is not None and torch.equal(ckpt["head"]["fc1.bias"], models[3].fc1.bias)


def test_arch_states_the_heads_and_must_fit_the_shapes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fewshot_trainer.vit import build_vit, get_arch

    torch.manual_seed(0)
    tiny = build_vit(get_arch("vit_test_p8_32"))  # width 64: not in the standard table
    torch.save(
        {"target_encoder": {f"module.{k}": v for k, v in tiny.state_dict().items()}},
        tmp_path / "t.pth.tar",
    )
    args = [
        "import-checkpoint",
        "--format",
        "msn",
        str(tmp_path / "t.pth.tar"),
        "--output",
        str(tmp_path / "c.pt"),
    ]
    assert main(args) == 1
    assert "width 64 is not a standard ViT width" in capsys.readouterr().err
    assert main([*args, "--arch", "vit_test_p8_32"]) == 0
    assert "note" not in capsys.readouterr().out
    assert load_checkpoint(tmp_path / "c.pt")["arch"] == get_arch("vit_test_p8_32").to_dict()
    assert main([*args, "--arch", "vit_small_p16_224"]) == 1
    assert "embed_dim 384 (--arch) vs 64 (weights)" in capsys.readouterr().err


# --- errors -----------------------------------------------------------------------------------------


def _fails(path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> str:
    out = tmp_path / "never.pt"
    assert main(["import-checkpoint", "--format", "msn", str(path), "--output", str(out), *extra]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fewshot import-checkpoint: ") and "Traceback" not in err
    assert not out.exists()
    return err


@pytest.fixture(scope="module")
def released(tmp_path_factory: pytest.TempPathFactory) -> dict:
    path = tmp_path_factory.mktemp("msn") / "vits16.pth.tar"
    released_checkpoint(path)
    return torch.load(path, weights_only=True)


def _write(tmp_path: Path, name: str, ckpt) -> Path:
    torch.save(ckpt, tmp_path / name)
    return tmp_path / name


def test_wrong_format_is_refused_with_what_was_found(
    released: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert "no file at" in _fails(tmp_path / "missing.pth.tar", tmp_path, capsys)
    garbage = tmp_path / "garbage.pth.tar"
    garbage.write_bytes(b"<html>404 not found</html>")
    assert "not a readable torch checkpoint" in _fails(garbage, tmp_path, capsys)
    err = _fails(_write(tmp_path, "list.pt", [1, 2]), tmp_path, capsys)
    assert "expected a dict" in err
    err = _fails(_write(tmp_path, "other.pt", {"model": {}, "epoch": 1}), tmp_path, capsys)
    assert "no top-level key 'target_encoder'" in err and "['epoch', 'model']" in err
    err = _fails(_write(tmp_path, "r.pt", released), tmp_path, capsys, "--encoder", "anchor")
    assert "no top-level key 'encoder'" in err and "released MSN files hold only" in err
    ours = save_checkpoint(make_checkpoint(target_encoder={}), tmp_path / "ours.pt")
    assert "already a fewshot checkpoint" in _fails(ours, tmp_path, capsys)


def test_missing_unexpected_and_misshapen_keys_are_named(
    released: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def variant(edit) -> Path:
        encoder = dict(released["target_encoder"])
        edit(encoder)
        return _write(tmp_path, "v.pt", {**released, "target_encoder": encoder})

    err = _fails(variant(lambda e: e.pop("module.blocks.1.attn.qkv.weight")), tmp_path, capsys)
    assert "missing ['module.blocks.1.attn.qkv.weight']" in err
    err = _fails(variant(lambda e: e.update({"module.pred.weight": torch.zeros(1)})), tmp_path, capsys)
    assert "unexpected ['module.pred.weight']" in err
    err = _fails(
        variant(lambda e: e.update({"module.blocks.0.mlp.fc2.weight": torch.zeros(384, 10)})),
        tmp_path,
        capsys,
    )
    assert "module.blocks.0.mlp.fc2.weight (384, 10) (expected (384, 1536))" in err
    err = _fails(variant(lambda e: e.pop("module.fc.bn2.running_var")), tmp_path, capsys)
    assert "missing ['module.fc.bn2.running_var']" in err
    err = _fails(variant(lambda e: e.update({"module.pos_embed": torch.zeros(1, 18, 384)})), tmp_path, capsys)
    assert "17 position embeddings (+1 for CLS) is not a square grid" in err
    err = _fails(_write(tmp_path, "p.pt", {**released, "prototypes": torch.zeros(16, 8)}), tmp_path, capsys)
    assert "prototypes (16, 8) do not match the head's output 32" in err
    with pytest.raises(CheckpointImportError, match="not a state dict of tensors"):
        read_msn(_write(tmp_path, "s.pt", {"target_encoder": [1, 2, 3]}))
