"""batchproxy's wire-compatible subset of the TFS protos, in a descriptor pool of its own.

Our messages carry TensorFlow's full names (`tensorflow.TensorProto`,
`tensorflow.serving.PredictRequest`, ...) so that they are the same on the wire. Registered
in protobuf's default pool they would collide with TensorFlow's own, and whichever library
is imported second would fail (`duplicate symbol`). The generated `*_pb2.py` modules are
therefore rewritten at build time (setup.py) to add their files to `POOL` through
`add_serialized_file` instead. Classes of the two libraries stay distinct Python types;
they exchange messages as bytes (`SerializeToString` / `FromString`), as on the wire."""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import FileDescriptor

POOL = descriptor_pool.DescriptorPool()


def add_serialized_file(serialized: bytes) -> FileDescriptor:
    """Add one of our generated files to POOL, first copying in the protobuf well-known
    files it imports (wrappers, any) from the default pool, where their generated modules
    registered them: a pool resolves imports only among its own files."""
    proto = descriptor_pb2.FileDescriptorProto.FromString(serialized)
    for dependency in proto.dependency:
        if dependency.startswith("google/protobuf/"):
            _copy_from_default(dependency)
    return POOL.AddSerializedFile(serialized)


def _copy_from_default(name: str) -> None:
    try:
        POOL.FindFileByName(name)
        return
    except KeyError:
        pass
    # Importing the well-known module registers its file in the default pool.
    __import__(name.removesuffix(".proto").replace("/", ".") + "_pb2")
    well_known = descriptor_pool.Default().FindFileByName(name)
    for dependency in well_known.dependencies:
        _copy_from_default(dependency.name)
    POOL.AddSerializedFile(well_known.serialized_pb)
    # No generated module builds classes for this copy; the pure-Python runtime needs them
    # before a field of ours can hold one (upb builds them on demand).
    message_factory.GetMessageClassesForFiles([name], POOL)
