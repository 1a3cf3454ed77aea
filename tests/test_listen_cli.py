"""``audioclf listen``: events printed from an input device, and a clear message without one."""

from __future__ import annotations

import sys
import threading
import types

import numpy as np
import pytest
from test_events import SR, TONES, tone, tone_classifier

from audioclf import cli
from audioclf.commands import listen


class PortAudioError(Exception):
    pass


def fake_sounddevice(wave=None, devices=True) -> types.ModuleType:
    """A stand-in for sounddevice: an input device that plays ``wave`` in 0.1-s blocks, then silence."""
    sd = types.ModuleType("sounddevice")
    sd.PortAudioError = PortAudioError

    def query_devices(kind):
        if not devices:
            raise PortAudioError("Error querying device -1")
        return {"name": "fake microphone", "default_samplerate": SR}

    class InputStream:
        def __init__(self, samplerate, channels, dtype, blocksize, callback):
            self.callback, self.blocksize, self.stop = callback, blocksize, threading.Event()

        def __enter__(self):
            def play():
                for i in range(0, len(wave), self.blocksize):
                    if self.stop.is_set():
                        return
                    self.callback(wave[i:i + self.blocksize, None], self.blocksize, None, None)
            self.thread = threading.Thread(target=play)
            self.thread.start()
            return self

        def __exit__(self, *exc):
            self.stop.set()
            self.thread.join()

    sd.query_devices, sd.InputStream = query_devices, InputStream
    return sd


def test_listen_prints_the_events_heard_by_the_device(monkeypatch, capsys, tmp_path):
    wave = np.concatenate([np.zeros(SR, np.float32), tone(TONES["low"], 1.5), np.zeros(2 * SR, np.float32)])
    monkeypatch.setitem(sys.modules, "sounddevice", fake_sounddevice(wave))
    monkeypatch.setattr(listen, "load_detector", lambda model, **kw: tone_classifier())
    (tmp_path / "detect.json").write_text('{"median_s": 0.3}')
    # the fake device plays faster than real time: 1.5 s hears it all
    assert cli.main(["listen", "tones", "--seconds", "1.5", "--params", str(tmp_path / "detect.json")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["open", "close"]
    assert lines[1].split()[1:3] == ["1.00-2.50", "s"] and lines[1].split()[3] == "low"


def test_listen_without_a_device_or_portaudio_says_so(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sounddevice", fake_sounddevice(devices=False))
    assert cli.main(["listen", "mn04_as"]) == 2
    assert "no audio input device" in capsys.readouterr().err
    with pytest.raises(Exception, match="--seconds -1"):
        listen.run_listen("mn04_as", seconds=-1)


def test_listen_without_the_portaudio_library_says_what_to_install(monkeypatch, capsys):
    def fail(*a, **k):
        raise OSError("PortAudio library not found")

    import builtins

    real_import = builtins.__import__
    monkeypatch.delitem(sys.modules, "sounddevice", raising=False)
    monkeypatch.setattr(builtins, "__import__",
                        lambda name, *a, **k: fail() if name == "sounddevice" else real_import(name, *a, **k))
    assert cli.main(["listen", "mn04_as"]) == 2
    err = capsys.readouterr().err
    assert "PortAudio library" in err and "libportaudio2" in err
