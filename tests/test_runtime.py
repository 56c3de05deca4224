"""kn_dist.runtime: the console policy's pieces that are not Ray's."""

from __future__ import annotations

import sys

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
