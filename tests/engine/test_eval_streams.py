"""Where evaluation cuts a split into streams (worker.engine.data.stream_bounds, eval_streams).

The bounds were ``torch.linspace(0, n, s + 1).round()`` in float32, which cannot hold every
integer past 2**24: at 2**24 tokens and 20 streams one stream came out one longer than
``ceil(n / s)`` and the evaluation crashed. ``stream_bounds`` is the same rounding in exact
integers; it is checked here at sizes around 2**24 and 2**31 without allocating them.
"""

from __future__ import annotations

import pytest
import torch

from worker.engine.data import eval_streams, stream_bounds

AROUND_2_24 = [2**24 - 1, 2**24, 2**24 + 1, 20_000_001]
AROUND_2_31 = [2**31 - 1, 2**31 + 7, 3 * 2**31]


def _check_bounds(n: int, s: int) -> None:
    b = stream_bounds(n, s)
    assert len(b) == s + 1
    assert b[0] == 0 and b[-1] == n  # exact end points: no target dropped or invented
    lengths = [hi - lo for lo, hi in zip(b, b[1:], strict=False)]
    assert all(length >= 0 for length in lengths)  # monotonic; contiguous by construction
    assert sum(lengths) == n
    assert max(lengths) - min(lengths) <= 1  # balanced
    assert max(lengths) == -(-n // s)  # the longest stream fits eval_streams' L = ceil(n / s)
    for i in (1, s // 2, s - 1):  # the rule itself: round(i * n / s), ties to even
        q, r = divmod(i * n, s)
        want = q + (1 if 2 * r > s or (2 * r == s and q % 2 == 1) else 0)
        assert b[i] == want


@pytest.mark.parametrize("s", [16, 20, 32])
@pytest.mark.parametrize("n", AROUND_2_24)
def test_stream_bounds_are_exact_around_2_pow_24(n: int, s: int) -> None:
    _check_bounds(n, s)


@pytest.mark.parametrize("s", [16, 20, 32, 4096])
@pytest.mark.parametrize("n", AROUND_2_31)
def test_stream_bounds_are_exact_around_2_pow_31(n: int, s: int) -> None:
    _check_bounds(n, s)


def test_stream_bounds_on_small_sizes_by_brute_force() -> None:
    for n in range(0, 200):
        for s in range(1, 40):
            _check_bounds(n, s)
    assert stream_bounds(10, 4) == [0, 2, 5, 8, 10]  # 2.5 -> 2 and 7.5 -> 8: ties to even


def test_stream_bounds_refuses_negative_sizes() -> None:
    with pytest.raises(ValueError, match="n_targets >= 0"):
        stream_bounds(-1, 4)
    with pytest.raises(ValueError, match="streams >= 1"):
        stream_bounds(10, 0)


def _eval_streams_before(ids: torch.Tensor, num_streams: int
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """eval_streams as it was, with float32 linspace bounds (exact below 2**24)."""
    n_targets = ids.numel() - 1
    s = max(1, min(num_streams, n_targets))
    length = -(-n_targets // s)
    x = torch.zeros(s, length, dtype=torch.long)
    y = torch.full((s, length), -100, dtype=torch.long)
    bounds = torch.linspace(0, n_targets, s + 1).round().long().tolist()
    for i in range(s):
        a, b = bounds[i], bounds[i + 1]
        x[i, : b - a] = ids[a:b]
        y[i, : b - a] = ids[a + 1 : b + 1]
    return x, y


@pytest.mark.parametrize("num_streams", [1, 7, 8, 32, 64])
def test_eval_streams_on_a_real_split_are_the_streams_of_before(
        small_text: str, num_streams: int) -> None:
    ids = torch.tensor([ord(c) for c in small_text[:20_001]], dtype=torch.long)  # 20,000 targets
    x, y = eval_streams(ids, num_streams)
    x0, y0 = _eval_streams_before(ids, num_streams)
    assert x.shape == y.shape == (num_streams, -(-20_000 // num_streams))
    assert torch.equal(x, x0) and torch.equal(y, y0)
    assert int((y != -100).sum()) == 20_000
