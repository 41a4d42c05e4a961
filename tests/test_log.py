"""Progress bars render even for a task added without its `info` field (tests silence bars, so a
missing field surfaced only for users: `wbc evaluate --zoom auto` died with KeyError: 'info')."""

from __future__ import annotations

import io

from rich.console import Console

from wbc import log


def test_progress_renders_a_task_without_info(monkeypatch):
    monkeypatch.delenv("WBC_NO_PROGRESS", raising=False)
    buf = io.StringIO()
    monkeypatch.setattr(log, "console", Console(file=buf, force_terminal=True, width=100))
    with log.progress() as bar:
        task = bar.add_task("read target", total=3)
        bar.advance(task)
        bar.refresh()
    assert "read target" in buf.getvalue()
