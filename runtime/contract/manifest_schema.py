"""Check a parsed ``manifest.json`` against ``manifest.schema.json`` without the ``jsonschema`` package.

A deployed host installs only the runtime, whose dependencies stay small (numpy, pillow, ONNX
Runtime, tokenizers); ``jsonschema`` would add four packages, one of them compiled. The schema file
stays the single source of truth (tests validate the same documents with ``jsonschema`` too): this
module interprets the subset of JSON Schema 2020-12 the file uses and refuses any other keyword, so
the schema cannot silently grow a rule that is not enforced here. One deliberate difference:
``integer`` means a JSON integer literal (``1e12`` and ``3.0`` are numbers, not integers).

Errors name the field by its JSON path: ``schedulers.decoder.config.num_train_timesteps: expected
an integer <= 100000, found 1000000000000.0``.
"""

from __future__ import annotations

import json
import math
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

SCHEMA_PATH = Path(__file__).with_name("manifest.schema.json")

_ANNOTATIONS = {"$schema", "$id", "title", "description", "$comment", "$defs"}
_KEYWORDS = {"type", "enum", "const", "pattern", "minLength", "maxLength", "minimum", "maximum", "multipleOf",
             "required", "properties", "additionalProperties", "propertyNames", "items", "minItems", "maxItems",
             "$ref", "oneOf"} | _ANNOTATIONS


class SchemaViolation(ValueError):
    """One rule of the schema that a document breaks; ``str()`` is the one-line message."""


@lru_cache(maxsize=1)
def manifest_schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text())


def _is(kind: str, value: Any) -> bool:
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    types = {"string": str, "boolean": bool, "object": dict, "array": list, "null": type(None)}
    return isinstance(value, types[kind])


def _describe(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (int, float, str, bool, type(None))) else type(value).__name__
    return text if len(text) <= 60 else text[:57] + "..."


class _Validator:
    def __init__(self, root: dict) -> None:
        self.root = root

    def fail(self, where: str, expected: str, value: Any) -> None:
        raise SchemaViolation(f"{where or 'manifest'}: expected {expected}, found {_describe(value)}")

    def check(self, schema: dict, value: Any, where: str) -> None:
        unknown = set(schema) - _KEYWORDS
        if unknown:
            raise NotImplementedError(f"manifest schema keyword(s) {sorted(unknown)} at {where!r} are not supported")
        if "$ref" in schema:
            self.check(self._resolve(schema["$ref"]), value, where)
        if "oneOf" in schema:
            self._one_of(schema["oneOf"], value, where)
        if "type" in schema:
            kinds = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
            if not any(_is(k, value) for k in kinds):
                self.fail(where, " or ".join(f"a JSON {k}" for k in kinds), value)
        if "const" in schema and (value != schema["const"] or type(value) is not type(schema["const"])):
            self.fail(where, _describe(schema["const"]), value)
        if "enum" in schema and value not in schema["enum"]:
            self.fail(where, f"one of {schema['enum']}", value)
        self._scalar(schema, value, where)
        if isinstance(value, dict):
            self._object(schema, value, where)
        if isinstance(value, list):
            self._array(schema, value, where)

    def _resolve(self, ref: str) -> dict:
        if not ref.startswith("#/$defs/"):
            raise NotImplementedError(f"manifest schema $ref {ref!r}: only '#/$defs/...' is supported")
        return self.root["$defs"][ref[len("#/$defs/"):]]

    def _one_of(self, options: list, value: Any, where: str) -> None:
        errors = []
        for option in options:
            try:
                self.check(option, value, where)
            except SchemaViolation as err:
                errors.append(str(err))
        if len(errors) != len(options) - 1:
            raise SchemaViolation(errors[-1] if errors else f"{where}: matches several alternatives of the schema")

    def _scalar(self, schema: dict, value: Any, where: str) -> None:
        if _is("number", value):
            if "minimum" in schema and value < schema["minimum"]:
                self.fail(where, f"a number >= {schema['minimum']}", value)
            if "maximum" in schema and value > schema["maximum"]:
                self.fail(where, f"a number <= {schema['maximum']}", value)
            if "multipleOf" in schema and value % schema["multipleOf"]:
                self.fail(where, f"a multiple of {schema['multipleOf']}", value)
        if isinstance(value, str):
            if len(value) < schema.get("minLength", 0) or len(value) > schema.get("maxLength", math.inf):
                self.fail(where, f"a string of {schema.get('minLength', 0)}..{schema.get('maxLength')} characters",
                          value)
            if "pattern" in schema and not re.search(schema["pattern"], value):
                self.fail(where, f"a string matching {schema['pattern']}", value)

    def _object(self, schema: dict, value: dict, where: str) -> None:
        prefix = f"{where}." if where else ""
        for key in schema.get("required", ()):
            if key not in value:
                raise SchemaViolation(f"{prefix}{key}: expected this required field, found none")
        properties = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        for key, item in value.items():
            if "propertyNames" in schema:
                self.check(schema["propertyNames"], key, f"{prefix}{key} (as a key)")
            if key in properties:
                self.check(properties[key], item, f"{prefix}{key}")
            elif extra is False:
                raise SchemaViolation(f"{prefix}{key}: expected no such field (not in the schema), found one")
            elif isinstance(extra, dict):
                self.check(extra, item, f"{prefix}{key}")

    def _array(self, schema: dict, value: list, where: str) -> None:
        if len(value) < schema.get("minItems", 0) or len(value) > schema.get("maxItems", math.inf):
            bounds = f"{schema.get('minItems', 0)}..{schema.get('maxItems', 'any')}"
            raise SchemaViolation(f"{where}: expected an array of {bounds} items, found {len(value)} items")
        if "items" in schema:
            for index, item in enumerate(value):
                self.check(schema["items"], item, f"{where}[{index}]")


def validate(document: Any, schema: dict | None = None) -> None:
    """Raise :class:`SchemaViolation` (one line, naming the field) unless ``document`` fits ``schema``."""
    schema = manifest_schema() if schema is None else schema
    _Validator(schema).check(schema, document, "")
