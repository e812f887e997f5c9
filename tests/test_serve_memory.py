"""The server caps glibc's malloc arenas (flat RSS under load: benchmarks/results/serve-rss-*.md) unless the user
set MALLOC_ARENA_MAX."""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

import pytest

from moevl.serve.cli import limit_malloc_arenas


def test_a_user_setting_wins(monkeypatch):
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert limit_malloc_arenas() is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_applied_on_glibc(monkeypatch):
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    assert limit_malloc_arenas() is hasattr(libc, "gnu_get_libc_version")
