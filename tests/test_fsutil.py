"""Tests of node.fsutil: atomic, durable file replacement and directory syncs, and that
the journal, the log sink and the config repository go through them."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from node import fsutil
from node.fsutil import atomic_write, fsync_dir, fsync_file


class SyncLog:
    """Wraps os.fsync / os.replace to record, in order, what was synced and renamed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.events: list[tuple] = []
        real_fsync, real_replace = os.fsync, os.replace

        def fsync(fd: int) -> None:
            st_ = os.fstat(fd)
            kind = "dir" if stat.S_ISDIR(st_.st_mode) else "file"
            self.events.append(("fsync", kind, (st_.st_dev, st_.st_ino)))
            real_fsync(fd)

        def replace(src, dst) -> None:
            real_replace(src, dst)
            self.events.append(("replace", str(src), str(dst)))

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)

    @staticmethod
    def ident(path) -> tuple[int, int]:
        st_ = os.stat(path)
        return st_.st_dev, st_.st_ino


def leftovers(directory: Path, keep: set[str]) -> list[str]:
    return sorted(set(os.listdir(directory)) - keep)


def test_atomic_write_creates_and_replaces_bytes_and_text(tmp_path: Path) -> None:
    target = tmp_path / "state"
    atomic_write(target, b"one\x00two")
    assert target.read_bytes() == b"one\x00two"
    atomic_write(target, "drei ü\n")                 # text is written as UTF-8
    assert target.read_bytes() == "drei ü\n".encode()
    assert leftovers(tmp_path, {"state"}) == []      # no temporary file left behind


def test_atomic_write_large_payload_is_written_whole(tmp_path: Path) -> None:
    data = os.urandom(3 << 20)
    atomic_write(tmp_path / "big", data)
    assert (tmp_path / "big").read_bytes() == data


def test_atomic_write_syncs_file_before_rename_and_directory_after(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    log = SyncLog(monkeypatch)
    atomic_write(tmp_path / "f", b"data")
    kinds = [(e[0], e[1] if e[0] == "fsync" else None) for e in log.events]
    assert kinds == [("fsync", "file"), ("replace", None), ("fsync", "dir")]
    assert log.events[2][2] == SyncLog.ident(tmp_path)            # the parent directory
    assert log.events[0][2] == SyncLog.ident(tmp_path / "f")      # the file now at the name


def test_atomic_write_mode_and_custom_tmp_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = SyncLog(monkeypatch)
    umask = os.umask(0o022)
    try:
        atomic_write(tmp_path / "seg", b"h", mode=0o600, tmp=tmp_path / "seg.tmp")
    finally:
        os.umask(umask)
    assert stat.S_IMODE(os.stat(tmp_path / "seg").st_mode) == 0o600
    assert ("replace", str(tmp_path / "seg.tmp"), str(tmp_path / "seg")) in log.events
    assert leftovers(tmp_path, {"seg"}) == []


def test_failure_before_rename_keeps_old_content_and_removes_tmp(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "applied"
    atomic_write(target, b"old\n")

    def broken_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="Input/output error"):
        atomic_write(target, b"new\n")
    monkeypatch.undo()
    assert target.read_bytes() == b"old\n"
    assert leftovers(tmp_path, {"applied"}) == []


def test_missing_parent_raises_and_creates_nothing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        atomic_write(tmp_path / "no" / "such" / "file", b"x")
    assert os.listdir(tmp_path) == []


def test_fsync_helpers_reject_wrong_kinds(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"x")
    fsync_dir(tmp_path)
    fsync_file(tmp_path / "file")
    with pytest.raises(NotADirectoryError):
        fsync_dir(tmp_path / "file")
    with pytest.raises(FileNotFoundError):
        fsync_dir(tmp_path / "missing")
    with pytest.raises(FileNotFoundError):
        fsync_file(tmp_path / "missing")


def test_no_private_copies_of_the_helpers_remain() -> None:
    """The modules that used to carry their own fsync-dir block now share node.fsutil."""
    import manager.logsink
    import node.configrepo
    import node.jlog.journal
    for module in (manager.logsink, node.configrepo, node.jlog.journal):
        assert not hasattr(module, "_fsync_dir"), module.__name__
        assert module.fsync_dir is fsutil.fsync_dir


def test_journal_segment_roll_syncs_the_directory_after_the_rename(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from node.jlog import Journal
    from node.jlog.format import parse_segment_name

    journal = Journal.open(str(tmp_path), "mainlog", subscribers=["s"], segment_size=256)
    try:
        log = SyncLog(monkeypatch)
        journal.append_batch([b"r" * 100 for _ in range(10)])     # several rolls
        journal_dir = SyncLog.ident(journal.path)
    finally:
        journal.close()
    renames = [i for i, e in enumerate(log.events)
               if e[0] == "replace" and parse_segment_name(os.path.basename(e[2])) is not None]
    assert len(renames) >= 2, log.events
    for i in renames:
        # the new segment's name is made durable before anything else happens
        assert log.events[i + 1] == ("fsync", "dir", journal_dir)
    assert not [n for n in os.listdir(journal.path) if n.endswith(".tmp")]
