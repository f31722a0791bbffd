"""Every launcher command in README.md and docs/*.md runs as written: the launcher exists and defines
every flag the command passes (read from its ``--helpfull``, one subprocess per launcher), and every
``benchmarks/*.py`` script and ``experiments/*.py`` config the docs name exists."""

from __future__ import annotations

import functools
import os
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_FENCE = re.compile(r"^(`{3,}|~{3,})")
_INLINE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
_LAUNCHER = re.compile(r"^launch(?:\.[A-Za-z_][A-Za-z0-9_]*)+$")
# A flag line of absl's --helpfull: "  --name: ...", "  --[no]name: ...", "  -?,--[no]help: ...".
_HELP_FLAG = re.compile(r"^\s+(?:-\S,)?--(\[no\])?([A-Za-z0-9_.\-]+):")


def _commands(path: Path) -> list[tuple[int, str]]:
    """(line number, command) for each shell command in the file that runs ``python -m launch.NAME``:
    lines of fenced code blocks (with their backslash continuations joined) and inline code spans."""
    found = []
    lines = path.read_text(encoding="utf-8").splitlines()
    fence = None
    i = 0
    while i < len(lines):
        line = lines[i]
        marker = _FENCE.match(line.strip())
        if marker and (fence is None or line.strip().startswith(fence)):
            fence = None if fence is not None else marker.group(1)
            i += 1
            continue
        if fence is not None:
            start, command = i, line
            while command.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                command = command.rstrip()[:-1] + " " + lines[i].strip()
            if re.search(r"-m\s+launch\.", command):
                found.append((start + 1, command.strip()))
        else:
            for span in _INLINE.findall(line):
                if re.search(r"python\S*\s+-m\s+launch\.", span):
                    found.append((i + 1, span.strip()))
        i += 1
    return found


def _invocations(command: str) -> list[tuple[str, list[str]]]:
    """(launcher module, its arguments) for each ``-m launch.NAME`` in a shell command line (which may
    chain several commands with ``&&``, ``;`` or ``|``)."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    tokens = list(lexer)
    segments, current = [], []
    for token in tokens:
        if token and set(token) <= set(";&|"):
            segments.append(current)
            current = []
        else:
            current.append(token)
    segments.append(current)
    out = []
    for segment in segments:
        for j, token in enumerate(segment[:-1]):
            if token == "-m" and segment[j + 1].startswith("launch."):
                out.append((segment[j + 1], segment[j + 2 :]))
                break
    return out


def _flag_names(args: list[str]) -> list[tuple[str, str]]:
    """(flag name as written, its value or "") for every ``--flag`` argument; the brackets and ellipses of
    usage notation (``[--scale=1.0 ...]``) are stripped."""
    flags = []
    for arg in args:
        arg = arg.lstrip("[").rstrip("]")
        if not arg.startswith("--") or arg == "--":
            continue
        name, _, value = arg[2:].partition("=")
        flags.append((name, value))
    return flags


def _cases() -> list[tuple[str, int, str, str, list[str]]]:
    cases = []
    for path in DOCS:
        for line, command in _commands(path):
            for module, args in _invocations(command):
                cases.append((str(path.relative_to(ROOT)), line, command, module, args))
    return cases


CASES = _cases()


@functools.lru_cache(maxsize=None)
def _all_helps() -> dict[str, tuple[frozenset[str], frozenset[str]] | str]:
    """launcher module -> (flag names, boolean flag names) from one ``--helpfull`` subprocess each, run
    side by side; or the launcher's error output when it printed no flags."""
    modules = sorted({module for *_, module, _ in CASES if _module_file(module).is_file()})
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}

    def helpfull(module):
        run = subprocess.run(
            [sys.executable, "-m", module, "--helpfull"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
        )
        names, booleans = set(), set()
        for line in (run.stdout + run.stderr).splitlines():
            match = _HELP_FLAG.match(line)
            if match:
                names.add(match.group(2))
                if match.group(1):
                    booleans.add(match.group(2))
        if not names:
            return module, f"`python -m {module} --helpfull` listed no flags (exit {run.returncode}):\n{run.stderr[-2000:]}"
        return module, (frozenset(names), frozenset(booleans))

    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(pool.map(helpfull, modules))


def _module_file(module: str) -> Path:
    return ROOT.joinpath(*module.split(".")).with_suffix(".py")


def test_the_docs_have_launcher_commands():
    files = {case[0] for case in CASES}
    assert "README.md" in files, "no `python -m launch.NAME` command found in README.md"
    first = _commands(ROOT / "README.md")[0][1]
    assert "-m launch.ask" in first, f"README.md's first launcher command is not launch.ask: {first}"


@pytest.mark.parametrize(
    "file,line,command,module,args", CASES, ids=[f"{c[0]}:{c[1]}:{c[3]}" for c in CASES]
)
def test_command_uses_known_flags(file, line, command, module, args):
    where = f"{file}:{line}: {command}"
    assert _LAUNCHER.match(module), f"{where}\n  not a launcher module name: {module!r}"
    assert _module_file(module).is_file(), f"{where}\n  {module}: {_module_file(module).relative_to(ROOT)} does not exist"
    helps = _all_helps()[module]
    assert not isinstance(helps, str), f"{where}\n  {helps}"
    names, booleans = helps
    unknown = []
    for name, _ in _flag_names(args):
        if name in names:
            continue
        if name.startswith("config.") and "config" in names:  # an override of a config_flags config file
            continue
        if name.startswith("no") and name[2:] in booleans:
            continue
        unknown.append(f"--{name}")
    assert not unknown, f"{where}\n  {module} defines no flag {', '.join(unknown)}"
    for name, value in _flag_names(args):
        config = re.fullmatch(r"(experiments/[a-z0-9_]+\.py)(?::\w+)?", value) if name == "config" else None
        if config:
            assert (ROOT / config.group(1)).is_file(), f"{where}\n  --config names a missing file {config.group(1)}"


def test_referenced_benchmark_scripts_exist():
    missing = []
    for path in DOCS:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for script in re.findall(r"\bbenchmarks/[A-Za-z0-9_/]+\.py\b", line):
                if not (ROOT / script).is_file():
                    missing.append(f"{path.relative_to(ROOT)}:{number}: {script}")
    assert not missing, "the docs name benchmark scripts that do not exist:\n  " + "\n  ".join(missing)


def test_the_extractor_reads_continuations_chains_and_usage_notation():
    assert _invocations("a && .venv/bin/python -m launch.ask --pretrained=x --question=\"a b\" | tee f") == [
        ("launch.ask", ["--pretrained=x", "--question=a b"])
    ]
    assert _invocations("python -m launch.chat --checkpoint=runs/niah --doc=notes.txt  # /doc FILE, /quit") == [
        ("launch.chat", ["--checkpoint=runs/niah", "--doc=notes.txt"])
    ]
    args = _invocations("""python -m launch.tpu.launch "--set=train.mesh=(('fsdp', 4),)" [--dry_run --nospot ...]""")
    assert args == [("launch.tpu.launch", ["--set=train.mesh=(('fsdp', 4),)", "[--dry_run", "--nospot", "...]"])]
    assert _flag_names(args[0][1]) == [("set", "train.mesh=(('fsdp', 4),)"), ("dry_run", ""), ("nospot", "")]
    assert _module_file("launch.tpu.launch") == ROOT / "launch" / "tpu" / "launch.py"
