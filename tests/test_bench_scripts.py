"""Every benchmark script still imports: they are not run by the suite (they time things), so an API
they use can change under them unnoticed (bench_open_set imported a removed helper for a while)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load(script: Path) -> ModuleType:
    """Module level only: main() runs under ``__name__ == "__main__"``. The script's folder goes on
    ``sys.path`` first, as ``python bench/x.py`` puts it, so a benchmark may import a sibling."""
    name = f"bench_script_{script.stem}"
    spec = importlib.util.spec_from_file_location(name, script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    sys.path.insert(0, str(script.parent))
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[name]
        sys.path.remove(str(script.parent))
    return module


@pytest.mark.parametrize("script", sorted(BENCH.glob("*.py")), ids=lambda p: p.name)
def test_the_benchmark_imports(script: Path) -> None:
    assert callable(getattr(load(script), "main", None)), f"{script.name} has no main()"


def test_the_synthetic_open_set_stand_in_separates_classes() -> None:
    embeddings, labels = load(BENCH / "bench_open_set.py").synthetic_embeddings(1.0, seed=0)
    assert embeddings.shape == (2500, 128) and len(set(labels.tolist())) == 50
    assert abs(float(embeddings[0] @ embeddings[0]) - 1.0) < 1e-5
    same = embeddings[labels == 0] @ embeddings[labels == 0].T
    other = embeddings[labels == 0] @ embeddings[labels == 1].T
    assert same.mean() > other.mean() + 0.1  # classes are clusters, not noise


def test_the_fused_attention_export_computes_what_timm_does(tmp_path: Path) -> None:
    """The ablation's com.microsoft.Attention graph is a faster form of the same model, not another one."""
    import copy

    import onnx
    import onnxruntime as ort
    import torch

    from fewshot_trainer.vit import build_vit, get_arch

    bench = load(BENCH / "ablate_fused_attention.py")
    spec = get_arch("vit_test_p8_32")
    torch.manual_seed(0)
    plain = build_vit(spec).eval()
    fused = copy.deepcopy(plain)
    for block in fused.blocks:
        block.attn = bench.ContribAttentionBlock(block.attn)
    path = tmp_path / "fused.onnx"
    bench.export(fused, spec.img_size, path)
    assert [n.op_type for n in onnx.load(str(path)).graph.node].count("Attention") == spec.depth
    pixels = torch.randn(3, 3, spec.img_size, spec.img_size)
    with torch.no_grad():
        expected = plain(pixels).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: pixels.numpy()})
    assert abs(got - expected).max() < 1e-4 * max(1.0, abs(expected).max())


def test_the_engine_benchmark_times_each_file_on_the_engine_the_server_gives_it(
    tiny_model_path: Path, tmp_path: Path
) -> None:
    """bench_engine's figures are only the served engine's if a bf16 variant runs where the server
    runs it (OpenVINO) and the others on ONNX Runtime, in both layouts."""
    import shutil

    from fewshot_common.cli import main as fewshot
    from fewshot_common.openvino_engine import openvino_available
    from fewshot_common.variants import variant_path

    bench = load(BENCH / "bench_engine.py")
    parent = tmp_path / "tiny.onnx"
    shutil.copy(tiny_model_path, parent)
    assert fewshot(["export", "--from-onnx", str(parent), "--precision", "bf16"]) == 0
    files = {"fp32": parent, "bf16": variant_path(parent, "bf16")}
    rates, engines = bench.engine_rates(files, [2], rounds=1, cores=2, input_size=32)
    assert engines["fp32"] == "onnxruntime CPUExecutionProvider"
    if openvino_available():
        assert engines["bf16"].startswith("openvino CPU")
    for key in files:
        assert set(rates[key]) == set(bench.LAYOUTS)
        assert all(rate > 0 for by_batch in rates[key].values() for rate in by_batch.values())


def test_the_calibration_benchmark_measures_both_confidences_on_a_tiny_synthetic_set() -> None:
    bench = load(BENCH / "bench_calibration.py")
    embeddings, labels = load(BENCH / "bench_open_set.py").synthetic_embeddings(
        1.0, seed=0, classes=6, per_class=12, dim=32
    )
    summary = bench.measure(embeddings, labels, draws=2, seed=0, bins=10, ways=4)
    assert summary["queries"] == 2 * 4 * (12 - bench.SHOTS)
    for name in ("old", "new"):
        assert 0.0 <= summary[name]["ece"] <= 1.0
        table = summary[name]["reliability"]
        assert sum(row["images"] for row in table) == summary["queries"]
    # The old per-prediction curves were no distribution; the new top-3 never sum past 1.
    assert summary["new"]["max_top3_sum"] <= 1.0 + 1e-9
    assert 0.0 < summary["new"]["mean_p_unknown"] < 1.0
    assert summary["new"]["nll_true_class"] > 0.0
