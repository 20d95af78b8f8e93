"""flora-demo --quantize: constrained clients (a 4-bit or 8-bit base) beside full-precision ones."""

from __future__ import annotations

import pytest

from flora.common.quantize import MissingExtra
from flora.demo import cli
from flora.demo.monitor import round_rows
from flora.demo.workspace import prepare


def test_bases_are_cycled_per_client_and_reach_each_clients_flags(tmp_path):
    args = cli.parse_args(["--clients", "3", "--ranks", "16,8,2", "--quantize", "none,none,nf4"])
    assert args.client_quantize == ["none", "none", "nf4"]
    workspace = prepare(tmp_path / "run")
    flags = [cli._client_args(1, f"c{k}", r, tmp_path / "d.jsonl", workspace, args, q)
             for k, (r, q) in enumerate(zip(args.client_ranks, args.client_quantize))]
    assert [next(f for f in fl if f.startswith("--quantize=")) for fl in flags] == [
        "--quantize=none", "--quantize=none", "--quantize=nf4"]


@pytest.mark.parametrize("value", ["nf3", "", "none,,x"])
def test_an_unknown_base_is_refused_naming_the_choices(value, capsys):
    with pytest.raises(SystemExit) as exited:
        cli.parse_args(["--quantize", value])
    assert exited.value.code == 2 and "none, nf4, fp4, int8" in capsys.readouterr().err


def test_a_quantized_client_without_bitsandbytes_names_the_install(monkeypatch, capsys):
    def missing():
        raise MissingExtra("quantize: bitsandbytes is not installed; pip install 'flora-fl[qlora]'")

    monkeypatch.setattr(cli, "bitsandbytes", missing)
    with pytest.raises(SystemExit) as exited:
        cli.parse_args(["--quantize", "int8"])
    assert exited.value.code == 2 and "pip install 'flora-fl[qlora]'" in capsys.readouterr().err
    assert cli.parse_args([]).client_quantize == ["none"] * 3  # full precision needs nothing extra


def test_the_participants_column_names_each_quantised_base():
    record = {"round": 1, "bytes_in": 0, "bytes_out": 0, "clients": [
        {"name": "client-2", "rank": 2}, {"name": "client-0", "rank": 16}, {"name": "client-1", "rank": 8}]}
    bases = dict(zip(cli.client_names(3), ["none", "none", "nf4"]))
    [row] = round_rows([record], bases)
    assert row["participants"] == "client-0 (r=16), client-1 (r=8), client-2 (r=2, nf4)"
    assert round_rows([record])[0]["participants"] == "client-0 (r=16), client-1 (r=8), client-2 (r=2)"


def test_nproc_reaches_every_client_and_is_refused_beside_a_quantized_base(tmp_path, capsys):
    args = cli.parse_args(["--clients", "2", "--nproc", "2"])
    workspace = prepare(tmp_path / "run")
    flags = cli._client_args(1, "c0", 4, tmp_path / "d.jsonl", workspace, args, "none")
    assert "--nproc=2" in flags
    assert "--nproc=1" in cli._client_args(1, "c0", 4, tmp_path / "d.jsonl", workspace, cli.parse_args([]), "none")
    with pytest.raises(SystemExit) as exited:
        cli.parse_args(["--nproc", "2", "--quantize", "none,nf4"])
    assert exited.value.code == 2 and "--nproc 2 with --quantize none,nf4" in capsys.readouterr().err
