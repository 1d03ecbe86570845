"""Fixtures every test gets: one thread for torch (tiny convs on a shared 2-core machine run faster so, and the
timings of one test do not depend on another's), a non-interactive matplotlib, and a curve cache in a temporary
folder (a test never reads or writes the user's ~/.cache/spp)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    """$SPP_CACHE_DIR for this test: a fresh folder under its tmp_path."""
    folder = tmp_path / "spp-cache"
    monkeypatch.setenv("SPP_CACHE_DIR", str(folder))
    return folder
