"""The settings reference (docs/settings.md): every setting of the model, rendered at build time.

Read from the pydantic model itself (`Settings` and its groups: names, types, defaults, and each
field's docstring as its description), so the page cannot drift from the code. The one import
of the settings model is below: if the module moves, change it there.
"""

from __future__ import annotations

import json
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import annotated_types
from pydantic import BaseModel, IPvAnyNetwork, SecretStr
from pydantic.fields import FieldInfo

from worker.settings import ENV_PREFIX, NESTED_DELIMITER, Settings

MODEL: type[BaseModel] = Settings  # what the reference documents

_SCALARS: dict[Any, str] = {
    str: "string",
    int: "integer",
    float: "number",
    bool: "boolean",
    Path: "path",
    SecretStr: "string (secret)",
    IPvAnyNetwork: "network (CIDR)",
}


@dataclass(frozen=True)
class Setting:
    """One setting: where it is set, what it takes, what it is without being set."""

    toml_key: str  # "lock.lease_seconds" ([lock] lease_seconds in the TOML file)
    env: str  # IMGPREP_LOCK__LEASE_SECONDS
    type: str
    default: str  # as TOML would write it
    description: str


@dataclass(frozen=True)
class Group:
    """A [group] of the TOML file (None: the top-level settings) and its settings."""

    name: str | None
    description: str
    settings: tuple[Setting, ...]


def is_group(field: FieldInfo) -> bool:
    return isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)


def groups(model: type[BaseModel] = MODEL) -> list[Group]:
    """The top-level settings first, then each group in the model's order."""
    top = tuple(
        setting(name, None, field)
        for name, field in model.model_fields.items()
        if not is_group(field)
    )
    found = [Group(None, "Settings outside any group.", top)]
    for name, field in model.model_fields.items():
        if is_group(field):
            group_model = typing.cast(type[BaseModel], field.annotation)
            found.append(
                Group(
                    name,
                    one_line(group_model.__doc__ or ""),
                    tuple(setting(sub, name, f) for sub, f in group_model.model_fields.items()),
                )
            )
    return found


def all_settings(model: type[BaseModel] = MODEL) -> list[Setting]:
    return [s for group in groups(model) for s in group.settings]


def setting(name: str, group: str | None, field: FieldInfo) -> Setting:
    key = f"{group}.{name}" if group else name
    env = ENV_PREFIX + (f"{group}{NESTED_DELIMITER}{name}" if group else name).upper()
    return Setting(
        toml_key=key,
        env=env,
        type=type_name(field.annotation, field.metadata),
        default=default_text(field),
        description=one_line(field.description or ""),
    )


def one_line(text: str) -> str:
    """A docstring as one paragraph (its line breaks and indentation joined)."""
    return " ".join(text.split())


def type_name(annotation: Any, metadata: list[Any]) -> str:
    """A reader's name of a field's type, with its bounds (`number > 0`)."""
    origin = typing.get_origin(annotation)
    arguments = typing.get_args(annotation)
    if origin is typing.Annotated:
        return type_name(arguments[0], [*arguments[1:], *metadata])
    if origin is typing.Literal:
        return "one of " + ", ".join(f"`{value}`" for value in arguments)
    if origin in (typing.Union, types.UnionType):
        named = [type_name(a, []) for a in arguments if a is not type(None)]
        optional = len(named) < len(arguments)
        return " or ".join(named) + (", or unset" if optional else "")
    if origin is tuple:
        return f"list of {type_name(arguments[0], [])}"
    name = _SCALARS.get(annotation) or str(getattr(annotation, "__name__", annotation))
    return name + bounds(metadata)


def bounds(metadata: list[Any]) -> str:
    found = []
    for item in metadata:
        constraints = getattr(item, "metadata", [item])  # a FieldInfo carries its own
        for constraint in constraints:
            if isinstance(constraint, annotated_types.Gt):
                found.append(f" > {constraint.gt}")
            elif isinstance(constraint, annotated_types.Ge):
                found.append(f" ≥ {constraint.ge}")
            elif isinstance(constraint, annotated_types.Lt):
                found.append(f" < {constraint.lt}")
            elif isinstance(constraint, annotated_types.Le):
                found.append(f" ≤ {constraint.le}")
    return ",".join(found)


def default_text(field: FieldInfo) -> str:
    factory = field.default_factory
    if factory is not None:  # computed where it runs: say by what
        return f"{factory.__module__.lstrip('_')}.{factory.__qualname__}()"
    return toml_value(field.default)


def toml_value(value: Any) -> str:
    """A default as the TOML file writes it (`""`, `30.0`, `["http", "https"]`, `true`)."""
    if value is None:
        return "(unset)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, SecretStr):
        return json.dumps(value.get_secret_value())
    if isinstance(value, tuple | list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    return json.dumps(str(value))


def cell(text: str) -> str:
    return text.replace("|", "\\|")


def render(model: type[BaseModel] = MODEL) -> str:
    """The reference as Markdown: one table per group."""
    lines: list[str] = []
    for group in groups(model):
        title = f"`[{group.name}]`" if group.name else "Top level"
        lines += [f"## {title}", "", group.description, ""]
        lines += ["| Setting | Type | Default | Description |", "| --- | --- | --- | --- |"]
        for s in group.settings:
            where = f"`{s.toml_key}`<br>`{s.env}`"
            default = f"`{cell(s.default)}`"
            lines.append(f"| {where} | {cell(s.type)} | {default} | {cell(s.description)} |")
        lines.append("")
    return "\n".join(lines)
