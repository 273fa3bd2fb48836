"""Build steps that pyproject.toml cannot express.

1. Generate the protobuf and gRPC modules from our own .proto files (grpcio-tools), so the
   generated code always matches the installed protobuf runtime, and move them off
   protobuf's default descriptor pool (see `use_private_pool`).
2. Compile the Cython core `batchproxy._core`. `BATCHPROXY_NO_EXTENSIONS=1` at build time
   skips it; the package then runs its pure-Python twin.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import Extension, setup

ROOT = Path(__file__).resolve().parent
SRC = ROOT / "src"
PROTO_DIR = SRC / "batchproxy" / "protos"


def generate_protos() -> None:
    from grpc_tools import protoc

    try:
        import importlib.resources as resources

        well_known = str(resources.files("grpc_tools") / "_proto")
    except Exception:  # pragma: no cover - very old grpc_tools
        import grpc_tools

        well_known = str(Path(grpc_tools.__file__).parent / "_proto")
    for proto in sorted(PROTO_DIR.glob("*.proto")):
        out = proto.with_name(proto.stem + "_pb2.py")
        if out.exists() and out.stat().st_mtime >= proto.stat().st_mtime:
            continue
        args = [
            "grpc_tools.protoc",
            f"-I{SRC}",
            f"-I{well_known}",
            f"--python_out={SRC}",
            f"--pyi_out={SRC}",
        ]
        if proto.stem == "services":
            args.append(f"--grpc_python_out={SRC}")
        args.append(str(proto.relative_to(SRC)))
        if protoc.main(args) != 0:
            sys.exit(f"protoc failed on {proto}")
    for module in sorted(PROTO_DIR.glob("*_pb2.py")):
        use_private_pool(module)


# protoc writes `_descriptor_pool.Default().AddSerializedFile(...)`; ours go to the package's
# own pool instead, because TensorFlow registers the same full names in the default one
# (see batchproxy/protos/__init__.py). Applied to every module, including ones protoc left
# alone as up to date, so an older build's output is fixed too.
DEFAULT_POOL_CALL = "_descriptor_pool.Default().AddSerializedFile("
PRIVATE_POOL_CALL = "_batchproxy_protos.add_serialized_file("
PRIVATE_POOL_IMPORT = "from batchproxy import protos as _batchproxy_protos\n"


def use_private_pool(module: Path) -> None:
    text = module.read_text()
    if PRIVATE_POOL_CALL in text:
        return
    if text.count(DEFAULT_POOL_CALL) != 1:
        sys.exit(f"{module}: unexpected protoc output, cannot move it off the default pool")
    text = text.replace(DEFAULT_POOL_CALL, PRIVATE_POOL_CALL)
    text = text.replace("\nDESCRIPTOR = ", "\n" + PRIVATE_POOL_IMPORT + "\nDESCRIPTOR = ", 1)
    module.write_text(text)


def extensions() -> list[Extension]:
    if os.environ.get("BATCHPROXY_NO_EXTENSIONS") == "1":
        return []
    from Cython.Build import cythonize

    ext = Extension(
        "batchproxy._core",
        ["src/batchproxy/_core.pyx"],
        extra_compile_args=["-O3"],
    )
    return cythonize(
        [ext],
        language_level=3,
        compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True},
    )


generate_protos()
setup(ext_modules=extensions())
