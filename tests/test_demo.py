"""flora-demo end to end: the real launcher, server and clients, as a new user runs them."""

from __future__ import annotations

import json
import re
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
from flora.common.basemodel import BUILTIN_MODEL, load_model, target_module_shapes
from flora.common.builtin_weights import read_record, weights_fingerprint
from flora.common.merge import merged_update, module_weights
from flora.common.payload import read_update
from flora.demo.sample_data import TASKS

pytestmark = pytest.mark.slow

DEMO = shutil.which("flora-demo")
SMALL = ["--clients", "2", "--rounds", "2", "--ranks", "4,2", "--local-steps", "10"]
ACCURACY = re.compile(r"^task (\S+): base (\d+)/(\d+), best single client (\d+)/(\d+), merged (\d+)/(\d+)$", re.M)


def run_demo(workdir: Path, *flags: str, timeout: float = 600) -> subprocess.CompletedProcess:
    result = subprocess.run([DEMO, "--workdir", str(workdir), *flags], capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"flora-demo failed:\n{result.stdout}\n{result.stderr}"
    return result


def history(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "server" / "history.jsonl").read_text().splitlines()]


def accuracy(stdout: str) -> dict[str, tuple[int, int, int, int]]:
    """The demo's accuracy lines: task -> (base, best single client, merged, held-out prompts)."""
    found = {}
    for task, base, n, single, n2, merged, n3 in ACCURACY.findall(stdout):
        assert n == n2 == n3
        found[task] = (int(base), int(single), int(merged), int(n))
    return found


def alone_scores(stdout: str) -> dict[str, list[int]]:
    """The per-model score table: model -> exact matches per task, in the table's task order."""
    rows = re.findall(r"^\| ((?:client-\d+ alone|merged model \(after\))) +\|(.*)\|$", stdout, re.M)
    return {model: [int(cell.split("/")[0]) for cell in cells.split("|")] for model, cells in rows}


def completion_table(stdout: str) -> list[str]:
    """The lines of the held-out completions table."""
    after = stdout.split("greedy completions of held-out prompts", 1)[1].split("\n", 1)[1]
    return after.split("\n\n", 1)[0].splitlines()


def assert_readable(table: list[str]) -> None:
    """A Markdown table of one line per row: same column count and width on every line."""
    assert len(table) >= 3
    assert all(line.startswith("| ") and line.endswith(" |") or line.startswith("|-") for line in table), table
    assert len({line.count("|") for line in table}) == 1 and len({len(line) for line in table}) == 1, table


def test_builtin_model_loads_the_pretrained_weights_to_their_recorded_fingerprint():
    assert weights_fingerprint(load_model(BUILTIN_MODEL)) == read_record()["fingerprint"]


def test_default_demo_scores_every_task_for_every_model_and_merges_exactly(tmp_path):
    workdir = tmp_path / "demo"
    result = run_demo(workdir)

    records = history(workdir)
    assert [r["round"] for r in records] == [0, 1, 2, 3]
    for record in records[1:]:
        assert sorted((c["name"], c["rank"]) for c in record["clients"]) == [("client-0", 16), ("client-1", 8), ("client-2", 4)]
    assert records[-1]["validation_loss"] < records[0]["validation_loss"]
    assert "| round" in result.stdout and "(lower)" in result.stdout
    # What was learned, in words: every task's held-out prompts scored for the base model, each
    # client's own model and the merged one.
    scores = accuracy(result.stdout)
    assert sorted(scores) == sorted(TASKS)
    assert all(n >= 9 and max(base, single, merged) <= n for base, single, merged, n in scores.values()), scores
    # The federation taught something a person can read: the merged model answers held-out prompts
    # exactly where the base model answers fewer, on at least two tasks.
    assert sum(merged > base for base, _, merged, _ in scores.values()) >= 2, scores
    # ...and no client alone does as well on every task: each site contributes what the others lack.
    merged_row = alone_scores(result.stdout)["merged model (after)"]
    for k in range(3):
        assert any(own < merged for own, merged in zip(alone_scores(result.stdout)[f"client-{k} alone"], merged_row)), result.stdout
    assert_readable(completion_table(result.stdout))
    assert all(f"| client-{k} alone " in result.stdout for k in range(3)) and "| merged model (after) |" in result.stdout
    assert (workdir / "report.png").stat().st_size > 10_000 and f"run report: {workdir / 'report.png'}" in result.stdout

    # The checkpoint is base + every global update, merged in version order.
    checkpoint = workdir / "server" / records[-1]["checkpoint"]
    assert str(checkpoint) in result.stdout
    exported = AutoModelForCausalLM.from_pretrained(checkpoint)
    expected = load_model(BUILTIN_MODEL)
    shapes = target_module_shapes(expected, ["all-linear"])  # the demo's default --target-modules
    weights = {n: w.detach().clone() for n, w in module_weights(expected, sorted(shapes)).items()}
    for version in (1, 2, 3):
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


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_demo_leaves_no_process_behind(tmp_path, sig):
    workdir = tmp_path / "demo"
    demo = subprocess.Popen([DEMO, "--workdir", str(workdir), *SMALL, "--rounds", "50"], stdout=subprocess.PIPE, text=True)
    try:
        for line in demo.stdout:  # wait until the clients are training: the monitor's first round line
            if re.search(r"round \d+/50 ", line):  # (round 1 may commit before a poll sees it open)
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
    result = run_demo(workdir, "--base-model", str(model), "--data-dir", str(data), *SMALL)
    records = history(workdir)
    assert [r["round"] for r in records] == [0, 1, 2]
    assert records[-1]["validation_loss"] < records[0]["validation_loss"]
    # Multi-line Dolly prompts and answers still make a table of one line per row, scored per category.
    assert_readable(completion_table(result.stdout))
    assert len(accuracy(result.stdout)) >= 2
