"""How a setting is declared, once: :func:`setting` makes a dataclass field that carries its default, help
text, command-line flag and allowed values; :func:`settings` reads them back as :class:`Setting` records,
from which the checks (:func:`_check_settings`) and the CLI's flags (``cli.py``) are generated.

The run's config sections (``config.py``) and the options of running a model (``options.py``) are both
declared with it. A leaf module: it imports nothing of audioclf but the error type.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from .errors import AudioclfError

_SECTION_NAMES: dict[type, str] = {}  # config section class -> its name in RunConfig (name_sections)


def _check_range(name: str, value, low=None, high=None, *, low_open=False):
    if value is None:
        return
    # NaN compares False with every bound, so it would pass the checks below: refuse it (and inf) first
    if isinstance(value, float) and not math.isfinite(value):
        allowed = " and ".join(f"{op} {b}" for op, b in ((">" if low_open else ">=", low), ("<=", high)) if b is not None)
        raise AudioclfError(f"{name}={value!r} is not a finite number: it must be {allowed or 'finite'}")
    if low is not None and (value < low or (low_open and value == low)):
        op = ">" if low_open else ">="
        raise AudioclfError(f"{name}={value!r} is out of range: it must be {op} {low}")
    if high is not None and value > high:
        raise AudioclfError(f"{name}={value!r} is out of range: it must be <= {high}")


def _check_choice(name: str, value, choices):
    if value not in choices:
        raise AudioclfError(f"Unsupported {name}={value!r}; choose one of {', '.join(map(repr, choices))}")


def setting(default: Any, *, help: str, flag: Optional[str] = None, yaml_only: Optional[str] = None,
            low=None, high=None, low_open: bool = False, choices: Optional[tuple] = None):
    """A config field with everything the rest of audioclf needs to know about it, in one place.

    Args:
        default: The value when neither a preset, a backbone, YAML nor a flag sets it. The one default.
        help (str): What the setting does, with its unit; the CLI's help text.
        flag (str, optional): Its command-line flag. (Default: ``--`` and the name with dashes)
        yaml_only (str, optional): Why the setting has no flag; it is then set in a YAML config only.
        low, high (optional): Inclusive bounds of the allowed range; ``None`` = unbounded. Bounds that
            depend on another setting are checked by the section's ``__post_init__`` instead.
        low_open (bool, optional): ``low`` itself is not allowed. (Default: ``False``)
        choices (tuple, optional): Allowed values of a ``str`` setting whose choices live elsewhere (the
            backbone registry); a ``Literal`` annotation gives its choices itself.
    """
    if flag is not None and yaml_only is not None:
        raise TypeError("a setting has a flag or a reason to be YAML-only, not both")
    return field(default=default, metadata={"help": help, "flag": flag, "yaml_only": yaml_only, "low": low,
                                            "high": high, "low_open": low_open, "choices": choices})


@dataclass(frozen=True)
class Setting:
    """One declared setting, as :func:`settings` reads it from a config section's field."""

    section: str  # "features", ...: its place in RunConfig and in a YAML file; else its class's name
    name: str
    kind: type  # bool, int, float or str: what one value is, once an Optional is unwrapped
    optional: bool  # None is allowed
    choices: Optional[tuple]
    default: Any
    help: str
    flag: Optional[str]  # None: YAML only
    yaml_only: Optional[str]
    low: Any
    high: Any
    low_open: bool


@functools.cache
def settings(cls: type) -> tuple[Setting, ...]:
    """The settings of config section ``cls`` (:class:`FeatureConfig`, ...), in declaration order."""
    hints = typing.get_type_hints(cls)
    # a RunConfig section by its name there; another group of settings names itself (events.DetectConfig,
    # options.PredictOptions: SECTION = "detect", "predict")
    section = _SECTION_NAMES.get(cls) or cls.SECTION
    out = []
    for f in dataclasses.fields(cls):
        tp, optional = hints[f.name], False
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            args = [t for t in typing.get_args(tp) if t is not type(None)]
            tp, optional = args[0], len(args) < len(typing.get_args(tp))
        choices = typing.get_args(tp) if typing.get_origin(tp) is Literal else f.metadata["choices"]
        kind = type(choices[0]) if typing.get_origin(tp) is Literal else tp
        m = f.metadata
        flag = None if m["yaml_only"] else m["flag"] or "--" + f.name.replace("_", "-")
        out.append(Setting(section, f.name, kind, optional, choices, f.default, m["help"], flag, m["yaml_only"],
                           m["low"], m["high"], m["low_open"]))
    return tuple(out)


def name_sections(sections: dict[str, type]) -> None:
    """Name the config sections (``{"features": FeatureConfig, ...}``) as RunConfig and YAML files do."""
    _SECTION_NAMES.update({cls: name for name, cls in sections.items()})
    settings.cache_clear()


def _check_settings(section) -> None:
    """The rules a setting declares for itself: a value among its choices, within its range, finite."""
    for s in settings(type(section)):
        value = getattr(section, s.name)
        if s.choices is not None and not (s.optional and value is None):
            _check_choice(s.name, value, s.choices)
        _check_range(s.name, value, s.low, s.high, low_open=s.low_open)


DEVICES = "auto, cpu, cuda or cuda:N"


def check_device(device: str) -> None:
    """Refuse a device name torch would not take, naming what is allowed."""
    if not (device in ("auto", "cpu", "cuda") or device.startswith("cuda:")):
        raise AudioclfError(f"Unsupported device={device!r}; choose {DEVICES}")
