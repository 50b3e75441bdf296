"""One name per step: the task `imgprep.<name>`, its module `tasks/steps/<name>.py` (or
`tasks/operations/<name>.py`) and the domain function it calls, `<name>`; the disk steps of the
file backends share one body (tasks.disk_steps), each with its own backend."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from types import ModuleType

import pytest

import tasks.operations
import tasks.steps
from domain.disks.backends import BACKENDS
from tasks.canvases import DISK_STEPS
from worker.app.application import app, task_modules


def modules(package: ModuleType) -> list[ModuleType]:
    return [
        importlib.import_module(f"{package.__name__}.{info.name}")
        for info in pkgutil.iter_modules(package.__path__)
    ]


STEPS = modules(tasks.steps)
OPERATIONS = modules(tasks.operations)


def short(module: ModuleType) -> str:
    return module.__name__.rsplit(".", 1)[1]


@pytest.mark.parametrize("module", STEPS + OPERATIONS, ids=short)
def test_each_task_module_holds_the_task_of_its_name(module: ModuleType) -> None:
    name = short(module)
    task = getattr(module, name)
    assert task.name == f"imgprep.{name}"
    defined = [
        str(value.name)
        for value in vars(module).values()
        if hasattr(value, "apply_async") and str(value.name).startswith("imgprep.")
    ]
    assert defined == [f"imgprep.{name}"], "one task per module"


# step name → the file backend whose disk it makes, as the canvases choose it
FILE_DISK_STEPS = {
    name.removeprefix("imgprep."): backend
    for backend, name in DISK_STEPS.items()
    if backend in BACKENDS
}


@pytest.mark.parametrize("module", [m for m in STEPS if short(m) not in FILE_DISK_STEPS], ids=short)
def test_each_step_calls_the_domain_function_of_its_name(module: ModuleType) -> None:
    name = short(module)
    domain_modules = [
        value
        for value in vars(module).values()
        if inspect.ismodule(value) and value.__name__.startswith("domain.")
    ]
    owners = [m.__name__ for m in domain_modules if inspect.isfunction(getattr(m, name, None))]
    assert len(owners) == 1, f"{module.__name__} calls no domain function named {name}"
    assert f"{owners[0].rsplit('.', 1)[1]}.{name}(" in inspect.getsource(module)


@pytest.mark.parametrize(("step", "backend"), FILE_DISK_STEPS.items())
def test_each_file_disk_step_makes_the_disk_of_its_backend(step: str, backend: str) -> None:
    assert sorted(FILE_DISK_STEPS) == ["copy_raw_disk", "create_overlay"]
    source = inspect.getsource(importlib.import_module(f"tasks.steps.{step}"))
    assert f'disk_steps.create_file_disk(self, "{backend}", fetched, request)' in source


def test_the_app_registers_exactly_the_task_modules() -> None:
    for name in task_modules():  # what a worker imports from the app's include list
        importlib.import_module(name)
    registered = {name for name in app.tasks if name.startswith("imgprep.")}
    expected = {f"imgprep.{short(m)}" for m in STEPS + OPERATIONS} | {"imgprep.ping"}
    assert registered == expected
    assert set(task_modules()) == {m.__name__ for m in STEPS + OPERATIONS} | {"tasks.ping"}
