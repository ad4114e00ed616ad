"""README.md and docs/*.md cannot drift from the code: every command their code blocks show is checked,
and so is every relative link and every file, config option and config key they name.

A command is a code-block line (indented by four spaces, or inside a ``` fence) or an inline code span
that starts, after an optional `$ `, with one of the PROGRAMS; a code line that starts with `[--`
continues the command above it.
Placeholders are written `<like this>` (or `[optional]`, `UPPER` for a flag's value). How each is checked,
without training or touching the network:
- `python train.py ...`, `minilm-train ...`, `torchrun ... train.py ...`: every job the overrides describe is
  composed and validated by minilm's own preflight (minilm/launch/cli.py), in this process. A `$ ` command
  followed by an `error: ...` line must fail preflight with exactly that line.
- scripts and `minilm-*` entry points: the program exists and every `--flag` shown is one it defines
  (its source); `test_every_program_shown_answers_help` (slow) runs each one's --help.
- `bash scripts/gpu/gpu_check.sh MODE`: MODE is one the script accepts (its dry run is tests/test_gpu_check.py).
- `pytest ...`: every marker named is declared in pyproject.toml and every test path exists.
- `pip install ...`: every extra named is declared in pyproject.toml; the quick start's installs are .ci/run's.
- `wandb sweep FILE`: FILE exists (its parameters compose in tests/test_studies.py); `wandb agent` needs
  the W&B server: nothing more to check.
"""

import re
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    from pip._vendor import tomli as tomllib

from minilm.config import schema_field
from minilm.launch.cli import CONFIG_DIR, group_options, preflight

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
ALL_MARKDOWN = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
ENTRY_POINTS = PYPROJECT["project"]["scripts"]  # minilm-report = "minilm.analysis.report:main", ...
PROGRAMS = ("python train.py", "python3 train.py", "minilm-", "torchrun", "python scripts/", "python3 scripts/",
            "bash scripts/", "pytest", "pip install", "wandb ")


def code_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of every line in the page's code blocks (indented or fenced), dedented."""
    found, fenced, previous_blank = [], False, True
    in_indented = False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            found.append((number, line.strip()))
            continue
        if line.startswith("    ") and (previous_blank or in_indented) and line.strip():
            in_indented = True
            found.append((number, line.strip()))
        elif line.strip():
            in_indented = False
        previous_blank = not line.strip()
    return found


def commands(path: Path) -> list[tuple[str, str, str | None]]:
    """(where, command, the `error:` line it must print or None) for every command the page shows."""
    lines = code_lines(path)
    found = []
    for i, (number, text) in enumerate(lines):
        prompt = text.startswith("$ ")
        text = text.removeprefix("$ ")
        if text.startswith("[--") and found:  # a synopsis continued on the next line
            where, command, expected = found[-1]
            found[-1] = (where, f"{command} {text}", expected)
            continue
        if not text.startswith(PROGRAMS):
            continue
        expected = None
        if prompt and i + 1 < len(lines) and lines[i + 1][1].startswith("error: "):
            expected = lines[i + 1][1].removeprefix("error: ")
        found.append((f"{path.relative_to(ROOT)}:{number}", text, expected))
    text = path.read_text()
    for match in re.finditer(r"`([^`\n]+)`", text):  # commands in the prose: `python scripts/... --steps 100`
        if match[1].startswith(PROGRAMS):
            found.append((f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, match.start()) + 1}", match[1], None))
    return found


ALL_COMMANDS = [c for page in PAGES for c in commands(page)]


def words(command: str) -> list[list[str]]:
    """The command's words, a trailing comment dropped, split at `&&` into the commands it chains."""
    parts, current = [], []
    try:
        split = shlex.split(command, comments=True)
    except ValueError:  # a table cell's `\|` in an inline span: split at spaces
        split = command.split("  #")[0].split()
    for word in split:
        if word == "&&":
            parts.append(current)
            current = []
        else:
            current.append(word)
    return [*parts, current]


def is_placeholder(word: str) -> bool:
    return "<" in word or word.startswith("[") or word.endswith("]") or word.isupper() or word == "..."


def flags(argv: list[str]) -> list[str]:
    found = []
    for word in argv:
        for flag in re.findall(r"--[a-z][a-z0-9-]*", word):
            found.append(flag)
    return found


# ---------------------------------------------------------------- train.py


def train_args(argv: list[str]) -> list[str] | None:
    """The overrides of a training command, or None when argv is not one."""
    if argv[0] in ("python", "python3") and argv[1:2] == ["train.py"]:
        return argv[2:]
    if argv[0] == "minilm-train":
        return argv[1:]
    if argv[0] == "torchrun":
        return argv[argv.index("train.py") + 1:]
    return None


def training_commands() -> dict[tuple[tuple[str, ...], str | None], list[str]]:
    """Each distinct training command line (its overrides, the error it must print) and where it is shown."""
    found = {}
    for where, command, expected in ALL_COMMANDS:
        for argv in words(command):
            if train_args(argv) is not None:
                found.setdefault((tuple(train_args(argv)), expected), []).append(where)
    return found


TRAIN = training_commands()


def test_the_docs_show_the_commands_a_user_types():
    assert len(TRAIN) >= 15, TRAIN  # the extraction still finds them
    assert any(expected for _, expected in TRAIN)


# A sweep composes every one of its jobs (about 0.1 s each): those are slow.
@pytest.mark.parametrize("args, expected", [
    pytest.param(*key, marks=[pytest.mark.slow] if "-m" in key[0] else []) for key in TRAIN],
    ids=[" ".join(wheres) for wheres in TRAIN.values()])
def test_training_command_passes_preflight(args, expected):
    where, shown = TRAIN[(args, expected)][0], " ".join(args)
    assert not any(is_placeholder(a) for a in args), f"{where}: write a real value, not a placeholder: {shown}"
    error = preflight(list(args))
    if expected is None:
        assert error is None, f"{where}: train.py {shown}\n  error: {error}"
    else:
        assert error == expected, f"{where}: train.py {shown} prints\n  error: {error}\nnot\n  {expected}"


# ---------------------------------------------------------------- scripts and entry points


def program(argv: list[str]) -> Path | None:
    """The source file of a script or `minilm-*` entry point the command runs (None: not one)."""
    if argv[0] in ("python", "python3", "bash") and len(argv) > 1 and argv[1].startswith("scripts/"):
        return ROOT / argv[1]
    if argv[0] in ENTRY_POINTS and argv[0] != "minilm-train":
        module = ENTRY_POINTS[argv[0]].split(":")[0]
        return ROOT / (module.replace(".", "/") + ".py")
    return None


PROGRAM_COMMANDS = [(where, argv) for where, command, _ in ALL_COMMANDS for argv in words(command)
                    if program(argv) is not None]


def override_groups(argv: list[str]) -> list[list[str]]:
    """The training overrides a benchmark command passes, one list per job it preflights: the plain ones
    together, and each word with spaces as its own (bench_model.py --variants "a=1 b=2")."""
    overrides = [w for w in argv[2:] if "=" in w and not w.startswith("-") and not is_placeholder(w)]
    if not overrides or program(argv).parent.name != "bench":
        return []
    return [[w for w in overrides if " " not in w], *[w.split() for w in overrides if " " in w]]


# Each job preflighted costs three compositions: a command with many variants is slow (as a sweep is).
@pytest.mark.parametrize("where, argv", [
    pytest.param(where, argv, marks=[pytest.mark.slow] if len(override_groups(argv)) > 4 else [], id=where)
    for where, argv in PROGRAM_COMMANDS])
def test_program_exists_and_defines_every_flag_shown(where, argv):
    source = program(argv)
    assert source.is_file(), f"{where}: {source.relative_to(ROOT)} does not exist"
    text = source.read_text()
    if source.suffix == ".sh":  # gpu_check.sh MODE: one of its case labels
        modes = re.findall(r"^\s+([\w-]+)\)", text, re.MULTILINE)
        assert argv[2:3] and argv[2] in modes, f"{where}: {argv[2:3]} is not one of {modes}"
        return
    for flag in flags(argv[2:] if argv[0].startswith("python") else argv[1:]):
        assert f'"{flag}"' in text, f"{where}: {source.relative_to(ROOT)} defines no {flag}"
    sweep = ["-m"] if source.name == "bench_sweep.py" else []
    for group in override_groups(argv):  # the benchmarks take training overrides
        assert preflight([*sweep, *group]) is None, f"{where}: {group}: {preflight([*sweep, *group])}"


@cache
def help_text(path: Path) -> str:
    module = next((m.split(":")[0] for m in ENTRY_POINTS.values()
                   if ROOT / (m.split(":")[0].replace(".", "/") + ".py") == path), None)
    argv = [sys.executable, "-m", module, "--help"] if module else [sys.executable, str(path), "--help"]
    if module and "__main__" not in path.read_text():
        function = next(m.split(":")[1] for m in ENTRY_POINTS.values() if m.startswith(module + ":"))
        argv = [sys.executable, "-c", f"import sys; sys.argv = ['{path.stem}', '--help']; "
                f"from {module} import {function}; {function}()"]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{path.relative_to(ROOT)} --help: exit {proc.returncode}\n{proc.stderr[-2000:]}"
    return proc.stdout


@pytest.mark.slow
def test_every_program_shown_answers_help():
    for where, argv in PROGRAM_COMMANDS:
        source = program(argv)
        if source.suffix == ".py":
            text = help_text(source)
            for flag in flags(argv[2:] if argv[0].startswith("python") else argv[1:]):
                assert flag in text, f"{where}: {flag} is not in {source.relative_to(ROOT)} --help"


# ---------------------------------------------------------------- pytest, pip, wandb


def test_pytest_commands_name_declared_markers_and_existing_tests():
    declared = {m.split(":")[0] for m in PYPROJECT["tool"]["pytest"]["ini_options"]["markers"]}
    shown = [(where, argv) for where, command, _ in ALL_COMMANDS for argv in words(command) if argv[0] == "pytest"]
    assert shown
    for where, argv in shown:
        for i, word in enumerate(argv):
            if word == "-m":
                for marker in re.findall(r"[A-Za-z_]+", argv[i + 1]):
                    assert marker in declared | {"not", "and", "or"}, f"{where}: marker {marker} is not declared"
            elif word.startswith("tests/") and not is_placeholder(word):
                assert (ROOT / word.split("::")[0]).exists(), f"{where}: {word} does not exist"


def test_pip_commands_name_declared_extras_and_the_quick_start_is_what_ci_runs():
    extras = set(PYPROJECT["project"]["optional-dependencies"])
    ci = (ROOT / ".ci" / "run").read_text()
    shown = [(where, argv) for where, command, _ in ALL_COMMANDS for argv in words(command)
             if argv[:2] == ["pip", "install"]]
    assert shown
    for where, argv in shown:
        for word in argv[2:]:
            for extra in re.findall(r"\.\[([a-z,]+)\]", word):
                assert set(extra.split(",")) <= extras, f"{where}: extra {extra} is not in pyproject.toml"
            if where.startswith("README.md") and not word.startswith("-"):
                assert word in ci or word.replace('"', "") in ci.replace('"', ""), f"{where}: .ci/run lacks {word}"
    readme_tests = [argv for where, command, _ in ALL_COMMANDS if where.startswith("README.md")
                    for argv in words(command) if argv[0] == "pytest"]
    assert readme_tests and "python -m pytest" in ci


def test_wandb_commands_name_existing_files():
    shown = [(where, argv) for where, command, _ in ALL_COMMANDS for argv in words(command) if argv[0] == "wandb"]
    for where, argv in shown:
        assert argv[1] in ("sweep", "agent", "sync", "offline", "disabled", "login"), f"{where}: {argv}"
        if argv[1] == "sweep":
            assert (ROOT / argv[2]).is_file(), f"{where}: {argv[2]} does not exist"


# ---------------------------------------------------------------- links, paths, options and keys named


def slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(line.lstrip("#")) for line in path.read_text().splitlines() if line.startswith("#")}


def test_every_relative_link_points_to_an_existing_file_and_heading():
    checked = 0
    for page in ALL_MARKDOWN:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue  # https:, mailto:
            file, _, anchor = target.partition("#")
            linked = (page.parent / file).resolve() if file else page
            assert linked.exists(), f"{page.relative_to(ROOT)}: the link {target} points to nothing"
            if anchor and linked.suffix == ".md":
                assert anchor in anchors(linked), f"{page.relative_to(ROOT)}: {target}: no such heading"
            checked += 1
    assert checked > 20


def spans(page: Path) -> list[str]:
    return re.findall(r"`([^`\n]+)`", page.read_text())


def test_every_file_the_docs_name_exists():
    for page in PAGES:
        for span in spans(page):
            for word in span.split():
                if re.fullmatch(r"(minilm|configs|scripts|tests|docs|hydra_plugins)/[\w./-]*|train\.py", word) \
                        and "<" not in word:
                    assert (ROOT / word.split("::")[0]).exists(), f"{page.relative_to(ROOT)}: `{word}` does not exist"


GROUPS = {str(p.relative_to(CONFIG_DIR)) for p in CONFIG_DIR.rglob("*") if p.is_dir()}  # model, hydra/launcher


def test_every_config_option_and_key_the_docs_name_exists():
    for page in PAGES:
        for span in spans(page):
            for word in span.replace(",", " ").split():
                name, sep, value = word.partition("=")
                if sep and name in GROUPS and re.fullmatch(r"[\w-]+", value):
                    assert value in group_options(name), f"{page.relative_to(ROOT)}: `{word}`: no such option"
                key = name.lstrip("+~")
                if re.fullmatch(r"(model|norm|precision|data|optim|train|logger|diagnostics|paths|study)\.[a-z_.]+",
                                key) and not re.search(r"\.(py|yaml|md|json|jsonl|pt|log|bin|csv|png)$", key):
                    assert schema_field(key) is not None, f"{page.relative_to(ROOT)}: `{word}`: no config key {key}"


def classes() -> dict[str, set[str]]:
    """Every class minilm defines and the names defined in its body."""
    import ast

    found = {}
    for path in (ROOT / "minilm").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                names = {n.name for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
                names |= {t.id for n in node.body if isinstance(n, ast.Assign) for t in n.targets
                          if isinstance(t, ast.Name)}
                names |= {n.target.id for n in node.body if isinstance(n, ast.AnnAssign)
                          and isinstance(n.target, ast.Name)}
                found.setdefault(node.name, set()).update(names)
    return found


def test_every_method_the_docs_name_exists():
    defined = classes()
    assert "Run" in defined or "GPT" in defined
    for page in PAGES:
        for span in spans(page):
            for cls, attr in re.findall(r"\b([A-Z]\w+)\.([a-z_]\w*)\b", span):
                if cls in defined:
                    assert attr in defined[cls], f"{page.relative_to(ROOT)}: `{span}`: {cls} has no {attr}"
