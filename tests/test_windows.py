"""The windows the model classifies (:mod:`audioclf.windows`): streamed, counted and batched alike."""

import numpy as np
import pytest
import torch

from audioclf import windows
from audioclf.audio import CROP_SLACK, fix_length, inference_windows, window_starts
from audioclf.config import FeatureConfig


@pytest.mark.parametrize("block", [1, 7, 100, 1000])
def test_sliding_windows_do_not_depend_on_block_boundaries(block):
    wave = np.arange(1000, dtype=np.float32)
    blocks = [wave[i:i + block] for i in range(0, len(wave), block)]
    got = list(windows.sliding_windows(blocks, window=300, hop=150))
    starts = [s for s, _ in got]
    assert starts == [0, 150, 300, 450, 600, 700]  # the last one ends exactly at the end
    for s, w in got:
        np.testing.assert_array_equal(w, wave[s:s + 300])


def test_sliding_windows_pad_a_short_recording_and_stop_at_an_exact_end():
    (start, w), = windows.sliding_windows([np.ones(100, np.float32)], window=300, hop=150)
    assert start == 0 and w.shape == (300,) and w[:100].all() and not w[100:].any()
    assert [s for s, _ in windows.sliding_windows([np.ones(600, np.float32)], 300, 150)] == [0, 150, 300]


def _ramp_blocks(wave: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """``wave`` in blocks of random lengths (empty ones too), as a decoder might hand it over."""
    cuts = np.sort(rng.integers(0, len(wave) + 1, size=rng.integers(0, 6)))
    return np.split(wave, cuts)


@pytest.mark.parametrize("window, hop", [(1, 1), (7, 1), (7, 3), (7, 7), (7, 10), (300, 150), (300, 149), (300, 301),
                                         (1000, 250), (1000, 999)])
def test_streamed_counted_and_batched_windows_agree(window, hop):
    """The three users of ``audio.window_starts``: the streamed windows (``sliding_windows``), the count the
    server checks before decoding (``count_windows``) and the windows training caches (``inference_windows``)
    give the same windows, and ``prepare`` classifies the same samples."""
    rng = np.random.default_rng(window * 1000 + hop)
    slack = int(window * (1 + CROP_SLACK))
    lengths = {0, 1, window - 1, window, window + 1, slack, slack + 1, 2 * window, 2 * window + 1, 3 * window + hop,
               5 * window + 3, window + 4 * hop, window + 4 * hop - 1, window + 4 * hop + 1, *rng.integers(1, 6000, 4)}
    for n in sorted(x for x in lengths if x >= 0):
        wave = np.arange(1, n + 1, dtype=np.float32)  # no zeros: padding shows
        starts = window_starts(n, window, hop)
        expected = [fix_length(wave[s:s + window], window) for s in starts]

        streamed = list(windows.sliding_windows(_ramp_blocks(wave, rng), window, hop))
        assert [s for s, _ in streamed] == starts, n
        np.testing.assert_array_equal(np.stack([w for _, w in streamed]), np.stack(expected))
        assert windows.count_windows(n, window, hop) == len(starts)
        np.testing.assert_array_equal(inference_windows(torch.from_numpy(wave), window, hop).numpy(), np.stack(expected))
        if n:  # an empty waveform is refused before any window
            source = windows.prepare(wave, None, FeatureConfig(), window, hop)  # at its own rate: as it is
            np.testing.assert_array_equal(np.stack([w for _, w in source.windows]), np.stack(expected))
