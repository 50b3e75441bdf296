"""The documentation names real things: every setting is in the settings reference, every
command and schema on its page, and every repository path, test, module and setting the pages
write in backticks exists (so a module that moves, or a test renamed, fails here until the
docs follow). The site itself is built by scripts/test.sh (`mkdocs build --strict`)."""

from __future__ import annotations

import re
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from pydantic import BaseModel

ROOT = Path(__file__).resolve().parents[2]
HOOKS = ROOT / "docs" / "hooks"
sys.path.insert(0, str(HOOKS))  # as mkdocs loads its hooks: by name, from their directory

import cli_reference  # noqa: E402
import imgprep_docs  # noqa: E402
import schemas_reference  # noqa: E402
import settings_reference  # noqa: E402

# The pages whose paths are checked: the front page, the site's own pages, and the repository's
# documents the site includes as they are (the changelog names what no longer exists, on purpose).
CHECKED = [
    ROOT / "README.md",
    *sorted((ROOT / "docs").rglob("*.md")),
    ROOT / "RELIABILITY.md",
    ROOT / "SECURITY.md",
    ROOT / "BENCHMARKS.md",
]
PACKAGES = ("domain", "worker", "tasks", "helper", "bench", "tests")
NOT_IN_THE_REPOSITORY = {"site", "build", "dist", "artifacts"}  # build outputs, git-ignored


def settings_fields() -> Iterator[tuple[str, str, str]]:
    """(TOML key, environment variable, description) of every setting, read from the model
    itself, independently of the reference's generator."""
    model = settings_reference.MODEL
    for name, field in model.model_fields.items():
        group = field.annotation
        if isinstance(group, type) and issubclass(group, BaseModel):
            for sub, subfield in group.model_fields.items():
                env = f"IMGPREP_{name.upper()}__{sub.upper()}"
                yield f"{name}.{sub}", env, subfield.description or ""
        else:
            yield name, f"IMGPREP_{name.upper()}", field.description or ""


# --- the settings reference -------------------------------------------------------------------


def test_every_setting_has_a_description() -> None:
    undescribed = [key for key, _, description in settings_fields() if not description.strip()]
    assert undescribed == [], "give each a docstring in the settings model"


def missing_from(page: str) -> list[str]:
    """The settings a rendered reference does not name with its variable and description."""
    return [
        key
        for key, env, description in settings_fields()
        if f"`{key}`<br>`{env}`" not in page or " ".join(description.split()) not in page
    ]


def test_the_settings_reference_names_every_setting_with_its_variable() -> None:
    assert missing_from(settings_reference.render()) == []


def test_a_setting_missing_from_the_reference_is_noticed(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a generator that leaves one setting out
    complete = settings_reference.groups

    def without_wait(
        model: type[BaseModel] = settings_reference.MODEL,
    ) -> list[settings_reference.Group]:
        return [
            replace(g, settings=tuple(s for s in g.settings if s.toml_key != "lock.wait_seconds"))
            for g in complete(model)
        ]

    monkeypatch.setattr(settings_reference, "groups", without_wait)
    # Then the check names it
    assert missing_from(settings_reference.render()) == ["lock.wait_seconds"]


def test_the_reference_gives_each_default_as_config_imgprep_toml_writes_it() -> None:
    # The defaults on the page parse as TOML and equal the documented file's values.
    documented = tomllib.loads((ROOT / "config" / "imgprep.toml").read_text())
    compared = 0
    for setting in settings_reference.all_settings():
        if setting.default.startswith("(") or setting.default.endswith("()"):
            continue  # unset (broker_url) or computed where it runs (host_id)
        group, _, name = setting.toml_key.rpartition(".")
        expected = documented[group][name] if group else documented[setting.toml_key]
        assert tomllib.loads(f"v = {setting.default}")["v"] == expected, setting.toml_key
        compared += 1
    assert compared > 70


def test_types_read_as_words_with_their_bounds() -> None:
    by_key = {s.toml_key: s for s in settings_reference.all_settings()}
    assert by_key["lock.lease_seconds"].type == "number > 0"
    assert by_key["peer.port"].type == "integer ≥ 1, ≤ 65535"
    assert by_key["mount.kernel_mount"].type == "one of `never`, `fallback`, `always`"
    assert by_key["broker_url"].type == "string, or unset"
    assert by_key["fetch.denied_networks"].type == "list of network (CIDR)"
    assert by_key["host_id"].default == "socket.gethostname()"


# --- the generated references -------------------------------------------------------------------


def test_the_command_reference_has_every_command() -> None:
    names = [name for name, _ in cli_reference.commands()]
    assert {"imgprep worker", "imgprep prepare", "imgprep status", "imgprep cache evict"} <= set(
        names
    )
    page = cli_reference.render()
    assert all(f"### `{name}`" in page for name in names)
    assert str(ROOT) not in page  # the checkout's own path is not published


def test_the_schemas_page_shows_every_schema_file() -> None:
    page = schemas_reference.render(ROOT / "schemas")
    for path in (ROOT / "schemas").glob("*.json"):
        assert f'??? note "schemas/{path.name}"' in page, path.name
    assert "| `imgprep.prepare_disk` | `imgprep` | [`PrepareRequest`](#preparerequest) |" in page


def test_the_wire_contract_page_lists_every_operation() -> None:
    from worker.app.wire_schemas import OPERATIONS

    page = (ROOT / "docs" / "wire-contract.md").read_text()
    for name in OPERATIONS:
        assert f"`{name}`" in page, f"docs/wire-contract.md lacks {name}"


# --- the hook: includes and their links ---------------------------------------------------------

PAGES = {"RELIABILITY.md": "reliability-evidence.md", "README.md": "index.md"}


@pytest.mark.parametrize(
    ("target", "page", "expected"),
    [
        ("RELIABILITY.md", "index.md", "reliability-evidence.md"),  # an included file: its page
        ("RELIABILITY.md#figures", "sub/x.md", "../reliability-evidence.md#figures"),
        ("README.md#layout", "index.md", "#layout"),  # the page itself
        ("docs/fleet.md#figures", "index.md", "fleet.md#figures"),  # a page of the site
        ("https://semver.org/", "index.md", "https://semver.org/"),
        ("#local", "index.md", "#local"),
        ("schemas/", "index.md", None),  # no page for it: the text stays, the link goes
        ("worker/delivery/broker.py", "index.md", None),
    ],
)
def test_links_of_an_included_file_become_site_links(
    target: str, page: str, expected: str | None
) -> None:
    assert imgprep_docs.site_target(target, "README.md", page, PAGES) == expected


def test_links_in_code_are_left_alone_and_dead_ones_keep_their_text() -> None:
    text = "See [the figures](RELIABILITY.md) and [`schemas/`](schemas/), `[a](b.md)`.\n"
    text += "```\n[x](y.md)\n```\n"
    rewritten = imgprep_docs.rewrite_links(text, "README.md", "index.md", PAGES)
    assert rewritten == (
        "See [the figures](reliability-evidence.md) and `schemas/`, `[a](b.md)`.\n"
        "```\n[x](y.md)\n```\n"
    )


def test_directives_include_generate_or_fail_loudly(tmp_path: Path) -> None:
    (tmp_path / "PRESENT.md").write_text("# Present\n[back](README.md)\n")
    page = "<!-- imgprep:include PRESENT.md -->\nfallback\n<!-- imgprep:end -->\n"
    assert imgprep_docs.expand(page, "p.md", PAGES, tmp_path) == "# Present\n[back](index.md)\n\n"
    optional = "<!-- imgprep:include ABSENT.md optional -->\nfallback\n<!-- imgprep:end -->\n"
    assert imgprep_docs.expand(optional, "p.md", PAGES, tmp_path) == "fallback\n"
    with pytest.raises(imgprep_docs.DirectiveError, match=r"ABSENT\.md, which does not exist"):
        imgprep_docs.expand(optional.replace(" optional", ""), "p.md", PAGES, tmp_path)
    with pytest.raises(imgprep_docs.DirectiveError, match="unknown directive"):
        imgprep_docs.expand("<!-- imgprep:nonsense -->\n", "p.md", PAGES, tmp_path)
    with pytest.raises(imgprep_docs.DirectiveError, match="has no"):
        imgprep_docs.expand("<!-- imgprep:include PRESENT.md -->\n", "p.md", PAGES, tmp_path)


def test_every_repository_document_the_site_shows_is_included_by_one_page() -> None:
    included = imgprep_docs.included_by()
    for document in ("README.md", "RELIABILITY.md", "SECURITY.md", "BENCHMARKS.md", "CHANGELOG.md"):
        assert document in included, f"no page of docs/ includes {document}"


# --- the docs name real things ------------------------------------------------------------------

INLINE_CODE = re.compile(r"(`+)(.+?)\1")
FENCE = re.compile(r"^\s*(```|~~~)")
TEST_REFERENCE = re.compile(r"^(?P<file>[\w./-]+\.py)?::(?P<test>\w+)$")
MODULE = re.compile(rf"^(?:{'|'.join(PACKAGES)})(?:\.\w+)+$")
PLACEHOLDER = re.compile(r"[<>{}*$…|\"'\[\]]|\.\.\.")


def inline_code(text: str) -> Iterator[str]:
    """The words of every inline code span outside fenced blocks, in order."""
    fenced = False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            for span in INLINE_CODE.finditer(line):
                yield from span[2].split()


def top_level() -> set[str]:
    return {
        p.name
        for p in ROOT.iterdir()
        if not p.name.startswith(".")
        and p.name not in NOT_IN_THE_REPOSITORY
        and not p.name.endswith(".egg-info")
    }


def defines(path: Path, name: str) -> bool:
    pattern = rf"^\s*(?:async\s+)?(?:def|class)\s+{name}\b|^{name}\s*[:=]"
    return re.search(pattern, path.read_text(), re.MULTILINE) is not None


def module_exists(dotted: str) -> bool:
    """`domain.cache.fetch`, or `domain.cache.fetch.fetch_to_cache`: a module, and at most two
    names defined in it (a function, a class, a class's attribute)."""
    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        base = ROOT.joinpath(*parts[:split])
        module = base.with_suffix(".py")
        if not module.is_file():
            module = base / "__init__.py"
        if module.is_file():
            rest = parts[split:]
            return len(rest) <= 2 and all(defines(module, name) for name in rest)
    return False


def python_sources() -> str:
    """The code imgprep and its tests run, where an `IMGPREP_*` variable that is no setting must
    be read (this file, which names made-up ones, aside)."""
    files = [p for package in PACKAGES for p in (ROOT / package).rglob("*.py")]
    return "\n".join(p.read_text() for p in files if p != Path(__file__).resolve())


@dataclass(frozen=True)
class Known:
    """What exists, to check names against."""

    top: set[str]  # the repository's top-level files and directories
    settings: set[str]  # `lock.wait_seconds`, `cache_dir`
    groups: set[str]  # `lock`
    variables: set[str]  # IMGPREP_LOCK__WAIT_SECONDS
    python: str  # the code, for variables that are no settings (IMGPREP_CONFIG)

    @classmethod
    def read(cls) -> Known:
        fields = list(settings_fields())
        settings = {key for key, _, _ in fields}
        groups = {key.split(".", maxsplit=1)[0] for key in settings if "." in key}
        variables = {env for _, env, _ in fields}
        return cls(top_level(), settings, groups, variables, python_sources())


def files_named(name: str, known: Known) -> list[Path] | None:
    """The files a word names, when it names a path (empty: none exists); None when it is no
    path. `worker/delivery/broker.py`, `schemas/`, `pyproject.toml`; `unit/...` and
    `integration/...` under tests/ (as SECURITY.md writes them); a test file named alone
    (`test_sentinel.py`)."""
    first = name.split("/", maxsplit=1)[0]
    if name.endswith(".py") and "/" not in name:
        return sorted((ROOT / "tests").rglob(name))
    if first in ("unit", "integration") and "/" in name:
        path = ROOT / "tests" / name
    elif first in known.top and ("/" in name or "." in name):
        path = ROOT / name
    else:
        return None
    return [path] if path.exists() else []


def is_real(name: str, known: Known) -> bool | None:
    """Whether a module, setting or `IMGPREP_*` variable exists; None when the word is none."""
    if MODULE.match(name):
        return module_exists(name)
    if "." in name and name.split(".", maxsplit=1)[0] in known.groups:
        return name in known.settings or name.count(".") > 1
    if re.fullmatch(r"IMGPREP_[A-Z0-9_]+", name):
        return name in known.variables or name in known.python
    return None


def unknown_names(text: str) -> list[str]:
    """What a document names in backticks that does not exist: a path, a test (`file::test`,
    or `::test` of a file named before it), a module (`domain.cache.fetch`), a setting
    (`lock.wait_seconds`) or an environment variable (`IMGPREP_*`)."""
    known = Known.read()
    missing: list[str] = []
    named: list[Path] = []  # the Python files named so far, the latest first
    for raw in inline_code(text):
        word = raw.removeprefix("./").rstrip(",;:.)")
        if not word or PLACEHOLDER.search(word) or word.startswith("/"):
            continue
        reference = TEST_REFERENCE.match(word)
        name, test = (reference["file"], reference["test"]) if reference else (word, None)
        candidates = named
        if name is not None:
            files = files_named(name, known)
            if files is None:
                if is_real(name, known) is False:
                    missing.append(word)
                continue
            if not files:
                missing.append(word)
                continue
            named[:0] = [path for path in files if path.suffix == ".py"]
            candidates = files
        if test is not None and not any(defines(path, test) for path in candidates):
            missing.append(word)
    return missing


@pytest.mark.parametrize("document", CHECKED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_path_test_module_and_setting_a_document_names_exists(document: Path) -> None:
    assert unknown_names(document.read_text()) == []


def test_the_check_notices_what_does_not_exist() -> None:
    text = (
        "`worker/delivery/broker.py` `worker/no_such.py` "
        "`tests/unit/test_docs.py::test_no_such_test` "
        "`::test_the_check_notices_what_does_not_exist` `test_redis_outage.py` `test_nope.py` "
        "`domain.cache.fetch.fetch_to_cache` `domain.cache.nope` `lock.wait_seconds` "
        "`lock.wait_secs` `IMGPREP_LOCK__WAIT_SECONDS` `IMGPREP_NOPE` `<cache>/<key>` "
        "`./scripts/test.sh unit` `imgprep.prepare_disk`"
    )
    assert unknown_names(text) == [
        "worker/no_such.py",
        "tests/unit/test_docs.py::test_no_such_test",
        "test_nope.py",
        "domain.cache.nope",
        "lock.wait_secs",
        "IMGPREP_NOPE",
    ]
