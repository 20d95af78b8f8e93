"""Peers, learning half: Flower's FedAvg over the PEFT LoRA state dict against flora's methods.

DESIGN.md section 8 and issue 14 item 5: the same federated fine-tuning (stories260K, the 10
Dolly clients of ../shared, equal ranks 4, bench.quality's rounds, local steps, batch, learning
rate, cutoff, data split and LoRA seeds) through Flower's deployment runtime with its standard
``FedAvg`` strategy, as Flower's FlowerTune LLM template runs it (``get_peft_model_state_dict`` /
``set_peft_model_state_dict``, the state dict as arrays, averaged weighted by num-examples), and
flora's methods: validation loss and bytes per round.

Flower side: the Flower App in ``bench/flowerft/`` on a SuperLink and one SuperNode per client
(node config ``partition-id``), in the venv ``bench.peers`` makes (only ``flwr``). Its ClientApp
trains with flora's own data loading, trainer and seeds (``floraft.task``), so torch,
transformers, peft and flora are made importable there by a ``.pth`` file appended to that venv
(``expose_packages``): appended, so Flower's protobuf 6 stays first; ``check_environment``
verifies that, and that none of the flora modules the app imports loads protobuf. Bytes are
those of Flower's messages (every object of the message tree, deflated), counted in the ServerApp.

flora side: the losses are bench.quality's recorded runs (``bench/results/quality-runs.jsonl``,
its settings checked against this run's); the bytes are flora's own payloads of an in-process
run of each method (``flora.sim``, seed 0): per round the clients' ``client_update`` uploads, and
what each client downloads to start the round (the previous version's GLOBAL_UPDATE, planned by
the server's ``plan_downlink``, and the method's GLOBAL_LORA where it keeps one).

    python -m bench.peers_finetune                 # 3 seeds, 3 rounds
    python -m bench.peers_finetune --seeds 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from flora.common.tables import format_table

APP = Path(__file__).resolve().parent / "flowerft"
REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
BASE_MODEL = SHARED / "models" / "stories260K"
DATA = SHARED / "data" / "dolly-10clients"
RUNS = Path(__file__).resolve().parent / "results" / "quality-runs.jsonl"
QUALITY = RUNS.with_name("quality.json")
FLORA_METHODS = ("flora-warm", "fedex", "fedit", "flora")
FLOWER = "Flower FedAvg"
PTH = "zz-flora-bench.pth"
MB = 1e6
# bench.quality's equal-rank setting; every key is checked against quality.json's settings.
SETTING = {"local_steps": 10, "batch_size": 4, "learning_rate": 0.01, "cutoff": 128, "examples_per_client": 100,
           "validation_fraction": 0.1, "equal_rank": 4, "seed": 0}
COLUMNS = ["round", "system", "seeds", "validation_loss", "minus_fedit", "up_MB", "down_MB", "up_per_client_KB",
           "down_per_client_KB"]


# --- Flower's environment ---------------------------------------------------------------------

def expose_packages(bin_dir: Path) -> Path:
    """Append this interpreter's flora and its site-packages (torch, transformers, peft) to Flower's venv.

    A ``.pth`` file is read after the venv's own site-packages is on ``sys.path``, so every
    package Flower installed (protobuf 6, grpcio, numpy) is found first. An editable flora is
    reached through its finder (the one this interpreter uses); rewritten on every run.
    """
    import torch

    import flora

    site = Path(subprocess.run([str(bin_dir / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    finder = next((m for n, m in sys.modules.items() if n.startswith("__editable__") and "flora" in n), None)
    lines = [str(Path(finder.__file__).parent if finder else Path(flora.__file__).parents[1]),
             str(Path(torch.__file__).resolve().parents[1])]
    if finder:
        lines.append(f"import {finder.__name__}; {finder.__name__}.install()")
    path = site / PTH
    path.write_text("\n".join(lines) + "\n")
    return path


_CHECK = """
import json, sys
import google.protobuf
import floraft.task, floraft.client_app, floraft.server_app
import flora
print(json.dumps({"protobuf": google.protobuf.__version__, "protobuf_file": google.protobuf.__file__,
                  "flora": flora.__file__, "flora_v1": sorted(m for m in sys.modules if m.startswith("flora.v1"))}))
"""


def check_environment(bin_dir: Path) -> dict:
    """Import the app in Flower's venv: protobuf must be Flower's (6.x, from that venv) and flora's stubs unloaded."""
    env = {**os.environ, "PYTHONPATH": str(APP)}
    found = json.loads(subprocess.run([str(bin_dir / "python"), "-c", _CHECK], check=True, capture_output=True,
                                      text=True, env=env, cwd=APP).stdout)
    venv = bin_dir.parent.resolve()
    if not found["protobuf"].startswith("6.") or venv not in Path(found["protobuf_file"]).resolve().parents:
        raise RuntimeError(f"Flower's venv imports protobuf {found['protobuf']} from {found['protobuf_file']}, not its own 6.x")
    if found["flora_v1"]:
        raise RuntimeError(f"the Flower app imports flora's protobuf stubs {found['flora_v1']}")
    if REPO not in Path(found["flora"]).resolve().parents:
        raise RuntimeError(f"Flower's venv imports flora from {found['flora']}, not from {REPO}")
    return found


def run_config(seed: int, rounds: int, out: Path) -> str:
    """The app's run config (``flwr run --run-config``) for bench.quality's setting and ``seed``."""
    values = {"base-model": str(BASE_MODEL), "data-dir": str(DATA), "num-clients": 10, "rounds": rounds, "seed": seed,
              "data-seed": SETTING["seed"], "local-steps": SETTING["local_steps"], "batch-size": SETTING["batch_size"],
              "learning-rate": SETTING["learning_rate"], "cutoff": SETTING["cutoff"],
              "examples-per-client": SETTING["examples_per_client"],
              "validation-fraction": SETTING["validation_fraction"], "rank": SETTING["equal_rank"], "out": str(out)}
    return " ".join(f"{k}={json.dumps(v)}" for k, v in values.items())


def run_flower(work: Path, seeds: Sequence[int], rounds: int) -> list[dict]:
    """Every seed through one SuperLink and ten SuperNodes (one per client); each seed's history."""
    from bench.peers import flower_env, flower_runtime

    bin_dir = flower_env()
    expose_packages(bin_dir)
    print(f"Flower venv: {json.dumps(check_environment(bin_dir))}", flush=True)
    results = []
    with flower_runtime(work, [f"partition-id={k} num-partitions=10" for k in range(10)]) as runtime:
        for seed in seeds:
            started = time.monotonic()
            result = runtime.run(APP, run_config(seed, rounds, work / f"flower-{seed}.json"), work / f"flower-{seed}.json")
            print(f"Flower FedAvg seed {seed}: losses {[round(r['validation_loss'], 4) for r in result['history']]} "
                  f"({time.monotonic() - started:.0f} s)", flush=True)
            results.append(result)
    return results


# --- flora's side -----------------------------------------------------------------------------

def check_setting(quality: Mapping) -> None:
    """Refuse to compare against recorded runs of another setting (quality.json's settings)."""
    settings = quality["settings"]
    wrong = {k: (settings.get(k), v) for k, v in SETTING.items() if settings.get(k) != v}
    if Path(quality["base_model"]).name != BASE_MODEL.name or Path(quality["data"]).name != DATA.name:
        wrong["material"] = (f"{quality['base_model']} {quality['data']}", f"{BASE_MODEL} {DATA}")
    if wrong:
        raise SystemExit(f"{QUALITY} was run with another setting (recorded, expected): {wrong}")


def recorded_losses(lines: Sequence[str], methods: Sequence[str], rounds: int) -> dict[str, dict[int, list[float]]]:
    """{method: {seed: validation loss of rounds 0..rounds}} of the equal-rank exact-downlink runs."""
    losses: dict[str, dict[int, list[float]]] = {m: {} for m in methods}
    for line in lines:
        entry = json.loads(line)
        method, _, setting = entry["label"].rpartition("-")
        if setting != "equal" or method not in losses:
            continue
        history = sorted(entry["history"], key=lambda r: r["round"])
        if len(history) > rounds:
            losses[method][history[0]["seed"]] = [r["validation_loss"] for r in history[: rounds + 1]]
    return losses


def flora_bytes(methods: Sequence[str], rounds: int, seed: int = 0) -> dict[str, list[dict]]:
    """Per method and round: bytes of flora's uploads and of what the clients download to start the round.

    One in-process run (``flora.sim``, bench.quality's setting and seed ``seed``) of each method;
    every payload is encoded as the client and server encode it. Round t's download: the previous
    version's GLOBAL_UPDATE (none before round 1) plus the GLOBAL_LORA of that version where the
    method keeps one (fedit and fedex: the seeded one at version 0), for every client.
    """
    import torch

    from flora.client.trainer import TrainConfig
    from flora.common.basemodel import load_model, load_tokenizer
    from flora.common.downlink import plan_downlink
    from flora.common.lora import LoraPair
    from flora.common.payload import PayloadMeta, encode_adapter, encode_update
    from flora.sim.engine import SimConfig, run_method
    from flora.sim.federation import DataOptions, client_files, load_federation

    torch.set_num_threads(1)
    options = DataOptions("alpaca", SETTING["cutoff"], False, SETTING["examples_per_client"],
                          SETTING["validation_fraction"], SETTING["seed"])
    federation = load_federation(client_files(DATA), load_tokenizer(str(BASE_MODEL)), options)
    local = TrainConfig(max_steps=SETTING["local_steps"], batch_size=SETTING["batch_size"],
                        learning_rate=SETTING["learning_rate"], device="cpu")
    rank = SETTING["equal_rank"]
    result: dict[str, list[dict]] = {}
    for method in methods:
        config = SimConfig(method, (rank,) * len(federation.clients), rounds, local, seed=seed)
        rows, update_bytes, kept_bytes = [], 0, 0
        for outcome in run_method(load_model(str(BASE_MODEL)), federation.clients, federation.validation, config):
            number, clients = outcome.record.round, len(federation.clients)
            if number > 0:
                up = [len(encode_adapter(u, PayloadMeta("client_update", rank=u.rank, alpha=u.scaling * u.rank,
                                                        scaling_rule="standard", round=number))) for u in outcome.updates]
                rows.append({"round": number, "validation_loss": outcome.record.validation_loss, "up_bytes": sum(up),
                             "down_bytes": clients * (update_bytes + kept_bytes), "clients": clients})
                delta = outcome.delta
                stack = {n: LoraPair(p.a * delta.scaling, p.b) for n, p in delta.pairs.items()}
                update_bytes = len(encode_update(plan_downlink(stack).update,
                                                 PayloadMeta("global_update", round=number, version=number)))
            kept = outcome.kept
            kept_bytes = 0 if kept is None else len(encode_adapter(kept, PayloadMeta(
                "global_lora", rank=kept.rank, alpha=kept.scaling * kept.rank, scaling_rule="standard",
                round=number, version=number), torch.float32))
        result[method] = rows
        print(f"flora {method} seed {seed}: losses {[round(r['validation_loss'], 4) for r in rows]}", flush=True)
    return result


# --- the table --------------------------------------------------------------------------------

def _loss_cell(values: Sequence[float]) -> str:
    mean = statistics.fmean(values)
    return f"{mean:.4f}" if len(values) == 1 else f"{mean:.4f} ± {statistics.stdev(values):.4f}"


def table_rows(flower: Sequence[Mapping], recorded: Mapping[str, Mapping[int, Sequence[float]]],
               flora: Mapping[str, Sequence[Mapping]], rounds: int) -> list[dict]:
    """One row per round (0: the starting model) and system: loss over the seeds run, bytes per round.

    ``minus_fedit``: the mean over the seeds that both ran of (this loss - flora fedit's), paired
    by seed. Flower's bytes are seed 0's (every seed moves the same shapes); flora's from ``flora``.
    """
    fedit = recorded.get("fedit", {})
    flower_losses = {run["seed"]: {r["round"]: r["validation_loss"] for r in run["history"]} for run in flower}
    rows = []
    for number in range(rounds + 1):  # round 0: the starting model (no traffic)
        seeds = sorted(flower_losses)
        traffic = next((r for r in flower[0]["history"] if r["round"] == number and "up_bytes" in r), None)
        paired = [flower_losses[s][number] - fedit[s][number] for s in seeds if s in fedit]
        rows.append({"round": number, "system": FLOWER, "seeds": len(seeds),
                     "validation_loss": _loss_cell([flower_losses[s][number] for s in seeds]),
                     "minus_fedit": statistics.fmean(paired) if paired else None,
                     **(_traffic(traffic["up_bytes"], traffic["down_bytes"], traffic["messages_up"]) if traffic else {})})
        for method, by_seed in recorded.items():
            sent = next((r for r in flora.get(method, []) if r["round"] == number), None)
            paired = [by_seed[s][number] - fedit[s][number] for s in by_seed if s in fedit]
            rows.append({"round": number, "system": f"flora {method}", "seeds": len(by_seed),
                         "validation_loss": _loss_cell([by_seed[s][number] for s in sorted(by_seed)]) if by_seed else None,
                         "minus_fedit": statistics.fmean(paired) if paired and method != "fedit" else None,
                         **(_traffic(sent["up_bytes"], sent["down_bytes"], sent["clients"]) if sent else {})})
    return rows


def _traffic(up: int, down: int, clients: int) -> dict:
    return {"up_MB": up / MB, "down_MB": down / MB, "up_per_client_KB": up / clients / 1e3,
            "down_per_client_KB": down / clients / 1e3}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="Flower runs, seeds 0..N-1 (bench.quality's seeds)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="results folder (default bench/results)")
    return parser.parse_args()


def main() -> None:
    from bench.report import write_results

    args = parse_args()
    if not (BASE_MODEL.is_dir() and DATA.is_dir()):
        raise SystemExit(f"needs {BASE_MODEL} and {DATA} (../shared)")
    quality = json.loads(QUALITY.read_text())
    check_setting(quality)
    recorded = recorded_losses(RUNS.read_text().splitlines(), FLORA_METHODS, args.rounds)
    load = {"start": os.getloadavg()}
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in load['start'])} ({os.cpu_count()} CPUs)", flush=True)
    with tempfile.TemporaryDirectory(prefix="flora-peers-ft-") as tmp:
        flower = run_flower(Path(tmp) / "flower", range(args.seeds), args.rounds)
    load["flower_end"] = os.getloadavg()
    flora = flora_bytes(FLORA_METHODS, args.rounds)
    load["end"] = os.getloadavg()
    rows = table_rows(flower, recorded, flora, args.rounds)
    print(format_table(rows, COLUMNS))
    print("validation_loss: mean ± std over seeds (flora: bench.quality's recorded runs); minus_fedit: paired by seed.\n"
          "MB = 1e6 bytes, all 10 clients together; up: the clients' uploads; down: what the clients receive to start\n"
          "the round (Flower: its train messages; flora: the previous version's global update and the method's global LoRA).")
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in load['end'])}")
    own = {m: [r["validation_loss"] for r in flora[m]] for m in flora}
    settings = {**SETTING, "rounds": args.rounds, "seeds": args.seeds, "clients": 10, "base_model": str(BASE_MODEL),
                "data": str(DATA)}
    path = write_results("peers-finetune", {"settings": settings, "load_average": load, "rows": rows,
                                            "flower": flower, "flora_bytes_run_seed0": flora,
                                            "flora_recorded_losses": recorded, "flora_seed0_losses_this_run": own},
                         **({"out_dir": args.out} if args.out else {}))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
