"""flora-demo end to end: the real launcher, server and clients, as a new user runs them."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import shared_path
from flora.common.basemodel import BUILTIN_MODEL, DEFAULT_TARGET_MODULES, load_model, target_module_shapes
from flora.common.merge import merged_update, module_weights
from flora.common.payload import read_update

pytestmark = pytest.mark.slow

DEMO = shutil.which("flora-demo")
SMALL = ["--clients", "2", "--rounds", "2", "--ranks", "4,2", "--local-steps", "10"]


def run_demo(workdir: Path, *flags: str, timeout: float = 600) -> subprocess.CompletedProcess:
    result = subprocess.run([DEMO, "--workdir", str(workdir), *flags], capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"flora-demo failed:\n{result.stdout}\n{result.stderr}"
    return result


def history(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "server" / "history.jsonl").read_text().splitlines()]


def test_demo_completes_every_round_with_every_client_and_learns(tmp_path):
    workdir = tmp_path / "demo"
    result = run_demo(workdir, *SMALL)

    records = history(workdir)
    assert [r["round"] for r in records] == [0, 1, 2]
    for record in records[1:]:
        assert sorted((c["name"], c["rank"]) for c in record["clients"]) == [("client-0", 4), ("client-1", 2)]
    assert records[-1]["validation_loss"] < records[0]["validation_loss"]
    assert "| round" in result.stdout and "(lower)" in result.stdout
    # What was learned, in words, and where the report is.
    completions = result.stdout.split("greedy completions of held-out prompts:", 1)[1]
    assert "base model (before)" in completions and "merged model (after)" in completions
    assert len([line for line in completions.splitlines() if line.startswith("| ")]) >= 3  # header + 2 prompts
    assert (workdir / "report.png").stat().st_size > 10_000 and f"run report: {workdir / 'report.png'}" in result.stdout

    # The checkpoint is base + every global update, merged in version order.
    checkpoint = workdir / "server" / records[-1]["checkpoint"]
    assert str(checkpoint) in result.stdout
    exported = AutoModelForCausalLM.from_pretrained(checkpoint)
    expected = load_model(BUILTIN_MODEL)
    shapes = target_module_shapes(expected, DEFAULT_TARGET_MODULES)
    weights = {n: w.detach().clone() for n, w in module_weights(expected, sorted(shapes)).items()}
    for version in (1, 2):
        update, _ = read_update(workdir / "server" / "downlink" / f"v{version:06d}.safetensors", shapes)
        weights = merged_update(weights, update)
    for name, value in expected.state_dict().items():
        module = name.removesuffix(".weight")
        torch.testing.assert_close(exported.state_dict()[name], weights.get(module, value), rtol=0, atol=1e-6, msg=name)


def demo_processes(workdir: Path) -> list[psutil.Process]:
    """Every live process whose command line mentions the demo's working directory."""
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if str(workdir) in cmdline and process.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(process)
    return found


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_demo_leaves_no_process_behind(tmp_path, sig):
    workdir = tmp_path / "demo"
    demo = subprocess.Popen([DEMO, "--workdir", str(workdir), *SMALL, "--rounds", "50"], stdout=subprocess.PIPE, text=True)
    try:
        for line in demo.stdout:  # wait until the clients are training
            if "round 1/50 open" in line:
                break
        children = [p for p in demo_processes(workdir) if p.pid != demo.pid]
        assert len(children) == 3, "expected the server and two clients to be running"
        # Keep reading what the demo prints while it shuts down: a full pipe would block its exit.
        threading.Thread(target=demo.stdout.read, daemon=True).start()
        demo.send_signal(sig)
        assert demo.wait(timeout=60) != 0
        deadline = time.monotonic() + 30
        while demo_processes(workdir) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert demo_processes(workdir) == []
    finally:
        if demo.poll() is None:
            demo.kill()


def test_demo_on_a_real_model_with_dolly_clients(tmp_path):
    model = shared_path("models", "stories260K")
    data = shared_path("data", "dolly-10clients")
    workdir = tmp_path / "demo"
    run_demo(workdir, "--base-model", str(model), "--data-dir", str(data), *SMALL)
    records = history(workdir)
    assert [r["round"] for r in records] == [0, 1, 2]
    assert records[-1]["validation_loss"] < records[0]["validation_loss"]
