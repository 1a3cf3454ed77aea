"""Audio I/O: decode with soundfile, mix to mono, resample with soxr, pad or crop to a fixed length.

soundfile (libsndfile) decodes WAV, FLAC, OGG/Vorbis, Opus in Ogg and MP3. What it cannot (m4a/AAC, webm/opus as
browsers record it, mp4 audio) goes to PyAV, whose wheels bundle FFmpeg: the optional extra ``audioclf[av]``.

Everything here works on 1-D ``float32`` numpy arrays in [-1, 1] at a known sample rate (Hz).

An audio source is a file path, or a member of an uncompressed tar (a WebDataset shard) written as
``/abs/shard-000003.tar#key.flac`` (:func:`member_path`); every reader here takes both.
"""

from __future__ import annotations

import errno
import functools
import io
import os
import re
import tarfile
from pathlib import Path
from typing import Iterator, NamedTuple, Optional, Union

import numpy as np
import soundfile as sf
import soxr
import torch

from .errors import AudioclfError

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif", ".au", ".opus", ".m4a", ".aac", ".mp4", ".webm")
AV_INSTALL = 'pip install "audioclf[av]"'


def link_problem(path) -> Optional[str]:
    """Why the symlink ``path`` leads to no file ("broken symlink ...", "symlink loop ..."); None when
    ``path`` is not a symlink or its target exists."""
    if not os.path.islink(path):
        return None
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "symlink loop (following the link leads back to it)"
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            return f"broken symlink (its target {os.readlink(path)} does not exist)"
        return f"cannot follow the symlink ({e.strerror})"
    return None


def _open(path) -> sf.SoundFile:
    member = split_member(path)
    if member is not None:
        data = read_member(*member)
        if not data:
            raise AudioclfError(f"{path}: the tar member is empty (0 bytes)")
        return _decoder(io.BytesIO(data), path)
    path = Path(path)
    if not path.is_file():
        raise AudioclfError(f"{path}: {link_problem(path) or 'no such audio file'}")
    if not os.access(path, os.R_OK):
        raise AudioclfError(f"{path}: permission denied (this user may not read the file)")
    if path.stat().st_size == 0:
        raise AudioclfError(f"{path}: the file is empty (0 bytes)")
    # Bytes, not str: soundfile encodes a str name strictly, so a name that is not valid UTF-8
    # (surrogate-escaped by Python) would fail with UnicodeEncodeError.
    return _decoder(os.fsencode(path), path)


# libsndfile's report of a chunk whose declared size passes the end of the file: "data : 32000 (should be 2956)"
_SHORT_CHUNK = re.compile(r"^\s*(?:data|SSND)\s*:\s*(\d+)\s*\(should be (\d+)\)", re.M)


def _decoder(source: Union[bytes, io.BytesIO], name) -> Union[sf.SoundFile, "AVFile"]:
    """soundfile's decoder for ``source``, else PyAV's."""
    try:
        f = sf.SoundFile(source)
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        reason = f"soundfile cannot decode it ({getattr(e, 'error_string', e)})"
    else:
        short = _SHORT_CHUNK.search(f.extra_info)
        if short and int(short[1]) > int(short[2]):
            # libsndfile reads what is there without a word: a truncated WAV would be classified as its start
            f.close()
            raise AudioclfError(f"{name}: truncated: its header declares {int(short[1])} bytes of audio, the file "
                                f"holds {int(short[2])}; copy or export it again")
        return f
    try:
        import av
    except ImportError:
        raise AudioclfError(f"{name}: {reason}; m4a/AAC, webm and mp4 audio need PyAV: {AV_INSTALL}") from None
    if isinstance(source, io.BytesIO):
        source.seek(0)
    try:
        return AVFile(av.open(source if isinstance(source, io.BytesIO) else os.fsdecode(source)), name)
    except av.FFmpegError as e:
        raise AudioclfError(f"{name}: {reason}, nor can FFmpeg ({e}); readable formats: "
                            f"{', '.join(sorted(sf.available_formats()))}, and what FFmpeg reads") from None


class AVFile:
    """The part of ``soundfile.SoundFile`` audioclf reads (``frames``, ``samplerate``, ``channels``, ``format``,
    ``read``), over the first audio stream of a PyAV container.

    ``frames`` comes from the container's header; a file without a duration in its header (webm as browsers
    record it) is decoded once to count them.
    """

    def __init__(self, container, name):
        import av

        self.name, self._container = name, container
        if not container.streams.audio:
            container.close()
            raise AudioclfError(f"{name}: the file holds no audio stream")
        self._stream = container.streams.audio[0]
        self.samplerate, self.channels = self._stream.codec_context.sample_rate, self._stream.codec_context.channels
        self.format = container.format.name.split(",")[0].upper()
        if container.duration is not None:
            self.frames = round(container.duration / av.time_base * self.samplerate)
        else:
            self.frames = sum(f.samples for f in self._decode())
            container.seek(0)
        self._frames, self._pending = self._decode(), np.zeros((0, self.channels), np.float32)

    def _decode(self) -> Iterator:
        import av

        try:
            yield from self._container.decode(self._stream)
        except av.FFmpegError as e:
            raise AudioclfError(f"{self.name}: decoding failed part-way ({e})") from None

    def read(self, frames: int = -1, dtype: str = "float32", always_2d: bool = True) -> np.ndarray:
        """Up to ``frames`` (all when -1) samples from where the last read stopped: ``(time, channels)`` float32."""
        parts, have = [self._pending], len(self._pending)
        while frames < 0 or have < frames:
            frame = next(self._frames, None)
            if frame is None:
                break
            x = frame.to_ndarray().astype(np.float32, copy=False)
            if frame.format.is_planar:  # (channels, time)
                x = x.T
            else:  # interleaved: (1, time * channels)
                x = x.reshape(-1, len(frame.layout.channels))
            if frame.format.name.startswith(("s16", "s32")):  # integer samples to [-1, 1]
                x = x / np.float32(2 ** (8 * frame.format.bytes - 1))
            parts.append(x)
            have += len(x)
        out = np.concatenate(parts) if len(parts) > 1 else parts[0]
        end = len(out) if frames < 0 else frames
        self._pending = out[end:]
        return out[:end]

    def close(self) -> None:
        self._container.close()

    def __enter__(self) -> "AVFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------- tar members

MEMBER_SEP = "#"  # between a tar's path and a member's name in a source path


class TarMember(NamedTuple):
    offset: int  # bytes from the start of the tar to the member's data
    size: int  # bytes
    kind: str = "file"  # or "symlink", "hardlink", "device", "fifo": no data of its own to read


def _member_kind(m: tarfile.TarInfo) -> str:
    return ("file" if m.isreg() else "symlink" if m.issym() else "hardlink" if m.islnk()
            else "device" if m.isdev() and not m.isfifo() else "fifo" if m.isfifo() else "")


class SourceStat(NamedTuple):
    """What identifies the content of an audio source, for cache keys (``os.stat``'s field names)."""

    st_size: int  # bytes of the file or member
    st_mtime_ns: int  # of the file, or of the tar holding the member


def member_path(tar, name: str) -> str:
    """The source path of member ``name`` of ``tar``: the tar's absolute real path, ``#``, the name."""
    return f"{os.path.realpath(tar)}{MEMBER_SEP}{name}"


def split_member(path) -> Optional[tuple[str, str]]:
    """(tar, member name) when ``path`` names a tar member (:func:`member_path`), else None.

    A plain file always wins: a path that exists as it is, ``#`` in its name or not, is a file. Otherwise
    the first ``#`` whose left side is an existing ``.tar`` file splits it, so a tar's own path may hold
    ``#`` too (a member name may as well: it is everything after the split).
    """
    path = os.fspath(path)
    if not isinstance(path, str) or MEMBER_SEP not in path or os.path.lexists(path):
        return None
    at = path.find(MEMBER_SEP)
    while at != -1:
        tar = path[:at]
        if tar.lower().endswith(".tar") and os.path.isfile(tar):
            return tar, path[at + 1:]
        at = path.find(MEMBER_SEP, at + 1)
    return None


def tar_index(tar) -> dict[str, TarMember]:
    """Name -> :class:`TarMember` of every member of the uncompressed tar ``tar`` but folders, in tar order
    (links and devices have their ``kind``, and nothing to read).

    Read from the headers alone (the data is skipped, not read) and kept per process, keyed by the tar's
    size and mtime: decoding workers look members up without rescanning, and a rewritten tar is read
    again. Forked DataLoader workers inherit the index their parent built.

    Raises:
        AudioclfError: naming ``tar``, when it cannot be read or is not an uncompressed tar, or when it holds
            one name twice (a later member would silently replace the first).
    """
    try:
        st = os.stat(tar)
    except OSError as e:
        raise AudioclfError(f"{tar}: cannot read the tar ({e.strerror})") from None
    return _cached_tar_index(os.path.realpath(tar), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=1024)
def _cached_tar_index(tar: str, size: int, mtime_ns: int) -> dict[str, TarMember]:
    try:
        # "r:" reads uncompressed tars only: a member of a compressed one cannot be reached without
        # decompressing everything before it, for every clip.
        with tarfile.open(tar, "r:") as t:
            members = {}
            for m in t:
                kind = _member_kind(m)
                if not kind:
                    continue  # a folder
                if m.name in members:
                    raise AudioclfError(f"{tar}: holds the member {m.name!r} twice, so one sample would silently "
                                        f"replace another; write the shard again with each name once")
                members[m.name] = TarMember(m.offset_data, m.size if kind == "file" else 0, kind)
            return members
    except tarfile.ReadError as e:
        raise AudioclfError(f"{tar}: not an uncompressed tar archive ({e}); shards must be plain .tar files "
                            f"(decompress .tar.gz shards first)") from None
    except OSError as e:
        raise AudioclfError(f"{tar}: cannot read the tar ({e.strerror or e})") from None


def read_member(tar, name: str) -> bytes:
    """The bytes of member ``name`` of ``tar``, read at its offset (no scan: see :func:`tar_index`).

    Raises:
        AudioclfError: naming the member, when the tar has no such member or ends inside it.
    """
    entry = tar_index(tar).get(name)
    if entry is None:
        raise AudioclfError(f"{member_path(tar, name)}: the tar has no member {name!r}")
    if entry.kind != "file":
        raise AudioclfError(f"{member_path(tar, name)}: a {entry.kind} member, not a file; shards hold the bytes "
                            f"of each file (audioclf shard writes them so)")
    try:
        with open(tar, "rb") as f:
            f.seek(entry.offset)
            data = f.read(entry.size)
    except OSError as e:
        raise AudioclfError(f"{member_path(tar, name)}: cannot read the tar ({e.strerror or e})") from None
    if len(data) != entry.size:
        raise AudioclfError(f"{member_path(tar, name)}: the tar ends inside the member (truncated shard)")
    return data


def source_stat(path) -> SourceStat:
    """Size and mtime of the audio source ``path``: a file's own, or a tar member's size with its tar's
    mtime (rewriting the tar changes it).

    Raises:
        OSError: as ``os.stat`` does, when the file, the tar or the member is not there or not readable.
    """
    member = split_member(path)
    if member is None:
        st = os.stat(path)
        return SourceStat(st.st_size, st.st_mtime_ns)
    tar, name = member
    st = os.stat(tar)
    try:
        entry = tar_index(tar).get(name)
    except AudioclfError as e:
        raise OSError(errno.EIO, str(e), path) from None
    if entry is None:
        raise FileNotFoundError(errno.ENOENT, "no such member in the tar", path)
    return SourceStat(entry.size, st.st_mtime_ns)


def source_exists(path) -> bool:
    """Whether ``path`` is a file, or a member of a readable tar that holds it."""
    if split_member(path) is None:
        return os.path.isfile(path)
    try:
        source_stat(path)
    except OSError:
        return False
    return True


def read_source(path) -> bytes:
    """The encoded bytes of the audio source ``path`` (a file or a tar member), as stored."""
    member = split_member(path)
    if member is not None:
        return read_member(*member)
    with open(path, "rb") as f:
        return f.read()


def to_mono(wave: np.ndarray) -> np.ndarray:
    """(time,) or (time, channels) -> (time,), averaging channels."""
    return wave if wave.ndim == 1 else wave.mean(axis=1)


def resample(wave: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    if orig_sr == target_sr or wave.size == 0:
        return wave.astype(np.float32, copy=False)
    return soxr.resample(wave, orig_sr, target_sr, quality="HQ").astype(np.float32, copy=False)


def resample_stream(orig_sr: int, target_sr: int) -> "soxr.ResampleStream":
    """A mono float32 resampler fed block by block, of :func:`resample`'s quality."""
    return soxr.ResampleStream(orig_sr, target_sr, 1, dtype="float32", quality="HQ")


def decode(path) -> tuple[np.ndarray, int]:
    """Decode ``path`` as stored: ``(time, channels)`` float32 samples and the file's sample rate (Hz).

    Raises:
        AudioclfError: naming the file, when it is missing, empty, undecodable, has no samples,
            or holds NaN/inf.
    """
    with _open(path) as f:
        try:
            wave = f.read(dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError) as e:
            raise AudioclfError(f"{path}: decoding failed part-way ({e})") from None
        orig_sr = f.samplerate
    if wave.shape[0] == 0:
        raise AudioclfError(f"{path}: the file holds zero samples of audio")
    if not np.isfinite(wave).all():
        raise AudioclfError(f"{path}: the audio holds NaN or infinite samples")
    return wave, orig_sr


def load_audio(path, sample_rate: int) -> np.ndarray:
    """Decode ``path`` to mono float32 at ``sample_rate`` Hz (the errors of :func:`decode`)."""
    wave, orig_sr = decode(path)
    return resample(to_mono(wave), orig_sr, sample_rate)


def audio_duration_s(path) -> float:
    """Length of the file in seconds, read from its header."""
    with _open(path) as f:
        return f.frames / f.samplerate


def audio_format(path) -> str:
    """soundfile's name for the format of ``path`` found in its header ("WAV", "FLAC", "OGG", "MP3", ...)."""
    with _open(path) as f:
        return f.format


BLOCK_S = 30.0  # seconds of audio stream_audio decodes at once


def decoding_bytes(path, block_s: float = BLOCK_S) -> int:
    """Bytes of float32 samples that decoding ``path`` holds at once (:func:`stream_audio`'s block, at the
    file's own rate and channels; a short file whole), read from its header."""
    with _open(path) as f:
        return 4 * f.channels * min(f.frames, int(block_s * f.samplerate))


def stream_audio(path, sample_rate: int, block_s: float = BLOCK_S) -> Iterator[np.ndarray]:
    """Yield consecutive mono float32 blocks of ``path`` at ``sample_rate``; memory stays at one block.

    Concatenating the blocks gives (to within resampler edge effects) ``load_audio(path, sample_rate)``.
    """
    with _open(path) as f:
        orig_sr = f.samplerate
        block = max(1, int(block_s * orig_sr))
        stream = None if orig_sr == sample_rate else resample_stream(orig_sr, sample_rate)
        while True:
            chunk = f.read(block, dtype="float32", always_2d=True)
            last = chunk.shape[0] < block
            mono = to_mono(chunk).astype(np.float32, copy=False)
            out = mono if stream is None else stream.resample_chunk(mono, last=last)
            if out.size:
                yield out
            if last:
                return


def fix_length(wave: torch.Tensor | np.ndarray, n_samples: int, *, random_crop: bool = False,
               generator: Optional[torch.Generator] = None):
    """Crop or zero-pad the last axis to ``n_samples``.

    Longer input is cropped at the centre, or at a random offset drawn from ``generator`` when
    ``random_crop`` (training). Shorter input is zero-padded at the end.
    """
    n = wave.shape[-1]
    if n > n_samples:
        excess = n - n_samples
        start = int(torch.randint(0, excess + 1, (1,), generator=generator)) if random_crop else excess // 2
        return wave[..., start:start + n_samples]
    if n < n_samples:
        pad = [(0, 0)] * (wave.ndim - 1) + [(0, n_samples - n)]
        if isinstance(wave, np.ndarray):
            return np.pad(wave, pad)
        return torch.nn.functional.pad(wave, (0, n_samples - n))
    return wave


# A clip at most this much longer than the window is centre-cropped to one window: sliding windows would
# only add a second window that overlaps the first almost entirely.
CROP_SLACK = 0.1


def default_hop(window: int) -> int:
    """Samples between the windows of a long recording unless told otherwise: half a window."""
    return max(1, window // 2)


def window_starts(n_samples: int, window: int, hop: int) -> list[int]:
    """The one rule for cutting a recording of ``n_samples`` samples into windows of ``window`` samples:
    the start sample of each window, in order.

    A recording at most ``CROP_SLACK`` longer than the window is one window, centre-cropped (or, when
    shorter, zero-padded at the end from start 0). A longer one gets a window every ``hop`` samples, plus
    one ending exactly at the end when the last of those stops short of it, so every sample is seen.
    """
    if n_samples <= window * (1 + CROP_SLACK):
        return [max(0, (n_samples - window) // 2)]  # fix_length's centre crop
    starts = list(range(0, n_samples - window + 1, hop))
    if starts[-1] + window < n_samples:
        starts.append(n_samples - window)
    return starts


def settled_windows(n_samples: int, window: int, hop: int) -> int:
    """How many of :func:`window_starts`' starts for ``n_samples`` samples stay where they are whatever
    audio follows: all but the last, which is centred or end-aligned. They are the first ones on the hop
    grid, so a stream can settle windows without listing the starts again for every block."""
    if n_samples <= window * (1 + CROP_SLACK):
        return 0
    return -(-(n_samples - window) // hop)


def inference_windows(wave: torch.Tensor, window: int, hop: int) -> torch.Tensor:
    """The windows a model classifies in one recording, ``(k, window)``, at :func:`window_starts`
    (``windows.sliding_windows`` streams the same ones).

    Training caches the features of exactly these windows, each peak-normalised on its own, so a model
    sees in training what it sees in prediction.
    """
    return torch.stack([fix_length(wave[s:s + window], window) for s in window_starts(wave.shape[-1], window, hop)])


def find_audio_files(root) -> list[Path]:
    """All audio files below ``root`` (recursive), sorted for a stable order."""
    root = Path(root)
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS)
