"""``flora-server``: settings from a file, the environment and flags; then serve.

    flora-server --config server.toml --port 0
    FLORA_ENROLLMENT_TOKEN=... flora-server --state-dir /var/lib/flora --rounds 10
    flora-server --config server.toml --print-config

Exit status 2, with one line naming the setting, for a configuration the server cannot start
with (settings, base model, validation data, port, state directory); nothing is written then.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from flora.common.settings import SettingsError, add_settings_arguments, load_settings, render_settings
from flora.server import handshakes
from flora.server.config import ENV_PREFIX, ServerSettings



def build_parser() -> argparse.ArgumentParser:
    """The command line: --config, --print-config and one flag per setting."""
    parser = argparse.ArgumentParser(
        prog="flora-server",
        description="Coordinate a federated LoRA fine-tuning run (FLoRA stacking over gRPC). "
        f"Settings come from --config (TOML or YAML), then {ENV_PREFIX}* environment variables, then flags.",
    )
    parser.add_argument("--config", type=Path, default=None, help="settings file (.toml, .yaml or .yml)")
    parser.add_argument("--print-config", action="store_true", help="print the effective settings as TOML and exit")
    add_settings_arguments(parser, ServerSettings)
    return parser


def setup_logging(level: str) -> None:
    """Timestamped, one-line logs on stderr; third-party progress bars off (logs may be files)."""
    logging.basicConfig(level=level.upper(), format=handshakes.LOG_FORMAT, stream=sys.stderr)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``flora-server`` console script."""
    flags = vars(build_parser().parse_args(argv))
    config, print_config = flags.pop("config"), flags.pop("print_config")
    try:
        settings = load_settings(ServerSettings, config_file=config, env_prefix=ENV_PREFIX, flags=flags)
    except SettingsError as err:
        print(f"flora-server: {err}", file=sys.stderr)
        sys.exit(2)
    if print_config:
        sys.stdout.write(render_settings(settings))
        return
    if settings.tls_cert is not None:
        handshakes.install(settings.log_level)  # before grpc's import: failed handshakes logged with the peer, in words
    setup_logging(settings.log_level)
    from flora.server.app import serve  # heavy imports (torch, transformers) only when serving
    from flora.server.inputs import ConfigurationError
    from flora.server.startup import StartupError

    try:
        asyncio.run(serve(settings))
    except (ConfigurationError, StartupError) as err:  # a setting to change: one line, as the client's
        print(f"flora-server: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
