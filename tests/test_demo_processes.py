"""flora-demo's launcher: children start the installed flora from any folder; configuration errors exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from flora.demo.processes import Supervisor


@pytest.mark.slow  # the child imports the client's CLI (torch, transformers)
def test_a_flora_folder_in_the_working_directory_does_not_shadow_the_package(tmp_path, monkeypatch):
    """A user's home with the clone at ~/flora: ``python -m`` alone would import that folder."""
    shadow = tmp_path / "flora"
    shadow.mkdir()
    (shadow / "__init__.py").write_text("raise ImportError('the working folder was imported, not flora')\n")
    monkeypatch.chdir(tmp_path)
    with Supervisor(tmp_path / "logs") as supervisor:
        child = supervisor.start("client", "flora.client.cli", ["--help"])
        code = child.process.wait(timeout=120)
    assert code == 0, child.log_tail()
    assert "usage: flora-client" in Path(child.log_path).read_text()


@pytest.mark.parametrize("problem", ["workdir", "data-dir"])
def test_an_unusable_folder_is_a_configuration_error_exit_2_like_a_bad_flag(tmp_path, monkeypatch, capsys, problem):
    """Exit status 2 for configuration mistakes, whether argparse or the demo's own checks find them."""
    import signal

    from flora.demo.cli import main

    monkeypatch.setattr(signal, "signal", lambda *args: None)  # main's SIGTERM handler: not in the test process
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("someone else's")
    (tmp_path / "data").mkdir()
    argv = (["--workdir", str(tmp_path / "taken")] if problem == "workdir"
            else ["--workdir", str(tmp_path / "run"), "--data-dir", str(tmp_path / "data")])
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    named = {"workdir": "--workdir", "data-dir": "client files (one per client expected)"}[problem]
    assert exit_.value.code == 2 and named in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["--clients", "0"])  # argparse's own refusal: the same status
    assert exit_.value.code == 2
