"""JSON-schema output as a typed column: the schema's Arrow type, and each row's JSON text turned
into a value of that type.

Mapping (``arrow_type``): object -> struct (its ``properties``, in order; a property not in
``required`` is nullable), array -> list, string / string enum / string const -> string,
integer -> int64, number -> float64, boolean -> bool; ``type: [X, "null"]`` and
``anyOf: [X, {type: null}]`` make X nullable; local ``$ref`` (``#/$defs/...``,
``#/definitions/...``) are followed (not recursively). Anything else (free-form objects,
unions, tuples, recursion) cannot be a column type: ``SchemaError`` naming the schema path.
``constrained_schema`` is the schema the grammar compiles: every object closed
(``additionalProperties: false`` unless the schema says otherwise), so the text holds only what
the column can hold. Knows nothing of tokenizers, grammars or models.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pyarrow as pa

from .fs import resolve

_SCALARS = {"string": pa.string(), "integer": pa.int64(), "number": pa.float64(), "boolean": pa.bool_()}
_INT64 = (-(1 << 63), (1 << 63) - 1)


class SchemaError(ValueError):
    """The JSON schema cannot be used; the message names where in it."""


def load_json_schema(uri: str, what: str = "task.json_schema_file") -> dict[str, Any]:
    """The JSON schema in the file at ``uri`` (a local path or s3:// URI)."""
    try:
        loc = resolve(uri)
        with loc.fs.open_input_stream(loc.path) as f:
            raw = f.read()
    except (OSError, ValueError) as e:
        raise SchemaError(f"{what}: cannot read {uri} ({e})") from e
    try:
        schema = json.loads(raw)
    except json.JSONDecodeError as e:
        raise SchemaError(f"{what}: {uri} is not valid JSON ({e})") from e
    if not isinstance(schema, dict):
        raise SchemaError(f"{what}: {uri} holds a {type(schema).__name__}, not a JSON schema object")
    return schema


class _Mapper:
    def __init__(self, root: dict[str, Any], where: str):
        self.root, self.where = root, where

    def _ref(self, ref: str, path: str, seen: tuple[str, ...]) -> tuple[dict[str, Any], tuple[str, ...]]:
        if ref in seen:
            raise SchemaError(f"{path}: recursive $ref {ref!r} cannot be a column type")
        if not ref.startswith("#/"):
            raise SchemaError(f"{path}: only local $ref (#/$defs/...) are supported, got {ref!r}")
        node: Any = self.root
        for part in ref[2:].split("/"):
            if not isinstance(node, dict) or part not in node:
                raise SchemaError(f"{path}: $ref {ref!r} points nowhere")
            node = node[part]
        if not isinstance(node, dict):
            raise SchemaError(f"{path}: $ref {ref!r} is not a schema")
        return node, seen + (ref,)

    def field(self, s: Any, path: str, seen: tuple[str, ...] = ()) -> tuple[pa.DataType, bool]:
        """(type, nullable) of the schema ``s`` at ``path``."""
        if not isinstance(s, dict):
            raise SchemaError(f"{path}: a schema must be a mapping, got {type(s).__name__}")
        if "$ref" in s:
            node, seen = self._ref(s["$ref"], path, seen)
            return self.field(node, path, seen)
        for key in ("anyOf", "oneOf"):
            if key in s:
                opts = s[key]
                real = [o for o in opts if not (isinstance(o, dict) and o.get("type") == "null")]
                if not isinstance(opts, list) or len(real) != 1 or len(opts) > 2:
                    raise SchemaError(f"{path}.{key}: only [X, {{type: null}}] can be a column type (a union cannot)")
                t, _ = self.field(real[0], f"{path}.{key}", seen)
                return t, len(opts) == 2
        if "enum" in s or "const" in s:
            values = s["enum"] if "enum" in s else [s["const"]]
            if not isinstance(values, list) or not values:
                raise SchemaError(f"{path}.enum: must be a non-empty list")
            if not all(isinstance(v, str) for v in values if v is not None):
                raise SchemaError(f"{path}: only string enums / consts can be column types")
            return pa.string(), None in values
        typ = s.get("type")
        nullable = False
        if isinstance(typ, list):
            real = [t for t in typ if t != "null"]
            nullable = len(real) != len(typ)
            if len(real) != 1:
                raise SchemaError(f"{path}.type: {typ} is a union; only [X, 'null'] can be a column type")
            typ = real[0]
        if typ is None and "properties" in s:
            typ = "object"
        if typ in _SCALARS:
            return _SCALARS[typ], nullable
        if typ == "array":
            if "prefixItems" in s or not isinstance(s.get("items"), dict):
                raise SchemaError(f"{path}.items: an array needs one items schema (tuples cannot be columns)")
            item, item_null = self.field(s["items"], f"{path}.items", seen)
            return pa.list_(pa.field("item", item, nullable=item_null)), nullable
        if typ == "object":
            props = s.get("properties")
            if not isinstance(props, dict) or not props:
                raise SchemaError(f"{path}: an object needs properties to be a struct column")
            if s.get("additionalProperties") not in (None, False):
                raise SchemaError(f"{path}.additionalProperties: must be false (or unset) for a struct column")
            required = set(s.get("required", []))
            unknown = required - set(props)
            if unknown:
                raise SchemaError(f"{path}.required: {sorted(unknown)} are not properties")
            fields = []
            for name, sub in props.items():
                t, null = self.field(sub, f"{path}.properties.{name}", seen)
                fields.append(pa.field(name, t, nullable=null or name not in required))
            return pa.struct(fields), nullable
        raise SchemaError(f"{path}: type {typ!r} cannot be a column type (object, array, string, "
                          "integer, number, boolean, enum)")


def arrow_type(schema: dict[str, Any], where: str = "task.json_schema") -> pa.DataType:
    """The Arrow type of values of ``schema``; SchemaError naming the path inside it."""
    return _Mapper(schema, where).field(schema, where)[0]


def constrained_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` with every object closed (``additionalProperties: false`` where unset)."""
    out = copy.deepcopy(schema)

    def close(node: Any) -> None:
        if isinstance(node, dict):
            if "properties" in node and "additionalProperties" not in node:
                node["additionalProperties"] = False
            for v in node.values():
                close(v)
        elif isinstance(node, list):
            for v in node:
                close(v)

    close(out)
    return out


def to_arrow_value(value: Any, typ: pa.DataType, path: str = "$") -> Any:
    """A parsed JSON value as a Python value that ``pa.array(..., type=typ)`` takes; ValueError
    naming the JSON path when it does not fit (the grammar makes this rare)."""
    if value is None:
        return None
    if pa.types.is_struct(typ):
        if not isinstance(value, dict):
            raise ValueError(f"{path}: expected an object")
        return {f.name: to_arrow_value(value.get(f.name), f.type, f"{path}.{f.name}") for f in typ}
    if pa.types.is_list(typ):
        if not isinstance(value, list):
            raise ValueError(f"{path}: expected an array")
        return [to_arrow_value(v, typ.value_type, f"{path}[{i}]") for i, v in enumerate(value)]
    if pa.types.is_string(typ):
        if not isinstance(value, str):
            raise ValueError(f"{path}: expected a string")
        return value
    if pa.types.is_boolean(typ):
        if not isinstance(value, bool):
            raise ValueError(f"{path}: expected a boolean")
        return value
    if pa.types.is_int64(typ):
        if isinstance(value, bool) or not isinstance(value, int) or not _INT64[0] <= value <= _INT64[1]:
            raise ValueError(f"{path}: expected an int64 integer")
        return value
    if pa.types.is_float64(typ):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{path}: expected a number")
        return float(value)
    raise ValueError(f"{path}: unsupported type {typ}")


def parse_structured(text: str, typ: pa.DataType) -> tuple[Any, str | None]:
    """(value for the ``structured`` column, None) or (None, the row's error)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        return None, f"the generated text is not valid JSON ({e})"
    try:
        return to_arrow_value(value, typ), None
    except ValueError as e:
        return None, f"the generated JSON does not fit the schema's column type ({e})"
