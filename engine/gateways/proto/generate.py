"""Regenerate `puppet_pb2.py` and `puppet_pb2_grpc.py` from `puppet.proto`.

    python -m engine.gateways.proto.generate            # rewrite the committed stubs
    python -m engine.gateways.proto.generate --out DIR  # write them elsewhere (the drift test does this)

Needs grpcio-tools (the `test` extra). protoc writes `import puppet_pb2` in the gRPC module, which only works
when this folder is on sys.path; we rewrite it to a package-relative import so the stubs live inside `engine`.
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO = "puppet.proto"
# No .pyi: protobuf ships no type information, so typed stubs would only restate Any (mypy skips them).
OUTPUTS = ("puppet_pb2.py", "puppet_pb2_grpc.py")


def generate(out_dir: Path = HERE) -> list[Path]:
    """Run protoc into `out_dir` and fix the generated import; returns the files written."""
    from grpc_tools import protoc  # a test/dev dependency: imported only when generating

    out_dir.mkdir(parents=True, exist_ok=True)
    well_known = str(resources.files("grpc_tools") / "_proto")  # google/protobuf/wrappers.proto
    args = [
        "grpc_tools.protoc",
        f"-I{HERE}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        PROTO,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {HERE / PROTO}")
    grpc_module = out_dir / "puppet_pb2_grpc.py"
    text = grpc_module.read_text(encoding="utf-8")
    fixed = text.replace("import puppet_pb2 as puppet__pb2", "from . import puppet_pb2 as puppet__pb2")
    if fixed == text:
        raise RuntimeError("protoc output changed shape: the puppet_pb2 import was not found to fix")
    grpc_module.write_text(fixed, encoding="utf-8")
    return [out_dir / name for name in OUTPUTS]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", type=Path, default=HERE, help="output folder (default: next to puppet.proto)"
    )
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
