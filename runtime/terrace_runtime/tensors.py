"""Open Inference Protocol v2 tensors: datatypes, specs, request decoding and
response encoding, as JSON and as the binary tensor data extension. Pure
functions over JSON-shaped data, bytes and numpy arrays.

References: KServe's "Open Inference Protocol" (v2) REST spec and its "Binary
Tensor Data Extension" (Triton's, unchanged). A request input is
`{"name", "shape", "datatype", "data"}` with `data` a JSON array in row-major
order, flat or nested; or, with the extension, `"parameters":
{"binary_data_size": n}` instead of `data`, its n bytes in the binary part of
the body (after the JSON), the binary inputs' parts in the order of the inputs.
Binary data is little-endian, row-major, unpadded; a BOOL is one byte, 0 or 1.

BYTES tensors are numpy object arrays of `bytes`. In JSON an element is a
string and stands for its UTF-8 encoding; in binary an element is a 4-byte
little-endian unsigned length followed by that many bytes. An element that is
not valid UTF-8 has no JSON string: such an output must be asked for as binary
data, and a request that asks for it as JSON is refused (a 400 saying so), as
KServe's own server refuses it, rather than answered with altered bytes.
"""

from __future__ import annotations

import json
import math
import reprlib
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import chain
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

_LENGTH = struct.Struct("<I")  # a BYTES element's length prefix in binary data


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


def bytes_tensor(values: Iterable[bytes], shape: Sequence[int]) -> np.ndarray:
    """A BYTES tensor of `shape` from its elements in row-major order."""
    items = list(values)
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return array.reshape(shape)


# --- requests ------------------------------------------------------------------


def decode_inputs(
    body: Any, specs: Sequence[TensorSpec], binary: bytes = b""
) -> dict[str, np.ndarray]:
    """The request's inputs as arrays, by name, each in the shape and dtype the
    request gives, after checking them against the model's inputs `specs`.

    `binary` is the body after its JSON part (binary tensor data extension);
    the inputs' `binary_data_size`s must add up to exactly its length.
    Raises InvalidRequest (HTTP 400), naming the input and what is wrong.
    """
    request = _object(body, "the request body")
    raw_inputs = request.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidRequest("'inputs' must be a non-empty list")
    by_name = {s.name: s for s in specs}
    view = memoryview(binary)
    offset = 0  # where the next binary input's bytes start
    arrays: dict[str, np.ndarray] = {}
    for index, item in enumerate(raw_inputs):
        if not isinstance(item, Mapping):
            raise InvalidRequest(f"input {index} must be an object")
        name = item.get("name")
        if not isinstance(name, str):
            raise InvalidRequest(f"input {index} has no 'name' string")
        if name not in by_name:
            raise InvalidRequest(
                f"unexpected input {reprlib.repr(name)}; the model takes {sorted(by_name)}"
            )
        if name in arrays:
            raise InvalidRequest(f"input {name!r} given twice")
        arrays[name], used = _decode_one(item, by_name[name], view[offset:])
        offset += used
    if offset != len(view):
        raise InvalidRequest(
            f"{len(view) - offset} bytes of binary data are left over: the inputs' "
            f"binary_data_size values add up to {offset}, the binary data is {len(view)} bytes"
        )
    missing = sorted(set(by_name) - set(arrays))
    if missing:
        raise InvalidRequest(f"missing inputs {missing}")
    _check_batch_dims(arrays, specs)
    return arrays


def decode_outputs(body: Any, specs: Sequence[TensorSpec]) -> dict[str, bool]:
    """The outputs to answer with, in answer order, each mapped to True if it
    goes as binary data: the output's own `parameters.binary_data`, else the
    request's `parameters.binary_data_output`, else False (JSON). Without
    `outputs` (or with an empty list, as KServe), all of the model's outputs
    `specs`. Raises InvalidRequest."""
    request = _object(body, "the request body")
    default = _flag(request.get("parameters"), "binary_data_output", "the request") or False
    names = [s.name for s in specs]
    raw = request.get("outputs")
    if raw is None or raw == []:
        return dict.fromkeys(names, default)
    if not isinstance(raw, list) or not all(
        isinstance(o, Mapping) and isinstance(o.get("name"), str) for o in raw
    ):
        raise InvalidRequest("'outputs' must be a list of objects with a 'name'")
    unknown = [o["name"] for o in raw if o["name"] not in names]
    if unknown:
        raise InvalidRequest(f"unknown outputs {reprlib.repr(unknown)}; the model produces {names}")
    chosen: dict[str, bool] = {}
    for o in raw:
        name = o["name"]
        if name in chosen:
            raise InvalidRequest(f"output {name!r} requested twice")
        own = _flag(o.get("parameters"), "binary_data", f"output {name!r}")
        chosen[name] = default if own is None else own
    return chosen


def _object(value: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise InvalidRequest(f"{what} must be a JSON object")
    return value


def _flag(parameters: Any, key: str, what: str) -> bool | None:
    if parameters is None:
        return None
    value = _object(parameters, f"{what}: 'parameters'").get(key)
    if value is not None and not isinstance(value, bool):
        raise InvalidRequest(
            f"{what}: parameters.{key} must be true or false, not {reprlib.repr(value)}"
        )
    return value


def _decode_one(
    item: Mapping[str, Any], spec: TensorSpec, binary: memoryview
) -> tuple[np.ndarray, int]:
    """One input's array, and how many bytes of `binary` (the binary data not
    yet taken by earlier inputs) it took."""
    name = spec.name
    datatype, shape = _check_header(item, spec)
    size = _binary_size(item, name)
    if size is None:
        if "data" not in item:
            raise InvalidRequest(f"input {name!r}: no 'data' (nor binary_data_size)")
        array, size = _from_json(name, datatype, item["data"]), 0
    elif "data" in item:
        raise InvalidRequest(f"input {name!r}: both 'data' and binary_data_size given")
    elif size > len(binary):
        raise InvalidRequest(
            f"input {name!r}: binary_data_size {size} runs past the end of the "
            f"binary data ({len(binary)} bytes left)"
        )
    else:
        array = _from_binary(name, datatype, binary[:size])
    expected = math.prod(shape)
    if array.size != expected:
        raise InvalidRequest(
            f"input {name!r}: {array.size} values do not fill shape {shape} ({expected} values)"
        )
    return array.reshape(shape), size


def _check_header(item: Mapping[str, Any], spec: TensorSpec) -> tuple[str, list[int]]:
    """The input's datatype and shape, checked against the model's."""
    name = spec.name
    datatype = item.get("datatype")
    if not isinstance(datatype, str):
        raise InvalidRequest(f"input {name!r}: no 'datatype' string")
    if datatype not in OIP_TO_NUMPY:
        raise InvalidRequest(
            f"input {name!r}: unknown datatype {reprlib.repr(datatype)}; one of "
            f"{list(OIP_TO_NUMPY)}"
        )
    if datatype != spec.datatype:
        raise InvalidRequest(
            f"input {name!r}: datatype {datatype} does not match the model's {spec.datatype}"
        )
    shape = item.get("shape")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise InvalidRequest(
            f"input {name!r}: shape must be a list of non-negative integers, not "
            f"{reprlib.repr(shape)}"
        )
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
    return datatype, shape


def _binary_size(item: Mapping[str, Any], name: str) -> int | None:
    parameters = item.get("parameters")
    if parameters is None:
        return None
    size = _object(parameters, f"input {name!r}: 'parameters'").get("binary_data_size")
    if size is None:
        return None
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise InvalidRequest(
            f"input {name!r}: binary_data_size must be a non-negative integer, not "
            f"{reprlib.repr(size)}"
        )
    return size


def _from_json(name: str, datatype: str, data: Any) -> np.ndarray:
    """A flat array of the JSON `data` elements, each checked against `datatype`."""
    if not isinstance(data, list):
        raise InvalidRequest(
            f"input {name!r}: 'data' must be a JSON array, not {reprlib.repr(data)}"
        )
    flat, kinds = _leaves(data)  # bool is not int in `kinds`: true is no number in JSON
    if datatype == "BYTES":
        _check_kinds(name, flat, kinds, {str}, "BYTES data must be strings")
        try:
            return bytes_tensor((v.encode() for v in flat), [len(flat)])
        except UnicodeEncodeError as exc:  # a lone surrogate ("\ud800") has no UTF-8
            raise InvalidRequest(f"input {name!r}: a string is not valid Unicode: {exc}") from None
    if datatype == "BOOL":
        _check_kinds(name, flat, kinds, {bool}, "BOOL data must be true/false")
        return np.array(flat, dtype=np.bool_)
    dtype = OIP_TO_NUMPY[datatype]
    if dtype.kind in "iu":
        _check_kinds(name, flat, kinds, {int}, f"{datatype} data must be integers")
        info = np.iinfo(dtype)
        if flat and (min(flat) < info.min or max(flat) > info.max):
            bad = next(v for v in flat if not info.min <= v <= info.max)
            raise InvalidRequest(
                f"input {name!r}: {bad} is out of range for {datatype} ({info.min} to {info.max})"
            )
        return np.array(flat, dtype=dtype)
    _check_kinds(name, flat, kinds, {int, float}, f"{datatype} data is not numeric")
    try:
        # Refuse values the type cannot hold (1e39 as FP32) instead of making them inf.
        with np.errstate(over="raise"):
            return np.array(flat, dtype=np.float64).astype(dtype)
    except (OverflowError, FloatingPointError):
        raise InvalidRequest(f"input {name!r}: values out of range for {datatype}") from None


def _check_kinds(
    name: str, flat: list[Any], kinds: set[type], allowed: set[type], rule: str
) -> None:
    if not kinds <= allowed:
        index, bad = next((i, v) for i, v in enumerate(flat) if type(v) not in allowed)
        raise InvalidRequest(f"input {name!r}: {rule}; element {index} is {reprlib.repr(bad)}")


def _leaves(data: list[Any]) -> tuple[list[Any], set[type]]:
    """The row-major leaves of nested lists, and their types."""
    kinds = set(map(type, data))
    while list in kinds:
        # Regular nesting unpacks a level at a time at C speed; a mix of lists
        # and leaves is walked (iteratively: JSON may nest deeply).
        data = list(chain.from_iterable(data)) if kinds == {list} else _walk(data)
        kinds = set(map(type, data))
    return data, kinds


def _walk(data: list[Any]) -> list[Any]:
    out: list[Any] = []
    stack = [iter(data)]
    while stack:
        for v in stack[-1]:
            if isinstance(v, list):
                stack.append(iter(v))
                break
            out.append(v)
        else:
            stack.pop()
    return out


def _from_binary(name: str, datatype: str, raw: memoryview) -> np.ndarray:
    """A flat array of one input's binary tensor data."""
    if datatype == "BYTES":
        return bytes_tensor(_split_bytes(name, raw), [-1])
    dtype = OIP_TO_NUMPY[datatype]
    if len(raw) % dtype.itemsize:
        raise InvalidRequest(
            f"input {name!r}: {len(raw)} bytes of binary data are not a whole number of "
            f"{datatype} values ({dtype.itemsize} bytes each)"
        )
    if datatype == "BOOL":
        octets = np.frombuffer(raw, dtype=np.uint8)
        if (octets > 1).any():
            raise InvalidRequest(f"input {name!r}: BOOL binary data must be bytes 0 or 1")
        return octets.astype(np.bool_)
    return np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype)


def _split_bytes(name: str, raw: memoryview) -> list[bytes]:
    elements: list[bytes] = []
    offset = 0
    while offset < len(raw):
        if len(raw) - offset < _LENGTH.size:
            raise InvalidRequest(
                f"input {name!r}: BYTES binary data ends inside the 4-byte length of "
                f"element {len(elements)}"
            )
        (length,) = _LENGTH.unpack_from(raw, offset)
        offset += _LENGTH.size
        if length > len(raw) - offset:
            raise InvalidRequest(
                f"input {name!r}: BYTES element {len(elements)} says {length} bytes, "
                f"{len(raw) - offset} are left"
            )
        elements.append(bytes(raw[offset : offset + length]))
        offset += length
    return elements


def _check_batch_dims(arrays: Mapping[str, np.ndarray], specs: Sequence[TensorSpec]) -> None:
    batch_dims = {arrays[s.name].shape[0] for s in specs if s.dynamic_batch}
    if len(batch_dims) > 1:
        raise InvalidRequest(f"inputs disagree on the batch dimension: {sorted(batch_dims)}")


# --- responses -----------------------------------------------------------------


def encode_outputs(
    arrays: Mapping[str, np.ndarray], binary: Mapping[str, bool]
) -> tuple[list[dict[str, Any]], bytes]:
    """The response's `outputs` for the names in `binary` (in its order) and the
    binary part of the body: an output mapped to True goes there, its JSON
    carrying `parameters.binary_data_size`; the others carry `data`.
    Raises InvalidRequest for a BYTES output with non-UTF-8 elements asked for
    as JSON (see the module docstring)."""
    outputs: list[dict[str, Any]] = []
    parts: list[bytes] = []
    for name, as_binary in binary.items():
        array = arrays[name]
        if as_binary:
            raw = tensor_bytes(array)
            parts.append(raw)
            header = {"name": name, "datatype": _datatype(name, array), "shape": list(array.shape)}
            outputs.append({**header, "parameters": {"binary_data_size": len(raw)}})
        else:
            outputs.append(encode_output(name, array))
    return outputs, b"".join(parts)


def encode_output(name: str, array: np.ndarray) -> dict[str, Any]:
    """One response output as JSON: `data` flat, row-major; BYTES as strings."""
    datatype = _datatype(name, array)
    if datatype == "BYTES":
        data: list[Any] = []
        for index, value in enumerate(array.ravel()):
            try:
                data.append(value if isinstance(value, str) else value.decode())
            except UnicodeDecodeError:
                as_binary = json.dumps({"name": name, "parameters": {"binary_data": True}})
                raise InvalidRequest(
                    f"output {name!r}: element {index} is not valid UTF-8, so it cannot be a "
                    f'JSON string; ask for this output as binary data: "outputs": [{as_binary}]'
                ) from None
    else:
        data = array.ravel().tolist()
    return {"name": name, "datatype": datatype, "shape": list(array.shape), "data": data}


def tensor_bytes(array: np.ndarray) -> bytes:
    """A tensor's binary tensor data: little-endian, row-major; BYTES elements
    (bytes, or str taken as UTF-8) each behind a 4-byte little-endian length."""
    if array.dtype == np.object_:
        parts: list[bytes] = []
        for value in array.ravel():
            raw = value.encode() if isinstance(value, str) else value
            parts += (_LENGTH.pack(len(raw)), raw)
        return b"".join(parts)
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def _datatype(name: str, array: np.ndarray) -> str:
    datatype = NUMPY_TO_OIP.get(array.dtype)
    if datatype is None:
        raise TypeError(f"output {name!r} has unsupported dtype {array.dtype}")
    return datatype
