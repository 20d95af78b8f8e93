"""The demo's supervisor starts the installed flora, whatever folder it is started from."""

from __future__ import annotations

from pathlib import Path

import pytest

from flora.demo.processes import Supervisor

pytestmark = pytest.mark.slow  # the child imports the client's CLI (torch, transformers)


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
