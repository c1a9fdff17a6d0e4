"""One engine lever the ONNX-level tools cannot reach: each block's attention exported as ONNX
Runtime's fused ``com.microsoft.Attention`` op (``QAttention`` once quantized), against the plain
export the trainer writes, side by side in one run; prints one JSON line, then a table.

ONNX Runtime's transformer optimizer matches no Attention in timm's graph (its qkv ``Linear`` is
split into q, k and v after one MatMul), so the fused op is emitted at export instead: a
``torch.autograd.Function`` whose ``symbolic`` writes the contrib op, with the qkv weight transposed
to the op's ``[D, 3D]`` layout. The weights are random (speed does not depend on them); the model's
shape is the served model's (its arch and input size from ``--model``). Reported: the fused graph's
largest difference from PyTorch, each int8 graph's least cosine to PyTorch, and img/s for both of
bench_engine.py's layouts at batch 8 and 32 (its quiet, interleaved timing).

    PYTHONPATH=service:service/client:trainer python bench/ablate_fused_attention.py [--model models/default.onnx]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import QuantType, quantize_dynamic
from torch import nn

from fewshot_common.cores import usable_cores
from fewshot_common.modelmeta import INPUT_NAME, OUTPUT_NAME, ModelMeta
from fewshot_trainer.vit import build_vit, get_arch

from bench_engine import LAYOUTS, REPO, cpu_model, engine_rates, onnxruntime_run


class _ContribAttention(torch.autograd.Function):
    """Multi-head self-attention without the output projection; exported as one contrib op."""

    @staticmethod
    def forward(
        ctx: object, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, num_heads: int
    ) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = (x @ weight + bias).reshape(batch, tokens, 3, num_heads, dim // num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = nn.functional.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2).reshape(batch, tokens, dim)

    @staticmethod
    def symbolic(g: object, x: object, weight: object, bias: object, num_heads: int) -> object:
        return g.op("com.microsoft::Attention", x, weight, bias, num_heads_i=num_heads)  # type: ignore[attr-defined]


class ContribAttentionBlock(nn.Module):
    """Stands in for a timm ``Attention`` (no qk-norm, no dropout at inference): same weights."""

    def __init__(self, attention: nn.Module) -> None:
        super().__init__()
        self.num_heads = int(attention.num_heads)
        # ORT's layout: [D, 3D], q then k then v, heads contiguous within each (timm's order).
        self.weight = nn.Parameter(attention.qkv.weight.detach().t().contiguous())
        self.bias = nn.Parameter(attention.qkv.bias.detach().clone())
        self.proj = attention.proj

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        return self.proj(_ContribAttention.apply(x, self.weight, self.bias, self.num_heads))


def export(model: nn.Module, size: int, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.randn(2, 3, size, size),),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=17,
            dynamo=False,
            custom_opsets={"com.microsoft": 1},
        )


def least_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float((a * b).sum(axis=1).min())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        type=Path,
        default=REPO / "models" / "default.onnx",
        help="the served fp32 export, for its shape only",
    )
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()

    served = onnx.load(str(args.model), load_external_data=False)
    meta = ModelMeta.from_metadata_props({p.key: p.value for p in served.metadata_props})
    size = meta.preprocess.input_size
    spec = dataclasses.replace(get_arch(meta.arch), img_size=size)
    torch.manual_seed(0)
    plain = build_vit(spec).eval()
    fused = copy.deepcopy(plain)
    for block in fused.blocks:
        block.attn = ContribAttentionBlock(block.attn)

    pixels = torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = plain(pixels).numpy()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        files = {
            "fp32": folder / "plain.onnx",
            "fp32, fused Attention": folder / "fused.onnx",
            "int8": folder / "plain.int8.onnx",
            "int8, QAttention": folder / "fused.int8.onnx",
        }
        export(plain, size, files["fp32"])
        export(fused, size, files["fp32, fused Attention"])
        # The shipped recipe (MatMul only); the fused graph's Attention quantized as well.
        quantize_dynamic(
            files["fp32"], files["int8"], weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"]
        )
        quantize_dynamic(
            files["fp32, fused Attention"],
            files["int8, QAttention"],
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul", "Gemm", "Attention"],
        )
        agreement = {}
        for key, path in files.items():
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            (out,) = session.run([OUTPUT_NAME], {INPUT_NAME: pixels.numpy()})
            agreement[key] = {
                "max_abs_diff": float(np.abs(out - reference).max()),
                "least_cosine": round(least_cosine(out, reference), 5),
            }
        rates, _ = engine_rates(
            files,
            [8, 32],
            rounds=args.rounds,
            cores=usable_cores(),
            input_size=size,
            make_run=onnxruntime_run,
        )

    record = {
        "bench": "ablate_fused_attention",
        "cpu": cpu_model(),
        "cores": usable_cores(),
        "onnxruntime": ort.__version__,
        "arch": meta.arch,
        "input_size": size,
        "agreement_with_pytorch": agreement,
        "img_per_s": {
            key: {
                layout: {str(b): round(r, 1) for b, r in by_batch.items()}
                for layout, by_batch in by_layout.items()
            }
            for key, by_layout in rates.items()
        },
    }
    print(json.dumps(record))
    print(f"\n{meta.arch} at {size} px, random weights; {record['cpu']}, {record['cores']} cores")
    print(f"| graph | {LAYOUTS[0]}: batch 8 / 32 | {LAYOUTS[1]}: batch 8 / 32 | vs PyTorch |")
    print("|---|---|---|---|")
    for key, by_layout in rates.items():
        cells = [" / ".join(f"{by_layout[layout][b]:.1f}" for b in (8, 32)) for layout in LAYOUTS]
        a = agreement[key]
        print(
            f"| {key} | {cells[0]} | {cells[1]} | max diff {a['max_abs_diff']:.2g}, "
            f"least cosine {a['least_cosine']} |"
        )


if __name__ == "__main__":
    main()
