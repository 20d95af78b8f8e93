"""Every console script installs and answers --help."""

from __future__ import annotations

import shutil
import subprocess

import pytest


@pytest.mark.parametrize("script", ["flora-server", "flora-client", "flora-demo", "flora-sim", "flora-admin"])
def test_console_script_help(script):
    path = shutil.which(script)
    assert path, f"{script} is not installed on PATH"
    result = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout
