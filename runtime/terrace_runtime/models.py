"""Model backends: onnxruntime and torch, behind one small interface.

A backend runs named numpy inputs to named numpy outputs; everything about
batching, protocols and generation lives elsewhere. Terrace's own models carry
a JSON description (task, tensor specs, tokenizer) inside the file: ONNX
`metadata_props["terrace"]`, TorchScript / torch.export extra file
`terrace.json`. An ONNX model without it is served as a tensor model with the
signature onnxruntime reports.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from .tensors import (
    OIP_TO_NUMPY,
    ONNX_TO_OIP,
    InvalidRequest,
    TensorSpec,
    bytes_tensor,
    onnx_dim,
)

log = logging.getLogger(__name__)

Task = Literal["tensor", "text-generation"]
METADATA_KEY = "terrace"
TORCH_EXTRA_FILE = "terrace.json"


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message is shown in /v2/health/ready."""


@dataclass(frozen=True)
class ModelInfo:
    task: Task
    format: str  # "onnx" | "torch"
    platform: str  # Triton/KServe platform name
    device: str  # where it actually runs, e.g. "cpu", "cuda:0"
    threads: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    quantization: str = "none"
    extra: Mapping[str, Any] = field(default_factory=dict)  # the model's terrace metadata

    @property
    def batchable(self) -> bool:
        """Requests can be stacked along dim 0 only if every tensor has a dynamic batch dim."""
        return all(s.dynamic_batch for s in (*self.inputs, *self.outputs))


class Backend(Protocol):
    info: ModelInfo

    def run(
        self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]
    ) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


def _specs(raw: Any) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec.from_json(s) for s in raw)


def _task_of(meta: Mapping[str, Any], forced: str) -> Task:
    task = meta.get("task", "tensor") if forced == "auto" else forced
    if task not in ("tensor", "text-generation"):
        raise ModelLoadError(f"unknown task {task!r}")
    if task == "text-generation" and "tokenizer" not in meta:
        raise ModelLoadError("a text-generation model needs a tokenizer in its terrace metadata")
    return task  # type: ignore[return-value]


def session_options(threads: int, spinning: bool = False) -> Any:
    """onnxruntime options for one model per process, one batch at a time."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    # Intra-op threads do the work; inter-op parallelism would only
    # oversubscribe the container's CPU limit.
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Spinning pool threads (onnxruntime's own default) answer a little faster;
    # sleeping ones cost a wake-up per op but leave the cores (and the watts the
    # energy metrics count) to others. Terrace defaults to sleeping.
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return options


class OnnxBackend:
    def __init__(
        self,
        path: Path,
        *,
        device: str,
        threads: int,
        task: str = "auto",
        quantization: str = "none",
        spinning: bool = False,
    ) -> None:
        import onnxruntime as ort

        options = session_options(threads, spinning)
        available = ort.get_available_providers()
        if device.startswith("cuda"):
            if "CUDAExecutionProvider" in available:
                providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
            else:
                log.warning("CUDA requested but onnxruntime has no CUDA provider; using CPU")
                providers = ["CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelLoadError(f"onnxruntime cannot load {path}: {exc}") from exc
        actual = "cuda:0" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        raw_meta = self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        meta: dict[str, Any] = json.loads(raw_meta) if raw_meta else {}
        inputs = tuple(
            TensorSpec(i.name, _onnx_type(i.type), tuple(onnx_dim(d) for d in i.shape))
            for i in self.session.get_inputs()
        )
        outputs = tuple(
            TensorSpec(o.name, _onnx_type(o.type), tuple(onnx_dim(d) for d in o.shape))
            for o in self.session.get_outputs()
        )
        self.info = ModelInfo(
            task=_task_of(meta, task),
            format="onnx",
            platform="onnxruntime_onnx",
            device=actual,
            threads=threads,
            inputs=inputs,
            outputs=outputs,
            quantization=quantization,
            extra=meta,
        )

    def run(
        self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]
    ) -> dict[str, np.ndarray]:
        feeds = {n: _onnx_strings(n, a) if a.dtype == object else a for n, a in inputs.items()}
        results = self.session.run(list(outputs), feeds)
        return {
            n: bytes_tensor((s.encode() for s in r.ravel()), r.shape) if r.dtype == object else r
            for n, r in zip(outputs, results, strict=True)
        }

    def close(self) -> None:
        del self.session


def _onnx_strings(name: str, array: np.ndarray) -> np.ndarray:
    """A BYTES input (bytes elements) as onnxruntime takes strings: str elements.
    onnxruntime would str() a bytes element ("b'a'") and decodes every string
    output as UTF-8, so ONNX string tensors carry UTF-8 text only."""
    text = []
    for index, value in enumerate(array.ravel()):
        try:
            text.append(value.decode())
        except UnicodeDecodeError:
            raise InvalidRequest(
                f"input {name!r}: element {index} is not valid UTF-8, and ONNX string "
                "tensors hold UTF-8 text"
            ) from None
    return np.array(text, dtype=object).reshape(array.shape)


def _onnx_type(type_str: str) -> str:
    try:
        return ONNX_TO_OIP[type_str]
    except KeyError:
        raise ModelLoadError(f"unsupported ONNX tensor type {type_str}") from None


def torch_device(torch: Any, device: str, threads: int) -> str:
    """Where torch runs: CUDA for "auto"/"cuda"/"cuda:N" when torch sees a GPU
    (a warning and CPU when one was asked for and there is none), else CPU with
    `threads` threads."""
    if (device in ("auto", "cuda") or device.startswith("cuda:")) and torch.cuda.is_available():
        return "cuda:0" if device in ("auto", "cuda") else device
    if device != "auto" and device.startswith("cuda"):
        log.warning("CUDA requested but torch sees no GPU; using CPU")
    torch.set_num_threads(threads)
    return "cpu"


class TorchBackend:
    """TorchScript (`torch.jit.save`) or `torch.export.save` programs."""

    def __init__(self, path: Path, *, device: str, threads: int, task: str = "auto") -> None:
        try:
            import torch
        except ImportError as exc:
            raise ModelLoadError("torch is not installed (pip install 'terrace[torch]')") from exc
        self.torch = torch
        self.device = torch.device(torch_device(torch, device, threads))
        extra = {TORCH_EXTRA_FILE: ""}
        try:
            module = _load_torch(torch, path, self.device, extra)
        except Exception as exc:
            raise ModelLoadError(f"torch cannot load {path}: {exc}") from exc
        # Exported programs refuse eval(); they were exported in eval mode.
        with contextlib.suppress(AttributeError, NotImplementedError, RuntimeError):
            module.eval()
        self.module = module
        raw = extra.get(TORCH_EXTRA_FILE) or ""
        if not raw:
            raise ModelLoadError(
                f"{path} has no {TORCH_EXTRA_FILE} extra file describing its inputs and outputs "
                "(save it with _extra_files={'terrace.json': ...}; see docs/runtime.md)"
            )
        meta = json.loads(raw)
        self.info = ModelInfo(
            task=_task_of(meta, task),
            format="torch",
            platform="pytorch_torchscript",
            device=str(self.device),
            threads=threads,
            inputs=_specs(meta["inputs"]),
            outputs=_specs(meta["outputs"]),
            extra=meta,
        )

    def run(
        self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]
    ) -> dict[str, np.ndarray]:
        torch = self.torch
        with torch.inference_mode():
            args = [
                torch.from_numpy(np.ascontiguousarray(inputs[s.name])).to(self.device)
                for s in self.info.inputs
            ]
            result = self.module(*args)
        if isinstance(result, Mapping):
            named = dict(result)
        elif isinstance(result, (tuple, list)):
            named = {s.name: r for s, r in zip(self.info.outputs, result, strict=True)}
        else:
            named = {self.info.outputs[0].name: result}
        out: dict[str, np.ndarray] = {}
        for name in outputs:
            array = named[name].detach().cpu().numpy()
            want = OIP_TO_NUMPY[next(s.datatype for s in self.info.outputs if s.name == name)]
            out[name] = array.astype(want, copy=False)
        return out

    def close(self) -> None:
        del self.module
        if self.device.type == "cuda":
            self.torch.cuda.empty_cache()


def _load_torch(torch: Any, path: Path, device: Any, extra: dict[str, str]) -> Any:
    """A torch.export archive (.pt2) or TorchScript (anything else); each tried
    second if the first fails, since extensions lie."""

    def exported() -> Any:
        program = torch.export.load(str(path), extra_files=extra)
        if device.type != "cpu":
            # Exported programs are traced on one device; this pass moves
            # parameters, buffers and device constants together.
            from torch.export.passes import move_to_device_pass

            program = move_to_device_pass(program, device)
        return program.module()

    def scripted() -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # TorchScript's deprecation notice
            return torch.jit.load(str(path), map_location=device, _extra_files=extra)

    first, second = (exported, scripted) if path.suffix == ".pt2" else (scripted, exported)
    try:
        return first()
    except Exception:
        return second()


def load_backend(
    path: Path,
    *,
    fmt: str,
    device: str,
    threads: int,
    task: str = "auto",
    quantization: str = "none",
    spinning: bool = False,
) -> Backend:
    if fmt == "onnx":
        return OnnxBackend(
            path,
            device=device,
            threads=threads,
            task=task,
            quantization=quantization,
            spinning=spinning,
        )
    if fmt == "torch":
        return TorchBackend(path, device=device, threads=threads, task=task)
    raise ModelLoadError(f"unknown model format {fmt!r}; expected onnx or torch")


def warmup_inputs(info: ModelInfo, batch: int) -> dict[str, np.ndarray]:
    """Zeros of the model's input shapes (dynamic dims -> `batch` first, then 8)."""
    feeds = {}
    for spec in info.inputs:
        shape = [d if d >= 0 else (batch if i == 0 else 8) for i, d in enumerate(spec.shape)]
        dtype = OIP_TO_NUMPY[spec.datatype]
        if spec.datatype == "BYTES":
            feeds[spec.name] = np.full(shape, b"", dtype=object)
        elif spec.name == "attention_mask":
            feeds[spec.name] = np.ones(shape, dtype=dtype)
        else:
            feeds[spec.name] = np.zeros(shape, dtype=dtype)
    return feeds
