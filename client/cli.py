"""``flora-client``: the command line of the client daemon.

    flora-client [--config FILE] [--print-config] [--server HOST:PORT --name NAME --data FILE ...]

Settings come from defaults < config file (TOML/YAML) < ``FLORA_CLIENT_*`` environment < flags.
Exit status: 0 when the run finished or the daemon was stopped (SIGTERM/SIGINT), 2 for a
configuration, data or model problem (one clear message, no traceback), 1 for anything else.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from transformers.utils import logging as hf_logging

from flora.client.config import ENV_PREFIX, ClientSettings
from flora.client.daemon import Daemon
from flora.client.diagnosis import ConnectionMisconfigured
from flora.client.local import ConfigError
from flora.client.progress import Progress, log_handler
from flora.client.state import StateError
from flora.common.settings import SettingsError, add_settings_arguments, load_settings, render_settings
from flora.common.threads import set_threads

log = logging.getLogger("flora.client")

EXIT_OK, EXIT_ERROR, EXIT_CONFIG = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    """The argument parser: one flag per setting, plus --config and --print-config."""
    parser = argparse.ArgumentParser(
        prog="flora-client",
        description="Federated LoRA client daemon: joins a flora-server, trains rounds on local data, uploads LoRA factors.",
        epilog=f"Every flag can also be set as an environment variable {ENV_PREFIX}<FLAG> (e.g. {ENV_PREFIX}TOKEN) "
        "or as a key of the --config file.",
    )
    parser.add_argument("--config", type=Path, default=None, help="TOML or YAML file of settings (flags and env override it)")
    parser.add_argument("--print-config", action="store_true", help="print the effective settings as TOML and exit")
    add_settings_arguments(parser, ClientSettings)
    return parser


def install_signal_handlers(stop: threading.Event) -> None:
    """SIGTERM/SIGINT ask for a graceful stop; a second one kills the process at once."""
    def handler(signum: int, _frame: object) -> None:
        log.info("event=signal signal=%s action=%s", signal.Signals(signum).name, "stop")
        stop.set()
        signal.signal(signum, signal.SIG_DFL)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)


def configure_logging(level: str, name: str, progress: Progress) -> None:
    """Structured ``key=value`` log lines on stderr, tagged with the client's name."""
    handler = log_handler(progress)
    handler.setFormatter(logging.Formatter(f"%(asctime)s level=%(levelname)s client={name} logger=%(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("flora").setLevel(level)
    if not progress.terminal:  # transformers' own bars (loading weights) would litter log files
        hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    """Run the daemon; returns (and exits with) the status described in the module docstring."""
    flags = vars(build_parser().parse_args(argv))
    config_file, print_config = flags.pop("config"), flags.pop("print_config")
    try:
        settings = load_settings(ClientSettings, config_file=config_file, env_prefix=ENV_PREFIX, flags=flags)
    except SettingsError as exc:
        print(f"flora-client: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if print_config:
        print(render_settings(settings), end="")
        return EXIT_OK
    progress = Progress(settings.progress)
    configure_logging(settings.log_level, settings.name, progress)
    set_threads(settings.training_processes, settings.threads)
    stop = threading.Event()
    install_signal_handlers(stop)
    try:
        return Daemon(settings, stop).run()
    except (ConfigError, StateError, ConnectionMisconfigured) as exc:
        log.error("event=fatal kind=config detail=%r", str(exc))
        print(f"flora-client: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except Exception:
        log.exception("event=fatal kind=unexpected")
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
