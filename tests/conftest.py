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


@pytest.fixture
def cache_misses(monkeypatch) -> list[str]:
    """The model specs recorded because the curve cache did not have them (the references actually recorded)."""
    from spp import cache

    calls: list[str] = []
    real = cache.cached_record

    def counting(cfg, compute, **kw):
        def miss():
            calls.append(cfg.model)
            return compute()

        return real(cfg, miss, **kw)

    monkeypatch.setattr(cache, "cached_record", counting)
    return calls
