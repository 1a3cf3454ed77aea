"""The options of running a trained model, declared as the run's settings are (:func:`audioclf.config.setting`):
each with its one default, help text, flag and allowed range. The CLI generates the flags of ``predict``,
``evaluate``, ``embed`` and ``serve`` from these declarations, and the library functions take their defaults
from them (``top_k: int = PredictOptions.top_k``), so a default is written once.

``PredictOptions``  how a model classifies: top_k, batch size, device, sliding window and hop
``ServeLimits``     where ``audioclf serve`` listens and the bounds of every request it answers
``AuditOptions``    how ``audioclf audit`` embeds clips and decides which are near-duplicates
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional
from urllib.parse import urlsplit

from .backbones import BACKBONES
from .errors import AudioclfError
from .settings import DEVICES, _check_settings, check_device, setting


@dataclass(frozen=True)
class PredictOptions:
    """How a trained model classifies audio: shared by predict, evaluate, embed, serve and the Python API."""

    SECTION = "predict"

    top_k: int = setting(3, help="how many of the best classes to list per file", low=1, high=10**6)
    batch_size: int = setting(32, help="windows per forward pass", low=1, high=65536)
    device: str = setting("auto", help=DEVICES)
    window_s: Optional[float] = setting(None, flag="--window", help="sliding-window length in s (default: the "
                                                                    "training duration)")
    hop_s: Optional[float] = setting(None, flag="--hop", help="sliding-window hop in s (default: half the window)")
    reject: bool = setting(True, help="answer 'unknown' for sounds unlike every trained class (the model's rule, "
                                      "fitted on its validation clips); --no-reject: always a trained class")

    def __post_init__(self):
        _check_settings(self)
        check_device(self.device)


@dataclass(frozen=True)
class ServeLimits:
    """Where ``audioclf serve`` listens, and the bounds of every request: a request's work and memory are
    bounded by these, never by the client's parameters."""

    SECTION = "serve"

    host: str = setting("127.0.0.1", help="address to listen on (0.0.0.0: every network interface)")
    port: int = setting(8000, help="TCP port to listen on", low=0, high=65535)
    max_upload_mb: float = setting(50.0, help="largest upload in MiB, else 413", low=0.0, high=1e6, low_open=True)
    max_audio_s: float = setting(600.0, help="longest decoded audio in s, else 413", low=0.0, high=1e6,
                                 low_open=True)
    max_windows: int = setting(2000, help="most sliding windows per request, else 422", low=1, high=10**6)
    timeout_s: float = setting(10.0, help="seconds a client may stall: headers, body, idle", low=0.0, high=3600.0,
                               low_open=True)
    # each open connection may hold an upload, twice over on disk (the upload spool and its decodable copy)
    max_connections: int = setting(64, help="open connections; past it a new one closes the one idle longest, and "
                                            "requests get 503 only when every one holds a request", low=1, high=10**5)
    # so one client cannot take every slot with half-open connections
    max_client_connections: int = setting(16, help="open connections from one client address; more are closed "
                                                   "at once", low=1, high=10**5)
    max_decoding_mb: float = setting(256.0, help="decoded audio in flight across all requests, in MiB; past it "
                                                 "requests wait, then 503", low=0.0, high=1e6, low_open=True)
    cors_origin: Optional[str] = setting(None, help="let pages from this one origin (scheme://host[:port]) call the "
                                                    "API (default: none)")
    # /listen: each live stream holds a window of audio and takes a forward pass every hop
    max_listeners: int = setting(4, help="live streams on /listen at once; more are closed with code 1013", low=0,
                                 high=1000)
    max_listen_s: float = setting(3600.0, help="longest /listen stream, in s of audio", low=0.0, high=1e6,
                                  low_open=True)
    listen_idle_s: float = setting(5.0, help="s a /listen client may send nothing before it is closed", low=0.0,
                                   high=3600.0, low_open=True)
    max_chunk_s: float = setting(1.0, help="most audio in one /listen message, in s; more closes the stream",
                                 low=0.0, high=60.0, low_open=True)
    max_listen_speed: float = setting(1.5, help="s of audio a /listen client may send per s (past a burst of two "
                                                "chunks); faster closes the stream", low=1.0, high=1000.0)
    listen_hop_s: float = setting(0.5, help="s of audio between /listen answers, a forward pass each", low=0.1,
                                  high=2.0)

    def __post_init__(self):
        _check_settings(self)
        if self.cors_origin is not None:
            check_origin(self.cors_origin)


def check_origin(origin: str) -> str:
    """``origin`` as a browser sends it (``scheme://host[:port]``, http or https, no path), else AudioclfError:
    a CORS origin that no browser can send lets no page in, silently."""
    try:
        parts = urlsplit(origin)
        port = parts.port
    except ValueError:
        parts, port = None, None
    if (parts is None or parts.scheme not in ("http", "https") or not parts.hostname or parts.path or parts.query
            or parts.fragment or parts.username or parts.password or origin != f"{parts.scheme}://{parts.netloc}"):
        raise AudioclfError(f"--cors-origin {origin!r} is not an origin: give scheme://host[:port] with http or "
                            f"https and nothing after it, e.g. https://example.org or http://localhost:3000")
    del port  # read only so that a bad port is refused above
    return origin


@dataclass(frozen=True)
class AuditOptions:
    """How ``audioclf audit`` embeds clips and decides which are near-duplicates. The thresholds are measured
    on ESC-10 with planted copies (docs/audit.md, benchmarks/audit.py)."""

    SECTION = "audit"

    backbone: str = setting("mn04_as", choices=tuple(n for n, b in BACKBONES.items() if b.pretrained_on == "audioset"),
                            help="AudioSet-pretrained network whose embeddings find near-duplicate candidates and "
                                 "feed the linear probe")
    # planted copies scored 0.67 and up; distinct clips of one kind of sound reach 0.98, so the cosine only
    # nominates candidates
    near_threshold: float = setting(0.5, low=0.0, high=1.0, low_open=True,
                                    help="cosine similarity of centred embeddings from which two clips are "
                                         "near-duplicate candidates")
    # planted copies scored 0.95 and up, copies already in ESC-50 0.88 and up; distinct recordings 0.66 at most
    match_threshold: float = setting(0.8, low=0.0, high=1.0, low_open=True,
                                     help="correlation of aligned log-mel fingerprints from which a candidate is a "
                                          "near-duplicate")

    def __post_init__(self):
        _check_settings(self)
