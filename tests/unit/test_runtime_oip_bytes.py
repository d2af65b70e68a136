"""OIP v2 tensors, BYTES above all: the JSON and binary (tensor data
extension) codecs as properties over every datatype, every validation problem
as a 400 naming the input, and Identity ONNX models (string and numeric),
built here with the onnx helper API, served by a real `terrace-runtime serve`
on 127.0.0.1 and called over HTTP."""

from __future__ import annotations

import json
import math
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import httpx
import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from localproc import ServerProcess
from onnx import TensorProto, helper
from terrace_runtime.http import dumps, loads
from terrace_runtime.tensors import (
    OIP_TO_NUMPY,
    InvalidRequest,
    TensorSpec,
    decode_inputs,
    decode_outputs,
    encode_outputs,
)

DATATYPES = sorted(OIP_TO_NUMPY)
FLOAT_WIDTHS: dict[str, Literal[16, 32, 64]] = {"FP16": 16, "FP32": 32, "FP64": 64}
HEADER = "Inference-Header-Content-Length"


def _pack(elements: list[bytes]) -> bytes:
    """BYTES elements as the extension spells them: 4-byte LE length, then the bytes."""
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def _item(name: str, datatype: str, shape: list[Any], data: Any) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": shape, "data": data}


def _binary_item(name: str, datatype: str, shape: list[int], size: int) -> dict[str, Any]:
    parameters = {"binary_data_size": size}
    return {"name": name, "datatype": datatype, "shape": shape, "parameters": parameters}


# --- codecs as properties ----------------------------------------------------------


def _elements(datatype: str) -> st.SearchStrategy[Any]:
    dtype = OIP_TO_NUMPY[datatype]
    if datatype == "BYTES":
        return st.one_of(st.text(), st.binary()).map(
            lambda v: v.encode() if isinstance(v, str) else v
        )
    if datatype == "BOOL":
        return st.booleans()
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return st.integers(int(info.min), int(info.max))
    return st.floats(width=FLOAT_WIDTHS[datatype], allow_nan=False, allow_infinity=False)


@st.composite
def _tensors(draw: st.DrawFn, utf8_only: bool = False) -> tuple[str, np.ndarray]:
    datatype = draw(st.sampled_from(DATATYPES))
    shape = draw(st.lists(st.integers(0, 3), max_size=3))
    elements = _elements(datatype)
    if datatype == "BYTES" and utf8_only:
        elements = st.text().map(str.encode)
    values = draw(st.lists(elements, min_size=math.prod(shape), max_size=math.prod(shape)))
    array = np.empty(len(values), dtype=OIP_TO_NUMPY[datatype])
    array[:] = values
    return datatype, array.reshape(shape)


def _spec(name: str, datatype: str, array: np.ndarray) -> TensorSpec:
    return TensorSpec(name, datatype, tuple(-1 for _ in array.shape))


def _assert_same(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    assert got.tolist() == want.tolist()


@settings(max_examples=200, deadline=None)
@given(tensor=_tensors(utf8_only=True), nested=st.booleans())
def test_every_datatype_round_trips_through_json(
    tensor: tuple[str, np.ndarray], nested: bool
) -> None:
    datatype, array = tensor
    [output], tail = encode_outputs({"t": array}, {"t": False})
    assert tail == b"" and output["datatype"] == datatype
    if nested and array.ndim > 1:  # the same values, nested as the shape says
        output["data"] = np.array(output["data"], dtype=object).reshape(array.shape).tolist()
    wire = loads(dumps({"inputs": [output]}))
    _assert_same(decode_inputs(wire, [_spec("t", datatype, array)])["t"], array)


@settings(max_examples=200, deadline=None)
@given(first=_tensors(), second=_tensors())
def test_every_datatype_round_trips_through_binary(
    first: tuple[str, np.ndarray], second: tuple[str, np.ndarray]
) -> None:
    """Two tensors, so each must take exactly its own bytes of the binary part."""
    (type_a, a), (type_b, b) = first, second
    outputs, tail = encode_outputs({"a": a, "b": b}, {"a": True, "b": True})
    assert all("data" not in o for o in outputs)
    assert sum(o["parameters"]["binary_data_size"] for o in outputs) == len(tail)
    # Fixed shapes: the two need not agree on a batch dimension.
    specs = [TensorSpec("a", type_a, a.shape), TensorSpec("b", type_b, b.shape)]
    decoded = decode_inputs(loads(dumps({"inputs": outputs})), specs, tail)
    _assert_same(decoded["a"], a)
    _assert_same(decoded["b"], b)


def test_bytes_wire_format_is_the_spec() -> None:
    """4-byte little-endian length per element, then its bytes, row-major."""
    elements = [b"a", b"", "é".encode(), b"\x00\xff"]
    raw = _pack(elements)
    assert raw[:5] == b"\x01\x00\x00\x00a"
    item = _binary_item("s", "BYTES", [2, 2], len(raw))
    array = decode_inputs({"inputs": [item]}, [TensorSpec("s", "BYTES", (-1, 2))], raw)["s"]
    assert array.shape == (2, 2) and array.ravel().tolist() == elements
    [output], tail = encode_outputs({"s": array}, {"s": True})
    assert tail == raw and output["parameters"] == {"binary_data_size": len(raw)}


def test_bytes_json_strings_are_utf8_and_nested_data_is_accepted() -> None:
    data = [["a", ""], ["ünï", "🙂"]]
    array = decode_inputs(
        {"inputs": [_item("s", "BYTES", [2, 2], data)]}, [TensorSpec("s", "BYTES", (-1, 2))]
    )["s"]
    assert array.ravel().tolist() == [b"a", b"", "ünï".encode(), "🙂".encode()]
    [output], _ = encode_outputs({"s": array}, {"s": False})
    assert output == {"name": "s", "datatype": "BYTES", "shape": [2, 2], "data": sum(data, [])}


def test_any_nesting_counts_only_the_elements() -> None:
    """As Triton: row-major leaves, however nested; deep nesting is no crash."""
    spec = [TensorSpec("s", "BYTES", (-1,))]
    mixed = [[["a"]], "b", []]
    assert decode_inputs({"inputs": [_item("s", "BYTES", [2], mixed)]}, spec)["s"].tolist() == [
        b"a",
        b"b",
    ]
    deep: list[Any] = ["x"]
    for _ in range(5000):
        deep = [deep]
    assert decode_inputs({"inputs": [_item("s", "BYTES", [1], deep)]}, spec)["s"].tolist() == [b"x"]


def test_non_utf8_bytes_go_as_binary_or_are_refused_as_json() -> None:
    array = np.array([b"ok", b"\xff\xfe"], dtype=object)
    with pytest.raises(InvalidRequest, match=r"output 's': element 1 is not valid UTF-8.*binary"):
        encode_outputs({"s": array}, {"s": False})
    _, tail = encode_outputs({"s": array}, {"s": True})
    assert tail == _pack([b"ok", b"\xff\xfe"])


def test_binary_output_choice_per_output_over_request_default() -> None:
    specs = [TensorSpec("a", "FP32", (-1,)), TensorSpec("b", "FP32", (-1,))]
    assert decode_outputs({}, specs) == {"a": False, "b": False}
    assert decode_outputs({"outputs": []}, specs) == {"a": False, "b": False}
    on = {"parameters": {"binary_data_output": True}}
    assert decode_outputs(on, specs) == {"a": True, "b": True}
    listed = {**on, "outputs": [{"name": "b", "parameters": {"binary_data": False}}, {"name": "a"}]}
    assert decode_outputs(listed, specs) == {"b": False, "a": True}


# Arbitrary JSON, with big integers, non-finite floats and lone surrogates.
_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(alphabet=st.characters(codec=None), max_size=4)
)
_JSON = st.recursive(
    _LEAVES,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=4), children, max_size=3)
    ),
    max_leaves=12,
)
_FIELDS = ["name", "datatype", "shape", "data", "parameters"]


@st.composite
def _requests(draw: st.DrawFn) -> tuple[Any, TensorSpec, bytes]:
    """A well-formed request for one input `t`, then broken (or not) by arbitrary
    JSON in one place: the body, an input field, a data element, the binary part."""
    datatype = draw(st.sampled_from(DATATYPES))
    shape = draw(st.lists(st.integers(0, 3), max_size=3))
    spec = TensorSpec("t", datatype, tuple(draw(st.sampled_from([-1, d])) for d in shape))
    count = max(0, math.prod(shape) + draw(st.sampled_from([0, 0, 0, 1, -1])))
    values = draw(st.lists(_elements(datatype), min_size=count, max_size=count))
    item: dict[str, Any] = {"name": "t", "datatype": datatype, "shape": shape}
    binary = b""
    if draw(st.booleans()):
        item["data"] = values
        broken = draw(st.booleans())
        if broken and values:
            values[draw(st.integers(0, len(values) - 1))] = draw(_LEAVES)
    else:
        if datatype == "BYTES":
            binary = _pack(values)
        else:
            little_endian = OIP_TO_NUMPY[datatype].newbyteorder("<")
            binary = np.array(values, dtype=little_endian).tobytes()
        item["parameters"] = {"binary_data_size": len(binary)}
        binary = draw(st.just(binary) | st.binary(max_size=24))
    field = draw(st.sampled_from([None, *_FIELDS]))
    if field is not None:
        item[field] = draw(_JSON)
    body: dict[str, Any] = {
        "inputs": draw(st.sampled_from([[item]] * 4 + [[item, item], item] + [[item]] * 4))
    }
    body["outputs"] = draw(st.none() | st.just([{"name": "t"}]) | _JSON)
    body["parameters"] = draw(st.none() | st.just({"binary_data_output": True}) | _JSON)
    whole = draw(st.sampled_from([False] * 9 + [True]))
    return draw(_JSON) if whole else body, spec, binary


@settings(max_examples=500, deadline=None)
@given(request=_requests())
def test_arbitrary_json_decodes_or_is_invalid_request(
    request: tuple[Any, TensorSpec, bytes],
) -> None:
    body, spec, binary = request
    try:
        arrays = decode_inputs(body, [spec], binary)
        decode_outputs(body, [spec])
    except InvalidRequest as exc:
        assert str(exc)
        return
    array = arrays["t"]
    assert array.dtype == OIP_TO_NUMPY[spec.datatype] and array.ndim == len(spec.shape)
    assert all(want in (-1, got) for got, want in zip(array.shape, spec.shape, strict=True))


# Each validation problem: (inputs, binary part, words the 400 must hold).
_X = TensorSpec("x", "FP32", (-1, 2))
_BAD: dict[str, tuple[TensorSpec, list[Any], bytes, str]] = {
    "numbers and booleans in BYTES": (
        TensorSpec("s", "BYTES", (-1,)),
        [_item("s", "BYTES", [2], [3, True])],
        b"",
        "'s': BYTES data must be strings; element 0 is 3",
    ),
    "null in BYTES": (
        TensorSpec("s", "BYTES", (-1,)),
        [_item("s", "BYTES", [1], [None])],
        b"",
        "BYTES data must be strings",
    ),
    "string in FP32": (
        _X,
        [_item("x", "FP32", [1, 2], [1.0, "2"])],
        b"",
        "'x': FP32 data is not numeric; element 1",
    ),
    "boolean in FP32": (_X, [_item("x", "FP32", [1, 2], [1.0, True])], b"", "is not numeric"),
    "float in INT32": (
        TensorSpec("i", "INT32", (-1,)),
        [_item("i", "INT32", [2], [1, 2.0])],
        b"",
        "'i': INT32 data must be integers; element 1 is 2.0",
    ),
    "boolean in INT64": (
        TensorSpec("i", "INT64", (-1,)),
        [_item("i", "INT64", [1], [False])],
        b"",
        "must be integers",
    ),
    "128 in INT8": (
        TensorSpec("i", "INT8", (-1,)),
        [_item("i", "INT8", [1], [128])],
        b"",
        "'i': 128 is out of range for INT8",
    ),
    "-1 in UINT8": (
        TensorSpec("u", "UINT8", (-1,)),
        [_item("u", "UINT8", [1], [-1])],
        b"",
        "out of range for UINT8",
    ),
    "2**64 in UINT64": (
        TensorSpec("u", "UINT64", (-1,)),
        [_item("u", "UINT64", [1], [2**64])],
        b"",
        "out of range",
    ),
    "1e39 in FP32": (
        _X,
        [_item("x", "FP32", [1, 2], [1e39, 0])],
        b"",
        "'x': values out of range for FP32",
    ),
    "non-bool in BOOL": (
        TensorSpec("b", "BOOL", (-1,)),
        [_item("b", "BOOL", [1], [1])],
        b"",
        "'b': BOOL data must be true/false",
    ),
    "count not matching the shape": (
        _X,
        [_item("x", "FP32", [2, 2], [1.0] * 3)],
        b"",
        "'x': 3 values do not fill shape [2, 2]",
    ),
    "negative shape": (
        _X,
        [_item("x", "FP32", [-1, 2], [])],
        b"",
        "'x': shape must be a list of non-negative integers",
    ),
    "non-integer shape": (_X, [_item("x", "FP32", [1.0, 2], [1, 2])], b"", "non-negative integers"),
    "boolean shape": (_X, [_item("x", "FP32", [True, 2], [1, 2])], b"", "non-negative integers"),
    "wrong rank": (_X, [_item("x", "FP32", [2], [1, 2])], b"", "'x': shape [2] has rank 1"),
    "fixed dimension": (
        _X,
        [_item("x", "FP32", [1, 3], [1, 2, 3])],
        b"",
        "does not match the model's [-1, 2]",
    ),
    "unknown datatype": (
        _X,
        [_item("x", "FP128", [1, 2], [1, 2])],
        b"",
        "'x': unknown datatype 'FP128'",
    ),
    "datatype not the model's": (
        _X,
        [_item("x", "FP64", [1, 2], [1, 2])],
        b"",
        "'x': datatype FP64 does not match the model's FP32",
    ),
    "no name": (
        _X,
        [{"datatype": "FP32", "shape": [1, 2], "data": [1, 2]}],
        b"",
        "input 0 has no 'name'",
    ),
    "no datatype": (
        _X,
        [{"name": "x", "shape": [1, 2], "data": [1, 2]}],
        b"",
        "'x': no 'datatype'",
    ),
    "no shape": (
        _X,
        [{"name": "x", "datatype": "FP32", "data": [1, 2]}],
        b"",
        "'x': shape must be",
    ),
    "no data": (_X, [{"name": "x", "datatype": "FP32", "shape": [1, 2]}], b"", "'x': no 'data'"),
    "data not an array": (
        _X,
        [_item("x", "FP32", [1, 2], 1.0)],
        b"",
        "'x': 'data' must be a JSON array",
    ),
    "input given twice": (
        _X,
        [_item("x", "FP32", [1, 2], [1, 2])] * 2,
        b"",
        "input 'x' given twice",
    ),
    "input the model does not have": (
        _X,
        [_item("y", "FP32", [1, 2], [1, 2])],
        b"",
        "unexpected input 'y'",
    ),
    "binary size past the end": (
        _X,
        [_binary_item("x", "FP32", [1, 2], 8)],
        b"\x00" * 4,
        "'x': binary_data_size 8 runs past the end of the binary data (4 bytes left)",
    ),
    "binary bytes left over": (
        _X,
        [_binary_item("x", "FP32", [1, 2], 8)],
        b"\x00" * 12,
        "4 bytes of binary data are left over",
    ),
    "binary size not whole values": (
        _X,
        [_binary_item("x", "FP32", [1, 2], 6)],
        b"\x00" * 6,
        "'x': 6 bytes of binary data are not a whole number of FP32 values",
    ),
    "binary values not filling the shape": (
        _X,
        [_binary_item("x", "FP32", [1, 2], 4)],
        b"\x00" * 4,
        "'x': 1 values do not fill shape [1, 2]",
    ),
    "binary BYTES cut inside a length": (
        TensorSpec("s", "BYTES", (-1,)),
        [_binary_item("s", "BYTES", [1], 2)],
        b"\x01\x00",
        "'s': BYTES binary data ends inside the 4-byte length of element 0",
    ),
    "binary BYTES element past the end": (
        TensorSpec("s", "BYTES", (-1,)),
        [_binary_item("s", "BYTES", [1], 5)],
        b"\x09\x00\x00\x00a",
        "'s': BYTES element 0 says 9 bytes, 1 are left",
    ),
    "binary BOOL not 0 or 1": (
        TensorSpec("b", "BOOL", (-1,)),
        [_binary_item("b", "BOOL", [1], 1)],
        b"\x02",
        "'b': BOOL binary data must be bytes 0 or 1",
    ),
    "negative binary size": (
        _X,
        [_binary_item("x", "FP32", [1, 2], -8)],
        b"",
        "'x': binary_data_size must be a non-negative integer",
    ),
    "data and binary size": (
        _X,
        [{**_item("x", "FP32", [0, 2], []), "parameters": {"binary_data_size": 0}}],
        b"",
        "'x': both 'data' and binary_data_size",
    ),
}


@pytest.mark.parametrize("case", list(_BAD))
def test_each_validation_problem_is_an_invalid_request_naming_it(case: str) -> None:
    spec, inputs, binary, words = _BAD[case]
    with pytest.raises(InvalidRequest) as caught:
        decode_inputs({"inputs": inputs}, [spec], binary)
    assert words in str(caught.value)


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"outputs": [{"name": "x"}, {"name": "x"}]}, "output 'x' requested twice"),
        (
            {"outputs": [{"name": "x", "parameters": {"binary_data": 1}}]},
            "binary_data must be true or false",
        ),
        ({"parameters": {"binary_data_output": "yes"}}, "binary_data_output must be true or false"),
        ({"parameters": []}, "'parameters' must be a JSON object"),
        ({"outputs": [{"name": "z"}]}, "unknown outputs ['z']"),
        ({"outputs": "x"}, "'outputs' must be a list"),
    ],
)
def test_bad_outputs_are_invalid_requests(body: dict[str, Any], words: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        decode_outputs(body, [_X])
    assert words in str(caught.value)


# --- Identity ONNX models over HTTP ------------------------------------------------

NUMERIC = {
    "f32": (TensorProto.FLOAT, "FP32"),
    "f16": (TensorProto.FLOAT16, "FP16"),
    "i8": (TensorProto.INT8, "INT8"),
    "u8": (TensorProto.UINT8, "UINT8"),
    "i64": (TensorProto.INT64, "INT64"),
    "b": (TensorProto.BOOL, "BOOL"),
}


def _identity_model(path: Path, inputs: dict[str, int], dims: list[str]) -> Path:
    """Each input `n` (ONNX element type) passed through to output `n_out`."""
    graph = helper.make_graph(
        [helper.make_node("Identity", [n], [f"{n}_out"]) for n in inputs],
        "identity",
        [helper.make_tensor_value_info(n, t, dims) for n, t in inputs.items()],
        [helper.make_tensor_value_info(f"{n}_out", t, dims) for n, t in inputs.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def _serve(model: Path, name: str, log: Path) -> ServerProcess:
    """One `terrace-runtime serve` on 127.0.0.1, on a port it binds itself
    (read back from `log` by `ServerProcess.wait`), stopped by its PID."""
    argv = [sys.executable, "-m", "terrace_runtime.cli", "serve", "--host", "127.0.0.1"]
    argv += ["--port", "0", "--model", str(model), "--format", "onnx", "--name", name]
    argv += ["--threads", "1"]
    return ServerProcess(name, argv, 0, "/v2/health/ready", log)


def _infer(server: ServerProcess) -> str:
    return f"{server.url}/v2/models/{server.name}/infer"


@pytest.fixture(scope="module")
def identity(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ServerProcess]]:
    tmp = tmp_path_factory.mktemp("identity")
    models = {
        "strings": _identity_model(tmp / "strings.onnx", {"x": TensorProto.STRING}, ["n", "m"]),
        "numbers": _identity_model(
            tmp / "numbers.onnx", {n: t for n, (t, _) in NUMERIC.items()}, ["n"]
        ),
    }
    servers = {name: _serve(path, name, tmp / f"{name}.log") for name, path in models.items()}
    try:
        for server in servers.values():
            server.wait(60)
        yield servers
    finally:
        for server in servers.values():
            server.stop()


def _post_binary(url: str, head: dict[str, Any], tail: bytes) -> httpx.Response:
    raw = json.dumps(head).encode()
    return httpx.post(
        url,
        content=raw + tail,
        headers={HEADER: str(len(raw)), "content-type": "application/octet-stream"},
    )


def _split(response: httpx.Response) -> tuple[dict[str, Any], dict[str, bytes]]:
    """A binary answer's JSON and each binary output's bytes, by name."""
    assert response.headers["content-type"] == "application/octet-stream"
    length = int(response.headers[HEADER])
    head = json.loads(response.content[:length])
    parts, offset = {}, length
    for o in head["outputs"]:
        if "parameters" in o:
            size = o["parameters"]["binary_data_size"]
            parts[o["name"]] = response.content[offset : offset + size]
            offset += size
    assert offset == len(response.content)
    return head, parts


def test_server_metadata_announces_binary_tensor_data(identity: dict[str, ServerProcess]) -> None:
    s = identity["strings"]
    assert "binary_tensor_data" in httpx.get(s.url + "/v2").json()["extensions"]
    meta = httpx.get(s.url + "/v2/models/strings").json()
    assert meta["inputs"] == [{"name": "x", "datatype": "BYTES", "shape": [-1, -1]}]


@pytest.mark.parametrize(
    ("shape", "data"),
    [
        ([1, 1], ["a"]),
        ([2, 3], [["a", "", "ünïcödé"], ["🙂", "tab\there", "nul\u0000in"]]),
        ([0, 2], []),
    ],
)
def test_bytes_json_round_trip_through_string_identity(
    identity: dict[str, ServerProcess], shape: list[int], data: list[Any]
) -> None:
    r = httpx.post(_infer(identity["strings"]), json={"inputs": [_item("x", "BYTES", shape, data)]})
    assert r.status_code == 200, r.text
    [out] = r.json()["outputs"]
    flat = [v for row in data for v in (row if isinstance(row, list) else [row])]
    assert out == {"name": "x_out", "datatype": "BYTES", "shape": shape, "data": flat}


def test_bytes_binary_in_and_out_through_string_identity(
    identity: dict[str, ServerProcess],
) -> None:
    elements = [b"a", b"", "é".encode(), b"trailing nul\x00", b"\x00"]
    raw = _pack(elements)
    head: dict[str, Any] = {
        "inputs": [_binary_item("x", "BYTES", [5, 1], len(raw))],
        "parameters": {"binary_data_output": True},
    }
    body, parts = _split(_post_binary(_infer(identity["strings"]), head, raw))
    [out] = body["outputs"]
    assert out == {
        "name": "x_out",
        "datatype": "BYTES",
        "shape": [5, 1],
        "parameters": {"binary_data_size": len(raw)},
    }
    assert parts["x_out"] == raw
    # Binary in, JSON out (no binary_data asked for): a plain JSON answer.
    head.pop("parameters")
    r = _post_binary(_infer(identity["strings"]), head, raw)
    assert r.headers["content-type"] == "application/json" and HEADER not in r.headers
    assert r.json()["outputs"][0]["data"] == [e.decode() for e in elements]
    # JSON in, binary out for that one output.
    json_in = {"inputs": [_item("x", "BYTES", [1, 2], ["é", ""])]}
    json_in["outputs"] = [{"name": "x_out", "parameters": {"binary_data": True}}]
    _, parts = _split(httpx.post(_infer(identity["strings"]), json=json_in))
    assert parts["x_out"] == _pack(["é".encode(), b""])


def test_non_utf8_bytes_into_an_onnx_string_input_is_a_400(
    identity: dict[str, ServerProcess],
) -> None:
    raw = _pack([b"ok", b"\xff\xfe"])
    head = {"inputs": [_binary_item("x", "BYTES", [1, 2], len(raw))]}
    r = _post_binary(_infer(identity["strings"]), head, raw)
    assert r.status_code == 400, r.text
    assert r.json() == {
        "error": "input 'x': element 1 is not valid UTF-8, and ONNX string tensors hold UTF-8 text"
    }


def _numeric_arrays(rows: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(rows)
    return {
        "f32": rng.normal(size=rows).astype(np.float32),
        "f16": rng.normal(size=rows).astype(np.float16),
        "i8": rng.integers(-128, 128, size=rows).astype(np.int8),
        "u8": rng.integers(0, 256, size=rows).astype(np.uint8),
        "i64": rng.integers(-(2**62), 2**62, size=rows).astype(np.int64),
        "b": rng.integers(0, 2, size=rows).astype(np.bool_),
    }


def test_numeric_identity_round_trips_in_json_and_binary(
    identity: dict[str, ServerProcess],
) -> None:
    arrays = _numeric_arrays(5)
    url = _infer(identity["numbers"])
    inputs = [_item(n, NUMERIC[n][1], [5], a.tolist()) for n, a in arrays.items()]
    r = httpx.post(url, json={"inputs": inputs})
    assert r.status_code == 200, r.text
    for out in r.json()["outputs"]:
        name = out["name"].removesuffix("_out")
        assert out["datatype"] == NUMERIC[name][1]
        np.testing.assert_array_equal(np.array(out["data"], dtype=arrays[name].dtype), arrays[name])
    head = {
        "inputs": [_binary_item(n, NUMERIC[n][1], [5], a.nbytes) for n, a in arrays.items()],
        "parameters": {"binary_data_output": True},
    }
    little_endian = b"".join(a.astype(a.dtype.newbyteorder("<")).tobytes() for a in arrays.values())
    _, parts = _split(_post_binary(url, head, little_endian))
    for name, array in arrays.items():
        assert parts[f"{name}_out"] == array.tobytes()


def _numbers(**bad: list[Any]) -> list[dict[str, Any]]:
    """Valid one-row inputs of the numeric model, but for the `bad` data given."""
    return [_item(n, t, [1], bad.get(n, [1])) for n, (_, t) in NUMERIC.items()]


@pytest.mark.parametrize(
    ("model", "inputs", "words"),
    [
        (
            "strings",
            [_item("x", "BYTES", [1, 2], [3, True])],
            "input 'x': BYTES data must be strings",
        ),
        ("strings", [_item("x", "FP32", [1, 1], [1.0])], "input 'x': datatype FP32 does not match"),
        (
            "strings",
            [_item("x", "BYTES", [1, 2], ["a"])],
            "input 'x': 1 values do not fill shape [1, 2]",
        ),
        ("numbers", _numbers(f16=[1e6]), "input 'f16': values out of range for FP16"),
        ("numbers", _numbers(i8=[300]), "input 'i8': 300 is out of range for INT8"),
        ("numbers", _numbers(b=[1]), "input 'b': BOOL data must be true/false"),
        ("numbers", _numbers(i64=[1.5]), "input 'i64': INT64 data must be integers"),
        ("numbers", _numbers()[:-1], "missing inputs ['b']"),
    ],
)
def test_validation_problems_are_400_in_the_protocol_shape(
    identity: dict[str, ServerProcess], model: str, inputs: list[Any], words: str
) -> None:
    r = httpx.post(_infer(identity[model]), json={"inputs": inputs})
    assert r.status_code == 400, r.text
    assert set(r.json()) == {"error"} and words in r.json()["error"]


@pytest.mark.parametrize(
    ("header", "body", "words"),
    [
        ("12", b"{}", "must be the byte length of the body's JSON part, 0 to 2"),
        ("x", b"{}", "must be the byte length"),
        ("2", b"{]", "not valid JSON"),
        ("2", b"{}", "'inputs' must be a non-empty list"),
    ],
)
def test_bad_binary_framing_is_a_400(
    identity: dict[str, ServerProcess], header: str, body: bytes, words: str
) -> None:
    r = httpx.post(_infer(identity["strings"]), content=body, headers={HEADER: header})
    assert r.status_code == 400 and words in r.json()["error"]
