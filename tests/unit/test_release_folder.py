"""The release folder shares no inode with the quantized checkpoint it is made from (issue 10)."""

from __future__ import annotations

from pathlib import Path

from tasks.publish import _link_or_copy


def test_release_files_are_copies_not_hard_links(tmp_path: Path) -> None:
    checkpoint = tmp_path / "checkpoint.safetensors"
    checkpoint.write_bytes(b"weights" * 1000)
    release = tmp_path / "release.safetensors"
    _link_or_copy(checkpoint, release)
    assert release.read_bytes() == checkpoint.read_bytes()
    assert release.stat().st_ino != checkpoint.stat().st_ino
    assert checkpoint.stat().st_nlink == 1
    release.write_bytes(b"corrupted")  # corrupting one leaves the other intact
    assert checkpoint.read_bytes() == b"weights" * 1000
