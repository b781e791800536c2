"""Spool write order: fsync-then-name against name-then-fsync, 1 and 4 writer threads.

    .venv/bin/python bench/bench_spool_order.py [REPEATS]

Each writer stores 60 files of 512 KB through ``FileStore.write_instance`` in
a fresh directory on the data disk; both orders run in alternation, REPEATS
times (default 4), and the ratio (name-first / fsync-first) of each pair is
printed with the median. Why it matters: naming the file before its fsync
lets one journal commit carry both the data and the name (ext4), where the
other order needs a second commit for the name; under concurrent writers the
journal is the shared resource.
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from storage.filestore import FileStore  # noqa: E402

DATA = os.urandom(512 * 1024)


def files_per_s(name_first: bool, threads: int, n: int = 60) -> float:
    root = Path(tempfile.mkdtemp(dir=REPO))
    try:
        store = FileStore(root / "data", min_free_mb=0)

        def writer(k: int) -> None:
            for i in range(n):
                store.write_instance(f"1.2.{k}", f"1.2.{k}.1", f"1.2.{k}.1.{i + 1}", [DATA],
                                     name_first=name_first)

        workers = [threading.Thread(target=writer, args=(k,)) for k in range(threads)]
        start = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        return threads * n / (time.perf_counter() - start)
    finally:
        shutil.rmtree(root)


def main() -> None:
    repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 4
    print(f"machine: {os.cpu_count()} cores; 512 KB files; {repeats} alternating pairs")
    for threads in (1, 4):
        ratios = []
        for _ in range(repeats):
            a = files_per_s(False, threads)
            b = files_per_s(True, threads)
            ratios.append(b / a)
            print(f"{threads} writer(s): fsync-first {a:6.0f}/s  name-first {b:6.0f}/s  "
                  f"ratio {b / a:.2f}", flush=True)
        print(f"{threads} writer(s): median ratio name-first/fsync-first "
              f"{statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
