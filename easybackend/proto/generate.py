"""
Regenerate the Python code of C{protos/chat.proto} into this package.

    python -m easybackend.proto.generate            # rewrite easybackend/proto/
    python -m easybackend.proto.generate --out DIR  # write elsewhere
    python -m easybackend.proto.generate --check    # exit 1 when out of date

It needs grpcio-tools (a test extra); the server itself needs only grpcio
and protobuf.  protoc is given the include mapping
C{easybackend/proto=protos}, so the generated C{chat_pb2_grpc.py} imports
C{from easybackend.proto import chat_pb2} and works from inside the package.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

#: the package these modules live in, as protoc sees it
PACKAGE_PATH = "easybackend/proto"
#: the checkout's protos/ folder
PROTO_DIR = Path(__file__).resolve().parents[2] / "protos"
#: this package's folder, where the generated code is committed
PACKAGE_DIR = Path(__file__).resolve().parent
PROTO_FILES = ("chat.proto",)
#: what protoc writes for each .proto file
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generated_names() -> list[str]:
    """The names of the generated files, in this package's folder."""
    return [
        Path(proto).stem + suffix
        for proto in PROTO_FILES
        for suffix in GENERATED_SUFFIXES
    ]


def generate(out_dir: Path, proto_dir: Path = PROTO_DIR) -> list[Path]:
    """
    Run protoc on C{proto_dir}'s files and write the generated modules
    straight into C{out_dir}; return their paths.
    """
    from grpc_tools import protoc  # a test extra, imported only here
    import importlib.resources

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    well_known = str(importlib.resources.files("grpc_tools") / "_proto")
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{PACKAGE_PATH}={proto_dir}",
            f"-I{well_known}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
        ] + [f"{PACKAGE_PATH}/{name}" for name in PROTO_FILES]
        status = protoc.main(args)
        if status != 0:
            raise RuntimeError(
                f"protoc failed with status {status} on {proto_dir}"
            )
        written = []
        for name in generated_names():
            target = out_dir / name
            shutil.copyfile(Path(tmp, PACKAGE_PATH, name), target)
            written.append(target)
    return written


def out_of_date(package_dir: Path = PACKAGE_DIR,
                proto_dir: Path = PROTO_DIR) -> list[str]:
    """The generated files in C{package_dir} that differ from protoc's."""
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp), proto_dir)
        stale = []
        for name in generated_names():
            fresh = Path(tmp, name).read_bytes()
            committed = package_dir / name
            if not committed.exists() or committed.read_bytes() != fresh:
                stale.append(name)
        return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m easybackend.proto.generate", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--proto-dir", type=Path, default=PROTO_DIR)
    parser.add_argument("--out", type=Path, default=PACKAGE_DIR)
    parser.add_argument(
        "--check", action="store_true",
        help="write nothing; exit 1 when the generated code is out of date",
    )
    options = parser.parse_args(argv)
    if options.check:
        stale = out_of_date(options.out, options.proto_dir)
        if stale:
            print("out of date with protos/: " + ", ".join(stale)
                  + "; run python -m easybackend.proto.generate")
            return 1
        print("generated code is up to date")
        return 0
    for path in generate(options.out, options.proto_dir):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
