import os
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

from audioclf.audio import (audio_duration_s, find_audio_files, fix_length, inference_windows, load_audio, stream_audio,
                            window_starts)
from audioclf.config import AudioclfError
from conftest import chirp_noise, tone

SR = 22050


def peak_hz(wave: np.ndarray, sample_rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(wave.size)))
    return float(np.fft.rfftfreq(wave.size, 1 / sample_rate)[spectrum.argmax()])


# ------------------------------------------------------------------------------------------- bad files

def test_unreadable_file_names_the_path(tmp_path):
    bad = tmp_path / "garbage.wav"
    bad.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(AudioclfError, match="garbage.wav.*cannot decode"):
        load_audio(bad, SR)


def test_empty_file_names_the_path(tmp_path):
    empty = tmp_path / "empty.wav"
    empty.touch()
    with pytest.raises(AudioclfError, match="empty.wav.*empty \\(0 bytes\\)"):
        load_audio(empty, SR)


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(AudioclfError, match="nope.wav: no such audio file"):
        load_audio(tmp_path / "nope.wav", SR)


def test_zero_length_audio_names_the_path(write_wav):
    path = write_wav(np.zeros(0, dtype=np.float32), 16000, name="silent.wav")
    assert path.stat().st_size > 0  # a valid header, no frames
    with pytest.raises(AudioclfError, match="silent.wav.*zero samples"):
        load_audio(path, SR)


@pytest.mark.parametrize("bad_value", [np.nan, np.inf])
def test_non_finite_audio_names_the_path(write_wav, bad_value):
    wave = tone(440, 16000, 0.1)
    wave[100] = bad_value
    path = write_wav(wave, 16000, name="nonfinite.wav", subtype="FLOAT")
    assert not np.isfinite(sf.read(path)[0]).all()  # soundfile kept the bad sample
    with pytest.raises(AudioclfError, match="nonfinite.wav.*NaN or infinite"):
        load_audio(path, SR)


def test_truncated_flac_names_the_path(write_wav):
    path = write_wav(tone(440, 16000, 0.5), 16000, name="cut.flac")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(AudioclfError, match="cut.flac: decoding failed part-way"):
        load_audio(path, SR)


# ------------------------------------------------------------------------------------ channels and rates

def test_multichannel_is_mixed_to_mono_by_mean(write_wav):
    rng = np.random.default_rng(1)
    data = (rng.uniform(-0.1, 0.1, (2000, 8)) + np.linspace(-0.8, 0.8, 8)).astype(np.float32)
    path = write_wav(data, SR, subtype="FLOAT")
    wave = load_audio(path, SR)
    assert wave.shape == (2000,) and wave.dtype == np.float32
    np.testing.assert_allclose(wave, data.mean(axis=1), atol=1e-6)


@pytest.mark.parametrize("orig_sr", [8000, 96000])
def test_resampling_keeps_length_and_pitch(write_wav, orig_sr):
    duration_s, freq = 1.3, 1000.0
    path = write_wav(tone(freq, orig_sr, duration_s), orig_sr, subtype="FLOAT")
    wave = load_audio(path, SR)
    assert wave.dtype == np.float32
    assert abs(wave.size - round(duration_s * SR)) <= 1
    assert abs(peak_hz(wave, SR) - freq) < 2.0  # bin spacing is 1 / 1.3 s
    assert np.abs(wave).max() == pytest.approx(0.5, abs=0.02)  # no gain change


def test_same_rate_is_returned_unchanged(write_wav):
    data = chirp_noise(SR, 0.5)
    path = write_wav(data, SR, subtype="FLOAT")
    np.testing.assert_array_equal(load_audio(path, SR), data)


def test_audio_duration_from_header(write_wav):
    assert audio_duration_s(write_wav(tone(440, 8000, 1.25), 8000)) == pytest.approx(1.25)


@pytest.mark.shared_data
def test_fsdd_recording_loads_at_target_rate(fsdd_root):
    path = fsdd_root / "recordings" / "0_george_0.wav"
    with sf.SoundFile(path) as f:
        assert f.samplerate == 8000
        frames = f.frames
    wave = load_audio(path, SR)
    assert abs(wave.size - round(frames * SR / 8000)) <= 1
    assert 0 < np.abs(wave).max() <= 1.0


# ------------------------------------------------------------------------------------------- fix_length

@pytest.mark.parametrize("as_tensor", [False, True])
def test_fix_length_centre_crop(as_tensor):
    wave = np.arange(10, dtype=np.float32)
    x = torch.from_numpy(wave) if as_tensor else wave
    out = fix_length(x, 4)
    assert type(out) is type(x)
    np.testing.assert_array_equal(np.asarray(out), [3, 4, 5, 6])


@pytest.mark.parametrize("as_tensor", [False, True])
def test_fix_length_zero_pads_at_the_end(as_tensor):
    wave = np.ones((2, 3), dtype=np.float32)  # batch axes are kept
    x = torch.from_numpy(wave) if as_tensor else wave
    out = fix_length(x, 5)
    assert type(out) is type(x)
    np.testing.assert_array_equal(np.asarray(out), [[1, 1, 1, 0, 0]] * 2)


@pytest.mark.parametrize("as_tensor", [False, True])
def test_fix_length_random_crop_is_in_bounds_and_seeded(as_tensor):
    wave = np.arange(100, dtype=np.float32)
    x = torch.from_numpy(wave) if as_tensor else wave
    g = torch.Generator().manual_seed(0)
    starts = []
    for _ in range(50):
        out = np.asarray(fix_length(x, 30, random_crop=True, generator=g))
        assert out.shape == (30,)
        np.testing.assert_array_equal(out, np.arange(out[0], out[0] + 30))  # a contiguous window
        starts.append(int(out[0]))
    assert min(starts) >= 0 and max(starts) <= 70
    assert len(set(starts)) > 10  # it really moves
    g2 = torch.Generator().manual_seed(0)
    again = [int(np.asarray(fix_length(x, 30, random_crop=True, generator=g2))[0]) for _ in range(50)]
    assert again == starts


def test_fix_length_exact_length_is_untouched():
    x = torch.randn(7)
    assert torch.equal(fix_length(x, 7, random_crop=True), x)


# -------------------------------------------------------------------------------------------- windows

@pytest.mark.parametrize("n_samples, starts", [
    (0, [0]), (50, [0]), (100, [0]),  # up to one window: zero-padded from the start
    (105, [2]), (110, [5]),  # at most CROP_SLACK longer: one window, centre-cropped as fix_length crops
    (111, [0, 11]),  # longer: a window every hop, the last one ending exactly at the end
    (200, [0, 50, 100]),  # the hop grid ends exactly at the end: no extra window
    (201, [0, 50, 100, 101]),
    (260, [0, 50, 100, 150, 160]),
])
def test_window_starts(n_samples, starts):
    assert window_starts(n_samples, 100, 50) == starts


def test_window_starts_with_a_hop_longer_than_the_window_still_ends_at_the_end():
    assert window_starts(350, 100, 120) == [0, 120, 240, 250]


def test_inference_windows_cut_at_window_starts():
    wave = torch.arange(1, 261, dtype=torch.float32)
    windows = inference_windows(wave, 100, 50)
    assert windows.shape == (5, 100)
    assert windows[:, 0].tolist() == [1, 51, 101, 151, 161] and windows[-1, -1] == 260
    padded = inference_windows(wave[:30], 100, 50)
    assert padded.shape == (1, 100) and padded[0, 29] == 30 and not padded[0, 30:].any()
    np.testing.assert_array_equal(inference_windows(wave[:105], 100, 50)[0], fix_length(wave[:105], 100))


# -------------------------------------------------------------------------------------------- streaming

@pytest.mark.parametrize("orig_sr, duration_s, block_s", [
    (44100, 3.37, 0.5),
    (8000, 2.0, 0.5),  # a whole number of blocks: the last read is empty
    (SR, 1.7, 0.4),  # no resampling
])
def test_stream_audio_matches_load_audio(write_wav, orig_sr, duration_s, block_s):
    path = write_wav(chirp_noise(orig_sr, duration_s), orig_sr, subtype="FLOAT")
    full = load_audio(path, SR)
    blocks = list(stream_audio(path, SR, block_s=block_s))
    assert len(blocks) >= int(duration_s / block_s)
    assert all(b.ndim == 1 and b.dtype == np.float32 for b in blocks)
    streamed = np.concatenate(blocks)
    assert abs(streamed.size - full.size) <= 4
    n = min(streamed.size, full.size)
    np.testing.assert_allclose(streamed[1000:n - 1000], full[1000:n - 1000], atol=1e-4)


def test_stream_audio_mixes_channels(write_wav):
    path = write_wav(tone(300, SR, 0.5), SR, channels=2, subtype="FLOAT")
    np.testing.assert_allclose(np.concatenate(list(stream_audio(path, SR, block_s=0.1))), tone(300, SR, 0.5),
                               atol=1e-6)


# ------------------------------------------------------------------------------------------- discovery

def test_find_audio_files_recursive_sorted_case_insensitive(tmp_path):
    for rel in ["b/x.WAV", "a/deep/er/y.flac", "a/z.ogg", "a/notes.txt", "c.mp3"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    os.mkdir(tmp_path / "dir.wav")  # a folder with an audio-looking name is not a file
    found = [p.relative_to(tmp_path).as_posix() for p in find_audio_files(tmp_path)]
    assert found == ["a/deep/er/y.flac", "a/z.ogg", "b/x.WAV", "c.mp3"]


# ------------------------------------------------------------------------------------------- tar members

def _tar_of(tmp_path, files: dict, name="set.tar"):
    """An uncompressed tar holding ``files`` (member name -> bytes)."""
    import io
    import tarfile

    path = tmp_path / name
    with tarfile.open(path, "w") as t:
        for member, data in files.items():
            info = tarfile.TarInfo(member)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path


def test_a_tar_member_decodes_like_the_file(tmp_path, write_wav):
    from audioclf.audio import member_path, read_source, split_member

    wav = write_wav(chirp_noise(16000, 2.0), 16000, name="src/a.wav")
    flac = tmp_path / "src" / "b.flac"
    sf.write(flac, tone(300, 16000, 1.0), 16000)
    tar = _tar_of(tmp_path, {"k1.wav": wav.read_bytes(), "dir/k2.flac": flac.read_bytes()})
    a, b = member_path(tar, "k1.wav"), member_path(tar, "dir/k2.flac")
    assert a == f"{os.path.realpath(tar)}#k1.wav" and split_member(b) == (os.path.realpath(tar), "dir/k2.flac")
    np.testing.assert_array_equal(load_audio(a, SR), load_audio(wav, SR))
    np.testing.assert_array_equal(load_audio(b, 8000), load_audio(flac, 8000))
    assert audio_duration_s(a) == pytest.approx(2.0)
    np.testing.assert_allclose(np.concatenate(list(stream_audio(a, SR, block_s=0.5))), load_audio(wav, SR), atol=1e-3)
    assert read_source(b) == flac.read_bytes()


def test_a_file_named_with_a_hash_is_a_file_not_a_member(tmp_path, write_wav):
    from audioclf.audio import split_member

    tar = _tar_of(tmp_path, {"x.wav": b"not audio"}, name="a.tar")
    plain = write_wav(tone(440, 16000, 0.5), 16000, name="a.tar#x.wav")  # the very path a member would have
    assert split_member(plain) is None
    assert load_audio(plain, 16000).shape == (8000,)
    # a tar whose own name holds '#': the split is at the '#' after an existing .tar
    odd = _tar_of(tmp_path, {"y.wav": plain.read_bytes()}, name="odd#1.tar")
    assert split_member(f"{odd}#y.wav") == (str(odd), "y.wav")
    assert split_member(f"{tmp_path}/nothing.tar#y.wav") is None  # no such tar: not a member path
    assert split_member(f"{tar}") is None and split_member(tmp_path / "a.tar") is None


def test_tar_member_errors_name_the_member(tmp_path, write_wav):
    wav = write_wav(tone(440, 16000, 0.5), 16000)
    tar = _tar_of(tmp_path, {"k.wav": wav.read_bytes(), "empty.wav": b""})
    with pytest.raises(AudioclfError, match=r"set\.tar#gone\.wav: the tar has no member 'gone\.wav'"):
        load_audio(f"{tar}#gone.wav", 16000)
    with pytest.raises(AudioclfError, match=r"set\.tar#empty\.wav: the tar member is empty"):
        load_audio(f"{tar}#empty.wav", 16000)
    cut = tmp_path / "cut.tar"
    cut.write_bytes(tar.read_bytes()[:700])  # the first header and part of its data
    with pytest.raises(AudioclfError, match=r"cut\.tar"):
        load_audio(f"{cut}#k.wav", 16000)
    gz = tmp_path / "set.tar.gz"
    import gzip
    gz.write_bytes(gzip.compress(tar.read_bytes()))
    bad = tmp_path / "zipped.tar"
    bad.write_bytes(gz.read_bytes())
    with pytest.raises(AudioclfError, match=r"zipped\.tar: not an uncompressed tar"):
        load_audio(f"{bad}#k.wav", 16000)


def test_source_stat_follows_a_rewritten_tar(tmp_path, write_wav):
    from audioclf.audio import source_stat

    wav = write_wav(tone(440, 16000, 0.5), 16000)
    tar = _tar_of(tmp_path, {"k.wav": wav.read_bytes()})
    first = source_stat(f"{tar}#k.wav")
    assert first.st_size == wav.stat().st_size and first.st_mtime_ns == tar.stat().st_mtime_ns
    assert source_stat(wav) == (wav.stat().st_size, wav.stat().st_mtime_ns)
    longer = write_wav(tone(440, 16000, 1.0), 16000, name="longer.wav")
    _tar_of(tmp_path, {"k.wav": longer.read_bytes()})
    os.utime(tar, ns=(first.st_mtime_ns + 10**9, first.st_mtime_ns + 10**9))  # a coarse clock could hide the rewrite
    second = source_stat(f"{tar}#k.wav")
    assert second != first and second.st_size == longer.stat().st_size
    assert load_audio(f"{tar}#k.wav", 16000).shape == (16000,)  # the new member, not the indexed old one
    with pytest.raises(FileNotFoundError):
        source_stat(f"{tar}#other.wav")
    with pytest.raises(FileNotFoundError):
        source_stat(tmp_path / "missing.wav")


# ---------------------------------------------------------------------------------------------- PyAV: m4a, webm, mp4

def encode_with_pyav(path, container: str, codec: str, wave: np.ndarray, sample_rate: int, **options) -> None:
    """``wave`` (mono) encoded by FFmpeg through PyAV, as a browser's recorder or a phone would."""
    av = pytest.importorskip("av")
    with av.open(str(path), mode="w", format=container, options=options) as out:
        stream = out.add_stream(codec, rate=sample_rate)
        stream.layout = "mono"
        step = stream.codec_context.frame_size or 1024
        for start in range(0, len(wave), step):
            frame = av.AudioFrame.from_ndarray(wave[None, start:start + step], format="flt", layout="mono")
            frame.sample_rate, frame.pts = sample_rate, start
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))


@pytest.mark.parametrize("name, container, codec, options", [
    ("browser.webm", "webm", "libopus", {"live": "1"}),  # as MediaRecorder writes it: no duration in the header
    ("phone.m4a", "ipod", "aac", {}),
    ("video.mp4", "mp4", "aac", {}),
])
def test_pyav_decodes_what_soundfile_cannot(tmp_path, name, container, codec, options):
    sr = 48000
    wave = (0.5 * np.sin(2 * np.pi * 440 * np.arange(2 * sr) / sr)).astype(np.float32)
    path = tmp_path / name
    encode_with_pyav(path, container, codec, wave, sr, **options)
    with pytest.raises(sf.LibsndfileError):
        sf.info(str(path))  # soundfile alone cannot
    assert audio_duration_s(path) == pytest.approx(2.0, abs=0.05)
    got = load_audio(path, 16000)
    assert len(got) == pytest.approx(32000, abs=800) and got.dtype == np.float32
    spectrum = np.abs(np.fft.rfft(got[4000:20000]))
    assert np.fft.rfftfreq(16000, 1 / 16000)[np.argmax(spectrum)] == pytest.approx(440, abs=2)  # the tone, at its pitch
    assert np.sqrt(np.mean(got[4000:20000] ** 2)) == pytest.approx(0.5 / np.sqrt(2), rel=0.1)  # and its level
    streamed = np.concatenate(list(stream_audio(path, 16000, block_s=0.3)))
    np.testing.assert_allclose(streamed[:30000], got[:30000], atol=2e-3)
    assert find_audio_files(tmp_path) == [path]


def test_without_pyav_the_error_names_the_extra(tmp_path, monkeypatch):
    path = tmp_path / "clip.m4a"
    path.write_bytes(b"\x00\x00\x00\x18ftypM4A " + b"\x00" * 64)
    monkeypatch.setitem(sys.modules, "av", None)  # import fails
    with pytest.raises(AudioclfError, match=r"clip.m4a: soundfile cannot decode it .*audioclf\[av\]"):
        load_audio(path, 16000)


def test_garbage_is_refused_by_both_decoders(tmp_path):
    pytest.importorskip("av")
    path = tmp_path / "noise.webm"
    path.write_bytes(b"not a media file at all" * 20)
    with pytest.raises(AudioclfError, match="noise.webm: soundfile cannot decode it .*nor can FFmpeg"):
        audio_duration_s(path)
