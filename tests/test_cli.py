"""The command line explains itself: every option has help with its default, --print-config shows the
resolved configuration, -v/-q go anywhere, old spellings keep working with a warning, and the inference and
serving flags are generated from one declaration (options.py)."""

import argparse
import inspect

import pytest
import yaml

from audioclf import cli, export
from audioclf.cli import build_parser, main
from audioclf.commands import embed as embed_command
from audioclf.commands import predict as predict_command
from audioclf.config import resolve
from audioclf.evaluate import evaluate
from audioclf.options import PredictOptions, ServeLimits
from audioclf.predict import Classifier, load
from audioclf.serve import create_app, serve
from audioclf.settings import settings


def subparsers(parser=None) -> dict[str, argparse.ArgumentParser]:
    parser = parser or build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def test_every_option_of_every_command_has_help():
    missing = []
    commands = subparsers()
    assert len(commands) >= 10
    for name, p in commands.items():
        for action in p._actions:
            hidden = action.help == argparse.SUPPRESS and isinstance(action, cli._RefuseFold)  # cv's refusals
            if not hidden and not (action.help or "").strip():
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, f"options without help: {missing}"


def test_options_show_their_default():
    from audioclf.config import SECTIONS

    declared = {(s.flag, s.name) for cls in (*SECTIONS.values(), PredictOptions, ServeLimits) for s in settings(cls)}
    silent = [f"{name} {action.option_strings[0]}" for name, p in subparsers().items() for action in p._actions
              if action.option_strings and ((action.option_strings[0], action.dest) in declared
                                            or action.default not in (None, False, argparse.SUPPRESS))
              and action.help != argparse.SUPPRESS and "default" not in action.help and "deprecated" not in action.help]
    assert not silent, f"options whose help does not say their default: {silent}"
    train = subparsers()["train"]._option_string_actions
    assert "default: from the backbone's recipe (15 for mn04_as)" in train["--epochs"].help
    assert train["--seed"].help.endswith("(default: 42)")
    assert train["--backbone"].help.endswith("(default: mn04_as)")  # the default preset's, not the dataclass's


def test_the_top_level_help_describes_the_tool(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "Train, evaluate, serve and export audio classifiers." in out
    assert "audioclf train my_sounds/ --out runs/mine" in out and "parse flags" not in out


def test_print_config_prints_the_resolved_config_and_trains_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", str(tmp_path), "--out", str(out), "--epochs", "3", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    expected = resolve(overrides={"data": {"root": str(tmp_path), "format": "folder"}, "train": {"epochs": 3}})
    assert printed == expected.to_dict()
    assert printed["features"]["sample_rate"] == 32000 and printed["train"]["lr"] == 5e-4  # front end and recipe
    assert not out.exists()
    assert main(["train", str(tmp_path), "--print-config"]) == 0  # nothing is written, so no --out needed
    assert yaml.safe_load(capsys.readouterr().out)["train"]["epochs"] == 15
    for command in ("train", "cv"):
        assert main([command, str(tmp_path)]) == 2
        assert f"--out is required: the run directory to write (audioclf {command}" in capsys.readouterr().err


def test_the_old_preset_name_works_with_a_warning(tmp_path, capsys, caplog):
    assert main(["train", str(tmp_path), "--out", str(tmp_path / "r"), "--preset", "seed", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["preset"] == "tutorial"
    assert "'seed' is deprecated" in caplog.text


@pytest.mark.parametrize("argv", [["-v", "-q", "backbones"], ["backbones", "-v", "-q"], ["-v", "backbones", "-q"]])
def test_verbose_and_quiet_go_before_or_after_the_command(argv):
    args = build_parser().parse_args(argv)
    assert args.verbose is True and args.quiet is True
    assert not hasattr(build_parser().parse_args(["backbones"]), "quiet")  # not given: the commands' default


def test_quiet_after_train_reaches_the_config(tmp_path):
    args = build_parser().parse_args(["train", str(tmp_path), "--out", "x", "-q"])
    assert cli.config_from_args(args).train.quiet is True
    args = build_parser().parse_args(["train", str(tmp_path), "--out", "x"])
    assert cli.config_from_args(args).train.quiet is False


@pytest.mark.parametrize("argv", [["predict", "m", "p", "--format", "both"], ["export", "m", "--format", "onnx", "--out", "o"]])
def test_the_old_output_format_spelling_still_works_and_says_so(argv, capsys):
    args = build_parser().parse_args(argv)
    assert args.out_format == argv[argv.index("--format") + 1]
    assert "--format is deprecated here, use --out-format" in capsys.readouterr().err
    new = [a if a != "--format" else "--out-format" for a in argv]
    assert build_parser().parse_args(new).out_format == args.out_format
    assert "deprecated" not in capsys.readouterr().err


def test_export_needs_an_output_format():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["export", "m", "--out", "o"])


def test_the_cli_lists_the_output_formats_the_library_knows():
    assert cli.PREDICT_OUT_FORMATS == tuple(predict_command.FORMATS)
    assert cli.EXPORT_FORMATS == tuple(export.FORMATS)


# ------------------------------------------------------------------------ options declared once

@pytest.mark.parametrize("command, cls", [("predict", PredictOptions), ("serve", ServeLimits)])
def test_option_flags_are_generated_from_their_declaration(command, cls):
    actions = subparsers()[command]._option_string_actions
    for s in settings(cls):
        action = actions[s.flag]
        # a bool is a --x/--no-x pair (argparse.BooleanOptionalAction), which takes no type
        assert action.dest == s.name and action.default is None and action.type is (None if s.kind is bool else s.kind)
        assert action.help.startswith(s.help)


def test_the_library_takes_its_defaults_from_the_declarations():
    def defaults(fn):
        return {k: p.default for k, p in inspect.signature(fn).parameters.items()}

    for fn in (predict_command.run_predict, predict_command.predict_to_folder, embed_command.run_embed, evaluate,
               load, Classifier.__init__, Classifier.classify, Classifier.classify_files, create_app, serve):
        for name, value in defaults(fn).items():
            for cls in (PredictOptions, ServeLimits):
                if name in {s.name for s in settings(cls)}:
                    assert value == getattr(cls(), name), f"{fn.__qualname__}({name}={value!r})"


def test_bad_options_are_refused_before_any_model_work(tmp_path, capsys):
    missing_model = str(tmp_path / "no-model")
    assert main(["serve", missing_model, "--port", "70000"]) == 2
    assert "port=70000 is out of range: it must be <= 65535" in capsys.readouterr().err
    assert main(["predict", missing_model, str(tmp_path), "--top-k", "0"]) == 2
    assert "top_k=0 is out of range: it must be >= 1" in capsys.readouterr().err
    assert main(["embed", missing_model, str(tmp_path), "--out", str(tmp_path / "e.npy"), "--device", "gpu"]) == 2
    assert "device='gpu'" in capsys.readouterr().err


# ------------------------------------------------------------------------ a failed train leaves nothing

def test_a_failed_train_leaves_no_out_folder(tmp_path, capsys):
    out = tmp_path / "runs" / "new"
    assert main(["train", str(tmp_path / "missing"), "--out", str(out), "--quiet"]) == 2
    assert "missing" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
    with pytest.raises(SystemExit):
        main(["train", str(tmp_path), "--out", str(out), "--epochs", "many"])
    assert not (tmp_path / "runs").exists()


def test_a_failed_train_keeps_a_folder_that_existed(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["train", str(tmp_path / "missing"), "--out", str(out), "--quiet"]) == 2
    assert (out / "notes.txt").read_text() == "mine"
