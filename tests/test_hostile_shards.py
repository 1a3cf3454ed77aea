"""Hostile WebDataset shards (issue 21): metadata members too large or nested too deep, a tar that holds one
name twice, link and device members, and brace patterns that name billions of shards."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
import time

import pytest
import soundfile as sf

from audioclf.config import AudioclfError
from audioclf.webdata import read_webdataset
from conftest import tone


def wav_bytes() -> bytes:
    buf = io.BytesIO()
    sf.write(buf, tone(440, 16000, 0.2), 16000, format="WAV")
    return buf.getvalue()


LINKS_AND_DEVICES = (tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE)  # (bytes themselves: b"2", b"1", b"3")


def write_tar(path, members: list[tuple[str, object]]):
    """A tar of ``(name, bytes)`` regular members, or ``(name, tarfile type)`` link and device members."""
    with tarfile.open(path, "w") as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data not in LINKS_AND_DEVICES:
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
            else:
                info.type = data
                info.linkname = "elsewhere.wav" if data in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
                t.addfile(info)
    return path


def reasons(tar) -> dict[str, str]:
    return {p.rsplit("#", 1)[1]: r for p, r in read_webdataset(tar).skipped}


def test_hostile_shard_members_are_bounded_before_they_are_parsed(tmp_path):
    wav = wav_bytes()
    deep = b"[" * 100_000 + b"]" * 100_000
    tar = write_tar(tmp_path / "s.tar", [
        ("good.wav", wav), ("good.cls", b"0"),
        ("digits.wav", wav), ("digits.cls", b"5" * 5000),
        ("deep.wav", wav), ("deep.json", deep),
        ("nested.wav", wav), ("nested.json", b'{"label": "0", "x": ' + b"[" * 40 + b"]" * 40 + b"}"),
        ("big.wav", wav), ("big.json", json.dumps({"label": "0", "pad": "x" * 100_000}).encode()),
    ])
    t0 = time.monotonic()
    why = reasons(tar)
    assert time.monotonic() - t0 < 10
    assert why["digits"] == "its .cls holds a 5000-digit number, not a class index"
    assert why["deep"].startswith("its deep.json is ") and "at most" in why["deep"]  # too large before too deep
    assert why["nested"] == "its .json nests more than 32 deep"
    assert why["big"].startswith("its big.json is ") and "metadata member holds at most 65536" in why["big"]


def test_hostile_shard_members_deep_json_within_the_size_bound(tmp_path):
    tar = write_tar(tmp_path / "s.tar", [("good.wav", wav_bytes()), ("good.cls", b"0"),
                                         ("deep.wav", wav_bytes()), ("deep.json", b"[" * 30_000 + b"]" * 30_000)])
    assert reasons(tar)["deep"] == "its .json nests more than 32 deep"


def test_hostile_shard_duplicate_keys_are_refused_naming_the_key(tmp_path):
    wav = wav_bytes()
    twice = write_tar(tmp_path / "twice.tar", [("a.wav", wav), ("a.cls", b"0"), ("b.wav", wav), ("b.cls", b"1"),
                                              ("a.wav", wav), ("a.cls", b"1")])
    with pytest.raises(AudioclfError, match=r"twice.tar: holds the member 'a.wav' twice"):
        read_webdataset(twice)
    cased = write_tar(tmp_path / "cased.tar", [("a.wav", wav), ("a.WAV", wav), ("a.cls", b"0"),
                                               ("b.wav", wav), ("b.cls", b"1")])
    with pytest.raises(AudioclfError, match=r"sample 'a' holds .wav twice"):
        read_webdataset(cased)


def test_hostile_shard_link_and_device_members_are_named_as_such(tmp_path):
    wav = wav_bytes()
    tar = write_tar(tmp_path / "s.tar", [("good.wav", wav), ("good.cls", b"0"),
                                         ("sym.wav", tarfile.SYMTYPE), ("sym.cls", b"0"),
                                         ("hard.wav", tarfile.LNKTYPE), ("hard.cls", b"0"),
                                         ("dev.wav", tarfile.CHRTYPE), ("dev.cls", b"0"),
                                         ("meta.wav", wav), ("meta.json", tarfile.SYMTYPE)])
    why = reasons(tar)
    assert why["sym"] == "its audio sym.wav is a symlink member, not a file; shards hold each clip's bytes"
    assert why["hard"].startswith("its audio hard.wav is a hardlink member")
    assert why["dev"].startswith("its audio dev.wav is a device member")
    assert why["meta"] == "its meta.json is a symlink member, not a file"


@pytest.mark.parametrize("pattern", ["shard-{000000000..999999999}.tar", "s-{0..99999}-{0..99999}.tar",
                                     "s-{a,b}{0..9}{0..9}{0..9}{0..9}{0..9}{0..9}.tar"])
def test_exhaustion_brace_pattern_is_bounded_before_expansion(tmp_path, pattern):
    # in a child process with a deadline and a memory cap: expanding first would take minutes and gigabytes
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))\n"
            "from audioclf.webdata import read_webdataset\n"
            "from audioclf.config import AudioclfError\n"
            "try:\n    read_webdataset(sys.argv[1])\nexcept AudioclfError as e:\n    print(e)\n")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / pattern)], capture_output=True, text=True,
                          timeout=60)
    assert "names more than 100000 shards; narrow the pattern's ranges" in done.stdout, done.stdout + done.stderr
