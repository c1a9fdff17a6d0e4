"""An int8 copy of a large prototype matrix, scanned by ONNX Runtime: a quarter of the bytes.

Top-k over 100,000 classes is one matrix-vector product over the whole matrix; at 128 float32 per
class memory bandwidth bounds it. Stored as int8 it is a quarter of the bytes, fits a server CPU's
L3 cache, and ONNX Runtime's integer GEMM with TopK scans it several times faster
(docs/benchmarks/registry-scale.md).

The int8 scores only choose candidates; :class:`PrototypeMatrix` re-scores them in float32 and
uses them only when :meth:`Int8Scan.error_bound` proves that no class outside the candidates can
reach the k-th best float32 score, so the answer is the same as the float32 scan's. Otherwise it
falls back to the float32 scan.

The query batch is quantised here (uint8, one scale and zero point for the batch, as ONNX's
DynamicQuantizeLinear would), so its rounding error is known exactly; the rows symmetrically with
one scale for the whole matrix, so the int32 dot products rank like the scores and TopK runs on
them directly (per-class scales cost a Cast and a Mul over every score:
docs/benchmarks/code-notes.md). By Cauchy-Schwarz, ``|q.w - q'.w'| <= |q| |w - w'| + |q - q'| |w'|`` (L2 norms).
"""

from __future__ import annotations

import threading

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

_OPSET = 17
_CHUNK_ROWS = 8192
# Rounding of the float32 products here (the int32 dot products themselves are exact).
_FLOAT_SLACK = 1e-4


def _graph(quantized_t: np.ndarray, with_rest: bool = False) -> onnx.ModelProto:
    """MatMulInteger and TopK; ``with_rest`` adds the log-sum-exp of the rows TopK left out
    (``rest``: the scores times ``logit_scale``, plus ``mask``, the candidates set to ``fill``)."""
    dim, rows = quantized_t.shape
    nodes = [
        helper.make_node("MatMulInteger", ["xq", "w", "x_zero"], ["dot"]),
        helper.make_node("TopK", ["dot", "k"], ["values", "indices"]),
    ]
    inputs = [
        helper.make_tensor_value_info("xq", TensorProto.UINT8, ["batch", dim]),
        helper.make_tensor_value_info("x_zero", TensorProto.UINT8, []),
        helper.make_tensor_value_info("k", TensorProto.INT64, [1]),
    ]
    outputs = [
        helper.make_tensor_value_info("values", TensorProto.INT32, ["batch", "k"]),
        helper.make_tensor_value_info("indices", TensorProto.INT64, ["batch", "k"]),
    ]
    if with_rest:
        nodes += [
            helper.make_node("Cast", ["dot"], ["dot_float"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["dot_float", "logit_scale"], ["logits"]),
            helper.make_node("Add", ["logits", "mask"], ["live"]),
            helper.make_node("ScatterElements", ["live", "indices", "fill"], ["others"], axis=1),
            # log-sum-exp, the peak subtracted first (no overflow however large the logits). Spelt
            # out: ONNX Runtime's ReduceLogSumExp took three times as long as these six nodes.
            helper.make_node(
                "Constant", [], ["axis"], value=numpy_helper.from_array(np.array([1], np.int64))
            ),
            helper.make_node("ReduceMax", ["others"], ["peak"], axes=[1], keepdims=1),
            helper.make_node("Sub", ["others", "peak"], ["shifted"]),
            helper.make_node("Exp", ["shifted"], ["terms"]),
            helper.make_node("ReduceSum", ["terms", "axis"], ["total"], keepdims=0),
            helper.make_node("Log", ["total"], ["log_total"]),
            helper.make_node("Squeeze", ["peak", "axis"], ["peak_row"]),
            helper.make_node("Add", ["log_total", "peak_row"], ["rest"]),
        ]
        inputs += [
            helper.make_tensor_value_info("logit_scale", TensorProto.FLOAT, []),
            helper.make_tensor_value_info("mask", TensorProto.FLOAT, [rows]),
            helper.make_tensor_value_info("fill", TensorProto.FLOAT, ["batch", "k"]),
        ]
        outputs.append(helper.make_tensor_value_info("rest", TensorProto.FLOAT, ["batch"]))
    graph = helper.make_graph(
        nodes, "int8_prototype_scan", inputs, outputs, [numpy_helper.from_array(quantized_t, "w")]
    )
    opsets = [helper.make_opsetid("", _OPSET)]
    # The oldest IR version that carries the opset (8), not onnx's newest: onnx 1.23 writes IR 14,
    # which onnxruntime 1.31 (the images' and the tests' pin, constraints.txt) refuses to load.
    return helper.make_model(graph, opset_imports=opsets, ir_version=helper.find_min_ir_version_for(opsets))


class Int8Scan:
    """Approximate scores of the first ``rows`` rows of a unit-row matrix, best ``k`` first."""

    def __init__(self, unit_rows: np.ndarray) -> None:
        unit_rows = np.asarray(unit_rows, dtype=np.float32)
        self.rows, self.dim = unit_rows.shape
        peak = float(np.abs(unit_rows).max(initial=0.0))
        self._scale = np.float32(peak / 127.0 if peak > 0 else 1.0)
        # Transposed for MatMulInteger ([D, rows]); for the error bound, the rows' largest rounding
        # error and largest norm (L2), dequantised. In chunks: no float32 temporaries of all rows.
        quantized_t = np.empty((self.dim, self.rows), dtype=np.int8)
        self._max_row_error = self._max_row_norm = 0.0
        for start in range(0, self.rows, _CHUNK_ROWS):
            chunk = unit_rows[start : start + _CHUNK_ROWS]
            quantized = np.clip(np.rint(chunk / self._scale), -127, 127).astype(np.int8)
            quantized_t[:, start : start + len(chunk)] = quantized.T
            dequantised = quantized * self._scale
            self._max_row_error = max(
                self._max_row_error, float(np.linalg.norm(chunk - dequantised, axis=1).max())
            )
            self._max_row_norm = max(self._max_row_norm, float(np.linalg.norm(dequantised, axis=1).max()))
        self._session = _session(_graph(quantized_t))
        # The graph that also sums the left-out rows (the softmax's normaliser), built on the first
        # request for it: a second copy of the rows, which top-k alone (ONNX Runtime runs every
        # node of a graph whatever outputs are asked for) should not pay the sum for.
        self._quantized_t: np.ndarray | None = quantized_t
        self._rest_session: ort.InferenceSession | None = None
        self._rest_lock = threading.Lock()

    def candidates(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per row of ``queries`` [N, D]: the ``k`` best approximate scores (descending), their
        row indices, and a bound on |approximate - float32 score| that holds for every row."""
        values, indices, bounds, _ = self._run(queries, k, None)
        return values, indices, bounds

    def candidates_and_rest(
        self, queries: np.ndarray, k: int, inverse_temperature: float, live_mask: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """As :meth:`candidates`, plus per query ``log sum exp(approximate score / T)`` over the
        rows that are not its candidates and where ``live_mask`` (float32 [rows]: 0 live, -inf
        masked out) is 0: -inf when there are none. Each of those terms is within a factor
        ``exp(bound / T)`` of its float32 score's."""
        return self._run(queries, k, (inverse_temperature, live_mask))

    def _run(
        self, queries: np.ndarray, k: int, rest: tuple[float, np.ndarray] | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        queries = np.asarray(queries, dtype=np.float32)
        quantized, scale, zero = _quantize_batch(queries)
        k = min(k, self.rows)
        feed = {"xq": quantized, "x_zero": np.array(zero, np.uint8), "k": np.array([k], np.int64)}
        if rest is None:
            dots, indices = self._session.run(None, feed)
            rest_lse = None
        else:
            inverse_temperature, live_mask = rest
            feed["logit_scale"] = np.array(scale * self._scale * inverse_temperature, np.float32)
            feed["mask"] = np.ascontiguousarray(live_mask, dtype=np.float32)
            feed["fill"] = np.full((len(queries), k), -np.inf, dtype=np.float32)
            dots, indices, rest_lse = self._with_rest().run(None, feed)
            # NaN where every row is a candidate or masked out (the peak is -inf): nothing to add.
            rest_lse = rest_lse.astype(np.float64)
            rest_lse[np.isnan(rest_lse)] = -np.inf
        values = dots.astype(np.float32) * (scale * self._scale)
        query_error = np.linalg.norm(queries - scale * (quantized.astype(np.float32) - zero), axis=1)
        bounds = (
            np.linalg.norm(queries, axis=1) * self._max_row_error
            + query_error * self._max_row_norm
            + _FLOAT_SLACK
            + self.dim * float(np.finfo(np.float32).eps)  # the float32 re-scoring's own rounding
        )
        return values, indices, bounds, rest_lse

    def _with_rest(self) -> ort.InferenceSession:
        with self._rest_lock:
            if self._rest_session is None:
                assert self._quantized_t is not None
                self._rest_session = _session(_graph(self._quantized_t, with_rest=True))
                self._quantized_t = None  # the session holds its own copy now
            return self._rest_session


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    # One thread without spinning: it runs beside the embedder's session on a few cores.
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _quantize_batch(queries: np.ndarray) -> tuple[np.ndarray, np.float32, int]:
    """uint8 with one scale and zero point for the whole batch (DynamicQuantizeLinear's rule)."""
    low, high = min(float(queries.min()), 0.0), max(float(queries.max()), 0.0)
    scale = np.float32((high - low) / 255.0) if high > low else np.float32(1.0)
    zero = int(np.clip(np.rint(-low / scale), 0, 255))
    quantized = np.clip(np.rint(queries / scale) + zero, 0, 255).astype(np.uint8)
    return quantized, scale, zero
