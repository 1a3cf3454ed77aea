"""``audioclf listen``: the default input device through :class:`audioclf.stream.StreamingDetector`,
printing each event as it opens and closes (what ``/listen`` does for the web page)."""

from __future__ import annotations

import queue
import sys
import time
from typing import Optional, Sequence

from ..errors import AudioclfError
from ..events import check_ignore
from ..options import PredictOptions, ServeLimits
from .detect import detect_config, load_detector

BLOCK_S = 0.1  # seconds of audio per callback of the sound card
QUEUE_BLOCKS = 100  # blocks waiting for the model at most (10 s): past it the oldest are dropped, said once


def open_input():
    """sounddevice and the default input device's info, or AudioclfError saying what is missing."""
    try:
        import sounddevice as sd
    except ImportError:
        raise AudioclfError("audioclf listen needs sounddevice: pip install 'audioclf[listen]'") from None
    except OSError as e:  # the wheel is there, the PortAudio library is not
        raise AudioclfError(f"audioclf listen needs the PortAudio library ({e}): install it, e.g. apt-get install "
                            f"libportaudio2 (or use the web page: audioclf serve MODEL, then Listen)") from None
    try:
        info = sd.query_devices(kind="input")
    except sd.PortAudioError as e:
        raise AudioclfError(f"no audio input device ({e}): connect a microphone, or use the web page in a browser "
                            f"that has one (audioclf serve MODEL, then Listen)") from None
    return sd, info


def run_listen(model, *, weights: Optional[str] = None, params: Optional[str] = None,
               overrides: Optional[dict] = None, ignore: Sequence[str] = (), seconds: Optional[float] = None,
               top_k: int = PredictOptions.top_k, listen_hop_s: float = ServeLimits.listen_hop_s,
               device: str = PredictOptions.device) -> int:
    """Listen to the default input device until Ctrl-C (or for ``seconds``), printing events as they open
    (``onset label score``) and close (``onset-offset label score``)."""
    from ..stream import StreamingDetector

    if seconds is not None and not seconds > 0:
        raise AudioclfError(f"--seconds {seconds}: give a positive number of seconds, or leave it out to stop at Ctrl-C")
    sd, info = open_input()  # before the model loads: without a device there is nothing to do
    clf = load_detector(model, weights=weights, device=device)
    config = detect_config(model, clf, params, overrides or {})
    rate = int(info["default_samplerate"])
    detector = StreamingDetector(clf, config, sample_rate=rate, hop_s=listen_hop_s, top_k=top_k,
                                 ignore=check_ignore(ignore, clf.labels))
    blocks: queue.Queue = queue.Queue(QUEUE_BLOCKS)
    dropped = []

    def heard(indata, frames, when, status):  # the sound card's thread: never wait here
        try:
            blocks.put_nowait(indata[:, 0].copy())
        except queue.Full:
            dropped.append(frames)

    def show(messages):
        for m in messages:
            for e in m["events"]:
                span = f"{e['onset']:8.2f} s" if e["state"] == "open" else f"{e['onset']:.2f}-{e['offset']:.2f} s"
                print(f"{e['state']:5}  {span:>16}  {e['label']}  {e['score']:.2f}", flush=True)

    print(f"listening to {info['name']} at {rate} Hz with {model} (Ctrl-C stops)", file=sys.stderr)
    end = None if seconds is None else time.monotonic() + seconds
    try:
        with sd.InputStream(samplerate=rate, channels=1, dtype="float32", blocksize=int(rate * BLOCK_S),
                            callback=heard):
            while end is None or time.monotonic() < end:
                try:
                    detector.feed(blocks.get(timeout=1.0))
                except queue.Empty:
                    continue
                show(detector.steps())
                if dropped:
                    print(f"the model falls behind the microphone: {sum(dropped) / rate:.1f} s of audio dropped",
                          file=sys.stderr)
                    dropped.clear()
    except KeyboardInterrupt:
        pass
    except sd.PortAudioError as e:
        raise AudioclfError(f"the audio input device failed: {e}") from None
    show(detector.steps(last=True))
    return 0
