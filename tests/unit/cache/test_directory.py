"""A cache entry counts only while its record describes the very file beside it; whatever else
is found under an entry's names is repaired by the next holder under the lock. Real files, real
qemu-img, a file:// source; locks in memory (tests.fakes)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from domain.cache.directory import ImageCache, cache_key
from domain.cache.fetch import fetch_image
from domain.cache.staging import FetchOptions
from domain.core.models import ImageSource
from domain.core.publish import record_path
from domain.core.runner import Limits, Runner
from tests.conftest import write_raw_image
from tests.fakes.locks import InMemoryLocks
from tests.unit.cache.test_download import Policy

MiB = 2**20


class Fetcher:
    """fetch_to_cache of one image from a file under `root`, into a cache under `root`."""

    def __init__(self, root: Path, runner: Runner) -> None:
        self.sources = root / "sources"
        self.sources.mkdir()
        self.cache = ImageCache(root / "cache")
        self.cache.root.mkdir()
        self.runner = runner
        self.locks = InMemoryLocks(wait=2)
        self.source_file = write_raw_image(
            self.sources / "image.raw", size=4 * MiB, data=os.urandom(64 * 1024)
        )
        self.source = ImageSource(url=f"file://{self.source_file}", image_id="image-1")
        self.entry = self.cache.entry(cache_key("image-1"))

    def fetch(self) -> None:
        fetch_image(
            self.source,
            cache=self.cache,
            options=FetchOptions(policy=Policy(file_roots=(self.sources,)), limits=Limits()),
            runner=self.runner,
            locks=self.locks,
        )

    def names(self) -> list[str]:
        return sorted(p.name for p in self.cache.root.iterdir())

    def intact(self) -> bool:
        record = self.cache.lookup(self.entry.name)
        digest = hashlib.sha256(self.entry.read_bytes()).hexdigest()
        return (
            record is not None
            and record.image.source_sha256 == digest
            and digest == hashlib.sha256(self.source_file.read_bytes()).hexdigest()
            and self.names() == [self.entry.name, self.entry.name + ".json"]
        )


@pytest.fixture
def fetcher(tmp_path: Path, runner: Runner) -> Fetcher:
    made = Fetcher(tmp_path, runner)
    made.fetch()
    assert made.intact()
    return made


def test_a_record_names_its_image_by_size_and_inode(fetcher: Fetcher) -> None:
    record = json.loads(record_path(fetcher.entry).read_text())
    stat = fetcher.entry.stat()
    assert record["file"] == {"size": stat.st_size, "inode": stat.st_ino}


def test_an_image_without_its_record_is_absent_and_repaired(fetcher: Fetcher) -> None:
    # Given an entry whose record is gone (a crash of the cache manager between its removals)
    record_path(fetcher.entry).unlink()
    # Then readers do not see it, and the next fetch publishes it again, whole
    assert fetcher.cache.lookup(fetcher.entry.name) is None
    fetcher.fetch()
    assert fetcher.intact()


def test_a_record_without_its_image_is_absent_and_repaired(fetcher: Fetcher) -> None:
    # Given a record whose image never followed (a crash between the two renames)
    fetcher.entry.unlink()
    assert fetcher.cache.lookup(fetcher.entry.name) is None
    fetcher.fetch()
    assert fetcher.intact()


def test_a_record_whose_size_disagrees_is_absent_and_repaired(fetcher: Fetcher) -> None:
    # Given an image cut short under its record (a partial file in the entry's place)
    with open(fetcher.entry, "r+b") as handle:
        handle.truncate(MiB)
    assert fetcher.cache.lookup(fetcher.entry.name) is None
    fetcher.fetch()
    assert fetcher.intact()


def test_a_record_whose_inode_disagrees_is_absent_and_repaired(fetcher: Fetcher) -> None:
    # Given another file of the same size swapped in under the record
    swapped = fetcher.entry.with_name("swapped")
    shutil.copyfile(fetcher.entry, swapped)
    os.replace(swapped, fetcher.entry)
    assert fetcher.cache.lookup(fetcher.entry.name) is None
    fetcher.fetch()
    assert fetcher.intact()


def test_an_unreadable_record_is_absent_and_repaired(fetcher: Fetcher) -> None:
    record_path(fetcher.entry).write_text("{not json")
    assert fetcher.cache.lookup(fetcher.entry.name) is None
    fetcher.fetch()
    assert fetcher.intact()


def test_a_record_written_before_stamps_is_still_trusted(fetcher: Fetcher) -> None:
    # Given a record from before records named their file (an upgrade keeps its cache)
    record = json.loads(record_path(fetcher.entry).read_text())
    del record["file"]
    record_path(fetcher.entry).write_text(json.dumps(record))
    # Then the entry is still there for readers (overlays use it)
    assert fetcher.cache.lookup(fetcher.entry.name) is not None


def test_every_holder_s_stale_temporaries_are_removed_by_the_next_one(
    tmp_path: Path, runner: Runner
) -> None:
    # Given what dead holders left: temporaries of several fences, and of the earlier version
    fetcher = Fetcher(tmp_path, runner)
    name = fetcher.entry.name
    leftovers = [
        f"{name}.part.7",
        f"{name}.json.part.7",
        f"{name}.converted.8",
        f"{name}.part",
        f"{name}.converted",
        f"{name}.json.part",
    ]
    for leftover in leftovers:
        (fetcher.cache.root / leftover).write_bytes(b"half a file")
    # When the image is fetched
    fetcher.fetch()
    # Then only the entry and its record are left
    assert fetcher.intact()
