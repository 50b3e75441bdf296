"""The wire contract as files: a JSON Schema per wire model and the table of operations.

`imgprep schemas` writes them into `schemas/` (checked in); a test fails when the files drift
from the models, so a change to the API shows up in review as a change to these files.
Every `WireModel` defined in `domain.core.models` gets a schema; every entry task must be listed in
OPERATIONS with its request and result models.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

from domain.cache import precache_models
from domain.core import models
from domain.core.models import WireModel
from domain.formats import snapshot_models
from worker.app.routing import DEFAULT_QUEUE

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
REPO_SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"

# task name → (request model, result model): what a control plane sends and gets back
OPERATIONS: dict[str, tuple[type[WireModel], type[WireModel]]] = {
    "imgprep.prepare_disk": (models.PrepareRequest, models.PreparedDisk),
    "imgprep.delete_disk": (models.DeleteDiskRequest, models.DeletedDisk),
    "imgprep.evict_cache": (models.EvictCacheRequest, models.CacheEvictionReport),
    "imgprep.snapshot": (snapshot_models.SnapshotRequest, snapshot_models.ConvertedImage),
    "imgprep.precache": (precache_models.PrecacheRequest, precache_models.PrecacheReport),
}

# The modules whose wire models are published as schemas.
WIRE_MODULES = (models, snapshot_models, precache_models)


def wire_models() -> list[type[WireModel]]:
    """Every wire model of the WIRE_MODULES, by name."""
    found = [
        value
        for module in WIRE_MODULES
        for value in vars(module).values()
        if inspect.isclass(value)
        and issubclass(value, WireModel)
        and value is not WireModel
        and value.__module__ == module.__name__
    ]
    return sorted(found, key=lambda model: model.__name__)


def model_schema(model: type[WireModel]) -> dict[str, Any]:
    schema = model.model_json_schema(mode="validation")
    return {"$schema": SCHEMA_DIALECT, "$id": f"{model.__name__}.json", **schema}


def operations_document() -> dict[str, Any]:
    return {
        "description": "imgprep operations: send the task by name to the queue with the request "
        "as its one positional argument (JSON); the result is stored under the same task id.",
        "operations": {
            name: {
                "queue": DEFAULT_QUEUE,
                "request": f"{request.__name__}.json",
                "result": f"{result.__name__}.json",
            }
            for name, (request, result) in sorted(OPERATIONS.items())
        },
    }


def rendered() -> dict[str, str]:
    """File name → content of every file of the schemas directory."""
    files = {f"{m.__name__}.json": _dump(model_schema(m)) for m in wire_models()}
    files["operations.json"] = _dump(operations_document())
    return files


def write(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in rendered().items():
        path = directory / name
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
            written.append(path)
    for stale in sorted(set(p.name for p in directory.glob("*.json")) - set(rendered())):
        (directory / stale).unlink()
        written.append(directory / stale)
    return written


def drift(directory: Path) -> list[str]:
    """Names of files that are missing, different or extra in `directory`."""
    expected = rendered()
    present = {p.name for p in directory.glob("*.json")} if directory.is_dir() else set()
    changed = [
        name
        for name, text in expected.items()
        if name not in present or (directory / name).read_text(encoding="utf-8") != text
    ]
    return sorted(changed + list(present - set(expected)))


def _dump(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
