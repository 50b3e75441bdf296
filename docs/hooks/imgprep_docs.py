"""The documentation site's build hook (mkdocs.yml, `hooks:`): what pages include or generate.

A page under docs/ asks for content with a directive, an HTML comment alone on its line:

    <!-- imgprep:include RELIABILITY.md -->       the repository's file, links made site links
    What GitHub shows in its place (a link to the file).
    <!-- imgprep:end -->
    <!-- imgprep:include CONTRIBUTING.md optional -->   ...the text between stays if it is absent
    <!-- imgprep:settings -->                     the settings reference, from the settings model
    <!-- imgprep:cli -->                          every command's --help, from the click group
    <!-- imgprep:schemas -->                      the JSON Schemas of schemas/

Included files stay where they are (RELIABILITY.md, SECURITY.md, BENCHMARKS.md, CHANGELOG.md and
README.md are read in place, never copied). Their links are relative to the repository: a link to
another included file becomes a link to the page that includes it, a link into docs/ a link to
that page, and a link to anything else (a module, schemas/) keeps its text and loses its target,
since the site has no such page. What is left is checked by mkdocs' own validation (strict).
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cli_reference
import schemas_reference
import settings_reference

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"

# <!-- imgprep:NAME [ARGUMENT] [optional] -->
DIRECTIVE = re.compile(
    r"^<!-- imgprep:(?P<name>[\w-]+)(?: (?P<argument>[^ ]+))?(?P<optional> optional)? -->\s*$"
)
END = "<!-- imgprep:end -->"
# inline code first (kept as it is), then a Markdown link or image
LINK = re.compile(r"(?P<code>`+[^`]*`+)|(?P<bang>!?)\[(?P<text>[^\]]*)\]\((?P<target>[^)\s]+)\)")
FENCE = re.compile(r"^\s*(```|~~~)")
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)  # http:, mailto:, ...


class DirectiveError(Exception):
    """A directive this hook does not know, or a file it must include and cannot find."""


# repository file → the docs page (its path under docs/) that includes it; set by on_files
_included_by: dict[str, str] = {}


def included_by(docs: Path = DOCS) -> dict[str, str]:
    """Which page includes each repository file, read from the pages' include directives."""
    found: dict[str, str] = {}
    for page in sorted(docs.rglob("*.md")):
        for line in page.read_text().splitlines():
            match = DIRECTIVE.match(line)
            if match and match["name"] == "include" and match["argument"]:
                found[match["argument"]] = page.relative_to(docs).as_posix()
    return found


def site_target(target: str, source: str, page: str, pages: dict[str, str]) -> str | None:
    """Where a link written in repository file `source` goes on the site, seen from `page`
    (a path under docs/); None when the site has no page for it."""
    if EXTERNAL.match(target) or target.startswith(("#", "/")):
        return target
    path, hash_, fragment = target.partition("#")
    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(source), path))
    if resolved in pages:
        destination = pages[resolved]
    elif resolved.startswith("docs/") and resolved.endswith(".md"):
        destination = resolved.removeprefix("docs/")
    else:
        return None
    if destination == page:
        relative = ""
    else:
        relative = posixpath.relpath(destination, posixpath.dirname(page) or ".")
    return f"{relative}{hash_}{fragment}" or "#"


def rewrite_links(text: str, source: str, page: str, pages: dict[str, str]) -> str:
    """`text` (the Markdown of repository file `source`) with its links made site links."""

    def replace(match: re.Match[str]) -> str:
        if match["code"]:
            return match[0]
        target = site_target(match["target"], source, page, pages)
        if target is None:
            return match["text"]
        return f"{match['bang']}[{match['text']}]({target})"

    lines = []
    fenced = False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
        lines.append(line if fenced else LINK.sub(replace, line))
    return "\n".join(lines) + "\n"


def expand(markdown: str, page: str, pages: dict[str, str], root: Path = ROOT) -> str:
    """The page's Markdown with every directive replaced by what it asks for."""
    out: list[str] = []
    lines = iter(markdown.splitlines())
    for line in lines:
        match = DIRECTIVE.match(line)
        if match is None:
            out.append(line)
        elif match["name"] == "include" and match["argument"]:
            out.extend(include(match, lines, page, pages, root))
        elif match["name"] in GENERATED:
            out.append(GENERATED[match["name"]](root))
        else:
            raise DirectiveError(f"docs/{page}: unknown directive {line.strip()}")
    return "\n".join(out) + "\n"


GENERATED: dict[str, Callable[[Path], str]] = {
    "settings": lambda root: settings_reference.render(),
    "cli": lambda root: cli_reference.render(),
    "schemas": lambda root: schemas_reference.render(root / "schemas"),
}


def include(
    match: re.Match[str], lines: Iterator[str], page: str, pages: dict[str, str], root: Path
) -> list[str]:
    """The file an include directive names, its links rewritten; or, when it is optional and
    absent, the lines up to the directive's end (what GitHub shows too)."""
    fallback = []
    for inner in lines:
        if inner.strip() == END:
            break
        fallback.append(inner)
    else:
        raise DirectiveError(f"docs/{page}: {match[0].strip()} has no {END}")
    name = match["argument"]
    path = root / name
    if path.is_file():
        return [rewrite_links(path.read_text(), name, page, pages)]
    if match["optional"]:
        return fallback
    raise DirectiveError(f"docs/{page} includes {name}, which does not exist")


def on_files(files: Any, config: Any) -> Any:
    """Learn which page includes which repository file, before any page is rendered."""
    _included_by.clear()
    _included_by.update(included_by(Path(config["docs_dir"])))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    return expand(markdown, page.file.src_uri, _included_by)
