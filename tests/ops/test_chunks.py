"""The one chunked-logits helper: chunk sizes from the device and the problem, spans that cover every row."""
import pytest
import torch

from fastsplit.ops import _chunks


@pytest.mark.parametrize("sms,hidden,rows", [(132, 3584, 1280), (132, 576, 6784), (108, 4096, 896), (16, 576, 896)])
def test_cuda_chunk_fills_two_waves_of_the_dh_pass(sms, hidden, rows):
    got = _chunks.cuda_rows(sms, hidden)
    assert got == rows
    col_tiles = -(-hidden // _chunks.COL_TILE)
    assert (got // _chunks.ROW_TILE) * col_tiles >= _chunks.WAVES * sms  # every SM busy twice
    assert ((got // _chunks.ROW_TILE) - 1) * col_tiles < _chunks.WAVES * sms  # and no row tile more


def test_cuda_chunk_is_bounded_by_the_l2_and_the_row_count(monkeypatch):
    monkeypatch.setattr(_chunks, "_sm_count", lambda index: 132)
    monkeypatch.setattr(_chunks, "_l2_bytes", lambda index: 50 << 20)
    dev = torch.device("cuda", 0)
    for V in (32000, 152064, 256000):
        rows = _chunks.chunk_rows(1 << 20, V, 3584, dev)
        assert rows % _chunks.ROW_TILE == 0
        assert rows == _chunks.ROW_TILE or rows * V * 4 <= _chunks.L2_BLOCKS * (50 << 20)
        assert rows <= _chunks.cuda_rows(132, 3584)
    assert _chunks.chunk_rows(1 << 20, 49152, 576, dev) == 1024  # SmolLM2: the L2 bound, not 6784
    assert _chunks.chunk_rows(100, 152064, 3584, dev) == 100  # never more rows than there are


def test_cpu_chunk_stays_in_the_last_level_cache():
    for V in (1000, 49152, 152064):
        rows = _chunks.chunk_rows(10 ** 6, V, 576, torch.device("cpu"))
        assert rows >= 1 and (rows == 1 or rows * V * 4 <= _chunks.CPU_CACHE_BYTES)
    assert _chunks.CPU_CACHE_BYTES >= 1 << 20


def test_spans_cover_every_row_once():
    for n, c in [(0, 4), (1, 4), (10, 3), (12, 4)]:
        covered = [i for s, e in _chunks.spans(n, c) for i in range(s, e)]
        assert covered == list(range(n))
