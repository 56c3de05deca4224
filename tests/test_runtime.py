"""kn_dist.runtime: the console policy's pieces that are not Ray's."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from kn_dist import runtime


def test_shutdown_systemexit_is_dropped_and_other_unraisables_are_printed(capsys, monkeypatch):
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)  # restored after the test
    runtime.quiet_ray_logs()
    assert sys.unraisablehook is runtime._quiet_shutdown_exit

    class RaisesWhenCollected:  # Python reports an exception from __del__ through sys.unraisablehook
        def __init__(self, exc: BaseException) -> None:
            self.exc = exc

        def __del__(self) -> None:
            raise self.exc

    RaisesWhenCollected(SystemExit(1))
    assert capsys.readouterr().err == ""
    RaisesWhenCollected(ValueError("a real problem"))
    assert "a real problem" in capsys.readouterr().err


def test_timeline_marks_are_ordered_and_restartable():
    runtime.restart_timeline("a")
    runtime.mark("b")
    runtime.mark("a")  # the first time counts
    import json

    marks = json.loads(runtime.timeline_json())
    assert list(marks) == ["a", "b"] and marks["a"] <= marks["b"]
    runtime.restart_timeline("c")
    assert list(json.loads(runtime.timeline_json())) == ["c"]


_FAULTS_OF_REPEATED_ALLOCATIONS = """
import resource, sys, torch
from kn_dist.runtime import keep_freed_cpu_memory
kept = keep_freed_cpu_memory() if sys.argv[1] == "keep" else False
for i in range(20):  # what training steps do: the same large temporaries, allocated and freed again
    if i == 10:  # after a warm-up: glibc's heap settles within the first ~8 (measured: 6-8 fault)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(16 * 2**20, dtype=torch.float32).fill_(1.0)  # 64 MiB, 16384 pages of 4 KiB
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_kept_heap_stops_page_faults_of_repeated_large_allocations():
    """The kernel's own count of minor page faults: glibc's default maps 64 MiB afresh on every allocation."""

    def faults(mode: str) -> tuple[str, int]:
        out = subprocess.run(
            [sys.executable, "-c", _FAULTS_OF_REPEATED_ALLOCATIONS, mode], capture_output=True, text=True, check=True
        ).stdout.split()
        return out[0], int(out[1])

    pages = 16 * 2**20 * 4 // 4096
    kept, default_faults = faults("default")
    assert kept == "False" and default_faults >= 8 * pages, default_faults  # ~one fault per page, every time
    kept, kept_faults = faults("keep")
    assert kept == "True" and kept_faults <= pages // 4, kept_faults  # the pages are reused
