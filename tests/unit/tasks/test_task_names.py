"""One name per step: the task `imgprep.<name>`, its module `tasks/steps/<name>.py` (or
`tasks/operations/<name>.py`) and the domain function it calls, `<name>`."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from types import ModuleType

import pytest

import tasks.operations
import tasks.steps
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


@pytest.mark.parametrize("module", STEPS, ids=short)
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


def test_the_app_registers_exactly_the_task_modules() -> None:
    for name in task_modules():  # what a worker imports from the app's include list
        importlib.import_module(name)
    registered = {name for name in app.tasks if name.startswith("imgprep.")}
    expected = {f"imgprep.{short(m)}" for m in STEPS + OPERATIONS} | {"imgprep.ping"}
    assert registered == expected
    assert set(task_modules()) == {m.__name__ for m in STEPS + OPERATIONS} | {"tasks.ping"}
