"""The pydantic models in api.py and the CRD YAML in crds/ describe the same API.

Walks both schemas side by side: same field names at every level, same
required fields, same enums, same integer bounds, same types, and the same
defaults (the CRD's after the apiserver's structural defaulting fills nested
defaults in, the model's as it dumps).
"""

from __future__ import annotations

import types
import typing
from pathlib import Path

import annotated_types
import pytest
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from terrace_operator import api

ROOT = Path(__file__).resolve().parents[2]
CRDS = {
    "ModelTier": ROOT / "crds" / "terrace.dev_modeltiers.yaml",
    "TierRouter": ROOT / "crds" / "terrace.dev_tierrouters.yaml",
}
MODELS = {
    ("ModelTier", "spec"): api.ModelTierSpec,
    ("ModelTier", "status"): api.ModelTierStatus,
    ("TierRouter", "spec"): api.TierRouterSpec,
    ("TierRouter", "status"): api.TierRouterStatus,
}


def crd_schema(kind: str) -> dict:
    crd = yaml.safe_load(CRDS[kind].read_text())
    (version,) = crd["spec"]["versions"]
    return version["schema"]["openAPIV3Schema"]


def apply_defaults(schema: dict, value: object) -> object:
    """What the apiserver's structural defaulting does to `value`."""
    if isinstance(value, dict) and schema.get("type") == "object":
        out = dict(value)
        for name, prop in (schema.get("properties") or {}).items():
            if name not in out and "default" in prop:
                out[name] = prop["default"]
            if name in out:
                out[name] = apply_defaults(prop, out[name])
        return out
    if isinstance(value, list) and "items" in schema:
        return [apply_defaults(schema["items"], v) for v in value]
    return value


def unwrap(annotation: object) -> tuple[object, bool]:
    """(inner type, optional?) for `X | None`."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        if len(args) == 1:
            return args[0], optional
        return typing.Union[tuple(args)], optional  # noqa: UP007
    return annotation, False


def bounds(field: FieldInfo) -> dict[str, object]:
    out: dict[str, object] = {}
    for m in field.metadata:
        if isinstance(m, annotated_types.Ge):
            out["minimum"] = m.ge
        elif isinstance(m, annotated_types.Le):
            out["maximum"] = m.le
        elif isinstance(m, annotated_types.MinLen):
            out["min_len"] = m.min_length
        elif isinstance(m, annotated_types.MaxLen):
            out["max_len"] = m.max_length
    return out


def compare(model: type[BaseModel], schema: dict, where: str, problems: list[str]) -> None:
    assert schema.get("type") == "object", where
    props = schema.get("properties") or {}
    fields = {(f.alias or name): f for name, f in model.model_fields.items()}
    for missing in sorted(set(props) - set(fields)):
        problems.append(f"{where}.{missing}: in the CRD, not in {model.__name__}")
    for extra in sorted(set(fields) - set(props)):
        problems.append(f"{where}.{extra}: in {model.__name__}, not in the CRD")
    crd_required = set(schema.get("required") or [])
    model_required = {alias for alias, f in fields.items() if f.is_required()}
    if crd_required != model_required:
        problems.append(
            f"{where}: required {sorted(crd_required)} in the CRD, "
            f"{sorted(model_required)} in {model.__name__}"
        )
    for alias in sorted(set(props) & set(fields)):
        compare_field(fields[alias], props[alias], f"{where}.{alias}", problems)


def compare_field(field: FieldInfo, prop: dict, where: str, problems: list[str]) -> None:
    inner, _ = unwrap(field.annotation)
    check_type(inner, prop, where, problems)

    # Defaults: the CRD's (filled in by structural defaulting) == the model's dump.
    if not field.is_required():
        model_default = field.get_default(call_default_factory=True)
        if isinstance(model_default, BaseModel):
            model_default = model_default.model_dump(by_alias=True, exclude_none=True, mode="json")
        if "default" in prop:
            crd_default = apply_defaults(prop, prop["default"])
            if crd_default != model_default:
                problems.append(
                    f"{where}: default {crd_default!r} in the CRD, {model_default!r} in the model"
                )
        elif model_default is not None:
            problems.append(f"{where}: default {model_default!r} in the model, none in the CRD")
    elif "default" in prop:
        problems.append(f"{where}: required in the model but defaulted in the CRD")

    b = bounds(field)
    if prop.get("type") == "integer":
        for key in ("minimum", "maximum"):
            if prop.get(key) != b.get(key):
                problems.append(
                    f"{where}: {key} {prop.get(key)} in the CRD, {b.get(key)} in the model"
                )
    # String and list lengths: wherever the model states one, it matches the CRD.
    length_keys = {"string": ("minLength", "maxLength"), "array": ("minItems", "maxItems")}
    if prop.get("type") in length_keys:
        lo, hi = length_keys[prop["type"]]
        for mine, theirs in (("min_len", lo), ("max_len", hi)):
            if mine in b and b[mine] != prop.get(theirs):
                problems.append(
                    f"{where}: {theirs} {prop.get(theirs)} in the CRD, {b[mine]} in the model"
                )


def check_type(inner: object, prop: dict, where: str, problems: list[str]) -> None:
    origin = typing.get_origin(inner)
    if isinstance(inner, type) and issubclass(inner, BaseModel):
        compare(inner, prop, where, problems)
    elif origin is list:
        if prop.get("type") != "array":
            problems.append(f"{where}: list in the model, {prop.get('type')} in the CRD")
            return
        (item,) = typing.get_args(inner)
        check_type(item, prop["items"], f"{where}[]", problems)
    elif origin is dict:
        if prop.get("type") != "object" or "additionalProperties" not in prop:
            problems.append(f"{where}: dict in the model, not a map in the CRD")
            return
        _, value = typing.get_args(inner)
        check_type(value, prop["additionalProperties"], f"{where}{{}}", problems)
    elif origin is typing.Literal:
        if set(typing.get_args(inner)) != set(prop.get("enum", [])):
            enum = prop.get("enum")
            problems.append(
                f"{where}: enum {enum} in the CRD, {typing.get_args(inner)} in the model"
            )
    elif inner is int:
        if prop.get("type") != "integer":
            problems.append(f"{where}: int in the model, {prop.get('type')} in the CRD")
    elif inner is str:
        if prop.get("type") != "string" or "enum" in prop:
            kind = f"{prop.get('type')} (enum {prop.get('enum')})"
            problems.append(f"{where}: str in the model, {kind} in the CRD")
    elif inner is bool:
        if prop.get("type") != "boolean":
            problems.append(f"{where}: bool in the model, {prop.get('type')} in the CRD")
    elif inner == (int | str) or inner == typing.Union[int, str]:  # noqa: UP007
        if not prop.get("x-kubernetes-int-or-string"):
            problems.append(f"{where}: int | str in the model, not int-or-string in the CRD")
    else:
        problems.append(f"{where}: the test does not know the model type {inner!r}")


@pytest.mark.parametrize(("kind", "part"), list(MODELS))
def test_model_matches_crd(kind: str, part: str) -> None:
    problems: list[str] = []
    compare(MODELS[kind, part], crd_schema(kind)["properties"][part], f"{kind}.{part}", problems)
    assert not problems, "\n".join(problems)


def test_the_walk_catches_drift() -> None:
    # The checker itself must be able to fail: drop a default and a field.
    schema = crd_schema("ModelTier")["properties"]["spec"]
    schema["properties"]["replicas"]["properties"]["max"]["default"] = 9
    del schema["properties"]["device"]
    problems: list[str] = []
    compare(api.ModelTierSpec, schema, "spec", problems)
    joined = "\n".join(problems)
    assert "spec.replicas.max: default 9 in the CRD, 8 in the model" in joined
    assert "spec.device: in ModelTierSpec, not in the CRD" in joined
    assert "spec.replicas: default" in joined  # the nested {} default fills max in differently


@pytest.mark.parametrize("kind", list(CRDS))
def test_every_field_has_a_description(kind: str) -> None:
    missing: list[str] = []

    def walk(schema: dict, where: str) -> None:
        for name, prop in (schema.get("properties") or {}).items():
            here = f"{where}.{name}"
            if name != "metadata" and not prop.get("description"):
                missing.append(here)
            walk(prop, here)
        if "items" in schema:
            walk(schema["items"], f"{where}[]")

    walk(crd_schema(kind), kind)
    assert not missing, missing


@pytest.mark.parametrize("kind", list(CRDS))
def test_crd_shape(kind: str) -> None:
    crd = yaml.safe_load(CRDS[kind].read_text())
    spec = crd["spec"]
    assert crd["metadata"]["name"] == f"{spec['names']['plural']}.terrace.dev"
    assert spec["group"] == "terrace.dev"
    assert spec["names"]["categories"] == ["terrace"]
    assert spec["names"]["shortNames"] == [{"ModelTier": "mtier", "TierRouter": "trouter"}[kind]]
    (version,) = spec["versions"]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert "status" in version["subresources"]
    columns = {c["name"] for c in version["additionalPrinterColumns"]}
    assert {"Ready", "Age"} <= columns
    if kind == "ModelTier":
        assert version["subresources"]["scale"] == {
            "specReplicasPath": ".spec.replicas.count",
            "statusReplicasPath": ".status.replicas",
            "labelSelectorPath": ".status.selector",
        }
        assert {"Replicas", "Ready-Replicas", "Device", "Power-W"} <= columns


def number_fields(schema: dict, where: str) -> list[str]:
    found = [where] if schema.get("type") == "number" else []
    for name, prop in (schema.get("properties") or {}).items():
        found += number_fields(prop, f"{where}.{name}")
    if "items" in schema:
        found += number_fields(schema["items"], f"{where}[]")
    return found


@pytest.mark.parametrize("kind", list(CRDS))
def test_no_floats_in_spec(kind: str) -> None:
    assert number_fields(crd_schema(kind)["properties"]["spec"], f"{kind}.spec") == []


def _tier_names(folder: Path) -> set[str]:
    return {
        doc["metadata"]["name"]
        for f in folder.glob("*.yaml")
        for doc in yaml.safe_load_all(f.read_text())
        if doc["kind"] == "ModelTier"
    }


@pytest.mark.parametrize(
    "sample",
    sorted((ROOT / "crds" / "samples").rglob("*.yaml")),
    ids=lambda p: str(p.relative_to(ROOT / "crds" / "samples")),
)
def test_samples_parse_into_the_models(sample: Path) -> None:
    """Every sample (crds/samples/ for the dev cluster, crds/samples/kind/)
    parses; a router names exactly the tiers of its own folder."""
    for doc in yaml.safe_load_all(sample.read_text()):
        if doc["kind"] == "ModelTier":
            spec = api.ModelTierSpec.model_validate(
                apply_defaults(crd_schema("ModelTier")["properties"]["spec"], doc["spec"])
            )
            assert spec.model.uri or (spec.model.format == "external" and spec.model.image)
        elif doc["kind"] == "TierRouter":
            spec = api.TierRouterSpec.model_validate(
                apply_defaults(crd_schema("TierRouter")["properties"]["spec"], doc["spec"])
            )
            names = [t.name for t in spec.tiers]
            assert sorted(names) == sorted(_tier_names(sample.parent)), names
            assert names[0] == "small-cpu" and names[-1] == "large-gpu", names
