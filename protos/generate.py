"""Regenerate the Python stubs of the flora.v1 protocol from the .proto sources.

Run from anywhere: ``python protos/generate.py`` rewrites the committed ``*_pb2.py``,
``*_pb2.pyi`` and ``*_pb2_grpc.py`` beside the sources; ``--out DIR`` writes them elsewhere,
which is how the test that guards against stale stubs compares them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent


def proto_sources() -> list[Path]:
    """The .proto files of every protocol package, in a stable order."""
    return sorted(PROTO_ROOT.glob("flora/**/*.proto"))


def generate(out_dir: Path) -> None:
    """Compile every proto source into ``out_dir`` (mirroring the package folders)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    include = str(Path(protoc.__file__).parent / "_proto")
    sources = [str(p.relative_to(PROTO_ROOT)) for p in proto_sources()]
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *sources,
    ]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed on {sources}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PROTO_ROOT, help="output root (default: beside the sources)")
    generate(parser.parse_args().out)


if __name__ == "__main__":
    sys.exit(main())
