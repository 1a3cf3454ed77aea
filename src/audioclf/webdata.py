"""WebDataset shards: write any dataset as tar shards (``audioclf shard``) and read shards back as a ClipSet.

A shard is an uncompressed tar of samples. A sample is a few members that share a key (the member name
up to the first dot of its base name, webdataset's rule): ``000042-bark_3.flac`` (the original audio
bytes, never re-encoded), ``000042-bark_3.cls`` (the class index, as text) and ``000042-bark_3.json``
(``{"label": class name, "fold": ..., "group": ..., "source": original path}``; a multilabel clip has
``"labels": [class names]`` instead, and no ``.cls``). ``dataset.json`` beside
the shards holds the classes in order, the shards with their sample counts and the audioclf version.

Reading never decodes audio: it indexes the tars' headers and reads the small label members. Each clip's
path names its tar member, ``/abs/shard-000003.tar#000042-bark_3.flac`` (``audio.member_path``), and every
audio reader decodes such a path like a file, reading the member at its offset.

Clips come in shard order, then tar order. A contiguous run of clips therefore lies in one or two tar
shards, so whoever decodes the clips in contiguous blocks (the feature cache, built per block and per
rank under torchrun) reads only the tars of its own blocks. The number of training steps never depends on
the tars: every rank steps through the same padded share of the cached clips (``train.epoch_order``), so
shards of uneven size cannot leave one rank waiting for another.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

from tqdm.auto import tqdm

from ._version import __version__
from .audio import (AUDIO_EXTENSIONS, audio_duration_s, audio_format, member_path, read_member, read_source,
                    source_stat, split_member, tar_index)
from .clips import Clip, ClipSet
from .errors import AudioclfError
from .fileio import atomic_path, check_output

log = logging.getLogger(__name__)

INDEX_NAME = "dataset.json"
INDEX_FORMAT = "audioclf-webdataset"  # dataset.json's "format": tells our index from another tool's file
INDEX_VERSION = 1
SHARD_PATTERN = "shard-{:06d}.tar"

# webdataset's own split of a member name into sample key and extension: the key ends at the first dot
# of the base name, so keys must hold no dots (and ours hold no slashes either)
MAX_SHARDS = 100_000  # shards one brace pattern may name
MAX_META_BYTES = 64 * 1024  # the largest .json or .cls member read
MAX_META_DEPTH = 32  # nested objects and lists in a .json member
_KEY_AND_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_REMOTE = re.compile(r"^(?:[A-Za-z][A-Za-z0-9+.-]*://|pipe:)")
_UNSAFE_IN_KEY = re.compile(r"[^A-Za-z0-9_-]+")
# tar bytes beyond the audio, per sample (the audio's header and padding, .cls and a short .json with theirs)
# and per shard (the end-of-archive blocks and tarfile's padding to a 10240-byte record)
_SAMPLE_OVERHEAD = 5 * 512
_SHARD_OVERHEAD = 2 * 512 + 10240


# ---------------------------------------------------------------------------------------------- writing

@dataclass(frozen=True)
class _Planned:
    clip: Clip
    ext: str  # the audio member's extension, no dot
    size: int  # bytes of the encoded audio


def write_shards(clipset: ClipSet, out_dir, *, samples_per_shard: int = 500, max_shard_bytes: int = 256 * 2**20,
                 quiet: bool = False) -> dict:
    """Write ``clipset`` as WebDataset shards ``out_dir/shard-000000.tar``, ... and ``out_dir/dataset.json``.

    Each clip's audio goes in as its original bytes, with its class index (``.cls``) and its label, fold,
    group and source path (``.json``). A shard closes at ``samples_per_shard`` samples or before it would
    pass ``max_shard_bytes`` (estimated from the clips' sizes and the tar headers; a clip larger than that
    gets a shard of its own). Every shard is written under a temporary name and renamed when complete, and
    ``dataset.json`` says ``"complete": false`` until the last one is in place, so an interrupted run never
    looks like a finished shard set; running again into the same folder starts it over.

    Args:
        clipset (ClipSet): the clips, classes and reader's skipped list (``data.load_clips``).
        out_dir (str or Path): the folder for the shards; it may not hold another shard set.
        samples_per_shard (int, optional): most samples per shard, >= 1. (Default: ``500``)
        max_shard_bytes (int, optional): about the largest shard, in bytes, >= 1. (Default: 256 MiB)
        quiet (bool, optional): no progress bars. (Default: ``False``)

    Returns:
        dict: ``out`` (the folder), ``shards`` (file names), ``samples`` (written), ``skipped`` ((path,
        reason) pairs: the reader's and the clips that could not be read here).

    Raises:
        AudioclfError: for a bad size limit, an ``out_dir`` that is a file or holds other shards, or when no
        clip can be read.
    """
    for name, value in (("samples_per_shard", samples_per_shard), ("max_shard_bytes", max_shard_bytes)):
        if not isinstance(value, int) or value < 1:
            raise AudioclfError(f"{name}={value!r} must be a whole number >= 1")
    out = Path(out_dir)
    _prepare_out_dir(out)
    planned, skipped = _check_clips(clipset.clips, quiet)
    if not planned:
        raise AudioclfError(f"none of the {len(clipset.clips)} clips could be read, so there is nothing to shard; "
                            f"e.g. {skipped[0][1] if skipped else 'the dataset is empty'}")
    shards = _plan(planned, samples_per_shard, max_shard_bytes)
    names = [SHARD_PATTERN.format(i) for i in range(len(shards))]
    skipped = clipset.skipped + skipped
    _write_index(out, clipset.classes, names, [len(s) for s in shards], skipped, complete=False)
    counts, key = [], 0
    mtime = int(time.time())  # whole seconds: a float mtime costs every member an extra pax header
    with tqdm(total=len(planned), desc="shards", unit="clip", disable=True if quiet else None) as bar:
        for name, shard in zip(names, shards):
            written = _write_shard(out / name, shard, clipset.classes, key, skipped, mtime)
            counts.append(written)
            key += len(shard)
            bar.update(len(shard))
    _write_index(out, clipset.classes, names, counts, skipped, complete=True)
    if skipped:
        log.warning("%d clip(s) left out of the shards, e.g. %s (%s)", len(skipped), *skipped[0])
    log.info("wrote %d samples in %d shard(s) to %s", sum(counts), len(names), out)
    return {"out": str(out), "shards": names, "samples": sum(counts), "skipped": skipped}


def _prepare_out_dir(out: Path) -> None:
    """Refuse a file or another shard set; clear what an interrupted ``write_shards`` left in ``out``."""
    check_output(out, folder=True)
    if not out.is_dir():
        return
    index = out / INDEX_NAME
    if index.is_file():
        meta = _load_index(index, allow_incomplete=True)
        if meta is not None and meta.get("complete"):
            raise AudioclfError(f"--out {out}: holds a finished shard set already ({INDEX_NAME}); choose another "
                                f"folder or delete it")
        if meta is not None:  # an interrupted run: start it over
            for shard in meta.get("shards", []):
                (out / shard["name"]).unlink(missing_ok=True)
            for tmp in out.glob(".shard-*.tar.tmp*"):  # atomic_path's, left by a killed process
                tmp.unlink(missing_ok=True)
            return
    tars = sorted(p.name for p in out.glob("*.tar"))
    if tars:
        raise AudioclfError(f"--out {out}: holds .tar files ({', '.join(tars[:3])}{', ...' if len(tars) > 3 else ''}) "
                            f"that are not from an audioclf shard run; choose an empty folder")


def _check_clips(clips: Sequence[Clip], quiet: bool) -> tuple[list[_Planned], list[tuple[str, str]]]:
    """Each readable clip with its member extension and size; (path, reason) for the others."""
    planned, skipped = [], []
    for clip in tqdm(clips, desc="checking", unit="clip", disable=True if quiet else None):
        try:
            audio_duration_s(clip.path)  # the header decodes: the same checks training makes
            planned.append(_Planned(clip, _audio_ext(clip.path), source_stat(clip.path).st_size))
        except (AudioclfError, OSError) as e:
            skipped.append((clip.path, str(e)))
    return planned, skipped


def _audio_ext(path: str) -> str:
    """The extension the audio member gets: the file's own when it is an audio one, else the format
    soundfile finds in it (a CSV may list ``clip.dat``)."""
    ext = os.path.splitext(path)[1].lower()
    if ext in AUDIO_EXTENSIONS:
        return ext[1:]
    found = audio_format(path)
    if f".{found.lower()}" not in AUDIO_EXTENSIONS:
        raise AudioclfError(f"{path}: soundfile reads it as {found}, which has no audio extension the shard reader "
                            f"knows ({', '.join(AUDIO_EXTENSIONS)}); convert it to one of those")
    return found.lower()


def _plan(planned: list[_Planned], per_shard: int, max_bytes: int) -> list[list[_Planned]]:
    """Consecutive runs of samples, one per shard, within both limits."""
    shards: list[list[_Planned]] = [[]]
    size = _SHARD_OVERHEAD
    for p in planned:
        cost = p.size + _SAMPLE_OVERHEAD
        if shards[-1] and (len(shards[-1]) >= per_shard or size + cost > max_bytes):
            shards.append([])
            size = _SHARD_OVERHEAD
        shards[-1].append(p)
        size += cost
    return shards


def sample_key(index: int, path: str) -> str:
    """A key unique in the shard set (the running ``index``) that stays readable (the file's stem), with
    only letters, digits, ``_`` and ``-``: webdataset cuts a key at its first dot."""
    member = split_member(path)
    stem = _UNSAFE_IN_KEY.sub("_", Path(member[1] if member else path).stem).strip("_")[:48]
    return f"{index:06d}-{stem}" if stem else f"{index:06d}"


def _write_shard(path: Path, shard: list[_Planned], classes: list[str], first_key: int,
                 skipped: list[tuple[str, str]], mtime: int) -> int:
    """Write one shard atomically; return its sample count. A clip gone unreadable since it was checked
    joins ``skipped``."""
    from webdataset import TarWriter

    written = 0
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        with TarWriter(f, mtime=mtime) as tar:
            for k, p in enumerate(shard, first_key):
                try:
                    data = read_source(p.clip.path)
                except (AudioclfError, OSError) as e:
                    skipped.append((p.clip.path, str(e)))
                    continue
                c = p.clip
                label = {"label": classes[c.label]} if c.tags is None else {"labels": [classes[t] for t in c.tags]}
                meta = {**label, "fold": c.fold, "group": c.group, "source": c.path}
                cls = {"cls": c.label} if c.tags is None else {}
                tar.write({"__key__": sample_key(k, c.path), p.ext: data, **cls, "json": meta})
                written += 1
    return written


def _write_index(out: Path, classes: list[str], shards: list[str], counts: list[int],
                 skipped: list[tuple[str, str]], *, complete: bool) -> None:
    index = {"format": INDEX_FORMAT, "version": INDEX_VERSION, "audioclf_version": __version__, "complete": complete,
             "classes": list(classes), "samples": sum(counts),
             "shards": [{"name": n, "samples": c} for n, c in zip(shards, counts)],
             "skipped": [list(s) for s in skipped]}
    with atomic_path(out / INDEX_NAME) as tmp:
        tmp.write_text(json.dumps(index, indent=1), encoding="utf-8")


# ---------------------------------------------------------------------------------------------- reading

Source = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]


def read_webdataset(source: Source) -> ClipSet:
    """Clips of a WebDataset shard set, each pointing at its audio member, in (shard, position) order.

    Args:
        source: a folder (the shards ``dataset.json`` lists, else every ``*.tar`` in it, sorted), one
            ``.tar``, a brace pattern such as ``shards-{000..099}.tar``, or a list of these. Only local,
            uncompressed tars: download remote shards first.

    A sample's label is its ``.json``'s ``"label"`` (a class name), else its ``.cls`` (a class index,
    named by ``dataset.json``'s classes when there is one, else by the index itself); a multilabel sample's
    ``.json`` has ``"labels"``, a list of class names (several, or none); its fold and group
    come from the ``.json`` when it has them. A sample without audio or without a label is listed in
    ``skipped`` with the reason. Classes: ``dataset.json``'s order, else sorted (numbers as numbers).

    Raises:
        AudioclfError: for a remote URL, a shard that is not there (naming it and the pattern), a tar that
            cannot be read, or shards without a single usable sample.
    """
    tars, index = _resolve(source)
    given = index["classes"] if index is not None else None
    found: list[tuple[str, object, Optional[int], Optional[str]]] = []  # (path, label, fold, group)
    skipped: list[tuple[str, str]] = []
    for tar in tars:
        for key, members in _samples(tar):
            sample = _read_sample(tar, key, members, given)
            if isinstance(sample, str):
                skipped.append((member_path(tar, key), sample))
            else:
                found.append(sample)
    if not found:
        raise AudioclfError(f"{_describe(source)}: no sample with audio and a label in {len(tars)} shard(s)"
                            + (f"; e.g. {skipped[0][0]}: {skipped[0][1]}" if skipped else " (the tars are empty)"))
    names = {str(n) for _, label, _, _ in found for n in (label if isinstance(label, tuple) else (label,))}
    classes = list(given) if given is not None else sorted(names, key=_class_order)
    number = {name: i for i, name in enumerate(classes)}
    clips = []
    for path, label, fold, group in found:
        unknown = [n for n in (label if isinstance(label, tuple) else (label,)) if str(n) not in number]
        if unknown:
            skipped.append((path, f"label {unknown[0]!r} is not one of the classes in {INDEX_NAME} ({', '.join(classes)})"))
        elif isinstance(label, tuple):
            tags = tuple(sorted(number[n] for n in label))
            clips.append(Clip(path, tags[0] if tags else -1, fold, group, tags))
        else:
            clips.append(Clip(path, number[str(label)], fold, group))
    if skipped:
        log.warning("%d sample(s) in the shards cannot be used, e.g. %s: %s; they are left out", len(skipped), *skipped[0])
    return ClipSet(clips, classes, skipped)


def _describe(source: Source) -> str:
    return ", ".join(map(str, source)) if isinstance(source, (list, tuple)) else str(source)


def _class_order(name: str) -> tuple:
    # names made from .cls indices sort as numbers, so class "10" comes after class "9"
    return (0, int(name), "") if name.isascii() and name.isdigit() else (1, 0, name)


def _resolve(source: Source) -> tuple[list[str], Optional[dict]]:
    """The shard files ``source`` names, in order, and the ``dataset.json`` beside them (or None)."""
    items = list(source) if isinstance(source, (list, tuple)) else [source]
    if not items:
        raise AudioclfError("no shards given: pass a folder, a .tar, a brace pattern or a list of them")
    tars: list[str] = []
    index = None
    for item in items:
        text = os.fspath(item)
        if _REMOTE.match(text):
            raise AudioclfError(f"{text}: remote shards are not supported yet; download them and give the local "
                                f"folder or pattern")
        if os.path.isdir(text):
            dir_tars, dir_index = _folder_shards(Path(text))
            if index is not None and dir_index is not None and dir_index["classes"] != index["classes"]:
                raise AudioclfError(f"{text}: its {INDEX_NAME} lists other classes than the shards before it; "
                                    f"shards of one dataset share one class list")
            index = index or dir_index
            tars += dir_tars
        else:
            tars += _expand(text)
    unique = list(dict.fromkeys(os.path.realpath(t) for t in tars))
    if len(unique) < len(tars):
        log.warning("%s names %d shard(s) more than once; each is read once", _describe(source), len(tars) - len(unique))
    if index is None:
        folders = {os.path.dirname(t) for t in unique}
        if len(folders) == 1 and os.path.isfile(os.path.join(*folders, INDEX_NAME)):
            index = _load_index(Path(*folders) / INDEX_NAME)
    return unique, index


def _folder_shards(folder: Path) -> tuple[list[str], Optional[dict]]:
    index = _load_index(folder / INDEX_NAME) if (folder / INDEX_NAME).is_file() else None
    if index is not None:
        tars = [str(folder / s["name"]) for s in index["shards"]]
        missing = [t for t in tars if not os.path.isfile(t)]
        if missing:
            raise AudioclfError(f"{folder / INDEX_NAME} lists {len(missing)} shard(s) that are not there, e.g. "
                                f"{missing[0]}; copy the whole shard folder")
        return tars, index
    tars = sorted(str(p) for p in folder.glob("*.tar") if p.is_file())
    if not tars:
        raise AudioclfError(f"{folder}: holds no .tar shards (format 'webdataset' wants a folder of .tar files, "
                            f"a .tar, or a pattern such as shards-{{000..009}}.tar)")
    return tars, None


def _expand(pattern: str) -> list[str]:
    """The files a brace pattern (or a plain path) names; each must exist. At most MAX_SHARDS of them, counted
    as the pattern expands: ``{0..999999999}`` names a billion."""
    from braceexpand import braceexpand

    if _pattern_size(pattern) > MAX_SHARDS:  # braceexpand lists a zero-padded range whole before yielding
        raise AudioclfError(f"{pattern}: names more than {MAX_SHARDS} shards; narrow the pattern's ranges")
    try:
        paths = list(braceexpand(pattern))
    except ValueError as e:  # unbalanced braces
        raise AudioclfError(f"{pattern}: not a valid brace pattern ({e})") from None
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        where = f" (from the pattern {pattern}, {len(paths)} paths)" if len(paths) > 1 else ""
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise AudioclfError(f"{missing[0]}{more}: no such shard file{where}")
    return paths


_INNERMOST = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+|[A-Za-z])\.\.(-?\d+|[A-Za-z])(?:\.\.(-?\d+))?$")


def _pattern_size(pattern: str) -> int:
    """How many names a brace pattern expands to, from its text alone (nested groups count as the product of
    their sizes, an upper bound): each innermost ``{a..b[..step]}`` or ``{x,y,...}``, then those around it."""
    size = 1
    while (m := _INNERMOST.search(pattern)) is not None:
        body, count = m.group(1), 1
        if r := _RANGE.match(body):
            first, last = (int(x) if x.lstrip("-").isdigit() else ord(x) for x in r.group(1, 2))
            count = abs(last - first) // max(1, abs(int(r.group(3) or 1))) + 1
        elif "," in body:
            count = body.count(",") + 1
        size *= count
        pattern = pattern[:m.start()] + "_" + pattern[m.end():]
    return size


def _load_index(path: Path, allow_incomplete: bool = False) -> Optional[dict]:
    """``dataset.json``, checked; None when it is another tool's file."""
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise AudioclfError(f"{path}: cannot read the shard index ({e})") from None
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        log.info("%s is not an audioclf shard index; ignored", path)
        return None
    if not allow_incomplete and not index.get("complete"):
        raise AudioclfError(f"{path}: the `audioclf shard` run that wrote these shards did not finish; run it again")
    classes, shards = index.get("classes"), index.get("shards")
    if not (isinstance(classes, list) and all(isinstance(c, str) for c in classes) and isinstance(shards, list)
            and all(isinstance(s, dict) and isinstance(s.get("name"), str) for s in shards)):
        raise AudioclfError(f"{path}: a shard index needs \"classes\" (a list of names) and \"shards\" (a list of "
                            f"{{\"name\": ...}}); it was changed or damaged")
    return index


def _samples(tar: str) -> Iterable[tuple[str, dict[str, str]]]:
    """(key, {extension: member name}) of each sample in ``tar``, in tar order, grouped as webdataset
    groups them (extensions lower-cased); members whose name has no extension belong to no sample."""
    samples: dict[str, dict[str, str]] = {}
    for name in tar_index(tar):
        m = _KEY_AND_EXT.match(name)
        if m is not None:
            members, ext = samples.setdefault(m.group(1), {}), m.group(2).lower()
            if ext in members:  # x.wav and x.WAV: one would silently replace the other
                raise AudioclfError(f"{tar}: sample {m.group(1)!r} holds .{ext} twice ({members[ext]} and {name}); "
                                    f"write the shard again with each member once")
            members[ext] = name
    return samples.items()


def _metadata(tar: str, name: str) -> Union[str, bytes]:
    """The bytes of a metadata member (``.json``, ``.cls``), or why they are not read: a link or device
    member, or one larger than MAX_META_BYTES."""
    entry = tar_index(tar)[name]
    if entry.kind != "file":
        return f"its {name} is a {entry.kind} member, not a file"
    if entry.size > MAX_META_BYTES:
        return f"its {name} is {entry.size} bytes; a metadata member holds at most {MAX_META_BYTES}"
    return read_member(tar, name)


def _too_deep(text: str, limit: int) -> bool:
    """Whether JSON ``text`` nests objects and lists more than ``limit`` deep (brackets in strings ignored),
    checked before parsing, which recurses."""
    depth, in_string, escaped = 0, False, False
    for ch in text:
        if in_string:
            escaped, in_string = (not escaped and ch == "\\"), in_string and (escaped or ch != '"')
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > limit:
                return True
        elif ch in "]}":
            depth -= 1
    return False


def _read_sample(tar: str, key: str, members: dict[str, str],
                 classes: Optional[list[str]]) -> Union[str, tuple[str, object, Optional[int], Optional[str]]]:
    """(audio path, label, fold, group) of one sample, or why it cannot be used; a multilabel sample's
    label is a tuple of class names."""
    audio = [ext for ext in members if f".{ext}" in AUDIO_EXTENSIONS]
    if not audio:
        return f"no audio member (one of {', '.join(AUDIO_EXTENSIONS)})"
    if len(audio) > 1:
        return f"more than one audio member ({', '.join(audio)}); a sample holds exactly one"
    kind = tar_index(tar)[members[audio[0]]].kind
    if kind != "file":
        return f"its audio {members[audio[0]]} is a {kind} member, not a file; shards hold each clip's bytes"
    meta = {}
    if "json" in members:
        data = _metadata(tar, members["json"])
        if isinstance(data, str):
            return data
        try:
            text = data.decode("utf-8")
            if _too_deep(text, MAX_META_DEPTH):
                return f"its .json nests more than {MAX_META_DEPTH} deep"
            meta = json.loads(text)
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            return f"its .json is not valid JSON ({e})"
        if not isinstance(meta, dict):
            return f"its .json is a {type(meta).__name__}, not an object with a \"label\""
    label = meta.get("label")
    if "labels" in meta:
        names = meta["labels"]
        if not isinstance(names, list) or not all(isinstance(n, str) and n.strip() for n in names):
            return f"\"labels\" in its .json is {names!r:.60}, not a list of class names"
        label = tuple(sorted({n.strip() for n in names}))
    if label is None and "cls" in members:
        data = _metadata(tar, members["cls"])
        if isinstance(data, str):
            return data
        label = data.decode("utf-8", "replace").strip()
        if not (label.isascii() and label.isdigit()):
            return f"its .cls holds {label[:20]!r}, not a class index"
        if len(label) > 9:  # int() of thousands of digits is refused by Python, and slow before that
            return f"its .cls holds a {len(label)}-digit number, not a class index"
        label = int(label)
    if label is None:
        return "no label: neither a .json with a \"label\" nor a .cls"
    if isinstance(label, int) and not isinstance(label, bool):
        if label < 0:
            return f"class index {label} is negative"
        if classes is not None:
            if label >= len(classes):
                return f"class index {label} is outside the {len(classes)} classes of {INDEX_NAME}"
            label = classes[label]
    elif not isinstance(label, tuple) and (not isinstance(label, str) or not label.strip()):
        return f"label {label!r} is neither a class name nor a class index"
    fold, group = meta.get("fold"), meta.get("group")
    if fold is not None and (isinstance(fold, bool) or not isinstance(fold, int)):
        return f"fold {fold!r} in its .json is not a whole number"
    return member_path(tar, members[audio[0]]), label, fold, None if group is None else str(group)
