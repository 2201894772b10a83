"""Atomic writes leave normal permissions (not mkstemp's owner-only 0600) and no temporary files behind."""

from __future__ import annotations

import os
import stat
import sys

import pytest

from kimchi_edge.runtime.fsutil import atomic_directory, atomic_write_json, read_json


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permissions")
def test_atomic_files_and_folders_get_umask_permissions(tmp_path):
    mask = os.umask(0o022)
    os.umask(mask)
    atomic_write_json(tmp_path / "manifest.json", {"labels": ["김치"]})
    assert stat.S_IMODE((tmp_path / "manifest.json").stat().st_mode) == 0o666 & ~mask
    assert read_json(tmp_path / "manifest.json") == {"labels": ["김치"]}
    with atomic_directory(tmp_path / "bundle") as d:
        (d / "x").write_text("x")
    assert stat.S_IMODE((tmp_path / "bundle").stat().st_mode) == 0o777 & ~mask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "manifest.json"]
