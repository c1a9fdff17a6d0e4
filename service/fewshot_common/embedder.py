"""ONNX Runtime embedder: an exported fewshot model turned into L2-normalised vectors.

The model file is self-describing (see :mod:`modelmeta`): its metadata gives the preprocessing,
the embedding size and the model id, so loading needs nothing but the path.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence, Sized
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .image_files import preprocessed_batches
from .images import ImageLimits, load_batch
from .modelmeta import INPUT_NAME, OUTPUT_NAME, ModelMeta
from .openvino_engine import OpenVinoRunner, openvino_available
from .providers import default_providers
from .vectors import l2_normalize

log = logging.getLogger(__name__)


class InvalidModel(ValueError):
    """The file is not a model this server can serve (no fewshot metadata, wrong graph shape)."""


def uses_openvino(precision: str, providers: Sequence[str]) -> bool:
    """A bf16 variant on a CPU host runs on OpenVINO, where it is installed: ONNX Runtime's CPU
    provider has no bf16 kernels (it would run the file as fp32). Elsewhere ONNX Runtime runs it."""
    return precision == "bf16" and providers[0] == "CPUExecutionProvider" and openvino_available()


def unoptimised_session(
    path: str | os.PathLike[str], providers: Sequence[str] = ("CPUExecutionProvider",)
) -> ort.InferenceSession:
    """A session that only describes the file (metadata, inputs, outputs): loading it costs
    little. ``providers``: those that will serve it (an fp16 graph may lack CPU kernels)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=list(providers))


class Embedder:
    """Loads one exported model and embeds images with it. Thread-safe: ORT sessions are, and
    the OpenVINO runner gives each concurrent run its own infer request.

    ``intra_op_threads``: threads per model run (None: the engine's own choice); ``spinning``:
    ONNX Runtime's busy-waiting threads; ``concurrent_runs``: how many runs the caller may start
    at once (OpenVINO compiles one copy of the model per run; ONNX Runtime needs no such hint).
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        *,
        providers: Sequence[str] | None = None,
        limits: ImageLimits = ImageLimits(),
        intra_op_threads: int | None = None,
        spinning: bool = True,
        max_batch_size: int = 32,
        concurrent_runs: int = 1,
    ) -> None:
        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"model file not found: {path}")
        if max_batch_size <= 0:
            raise ValueError(f"max_batch_size must be positive, got {max_batch_size}")
        providers = list(providers or default_providers())
        # The metadata and the graph's signature come from an unoptimised session (cheap): they
        # decide which engine runs the file before the engine compiles it.
        try:
            described = unoptimised_session(path, providers)
        except Exception as exc:  # onnxruntime raises its own untyped errors for bad files
            raise InvalidModel(f"{path}: not a loadable ONNX model ({exc})") from exc
        try:
            self.meta = ModelMeta.from_metadata_props(described.get_modelmeta().custom_metadata_map)
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidModel(f"{path}: {exc}") from exc
        self._check_graph(path, described)
        del described
        self.path = path  # the file served (a variant's own path), for its licence sidecar
        self.limits = limits
        self.max_batch_size = max_batch_size
        self._session: ort.InferenceSession | None = None
        self._openvino: OpenVinoRunner | None = None
        self.providers: list[str]
        self.engine: str  # what runs the model, for /v1/info and logs
        self.compute_precision: str  # the arithmetic it runs in ("bf16" only on bf16 units)
        if not (
            uses_openvino(self.meta.precision, providers)
            and self._open_openvino(intra_op_threads, concurrent_runs)
        ):
            self._open_onnxruntime(providers, intra_op_threads, spinning)

    def _open_openvino(self, intra_op_threads: int | None, concurrent_runs: int) -> bool:
        """OpenVINO compiles the file, or says why not and leaves it to ONNX Runtime (which runs
        any file OpenVINO reads): a server that cannot have the faster engine still serves."""
        try:
            self._openvino = OpenVinoRunner(
                self.path, threads_per_run=intra_op_threads, concurrent_runs=concurrent_runs
            )
        except Exception as exc:  # noqa: BLE001 -- OpenVINO's errors are untyped
            log.warning(
                "OpenVINO cannot compile %s (%s); ONNX Runtime serves it, in fp32 arithmetic",
                self.path.name,
                str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__,
            )
            return False
        self.providers = ["CPUExecutionProvider"]
        self.engine = self._openvino.description
        self.compute_precision = self._openvino.precision
        self._bind_io = False
        return True

    def _open_onnxruntime(self, providers: list[str], intra_op_threads: int | None, spinning: bool) -> None:
        options = ort.SessionOptions()
        if intra_op_threads is not None:
            options.intra_op_num_threads = intra_op_threads
        # Spinning (ONNX Runtime's default) makes idle intra-op threads busy-wait for the next
        # parallel section: fastest for a process doing only inference, but a server's decode and
        # gRPC threads need those cores between and beside model runs.
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        try:
            self._session = ort.InferenceSession(str(self.path), sess_options=options, providers=providers)
        except Exception as exc:
            raise InvalidModel(f"{self.path}: not a loadable ONNX model ({exc})") from exc
        self.providers = self._session.get_providers()
        self.engine = f"onnxruntime {self.providers[0]}"
        # ONNX Runtime has no bf16 kernels: a bf16 file's weights are cast to fp32 and run so.
        self.compute_precision = "fp32" if self.meta.precision == "bf16" else self.meta.precision
        # On a GPU, bind the output to host memory once per run instead of letting ORT allocate
        # and copy through its default path. Written for CUDA/TensorRT; not yet run on a GPU.
        self._bind_io = self.providers[0] in ("CUDAExecutionProvider", "TensorrtExecutionProvider")

    @property
    def session_options(self) -> ort.SessionOptions | None:
        """The options the ONNX Runtime session runs with (threads, spinning), as it reports
        them; ``None`` where OpenVINO runs the model."""
        return None if self._session is None else self._session.get_session_options()

    def _check_graph(self, path: Path, session: ort.InferenceSession) -> None:
        """Refuse a graph whose input/output do not match its own metadata."""
        inputs = {node.name: node for node in session.get_inputs()}
        outputs = {node.name: node for node in session.get_outputs()}
        if INPUT_NAME not in inputs or OUTPUT_NAME not in outputs:
            raise InvalidModel(
                f"{path}: expected input '{INPUT_NAME}' and output '{OUTPUT_NAME}', found inputs "
                f"{sorted(inputs)} and outputs {sorted(outputs)}"
            )
        size = self.meta.preprocess.input_size
        in_shape = list(inputs[INPUT_NAME].shape)
        if len(in_shape) != 4 or in_shape[1:] != [3, size, size] or isinstance(in_shape[0], int):
            raise InvalidModel(
                f"{path}: input '{INPUT_NAME}' has shape {in_shape}; the metadata needs "
                f"[batch, 3, {size}, {size}] with a dynamic batch dimension"
            )
        out_shape = list(outputs[OUTPUT_NAME].shape)
        dim = out_shape[1] if len(out_shape) == 2 else None
        if len(out_shape) != 2 or (isinstance(dim, int) and dim != self.meta.embedding_dim):
            raise InvalidModel(
                f"{path}: output '{OUTPUT_NAME}' has shape {out_shape}; the metadata says "
                f"[batch, {self.meta.embedding_dim}]"
            )

    @property
    def model_id(self) -> str:
        return self.meta.model_id

    @property
    def embedding_dim(self) -> int:
        return self.meta.embedding_dim

    def embed_array(self, pixels: np.ndarray) -> np.ndarray:
        """Preprocessed ``[N, 3, S, S]`` -> ``[N, D]`` float32, each row of unit L2 norm."""
        pixels = np.ascontiguousarray(pixels, dtype=np.float32)
        chunks = [
            self.run_model(pixels[start : start + self.max_batch_size])
            for start in range(0, len(pixels), self.max_batch_size)
        ]
        if not chunks:
            return np.empty((0, self.embedding_dim), dtype=np.float32)
        return l2_normalize(np.concatenate(chunks).astype(np.float32, copy=False))

    def run_model(self, pixels: np.ndarray) -> np.ndarray:
        """One model run on a preprocessed float32 batch, as is: no chunking, no normalising."""
        if self._openvino is not None:
            return self._openvino.run(pixels)
        assert self._session is not None
        if not self._bind_io:
            return self._session.run([OUTPUT_NAME], {INPUT_NAME: pixels})[0]
        binding = self._session.io_binding()
        binding.bind_cpu_input(INPUT_NAME, np.ascontiguousarray(pixels))
        binding.bind_output(OUTPUT_NAME, "cpu")
        self._session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

    def load_images(self, images: Sequence[bytes]) -> np.ndarray:
        """Decode, check limits and preprocess: encoded files -> ``[N, 3, S, S]``.

        In this process: for trusted files only (evaluation, export checks, tests). The server
        decodes a client's bytes in its isolated decode workers (fewshot_service.core.decode_pool)."""
        return load_batch(images, self.meta.preprocess, self.limits)

    def embed_images(self, images: Sequence[bytes]) -> np.ndarray:
        return self.embed_array(self.load_images(images))

    def embed_paths(self, paths: Iterable[str | os.PathLike[str]]) -> np.ndarray:
        """Embed image files, ``max_batch_size`` at a time; the first unreadable file raises
        :class:`errors.ImageError` naming it."""
        embeddings, _ = self._embed_files(paths, skip_unreadable=False)
        return embeddings

    def embed_readable_paths(self, paths: Iterable[str | os.PathLike[str]]) -> tuple[np.ndarray, np.ndarray]:
        """Embed the files that can be read, skipping the others (a data set with a few broken
        files stays usable); returns the embeddings and a boolean mask of the readable files."""
        return self._embed_files(paths, skip_unreadable=True)

    def _embed_files(
        self, paths: Iterable[str | os.PathLike[str]], *, skip_unreadable: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        # A sized iterable (a list, a tqdm bar over one) is read lazily, so progress shows.
        paths = paths if isinstance(paths, Sized) else list(paths)
        readable = np.zeros(len(paths), dtype=bool)
        parts = [np.empty((0, self.embedding_dim), dtype=np.float32)]
        for pixels, positions in preprocessed_batches(
            paths,
            self.meta.preprocess,
            self.max_batch_size,
            limits=self.limits,
            skip_unreadable=skip_unreadable,
        ):
            parts.append(self.embed_array(pixels))
            readable[positions] = True
        return np.concatenate(parts), readable
