"""The JSON Schemas of the wire contract (schemas/) as a page: the operations, then each model
with a table of its fields and the file itself, read from schemas/ at build time."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

OPERATIONS = "operations.json"


def anchor(model: str) -> str:
    """The heading id of a model's section (the toc extension's slug of its name)."""
    return model.lower()


def link(model: str, known: set[str]) -> str:
    return f"[`{model}`](#{anchor(model)})" if model in known else f"`{model}`"


def type_of(schema: dict[str, Any], known: set[str]) -> str:
    """A short reading of a property's schema: `string`, `integer ≥ 1 ≤ 255`, `list of X`, ..."""
    if "$ref" in schema:
        return link(schema["$ref"].rsplit("/", 1)[-1], known)
    if "const" in schema or "enum" in schema:
        values = [schema["const"]] if "const" in schema else schema["enum"]
        words = ", ".join(f"`{json.dumps(value)}`" for value in values)
        return words if len(values) == 1 else f"one of {words}"
    for combinator in ("anyOf", "oneOf"):
        if combinator in schema:
            return " or ".join(type_of(option, known) for option in schema[combinator])
    kind = schema.get("type", "any")
    if kind in ("array", "null"):
        return f"list of {type_of(schema.get('items', {}), known)}" if kind == "array" else "`null`"
    limits = [
        f"{word} {schema[key]}"
        for key, word in (("minimum", "≥"), ("maximum", "≤"), ("maxLength", "length ≤"))
        if key in schema
    ]
    return " ".join([str(kind), *limits])


def collapsed(title: str, text: str) -> list[str]:
    """A JSON file as a collapsed block (pymdownx.details) titled with its name."""
    return [
        f'??? note "{title}"',
        "",
        textwrap.indent(f"```json\n{text.rstrip()}\n```", "    "),
        "",
    ]


def cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def model_section(name: str, text: str, known: set[str]) -> list[str]:
    schema = json.loads(text)
    required = set(schema.get("required", []))
    lines = [f"### {name}", "", cell(schema.get("description", "")), ""]
    properties: dict[str, dict[str, Any]] = schema.get("properties", {})
    if properties:
        lines += [
            "| Field | Type | Required | Default | Description |",
            "| --- | --- | --- | --- | --- |",
        ]
        for field, spec in properties.items():
            default = f"`{json.dumps(spec['default'])}`" if "default" in spec else ""
            lines.append(
                f"| `{field}` | {cell(type_of(spec, known))} | {'yes' if field in required else ''}"
                f" | {cell(default)} | {cell(spec.get('description', ''))} |"
            )
        lines.append("")
    return lines + collapsed(f"schemas/{name}.json", text)


def render(directory: Path) -> str:
    """The operations table, then every model's section, in name order."""
    files = {path.name: path.read_text() for path in sorted(directory.glob("*.json"))}
    if OPERATIONS not in files:
        raise FileNotFoundError(f"{directory / OPERATIONS} is missing")
    known = {name.removesuffix(".json") for name in files if name != OPERATIONS}
    operations = json.loads(files[OPERATIONS])
    lines = [
        "## Operations",
        "",
        cell(operations.get("description", "")),
        "",
        "| Task | Queue | Request | Result |",
        "| --- | --- | --- | --- |",
    ]
    for task, spec in operations["operations"].items():
        request, result = (spec[key].removesuffix(".json") for key in ("request", "result"))
        lines.append(
            f"| `{task}` | `{spec['queue']}` | {link(request, known)} | {link(result, known)} |"
        )
    lines += ["", *collapsed(f"schemas/{OPERATIONS}", files[OPERATIONS]), "## Models", ""]
    for name in sorted(known):
        lines += model_section(name, files[f"{name}.json"], known)
    return "\n".join(lines)
