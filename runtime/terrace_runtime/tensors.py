"""Open Inference Protocol v2 tensors: datatypes, specs, request decoding and
response encoding. Pure functions over JSON-shaped data and numpy arrays.

Reference: KServe's "Open Inference Protocol" (v2) REST spec. A request input
is `{"name", "shape", "datatype", "data"}` where `data` is row-major, either
flat or nested; a response output has the same fields.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# OIP v2 datatype -> numpy dtype
OIP_TO_NUMPY: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(np.object_),
}
NUMPY_TO_OIP = {v: k for k, v in OIP_TO_NUMPY.items()}

# onnxruntime's type strings -> OIP v2 datatype
ONNX_TO_OIP = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}


class InvalidRequest(ValueError):
    """The client sent something the model cannot take: answered with HTTP 400."""


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output. -1 in `shape` is a dynamic dimension."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TensorSpec:
        return cls(str(data["name"]), str(data["datatype"]), tuple(int(d) for d in data["shape"]))

    @property
    def dynamic_batch(self) -> bool:
        return len(self.shape) > 0 and self.shape[0] == -1


def onnx_dim(dim: Any) -> int:
    """onnxruntime reports symbolic dims as strings or None: both are dynamic."""
    return dim if isinstance(dim, int) and dim >= 0 else -1


def decode_inputs(
    body: Any, specs: Sequence[TensorSpec]
) -> tuple[dict[str, np.ndarray], list[str] | None]:
    """Validate an infer request against the model's inputs; return the arrays
    and the requested output names (None = all)."""
    if not isinstance(body, Mapping):
        raise InvalidRequest("request body must be a JSON object")
    raw_inputs = body.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidRequest("'inputs' must be a non-empty list")
    by_name = {s.name: s for s in specs}
    arrays: dict[str, np.ndarray] = {}
    for item in raw_inputs:
        if not isinstance(item, Mapping):
            raise InvalidRequest("each input must be an object")
        name = item.get("name")
        if name not in by_name:
            raise InvalidRequest(f"unexpected input {name!r}; the model takes {sorted(by_name)}")
        if name in arrays:
            raise InvalidRequest(f"input {name!r} given twice")
        arrays[name] = _decode_one(item, by_name[name])
    missing = sorted(set(by_name) - set(arrays))
    if missing:
        raise InvalidRequest(f"missing inputs {missing}")
    _check_batch_dims(arrays, specs)
    return arrays, _requested_outputs(body.get("outputs"))


def _decode_one(item: Mapping[str, Any], spec: TensorSpec) -> np.ndarray:
    name = spec.name
    datatype = item.get("datatype")
    if datatype not in OIP_TO_NUMPY:
        raise InvalidRequest(f"input {name!r}: unknown datatype {datatype!r}")
    if datatype != spec.datatype:
        raise InvalidRequest(
            f"input {name!r}: datatype {datatype} does not match the model's {spec.datatype}"
        )
    shape = item.get("shape")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise InvalidRequest(f"input {name!r}: shape must be a list of non-negative integers")
    if len(shape) != len(spec.shape):
        raise InvalidRequest(
            f"input {name!r}: shape {shape} has rank {len(shape)}, the model expects "
            f"rank {len(spec.shape)} {list(spec.shape)}"
        )
    for got, want in zip(shape, spec.shape, strict=True):
        if want != -1 and got != want:
            raise InvalidRequest(
                f"input {name!r}: shape {shape} does not match the model's {list(spec.shape)}"
            )
    if "data" not in item:
        raise InvalidRequest(f"input {name!r}: no 'data' (binary tensor data is not supported)")
    dtype = OIP_TO_NUMPY[datatype]
    array = _to_array(name, datatype, dtype, item["data"])
    expected = math.prod(shape)
    if array.size != expected:
        raise InvalidRequest(
            f"input {name!r}: {array.size} values do not fill shape {shape} ({expected} values)"
        )
    return array.reshape(shape)


def _to_array(name: str, datatype: str, dtype: np.dtype[Any], data: Any) -> np.ndarray:
    try:
        if datatype == "BYTES":
            return np.array(
                [v.encode() if isinstance(v, str) else bytes(v) for v in _flatten(data)],
                dtype=object,
            )
        raw = np.asarray(data)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidRequest(f"input {name!r}: data cannot be read as {datatype}: {exc}") from None
    if raw.size == 0:
        return raw.astype(dtype)
    if raw.dtype == object or raw.dtype.kind in "USV":
        raise InvalidRequest(f"input {name!r}: data is not numeric")
    if datatype == "BOOL" and raw.dtype != np.bool_:
        raise InvalidRequest(f"input {name!r}: BOOL data must be true/false")
    if raw.dtype.kind == "f" and dtype.kind in "iub":
        raise InvalidRequest(f"input {name!r}: {datatype} data must be integers")
    try:
        # Refuse values the type cannot hold (300 as UINT8) instead of wrapping.
        with np.errstate(all="raise"):
            array = raw.astype(dtype)
        if dtype.kind in "iu" and not np.array_equal(array, raw):
            raise InvalidRequest(f"input {name!r}: values out of range for {datatype}")
    except (OverflowError, FloatingPointError) as exc:
        raise InvalidRequest(f"input {name!r}: values out of range for {datatype}: {exc}") from None
    return array


def _flatten(data: Any) -> list[Any]:
    if isinstance(data, list):
        out: list[Any] = []
        for v in data:
            out.extend(_flatten(v))
        return out
    return [data]


def _check_batch_dims(arrays: Mapping[str, np.ndarray], specs: Sequence[TensorSpec]) -> None:
    batch_dims = {arrays[s.name].shape[0] for s in specs if s.dynamic_batch}
    if len(batch_dims) > 1:
        raise InvalidRequest(f"inputs disagree on the batch dimension: {sorted(batch_dims)}")


def _requested_outputs(raw: Any) -> list[str] | None:
    if raw is None:
        return None
    if not isinstance(raw, list) or not all(
        isinstance(o, Mapping) and isinstance(o.get("name"), str) for o in raw
    ):
        raise InvalidRequest("'outputs' must be a list of objects with a 'name'")
    return [o["name"] for o in raw]


def check_outputs(requested: list[str] | None, specs: Sequence[TensorSpec]) -> list[str]:
    names = [s.name for s in specs]
    if requested is None:
        return names
    unknown = [n for n in requested if n not in names]
    if unknown:
        raise InvalidRequest(f"unknown outputs {unknown}; the model produces {names}")
    return requested


def encode_output(name: str, array: np.ndarray) -> dict[str, Any]:
    datatype = NUMPY_TO_OIP.get(array.dtype)
    if datatype is None:
        raise TypeError(f"output {name!r} has unsupported dtype {array.dtype}")
    if datatype == "BYTES":
        data: list[Any] = [
            v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in array.ravel()
        ]
    else:
        data = array.ravel().tolist()
    return {"name": name, "datatype": datatype, "shape": list(array.shape), "data": data}
