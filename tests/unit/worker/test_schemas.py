"""The wire contract's files: schemas/ matches the models, every entry task is listed."""

from __future__ import annotations

import json
from pathlib import Path

from worker.app import app
from worker.app.entry import EntryTask
from worker.app.wire_schemas import OPERATIONS, REPO_SCHEMAS, drift, rendered, wire_models, write


def test_checked_in_schemas_match_the_models() -> None:
    stale = drift(REPO_SCHEMAS)
    assert not stale, f"schemas/ is out of date ({stale}): run `imgprep schemas` and commit"


def test_every_entry_task_is_a_documented_operation() -> None:
    app.loader.import_default_modules()
    entry_tasks = {name for name, task in app.tasks.items() if isinstance(task, EntryTask)}
    assert entry_tasks == set(OPERATIONS)
    page = (Path(__file__).resolve().parents[3] / "docs" / "wire-contract.md").read_text()
    for name, (request, result) in OPERATIONS.items():
        assert f"`{name}`" in page, f"docs/wire-contract.md lacks {name}"
        assert request in wire_models() and result in wire_models()


def test_drift_names_a_changed_missing_or_extra_file(tmp_path: Path) -> None:
    # Given a schemas directory written from the models
    write(tmp_path)
    assert drift(tmp_path) == []
    # When one file is edited, one removed and one added
    (tmp_path / "PrepareRequest.json").write_text("{}\n")
    (tmp_path / "DeletedDisk.json").unlink()
    (tmp_path / "Old.json").write_text("{}\n")
    # Then each is named, and writing again restores exactly the rendered files
    assert drift(tmp_path) == ["DeletedDisk.json", "Old.json", "PrepareRequest.json"]
    write(tmp_path)
    assert sorted(p.name for p in tmp_path.glob("*.json")) == sorted(rendered())
    assert drift(tmp_path) == []


def test_request_schema_names_required_fields_and_forbids_unknown_ones() -> None:
    schema = json.loads(rendered()["PrepareRequest.json"])
    assert schema["$schema"].endswith("2020-12/schema")
    assert set(schema["required"]) == {"image", "disk"}
    assert schema["additionalProperties"] is False
    assert schema["properties"]["api_version"]["const"] == 1
