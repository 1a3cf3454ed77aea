import pytest
import torch

from audioclf.augment import (FrequencyMasking, RandomFrequencyShift, RandomGain, RandomTimeShift, RandomTimeStretch,
                              SpecAugment, TimeMasking, _beta, mixup)
from audioclf.config import AudioclfError, AugmentConfig

N_MELS, FRAMES = 40, 60


def features(batch=16, seed=0):
    """Strictly positive log-mel-like input, so every zero in the output is a mask."""
    return torch.rand(batch, N_MELS, FRAMES, generator=torch.Generator().manual_seed(seed)) + 0.1


def masked_runs(x_out: torch.Tensor, axis: int) -> list[list[tuple[int, int]]]:
    """Per example, the (start, end) runs of indices along ``axis`` that are zero across the other axis."""
    zero = (x_out == 0).all(dim=-1 if axis == -2 else -2)  # (batch, size)
    runs = []
    for row in zero.tolist():
        r, start = [], None
        for i, z in enumerate(row + [False]):
            if z and start is None:
                start = i
            elif not z and start is not None:
                r.append((start, i))
                start = None
        runs.append(r)
    return runs


@pytest.mark.parametrize("cls, axis, size", [(FrequencyMasking, -2, N_MELS), (TimeMasking, -1, FRAMES)])
def test_single_mask_is_one_contiguous_band_within_bounds(cls, axis, size):
    x = features(64)
    out = cls(max_width=10, n_masks=1, generator=torch.Generator().manual_seed(1)).train()(x)
    # Only whole bands are zeroed: every zero lies in a fully masked row/column.
    zero_lines = (out == 0).all(dim=-1 if axis == -2 else -2)
    assert torch.equal((out == 0), zero_lines.unsqueeze(-1 if axis == -2 else -2).expand_as(out))
    runs = masked_runs(out, axis)
    widths = []
    for r in runs:
        assert len(r) <= 1
        for start, end in r:
            assert 0 <= start < end <= size
            widths.append(end - start)
    assert widths and max(widths) <= 10
    assert len(set(widths)) > 3  # widths are drawn per example
    assert len({r[0][0] for r in runs if r}) > 3  # so are positions
    unmasked = out != 0
    assert torch.equal(out[unmasked], x[unmasked])  # the rest is untouched


def test_widths_and_counts_are_configurable():
    x = features(32)
    out = TimeMasking(max_width=3, n_masks=4, generator=torch.Generator().manual_seed(2)).train()(x)
    per_example = (out == 0).all(dim=-2).sum(-1)  # masked frames per example
    assert per_example.max() <= 4 * 3
    assert per_example.max() > 3  # more than one mask lands
    assert max(len(r) for r in masked_runs(out, -1)) > 1  # as separate bands


def test_width_is_capped_by_axis_size():
    x = features(8)[:, :4, :]  # only 4 bands
    out = FrequencyMasking(max_width=100, n_masks=1, generator=torch.Generator().manual_seed(0)).train()(x)
    assert out.shape == x.shape


def test_seeded_generator_reproduces_masks():
    cfg = AugmentConfig(freq_mask_width=8, time_mask_width=12, n_freq_masks=2, n_time_masks=2, gain_db=6.0)
    x = features()
    a = SpecAugment(cfg, torch.Generator().manual_seed(7)).train()(x)
    b = SpecAugment(cfg, torch.Generator().manual_seed(7)).train()(x)
    c = SpecAugment(cfg, torch.Generator().manual_seed(8)).train()(x)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_eval_mode_is_identity():
    cfg = AugmentConfig(freq_mask_width=20, time_mask_width=30, n_freq_masks=3, n_time_masks=3, gain_db=12.0)
    x = features()
    aug = SpecAugment(cfg, torch.Generator().manual_seed(0))
    assert not torch.equal(aug.train()(x), x)
    assert aug.eval()(x) is x


def test_zero_width_or_count_is_identity_in_training():
    x = features()
    assert TimeMasking(max_width=0, n_masks=1).train()(x) is x
    assert FrequencyMasking(max_width=10, n_masks=0).train()(x) is x


def test_negative_mask_settings_are_refused():
    with pytest.raises(AudioclfError, match="max_width=-1"):
        TimeMasking(max_width=-1, n_masks=1)


def test_masking_on_a_batch_masks_examples_independently():
    x = features(4)
    out = SpecAugment(AugmentConfig(freq_mask_width=10, time_mask_width=15),
                      torch.Generator().manual_seed(3)).train()(x)
    masks = [(o == 0) for o in out]
    assert out.shape == x.shape
    assert any(not torch.equal(masks[0], m) for m in masks[1:])


# ------------------------------------------------------------------------------------------- RandomGain

def test_random_gain_scales_mel_power_within_range():
    x = torch.log1p(features(32) * 10)
    out = RandomGain(max_db=6.0, generator=torch.Generator().manual_seed(0)).train()(x)
    ratio_db = 10 * torch.log10(torch.expm1(out) / torch.expm1(x))  # (batch, n_mels, frames)
    per_example = ratio_db.flatten(1)
    torch.testing.assert_close(per_example, per_example[:, :1].expand_as(per_example), atol=1e-3, rtol=0)
    assert per_example.abs().max() <= 6.0 + 1e-3
    assert per_example[:, 0].std() > 1.0  # gains differ between examples


def test_random_gain_eval_is_identity():
    x = features()
    gain = RandomGain(max_db=10.0, generator=torch.Generator().manual_seed(0))
    assert gain.eval()(x) is x
    assert RandomGain(max_db=0.0).train()(x) is x


# ------------------------------------------------------------------------------------------------ mixup

def test_mixup_targets_sum_to_one_and_mix_consistently():
    g = torch.Generator().manual_seed(0)
    x = features(16)
    y = torch.arange(16) % 5
    mx, target = mixup(x, y, 5, alpha=0.4, generator=g)
    assert mx.shape == x.shape and target.shape == (16, 5)
    torch.testing.assert_close(target.sum(1), torch.ones(16))
    own = target[torch.arange(16), y]
    assert (own >= 0.5 - 1e-6).all()  # the original stays dominant
    assert (own < 1).any()  # and some examples really are mixed
    assert not torch.equal(mx, x)


@pytest.mark.parametrize("alpha", [0.2, 1.0, 4.0, 20.0, 100.0])
def test_mixup_lambda_is_quick_and_in_range_for_any_allowed_alpha(alpha):
    g = torch.Generator().manual_seed(0)
    x = torch.eye(64).reshape(64, 1, 64)  # one-hot rows: the mixed row reveals lambda
    y = torch.zeros(64, dtype=torch.long)
    mx, target = mixup(x, y, 2, alpha=alpha, generator=g)
    lam = mx.reshape(64, 64).max(dim=1).values
    assert ((lam >= 0.5 - 1e-6) & (lam <= 1.0)).all()
    if alpha >= 20:  # Beta(alpha, alpha) concentrates at 0.5
        assert (lam - 0.5).abs().mean() < 0.1


@pytest.mark.parametrize("alpha", [0.2, 1.0, 10.0])
def test_beta_sampler_has_beta_moments(alpha):
    lam = _beta(alpha, 20000, torch.Generator().manual_seed(0)).double()
    assert ((lam >= 0) & (lam <= 1)).all()
    assert lam.mean().item() == pytest.approx(0.5, abs=0.01)
    assert lam.var().item() == pytest.approx(1 / (4 * (2 * alpha + 1)), rel=0.05)


def test_mixup_is_seeded():
    x, y = features(8), torch.arange(8) % 3
    a = mixup(x, y, 3, 0.5, torch.Generator().manual_seed(1))
    b = mixup(x, y, 3, 0.5, torch.Generator().manual_seed(1))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_mixup_alpha_zero_is_identity_with_one_hot_targets():
    x, y = features(8), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    mx, target = mixup(x, y, 3, alpha=0.0)
    assert mx is x
    assert torch.equal(target, torch.nn.functional.one_hot(y, 3).float())


def test_time_mask_fraction_caps_width_on_short_clips():
    # 87 frames (1 s at 22.05 kHz): a 25-frame mask would hide a spoken digit; 10 % caps it at 8
    m = TimeMasking(25, n_masks=1, generator=torch.Generator().manual_seed(0), max_fraction=0.1).train()
    widths = [int((m(torch.ones(1, 4, 87)) == 0).all(-2).sum()) for _ in range(300)]
    assert max(widths) == 8 and min(widths) == 0
    long = [int((m(torch.ones(1, 4, 431)) == 0).all(-2).sum()) for _ in range(300)]
    assert max(long) == 25  # on 5-s clips the cap does not bind
    with pytest.raises(AudioclfError, match="max_fraction"):
        TimeMasking(25, n_masks=1, max_fraction=1.5)


def test_time_shift_rolls_each_example_within_range():
    x = torch.arange(100.0).view(1, 1, 100).repeat(64, 3, 1)
    s = RandomTimeShift(0.2, torch.Generator().manual_seed(1)).train()
    y = s(x)
    shifts = (y[:, 0, 0] * -1) % 100  # x[t] = t, so y[0] = -shift mod 100
    shifts = torch.where(shifts > 50, shifts - 100, shifts)
    assert shifts.abs().max() <= 20 and len(set(shifts.tolist())) > 10
    for k in range(64):  # a circular roll: the same frames, the same order, all bands alike
        assert torch.equal(y[k], torch.roll(x[k], int(shifts[k]), dims=-1))
    assert torch.equal(s.eval()(x), x)
    assert torch.equal(RandomTimeShift(0.0).train()(x), x)


def test_frequency_shift_moves_bands_and_zero_fills():
    x = torch.arange(1.0, 41.0).view(1, 40, 1).repeat(64, 1, 5)  # band b holds b + 1
    s = RandomFrequencyShift(3, torch.Generator().manual_seed(2)).train()
    y = s(x)
    seen = set()
    for k in range(64):
        nz = y[k, :, 0][y[k, :, 0] > 0]
        first = int(torch.nonzero(y[k, :, 0])[0])
        shift = first - int(nz[0]) + 1  # where band 0 (value 1) landed, or how far it was pushed out
        seen.add(shift)
        assert abs(shift) <= 3
        assert torch.equal(nz, torch.arange(nz[0], nz[0] + len(nz)))  # order kept, nothing invented
        assert int((y[k, :, 0] == 0).sum()) == abs(shift)  # the bands shifted in are silent
    assert len(seen) > 4
    assert torch.equal(s.eval()(x), x) and torch.equal(RandomFrequencyShift(0).train()(x), x)
    with pytest.raises(AudioclfError, match="max_bands"):
        RandomFrequencyShift(-1)


def test_time_stretch_scales_events_in_time_within_range():
    # one 4-frame event at frames 40-43 of 100; stretching by f makes it about 4f frames long
    x = torch.zeros(64, 3, 100)
    x[..., 40:44] = 1.0
    s = RandomTimeStretch(0.25, torch.Generator().manual_seed(3)).train()
    y = s(x)
    assert y.shape == x.shape
    lengths = set()
    for k in range(64):
        on = torch.nonzero(y[k, 0] > 0.5).flatten()
        assert len(on) > 0  # a stretch of at most 1.25x keeps a mid-clip event inside the clip
        lengths.add(int(on[-1] - on[0]) + 1)
        assert torch.equal(y[k, 0], y[k, 2])  # every band stretched alike
    assert min(lengths) >= 3 and max(lengths) <= 5 and len(lengths) > 1
    # a compressed example is zero-padded (silence), never wrapped or repeated
    x = torch.ones(16, 2, 100)
    y = RandomTimeStretch(0.5, torch.Generator().manual_seed(4)).train()(x)
    silent = (y == 0).all(dim=-2).sum(-1)
    assert silent.max() > 0 and silent.max() <= 100 - int(100 / 1.5) + 1
    assert torch.equal(RandomTimeStretch(0.5).eval()(x), x) and RandomTimeStretch(0.0).train()(x) is x
    with pytest.raises(AudioclfError, match="time stretch"):
        RandomTimeStretch(-0.1)


def test_time_stretch_is_seeded():
    x = features()
    a = RandomTimeStretch(0.2, torch.Generator().manual_seed(5)).train()(x)
    b = RandomTimeStretch(0.2, torch.Generator().manual_seed(5)).train()(x)
    assert torch.equal(a, b) and not torch.equal(a, x)


def test_active_extent_spans_first_to_last_sound_gaps_included():
    from audioclf.augment import active_extent

    power = torch.full((2, 4, 100), 1e-6)
    power[0, :, 20:30] = 1.0
    power[0, :, 60:70] = 0.5  # a second bark after a silent gap: one event
    power[1] = 0.0  # digital silence: no extent
    extent = active_extent(power)
    on = extent[0].nonzero().squeeze(1)
    assert abs(on[0].item() - 20) <= 2 and abs(on[-1].item() - 69) <= 2 and len(on) == on[-1] - on[0] + 1
    assert extent[1].sum() == 0


def test_roll_time_rolls_each_example_by_its_own_shift():
    from audioclf.augment import roll_time

    x = torch.arange(30.0).view(3, 1, 10).repeat(1, 2, 1)
    shifts = torch.tensor([0, 3, -2])
    out = roll_time(x, shifts)
    for i in range(3):
        assert torch.equal(out[i], torch.roll(x[i], int(shifts[i]), -1))
