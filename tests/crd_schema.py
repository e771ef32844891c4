"""Fovea's CRD schemas as the API server applies them, for tests: defaults, the
structural schema (as JSON Schema, with strict field validation) and the CEL
rules (evaluated with cel-python; Kubernetes' quantity() library is provided
here on top of the `kubernetes` client's own quantity parser)."""

from __future__ import annotations

import copy
from pathlib import Path

import celpy
import jsonschema
import yaml
from celpy import celtypes
from kubernetes.utils import parse_quantity

CRDS = Path(__file__).resolve().parent.parent / "deploy" / "crds"


def crd(plural: str) -> dict:
    return yaml.safe_load((CRDS / f"{plural}.fovea.dev.yaml").read_text())


def open_api_schema(plural: str) -> dict:
    return crd(plural)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def kind_schema(kind: str) -> dict:
    return open_api_schema({"Capture": "captures", "ClusterCapture": "clustercaptures"}[kind])


def to_json_schema(s: dict) -> dict:
    """OpenAPI (structural, with x-kubernetes-*) -> JSON Schema; unknown fields are errors, as
    with kubectl's default strict field validation."""
    out = {k: v for k, v in s.items() if not k.startswith("x-kubernetes-") and k not in ("default", "properties",
                                                                                          "items", "additionalProperties")}
    if s.get("x-kubernetes-int-or-string"):
        out["type"] = ["integer", "string"]
    if "properties" in s:
        # metadata is the API server's to check
        out["properties"] = {k: {"type": "object"} if k == "metadata" else to_json_schema(v)
                             for k, v in s["properties"].items()}
        if not s.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if isinstance(s.get("additionalProperties"), dict):
        out["additionalProperties"] = to_json_schema(s["additionalProperties"])
    if "items" in s:
        out["items"] = to_json_schema(s["items"])
    if s.get("type") == "object" and not s.get("properties") and "additionalProperties" not in s \
            and not s.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False  # an empty object (hostPath: {}) takes no fields
    return out


def apply_defaults(s: dict, value):
    """Defaults, as the API server applies them before validation."""
    if isinstance(value, dict):
        for k, sub in (s.get("properties") or {}).items():
            if k not in value and "default" in sub:
                value[k] = copy.deepcopy(sub["default"])
            if k in value:
                value[k] = apply_defaults(sub, value[k])
    return value


class _Quantity:
    def __init__(self, text):
        self.value = parse_quantity(str(text))


def _quantity(text):
    return _Quantity(text)


def _compare_to(a, b):
    return celtypes.IntType((a.value > b.value) - (a.value < b.value))


_ENV = celpy.Environment()
_PROGRAMS: dict[str, object] = {}


def _program(rule: str):
    if rule not in _PROGRAMS:
        _PROGRAMS[rule] = _ENV.program(_ENV.compile(rule), functions={"quantity": _quantity,
                                                                      "compareTo": _compare_to})
    return _PROGRAMS[rule]


def cel_errors(s: dict, value, path: str = "") -> list[str]:
    """The messages of every x-kubernetes-validations rule that fails, walking the value."""
    errors = []
    for v in s.get("x-kubernetes-validations") or []:
        try:
            result = _program(v["rule"]).evaluate({"self": celpy.json_to_cel(value)})
        except celpy.CELEvalError:
            result = False  # an evaluation error rejects the object too
        if not isinstance(result, (bool, celtypes.BoolType)) or not result:
            errors.append(f"{path or '<root>'}: {v['message']}")
    if isinstance(value, dict):
        for k, sub in (s.get("properties") or {}).items():
            if k in value:
                errors += cel_errors(sub, value[k], f"{path}.{k}")
        if isinstance(s.get("additionalProperties"), dict):
            for k, item in value.items():
                errors += cel_errors(s["additionalProperties"], item, f"{path}.{k}")
    if isinstance(value, list) and "items" in s:
        for i, item in enumerate(value):
            errors += cel_errors(s["items"], item, f"{path}[{i}]")
    return errors


def api_errors(obj: dict) -> list[str]:
    """What the API server would say about this object: [] when it is accepted. The object
    is defaulted in place, as the server stores it."""
    s = kind_schema(obj["kind"])
    apply_defaults(s, obj)
    errors = [f"{'.'.join(map(str, e.path))}: {e.message}"
              for e in jsonschema.Draft7Validator(to_json_schema(s)).iter_errors(obj)]
    return errors or cel_errors(s, obj)
