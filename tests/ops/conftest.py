"""Op tests: every ``torch.empty`` / ``torch.empty_like`` hands out NaN, so an element a kernel
forgets to write shows up as NaN in the comparison."""
import pytest
import torch

_empty, _empty_like = torch.empty, torch.empty_like


def _poison(t):
    # no_grad: torch internals (inductor's pattern tracing) also call torch.empty(..., requires_grad=True)
    # while the patch is live, and an in-place fill on such a leaf is refused under autograd.
    if t.is_floating_point() and t.numel():
        with torch.no_grad():
            t.fill_(float("nan"))
    return t


@pytest.fixture(autouse=True)
def nan_poisoned_empty(monkeypatch):
    monkeypatch.setattr(torch, "empty", lambda *a, **k: _poison(_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _poison(_empty_like(*a, **k)))


@pytest.fixture
def debug_mode():
    """fastsplit.set_debug(True) for one test: value checks (which sync with the host) on."""
    import fastsplit

    fastsplit.set_debug(True)
    yield
    fastsplit.set_debug(None)
