"""The README, followed from top to bottom as a new user would: every command of its ```bash blocks runs, in
order, in a fresh folder holding the files it names (a small synthetic ``my_sounds/`` and a few clips), and
every ```python block runs after them. The commands it cannot run are listed in ``NOT_RUN`` with the reason;
each entry must still match a README line, so the list cannot go stale. The docs' relative links and anchors
must resolve."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from audioclf.backbones import BACKBONES, DEFAULT_BACKBONE
from audioclf.demo import make_synthetic_dataset, synth_clip

from conftest import SHARED_DATA

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SHARED_WEIGHTS = SHARED_DATA.parent / "weights" / BACKBONES[DEFAULT_BACKBONE].weights_file

# README command (its start) -> why the test does not run it
NOT_RUN = {
    "python3 -m venv": "creates a venv and installs from PyPI (the network); the suite already runs installed, "
                       "and test_demo.py runs the demo",
    "git clone": "the network",
    "pip install": "the network",
    "python benchmarks/accuracy.py": "needs ESC-50 and FSDD, and hours",
    "python benchmarks/openset.py": "needs ESC-50, and six trainings",
    "audioclf train ESC-50/": "needs ESC-50",
    "python benchmarks/polyphonic.py": "needs ESC-50 and trains two models",
    "python benchmarks/soundscapes.py": "needs ESC-50 and trains two models",
}
# commands that need the default backbone's pretrained weights (no download in tests): run when the shared
# copy is there
NEEDS_WEIGHTS = ("audioclf tag",)
# a server runs until stopped: started in the background with another port, stopped at the end of its block
SERVE = "audioclf serve"
README_PORT = "8000"
SR = 16000  # Hz, the synthetic clips' rate


def readme_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of each fenced block."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M)]


def shell_commands(block: str) -> list[str]:
    """A bash block's commands: backslash-continued lines joined, blank and comment-only lines dropped."""
    commands, current = [], ""
    for line in block.splitlines():
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        if current.strip() and not current.lstrip().startswith("#"):
            commands.append(current.strip())
        current = ""
    return commands


def not_run_reason(command: str) -> str | None:
    return next((why for start, why in NOT_RUN.items() if command.startswith(start)), None)


def _readme_commands() -> list[str]:
    return [c for lang, body in readme_blocks(README.read_text()) if lang == "bash" for c in shell_commands(body)]


def test_the_readme_is_a_short_page():
    assert len(README.read_text().splitlines()) <= 200


def test_every_not_run_entry_still_names_a_readme_command():
    commands = _readme_commands()
    for start in NOT_RUN:
        assert any(c.startswith(start) for c in commands), f"NOT_RUN[{start!r}] matches no README command"
    assert any(c.startswith(SERVE) for c in commands) and any(c.startswith(NEEDS_WEIGHTS) for c in commands)


def test_the_parser_joins_continued_lines_and_drops_comments():
    block = "# a comment\naudioclf train a \\\n    --out b   # note\n\ncurl x\n"
    assert shell_commands(block) == ["audioclf train a      --out b   # note", "curl x"]


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to dashes."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_the_docs_links_resolve():
    pages = [README, *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue  # a URL
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and file.suffix == ".md":
                headings = re.findall(r"^#+ (.*)$", file.read_text(), re.M)
                if anchor not in {_slug(h) for h in headings}:
                    broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


# ------------------------------------------------------------------------------------------ running it

def _user_folder(cwd: Path) -> None:
    """The files the README's commands name: my_sounds/ (a folder per class), test_sounds/, clip.wav,
    recording.wav (five 2-s sounds in a row) and reference.tsv (its events, DCASE style)."""
    make_synthetic_dataset(cwd / "my_sounds", n_per_class=6, sample_rate=SR, duration_s=1.0, seed=0)
    make_synthetic_dataset(cwd / "test_sounds", n_per_class=2, sample_rate=SR, duration_s=1.0, seed=1)
    rng = np.random.default_rng(2)
    sf.write(cwd / "clip.wav", synth_clip("chirp", rng, SR, 1.0), SR)
    kinds = ("tone", "clicks", "warble", "noise", "chirp")
    sf.write(cwd / "recording.wav", np.concatenate([synth_clip(k, rng, SR, 2.0) for k in kinds]), SR)
    rows = [f"recording.wav\t{2.0 * i:.1f}\t{2.0 * i + 2.0:.1f}\t{k}" for i, k in enumerate(kinds)]
    (cwd / "reference.tsv").write_text("filename\tonset\toffset\tevent_label\n" + "\n".join(rows) + "\n")


def _environment(tmp: Path, weights: bool) -> dict:
    """PATH with ``audioclf`` and ``python`` as this interpreter runs them; no downloads (a dead proxy); the
    default backbone's weights in TORCH_HOME's hub cache when ``weights``."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    for name, args in (("audioclf", "-m audioclf"), ("python", "")):
        script = bin_dir / name
        script.write_text(f'#!/bin/sh\nexec "{sys.executable}" {args} "$@"\n')
        script.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "MPLBACKEND": "Agg",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)}
    for proxy in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        env[proxy] = "http://127.0.0.1:9"  # the discard port: a download fails at once
    # the README's own server (curl) is reached directly; everything else goes to the dead proxy
    env["no_proxy"] = env["NO_PROXY"] = "127.0.0.1,localhost"
    if weights:
        cached = Path(env["TORCH_HOME"]) / "hub" / "checkpoints" / SHARED_WEIGHTS.name
        cached.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(SHARED_WEIGHTS, cached)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(command: str, cwd: Path, env: dict, port: int) -> subprocess.Popen:
    command = command.replace(f"--port {README_PORT}", f"--port {port}")
    server = subprocess.Popen(["bash", "-c", f"exec {command}"], cwd=cwd, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"README command failed: {command}\n{server.stdout.read()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return server
        except OSError:
            time.sleep(0.5)
    server.kill()
    pytest.fail(f"README command did not start serving within 120 s: {command}")


def _run(command: str, cwd: Path, env: dict) -> None:
    r = subprocess.run(["bash", "-c", f"set -eo pipefail\n{command}"], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, (f"README command failed (exit {r.returncode}): {command}\n"
                               f"stdout: {r.stdout[-2000:]}\nstderr: {r.stderr[-3000:]}")


@pytest.mark.slow
def test_the_readme_commands_run_in_order(tmp_path):
    weights = SHARED_WEIGHTS.is_file()
    cwd = tmp_path / "work"
    cwd.mkdir()
    _user_folder(cwd)
    env = _environment(tmp_path, weights)
    ran, skipped = [], []
    for lang, body in readme_blocks(README.read_text()):
        if lang != "bash":
            continue
        server, port = None, _free_port()
        try:
            for command in shell_commands(body):
                if not_run_reason(command) or (command.startswith(NEEDS_WEIGHTS) and not weights):
                    skipped.append(command)
                elif command.startswith(SERVE):
                    server = _start_server(command, cwd, env, port)
                    ran.append(command)
                else:
                    _run(command.replace(f"127.0.0.1:{README_PORT}", f"127.0.0.1:{port}"), cwd, env)
                    ran.append(command)
        finally:
            if server is not None:
                server.terminate()
                server.wait(timeout=30)
    for lang, body in readme_blocks(README.read_text()):
        if lang == "python":
            r = subprocess.run([sys.executable, "-c", body], cwd=cwd, env=env, capture_output=True, text=True,
                               timeout=300)
            assert r.returncode == 0, f"README Python block failed:\n{body}\n{r.stderr[-3000:]}"
    assert any(c.startswith("audioclf train") for c in ran) and (cwd / "runs" / "mine" / "best.pt").is_file()
    assert len(ran) >= 8, ran
