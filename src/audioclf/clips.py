"""What a dataset reader returns: the clips (audio source, label or labels, fold, group) and the class names.

A leaf module, so the readers in data.py and webdata.py, the feature cache and training share one
definition without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

LABEL_SEPARATOR = ";"  # between the class names of a multilabel manifest's labels cell


@dataclass(frozen=True)
class Clip:
    path: str  # absolute path of the audio file, or of a tar member (audio.member_path)
    label: int  # index into the dataset's class names
    fold: Optional[int] = None  # official fold, where the dataset has them
    group: Optional[str] = None  # source recording; clips of one group never straddle a split
    # a multilabel manifest's classes of the clip, several or none (``label`` is then the first, or -1);
    # None: the clip has exactly ``label``
    tags: Optional[tuple[int, ...]] = None

    @property
    def targets(self) -> tuple[int, ...]:
        """The classes the clip holds: its ``tags``, or its one ``label``."""
        return self.tags if self.tags is not None else (self.label,)

    @property
    def group_key(self) -> str:
        """The group the splits keep whole: ``group``, or the clip alone when it has none."""
        return self.group if self.group is not None else self.path


@dataclass
class ClipSet:
    clips: list[Clip]
    classes: list[str]  # label index -> class name
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) left out

    def describe(self, clips: Optional[Sequence[Clip]] = None) -> str:
        clips = self.clips if clips is None else clips
        groups = {c.group_key for c in clips}
        return f"{len(clips)} clips, {len({t for c in clips for t in c.targets})} classes, {len(groups)} groups"

    @property
    def multilabel(self) -> bool:
        """The data says how many classes each clip holds (a ``labels`` column): several, one or none."""
        return any(c.tags is not None for c in self.clips)
