"""The on-disk layout and the only code that writes into it.

Layout under the data directory::

    spool/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm   received instances, as received
    quarantine/<SOPInstanceUID>.<sha256-prefix>.dcm     conflicting duplicates, kept aside
    results/<job id>/<kind>/<SOPInstanceUID>.dcm        objects the node wrote
    tmp/                                                staging for atomic writes

Why atomic writes (temp file in the same filesystem, fsync, rename, fsync the
directory): a reader, or a node restarted after SIGKILL or power loss, sees a
file either complete or not at all, never half-written; and a C-STORE is only
acknowledged after the rename is durable.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import itertools
import os
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from storage.errors import InputError, OutOfSpaceError, StorageError

__all__ = ["FileStore", "HeldFile", "StoredFile", "atomic_write", "valid_uid", "write_error"]

_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_TMP_PREFIX = ".part-"


def valid_uid(uid: str) -> bool:
    """PS3.5 9.1: digits and dots, no leading zeros, at most 64 characters.

    Also what makes a UID safe as a path component (no '/', no '..').
    """
    return 0 < len(uid) <= 64 and _UID.match(uid) is not None


def write_error(what: str, exc: OSError) -> StorageError:
    """ENOSPC/EDQUOT as OutOfSpaceError (the sender is told Out of Resources, 0xA700,
    and may retry later); every other failure as StorageError."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return OutOfSpaceError(f"{what}: the file system is full")
    return StorageError(f"{what}: {exc.strerror}")


def _owner_only(path: Path) -> None:
    """chmod 0700 a directory this user owns (a data dir made earlier with a looser umask)."""
    with contextlib.suppress(OSError):
        st = path.stat()
        if st.st_uid == os.getuid() and st.st_mode & 0o077:
            path.chmod(0o700)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_tmp_names = itertools.count()


def _staging_name(staging: Path) -> Path:
    """A fresh name in ``staging``: the pid and a per-process counter never repeat while
    the process lives, and a leftover of a dead process is only ever skipped (O_EXCL)."""
    return staging / f"{_TMP_PREFIX}{os.getpid()}-{next(_tmp_names)}"


def _make_dirs(path: Path) -> None:
    """mkdir -p, with each new directory's entry made durable in its parent."""
    missing: list[Path] = []
    p = path
    while not p.is_dir():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):
            d.mkdir()
        _fsync_dir(d.parent)


def atomic_write(
    target: Path,
    chunks: Iterable[bytes | memoryview],
    *,
    tmp_dir: Path | None = None,
    overwrite: bool = False,
    known_dirs: set[Path] | None = None,
) -> tuple[int, str]:
    """Write ``chunks`` to ``target`` atomically and durably; returns (size, sha256 hex).

    ``overwrite=False`` uses link() instead of rename() for the final step, so
    an existing file is never replaced (raises FileExistsError). ``known_dirs``
    is a caller's cache of directories already made (a mkdir per write costs
    more than the write's own system calls); a directory removed behind its
    back is made again.
    """
    size, sha, _ = _write(target, chunks, tmp_dir=tmp_dir, overwrite=overwrite,
                          known_dirs=known_dirs, sync_first=True, hold=False)
    return size, sha


def _write(
    target: Path,
    chunks: Iterable[bytes | memoryview],
    *,
    tmp_dir: Path | None,
    overwrite: bool,
    known_dirs: set[Path] | None,
    sync_first: bool,
    hold: bool,
    sync: bool = True,
) -> tuple[int, str, int | None]:
    """The one write path. ``sync_first``: fsync the staged file before it gets its
    name (what ``atomic_write`` promises); otherwise name it first, then fsync (see
    ``FileStore.write_instance``). ``hold``: return the open descriptor with an
    exclusive flock on the file, taken before it got its name."""
    parent = target.parent
    staging = tmp_dir if tmp_dir is not None else parent
    for d in (staging, parent):
        if known_dirs is None or d not in known_dirs:
            _make_dirs(d)
            if known_dirs is not None:
                known_dirs.add(d)
    while True:
        tmp = _staging_name(staging)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            break
        except FileExistsError:
            continue
    digest = hashlib.sha256()
    size = 0
    keep = False
    try:
        for chunk in chunks:
            view = memoryview(chunk)
            digest.update(view)
            while view:
                n = os.write(fd, view)
                view = view[n:]
                size += n
        if hold:
            fcntl.flock(fd, fcntl.LOCK_EX)
        if sync_first and sync:
            os.fsync(fd)
        try:
            _publish(tmp, target, overwrite)
        except FileNotFoundError:
            # The target directory went away (a clean-up in another process): make it again.
            _make_dirs(parent)
            _publish(tmp, target, overwrite)
        if sync:
            if not sync_first:
                os.fsync(fd)
            _fsync_dir(parent)
        keep = hold
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    finally:
        if not keep:
            os.close(fd)
    return size, digest.hexdigest(), fd if keep else None


def _publish(tmp: Path, target: Path, overwrite: bool) -> None:
    if overwrite:
        os.replace(tmp, target)
    else:
        os.link(tmp, target)
        tmp.unlink()


@dataclass(frozen=True, slots=True)
class StoredFile:
    path: Path  # absolute
    relpath: str  # relative to the store root it lives in
    size: int
    sha256: str


@dataclass(slots=True)
class HeldFile:
    """A spool file and, until ``release``, an exclusive flock on it."""

    stored: StoredFile
    fd: int | None
    synced: bool = True

    def sync(self) -> None:
        """fsync the file, then its directory (when written with ``sync=False``)."""
        if self.synced:
            return
        if self.fd is None:
            raise RuntimeError("sync() after release()")
        os.fsync(self.fd)
        _fsync_dir(self.stored.path.parent)
        self.synced = True

    def release(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)  # closing the descriptor drops the flock

    def __enter__(self) -> HeldFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class FileStore:
    """Owns the spool, quarantine, results and staging directories under one data dir."""

    def __init__(
        self,
        data_dir: Path,
        *,
        spool_dir: Path | None = None,
        results_dir: Path | None = None,
        min_free_mb: int = 0,
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.spool = (spool_dir or self.data_dir / "spool").resolve()
        self.results = (results_dir or self.data_dir / "results").resolve()
        self.quarantine = self.data_dir / "quarantine"
        self.tmp = self.data_dir / "tmp"
        self.min_free_bytes = min_free_mb * 1024 * 1024
        # Owner-only: the spool holds patients' images, the database their names.
        for d in (self.data_dir, self.spool, self.results, self.quarantine, self.tmp):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        _owner_only(self.data_dir)
        # Staging must share a filesystem with the target for rename to be atomic.
        self._spool_tmp = self.spool / ".tmp"
        self._spool_tmp.mkdir(exist_ok=True)
        # Directories this process has made or seen (see atomic_write's known_dirs).
        self._known_dirs: set[Path] = set()

    # -- space ------------------------------------------------------------
    def free_bytes(self) -> int:
        return shutil.disk_usage(self.spool).free

    def check_space(self, incoming: int = 0) -> None:
        """Raise OutOfSpaceError if writing ``incoming`` bytes would cross the floor."""
        free = self.free_bytes()
        if free - incoming < self.min_free_bytes:
            raise OutOfSpaceError(
                f"free space {free // 2**20} MB is below the floor "
                f"{self.min_free_bytes // 2**20} MB"
            )

    # -- spool --------------------------------------------------------------
    def spool_relpath(self, study_uid: str, series_uid: str, sop_uid: str) -> str:
        for name, uid in (("study", study_uid), ("series", series_uid), ("SOP instance", sop_uid)):
            if not valid_uid(uid):
                raise InputError(f"invalid {name} UID {uid!r}")
        return f"{study_uid}/{series_uid}/{sop_uid}.dcm"

    def write_instance(
        self, study_uid: str, series_uid: str, sop_uid: str,
        chunks: Iterable[bytes | memoryview], *, name_first: bool = True,
    ) -> StoredFile:
        """Write a received instance; FileExistsError if that SOP instance is already stored."""
        with self.write_instance_held(study_uid, series_uid, sop_uid, chunks,
                                      name_first=name_first) as held:
            return held.stored

    def write_instance_held(
        self, study_uid: str, series_uid: str, sop_uid: str,
        chunks: Iterable[bytes | memoryview], *, name_first: bool = True, sync: bool = True,
    ) -> HeldFile:
        """Write a received instance and keep an exclusive flock on it until released.

        The file is named first and fsynced after (then its directory): on a
        journaling file system that is one journal commit per instance instead
        of two, since the fsync commits the name with the data (bench/bench_spool_order.py:
        about 1.25x the files per second with four concurrent writers, the same with
        one; ``name_first=False`` is the fsync-then-name order, kept for that
        comparison). A crash before
        the fsync can leave a named file whose data never reached the disk; it
        was never acknowledged and has no row, and the lock tells a concurrent
        store of the same SOP instance (which waits for it) from such a
        leftover (which it may replace: ``replace_unrecorded``). ``sync=False``
        leaves the fsyncs to ``HeldFile.sync`` (the caller overlaps them with the
        row's commit).
        """
        rel = self.spool_relpath(study_uid, series_uid, sop_uid)
        target = self.spool / rel
        try:
            size, sha, fd = _write(target, chunks, tmp_dir=self._spool_tmp, overwrite=False,
                                   known_dirs=self._known_dirs, sync_first=not name_first,
                                   hold=True, sync=sync)
        except FileExistsError:
            raise
        except OSError as exc:
            raise write_error(f"cannot write {rel}", exc) from exc
        return HeldFile(StoredFile(target, rel, size, sha), fd, synced=sync)

    def lock_existing(self, relpath: str) -> HeldFile:
        """Wait for the writer of a spool file (if one is still at work) and hold it."""
        path = self.spool_path(relpath)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        digest, size = hashlib.sha256(), 0
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            while chunk := os.read(fd, 1 << 20):
                digest.update(chunk)
                size += len(chunk)
        except BaseException:
            os.close(fd)
            raise
        return HeldFile(StoredFile(path, relpath, size, digest.hexdigest()), fd)

    def replace_unrecorded(self, relpath: str, chunks: Iterable[bytes | memoryview]) -> HeldFile:
        """Replace a spool file that no row records (never acknowledged), atomically."""
        target = self.spool_path(relpath)
        size, sha, fd = _write(target, chunks, tmp_dir=self._spool_tmp, overwrite=True,
                               known_dirs=self._known_dirs, sync_first=True, hold=True)
        return HeldFile(StoredFile(target, relpath, size, sha), fd)

    def spool_path(self, relpath: str) -> Path:
        return self._inside(self.spool, relpath)

    def write_quarantine(self, sop_uid: str, chunks: Iterable[bytes]) -> StoredFile:
        """Keep a conflicting duplicate aside, named by its content hash, never overwriting."""
        staged = self.tmp / f"q-{os.getpid()}-{os.urandom(6).hex()}"
        size, sha = atomic_write(staged, chunks, tmp_dir=self.tmp)
        name = f"{sop_uid if valid_uid(sop_uid) else 'invalid-uid'}.{sha[:16]}.dcm"
        target = self.quarantine / name
        if target.exists():
            staged.unlink()
        else:
            os.replace(staged, target)
            _fsync_dir(self.quarantine)
        return StoredFile(target, name, size, sha)

    # -- results ------------------------------------------------------------
    def write_result(self, job_id: int, kind: str, sop_uid: str, data: bytes) -> StoredFile:
        if not valid_uid(sop_uid):
            raise InputError(f"invalid SOP instance UID {sop_uid!r}")
        rel = f"{job_id}/{kind}/{sop_uid}.dcm"
        size, sha = atomic_write(self.results / rel, [data], tmp_dir=self.tmp, overwrite=True)
        return StoredFile(self.results / rel, rel, size, sha)

    def result_path(self, relpath: str) -> Path:
        return self._inside(self.results, relpath)

    # -- housekeeping ---------------------------------------------------------
    def remove_partials(self) -> list[Path]:
        """Delete staging files left by a crash; they were never acknowledged."""
        removed = []
        for d in (self._spool_tmp, self.tmp):
            for p in d.glob(f"{_TMP_PREFIX}*"):
                p.unlink(missing_ok=True)
                removed.append(p)
        for p in self.spool.rglob(f"{_TMP_PREFIX}*"):
            p.unlink(missing_ok=True)
            removed.append(p)
        return removed

    def remove_series(self, study_uid: str, series_uid: str) -> None:
        d = self.spool / study_uid / series_uid
        if d.is_dir() and valid_uid(study_uid) and valid_uid(series_uid):
            shutil.rmtree(d)
            self._known_dirs.discard(d)
            with contextlib.suppress(OSError):
                (self.spool / study_uid).rmdir()  # only if empty

    @staticmethod
    def _inside(root: Path, relpath: str) -> Path:
        path = (root / relpath).resolve()
        if not path.is_relative_to(root):
            raise StorageError(f"path {relpath!r} escapes {root}")
        return path
