"""File store: atomic, durable, never overwriting, confined to its root."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from storage.errors import InputError, OutOfSpaceError, StorageError
from storage.filestore import FileStore, atomic_write, valid_uid


def test_write_instance_layout_and_hash(filestore: FileStore) -> None:
    data = [b"DICM" * 100, b"tail"]
    f = filestore.write_instance("1.2", "1.2.3", "1.2.3.4", data)
    assert f.relpath == "1.2/1.2.3/1.2.3.4.dcm"
    assert f.path.read_bytes() == b"".join(data)
    assert f.sha256 == hashlib.sha256(b"".join(data)).hexdigest()
    assert f.size == 404
    assert filestore.spool_path(f.relpath) == f.path


def test_existing_instance_is_never_overwritten(filestore: FileStore) -> None:
    filestore.write_instance("1.2", "1.2.3", "1.2.3.4", [b"first"])
    with pytest.raises(FileExistsError):
        filestore.write_instance("1.2", "1.2.3", "1.2.3.4", [b"second"])
    assert (filestore.spool / "1.2/1.2.3/1.2.3.4.dcm").read_bytes() == b"first"
    assert not list((filestore.spool / ".tmp").iterdir())  # no staging file left behind


def test_failed_write_leaves_nothing(filestore: FileStore) -> None:
    def chunks():  # type: ignore[no-untyped-def]
        yield b"partial"
        raise RuntimeError("peer vanished")

    with pytest.raises(RuntimeError):
        filestore.write_instance("1.2", "1.2.3", "1.2.3.5", chunks())
    assert not (filestore.spool / "1.2/1.2.3/1.2.3.5.dcm").exists()
    assert not list((filestore.spool / ".tmp").iterdir())


def test_partials_from_a_crash_are_removed(filestore: FileStore) -> None:
    leftover = filestore.spool / ".tmp" / ".part-abc"
    leftover.write_bytes(b"half")
    assert filestore.remove_partials() == [leftover]
    assert not leftover.exists()


@pytest.mark.parametrize("uid", ["", "../etc", "1.2/3", "1..2", "01.2", "1.2.", "1" * 65, "a.b"])
def test_bad_uids_are_refused(filestore: FileStore, uid: str) -> None:
    with pytest.raises(InputError):
        filestore.write_instance("1.2", "1.2.3", uid, [b"x"])


@given(st.lists(st.integers(min_value=0, max_value=10**12), min_size=2, max_size=8))
def test_uid_grammar(parts: list[int]) -> None:
    uid = ".".join(str(p) for p in parts)
    assert valid_uid(uid) == (len(uid) <= 64)


def test_quarantine_keeps_each_distinct_version(filestore: FileStore) -> None:
    a = filestore.write_quarantine("1.2.3", [b"version a"])
    b = filestore.write_quarantine("1.2.3", [b"version b"])
    again = filestore.write_quarantine("1.2.3", [b"version a"])
    assert a.path != b.path and again.path == a.path
    assert sorted(p.read_bytes() for p in filestore.quarantine.iterdir()) == [
        b"version a", b"version b"]


def test_free_space_floor(data_dir: Path) -> None:
    store = FileStore(data_dir, min_free_mb=0)
    store.check_space(1024)
    huge = FileStore(data_dir, min_free_mb=10**9)  # a floor no disk meets
    with pytest.raises(OutOfSpaceError, match="below the floor"):
        huge.check_space()


def test_paths_cannot_escape(filestore: FileStore) -> None:
    with pytest.raises(StorageError):
        filestore.spool_path("../../etc/passwd")
    with pytest.raises(StorageError):
        filestore.result_path("/etc/passwd")


def test_atomic_overwrite_for_results(filestore: FileStore) -> None:
    f1 = filestore.write_result(7, "SEG", "1.2.3", b"one")
    f2 = filestore.write_result(7, "SEG", "1.2.3", b"two")
    assert f1.path == f2.path and f2.path.read_bytes() == b"two"


def test_atomic_write_sets_content_before_name(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "f.bin"
    size, _ = atomic_write(target, [b"x" * 10])
    assert size == 10 and target.read_bytes() == b"x" * 10
    assert [p.name for p in target.parent.iterdir()] == ["f.bin"]
    assert os.stat(target).st_nlink == 1
