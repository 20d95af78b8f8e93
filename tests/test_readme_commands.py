"""Every flora command the README shows runs as written: each goes through its tool's real
argument parser, the server and client commands through their settings loaders (--print-config,
in a folder where the README's kits and files exist), and flora-sim's comparisons for a round."""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable
from pathlib import Path

import pytest

from flora.client.cli import build_parser as client_parser
from flora.client.cli import main as client_main
from flora.demo.cli import parse_args as demo_parse
from flora.server.admin.cli import build_parser as admin_parser
from flora.server.admin.cli import main as admin_main
from flora.server.cli import build_parser as server_parser
from flora.server.cli import main as server_main
from flora.sim.cli import build_parser as sim_parser
from flora.sim.cli import main as sim_main

README = Path(__file__).resolve().parents[1] / "README.md"
PARSE: dict[str, Callable[[list[str]], object]] = {
    "flora-server": lambda argv: server_parser().parse_args(argv),
    "flora-client": lambda argv: client_parser().parse_args(argv),
    "flora-admin": lambda argv: admin_parser().parse_args(argv),
    "flora-sim": lambda argv: sim_parser().parse_args(argv),
    "flora-demo": demo_parse,
}
PLACEHOLDER = "..."  # after a flag (`--config ...`) any value; elsewhere "and the other flags"
FILE_FLAGS = ("--data", "--validation-data", "--tls-ca", "--tls-cert", "--tls-key")


def shell_lines(text: str) -> list[str]:
    """The lines of the README's ```bash blocks, a trailing backslash joining the next."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        lines += block.replace("\\\n", " ").splitlines()
    return lines


def readme_commands() -> list[list[str]]:
    """Every flora tool invocation with arguments, from code blocks and inline code alike."""
    text = README.read_text()
    lines = shell_lines(text) + re.findall(r"`(flora-[a-z]+ [^`]+)`", text)
    commands = [shlex.split(line, comments=True) for line in lines]
    return [argv for argv in commands if argv and argv[0] in PARSE and len(argv) > 1]


def filled(argv: list[str]) -> list[str]:
    """The command with its placeholders filled: a value after a flag, nothing for the rest."""
    words = []
    for word in argv:
        if word == PLACEHOLDER:
            if not (words and words[-1].startswith("--")):
                continue
            word = "x"
        words.append(word)
    return words


def is_flag_mention(argv: list[str]) -> bool:
    """`flora-server --method` or `flora-admin provision`: prose naming a flag or a sub-command."""
    return len(argv) == 2 and (argv[1].startswith("--") or argv[0] == "flora-admin") and argv[1] != "--help"


def test_the_readme_shows_the_commands_this_test_runs():
    tools = {argv[0] for argv in readme_commands()}
    assert tools == set(PARSE), f"commands of {sorted(set(PARSE) - tools)} are gone from the README: update the test"


@pytest.mark.parametrize("argv", readme_commands(), ids=" ".join)
def test_every_readme_command_parses(argv, capsys):
    if is_flag_mention(argv):  # the flag alone may lack its value (a switch needs none), but it must be the tool's
        try:
            PARSE[argv[0]]([argv[1], "--help"] if argv[0] == "flora-admin" else argv[1:])
        except SystemExit:
            error = capsys.readouterr().err
            assert "unrecognized arguments" not in error and "invalid choice" not in error, f"{argv[1]}: not {argv[0]}'s"
        return
    try:
        PARSE[argv[0]](filled(argv)[1:])
    except SystemExit as exit_:
        assert exit_.code == 0 and "--help" in argv, f"{' '.join(argv)} exits {exit_.code}"


def readme_toml(name: str) -> str:
    """The README's ```toml block that starts with ``# name``."""
    blocks = [b for b in re.findall(r"```toml\n(.*?)```", README.read_text(), re.S) if b.startswith(f"# {name}\n")]
    assert len(blocks) == 1, f"the README has no ```toml block for {name}"
    return blocks[0]


def write_file(path: Path) -> Path:
    """A file the README names, with a record where it is data (the settings may check it exists)."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text({".jsonl": '{"text": "x"}\n', ".json": '[{"text": "x"}]'}.get(path.suffix, ""))
    return path


def with_local_files(toml: str, folder: Path) -> str:
    """The README's server.toml with each absolute file path moved under ``folder``, the file there."""
    def local(match: re.Match) -> str:
        path = folder / match[1].lstrip("/")
        if path.suffix:  # a file (state_dir and other folders are made by the server)
            write_file(path)
        return f'"{path}"'
    return re.sub(r'"(/[^"]+)"', local, toml)


def test_the_readme_setup_commands_run_through_the_real_settings(tmp_path, monkeypatch, capsys):
    """Provisioning writes the kits the later commands name; each server and client command, with
    the files it names present, loads its settings (--print-config) and exits 0."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "server.toml").write_text(with_local_files(readme_toml("server.toml"), tmp_path))
    commands = [filled(argv) for argv in readme_commands() if not is_flag_mention(argv) and "--help" not in argv]
    provisions = [argv for argv in commands if argv[:2] == ["flora-admin", "provision"]]
    projects = [argv for argv in provisions if "--project" in argv]
    assert projects
    for number, argv in enumerate(projects):  # each new project into a folder of its own but the first
        out = argv.index("--out") + 1
        argv = [*argv[:out], argv[out] if number == 0 else f"{argv[out]}-{number}", *argv[out + 1:]]
        assert admin_main(argv[1:]) == 0, " ".join(argv)
    for argv in provisions:
        if argv not in projects:  # --add-client: extends the first project as written
            assert admin_main(argv[1:]) == 0, " ".join(argv)
    run = {"flora-server": server_main, "flora-client": client_main}
    settings_commands = [argv for argv in commands if argv[0] in run]
    assert len(settings_commands) >= 5
    for argv in settings_commands:
        for flag, value in zip(argv, argv[1:]):
            if flag in FILE_FLAGS:
                for name in value.split(","):
                    write_file(Path(name))
        try:
            code = run[argv[0]]([*argv[1:], "--print-config"])
        except SystemExit as exit_:
            code = exit_.code
        assert code in (0, None), f"{' '.join(argv)}: {capsys.readouterr().err}"
        assert "state_dir = " in capsys.readouterr().out  # the effective settings were printed


@pytest.mark.slow
def test_the_readme_flora_sim_comparisons_run(tmp_path, capsys):
    """As written, one short round each: a method the ranks do not admit fails here."""
    sims = [argv for argv in readme_commands() if argv[0] == "flora-sim" and not is_flag_mention(argv)]
    assert sims
    for number, argv in enumerate(sims):
        tiny = ["--rounds", "1", "--local-steps", "1", "--examples-per-client", "8", "--cutoff", "32",
                "--template", "plain", "--out", str(tmp_path / str(number))]
        sim_main([*argv[1:], *tiny])
        methods = argv[argv.index("--method") + 1].split(",")
        out = capsys.readouterr().out
        assert all(method in out for method in methods), out


def test_ci_runs_the_readme_test_command_in_a_venv_of_its_own():
    """.ci/run is the README's test command with .ci/venv for .venv: never a developer's .venv."""
    test_command = next(line for line in shell_lines(README.read_text()) if "python -m pytest" in line)
    script = [line for line in (README.parent / ".ci" / "run").read_text().splitlines() if not line.startswith("#")]
    assert [line for line in script if "python -m pytest" in line] == [test_command.replace(".venv", ".ci/venv")]
    assert not any(".venv" in line.replace(".ci/venv", "") for line in script)  # never removes or uses yours
