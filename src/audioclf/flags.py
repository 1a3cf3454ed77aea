"""The command line's flags, made from the declarations: a flag per setting of the run's config sections
(config.py) and of the inference and serving options (options.py), each with its help, its type, its
choices and its default in the help text; -v/-q, accepted before and after a command; old spellings that
still work with a warning. ``cli.py`` builds the commands' parsers with these.
"""

from __future__ import annotations

import argparse
import functools
import sys
from typing import Optional

from .backbones import BACKBONES, DEFAULT_BACKBONE
from .config import SECTIONS, TASK_RECIPES, resolve
from .settings import Setting, settings

# settings whose flags exclude each other: a weights file is loaded, so it cannot go with another choice
_EXCLUSIVE = ("pretrained", "weights_path")
# settings whose flag every command has (-q/--quiet, from common_flags), not generated per section
_GLOBAL = ("quiet",)


def common_flags() -> argparse.ArgumentParser:
    """-v and -q, accepted before the command and after it. A flag not given leaves no attribute (SUPPRESS),
    so a sub-command's parse does not undo one given before the command."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="debug logging")
    p.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                   help="no progress bars")
    return p


def _show(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"{value:g}" if isinstance(value, float) else str(value)


@functools.cache
def run_defaults() -> tuple[dict, set]:
    """(the values `audioclf train` uses when no flag, preset or YAML file says otherwise, by setting name;
    the names that a backbone's front end or recipe sets)."""
    defaults = {k: v for section in resolve("default").to_dict().values() if isinstance(section, dict)
                for k, v in section.items()}
    from_recipe = {k for b in BACKBONES.values() for d in (b.front_end, *b.recipe.values()) for k in d}
    return defaults, from_recipe


def _help(s: Setting, default, from_recipe: bool = False) -> str:
    """``s``'s help with its default, for argparse (which formats help with %)."""
    if from_recipe:
        note = "the backbone's recipe may set it" if "default" in s.help else "default: from the backbone's recipe"
        text = f"{s.help}; {note} ({_show(default)} for {DEFAULT_BACKBONE})"
    else:
        text = s.help if "default" in s.help else f"{s.help} (default: {_show(default)})"
    by_task = [f"{_show(v)} with --task {task}" for task, recipe in TASK_RECIPES.items()
               for section in recipe.values() for k, v in section.items() if k == s.name]
    if by_task:
        text += f"; {', '.join(by_task)}"
    return text.replace("%", "%%")


def _setting_kwargs(s: Setting, help: str) -> dict:
    """``add_argument`` keywords for setting ``s``: its type and choices as declared."""
    if s.kind is bool:
        return {"action": argparse.BooleanOptionalAction, "help": help}
    return {"type": s.kind, "choices": s.choices, "help": help}


def add_setting_args(p: argparse.ArgumentParser, only: Optional[tuple] = None, skip: tuple = (),
                      sections: Optional[dict] = None) -> None:
    """A flag for each config setting that has one (``only`` those, or all but ``skip``; of ``sections``,
    default RunConfig's), generated from its declaration; a flag not given is None and leaves the config
    as it is."""
    defaults, from_recipe = run_defaults() if sections is None else ({}, set())
    for section, cls in (sections or SECTIONS).items():
        chosen = [s for s in settings(cls) if s.flag and (only is None or s.name in only)
                  and s.name not in skip + _GLOBAL]
        if not chosen:
            continue
        group = p.add_argument_group(f"{section} settings") if only is None else p
        exclusive = group.add_mutually_exclusive_group() if any(s.name in _EXCLUSIVE for s in chosen) else None
        for s in chosen:
            kwargs = _setting_kwargs(s, _help(s, defaults.get(s.name, s.default), s.name in from_recipe))
            (exclusive if s.name in _EXCLUSIVE else group).add_argument(s.flag, dest=s.name, **kwargs)
        if any(s.name == "pretrained" for s in chosen):
            exclusive.add_argument("--no-pretrained", action="store_const", const="none", dest="pretrained",
                                   help="the same as --pretrained none: random initialisation, the from-scratch "
                                        "recipe")


def add_option_args(p: argparse.ArgumentParser, cls: type, only: Optional[tuple] = None) -> None:
    """A flag for each option of ``cls`` (:class:`PredictOptions` or :class:`ServeLimits`), ``only`` those
    if given, generated from its declaration in options.py; a flag not given is None: the default applies."""
    for s in settings(cls):
        if only is None or s.name in only:
            p.add_argument(s.flag, dest=s.name, **_setting_kwargs(s, _help(s, s.default)))


def given_options(args: argparse.Namespace, cls: type) -> dict:
    """The options of ``cls`` given as flags, checked against their declarations (a bad value is an
    AudioclfError naming it); those not given are left out, so the library's defaults (the same) apply."""
    given = {s.name: getattr(args, s.name) for s in settings(cls) if getattr(args, s.name, None) is not None}
    cls(**given)
    return given


def is_quiet(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "quiet", False))


class Deprecated(argparse.Action):
    """An old spelling that still works: it sets the new option's value and says on stderr what to use."""

    def __init__(self, option_strings, dest, new: str, **kwargs):
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog}: warning: {option_string} is deprecated here, use {self.new} (it will be removed)",
              file=sys.stderr)
        setattr(namespace, self.dest, values)
