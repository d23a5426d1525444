"""Generate the gRPC Python stubs from the .proto files shipped inside TorchServe's own jar.

    python -m serving.generate_grpc     # writes serving/grpc_stubs/ (git-ignored)

The protos are not committed: they are read from the installed TorchServe, so the stubs always match
the server. google/rpc/status.proto comes from googleapis-common-protos.
"""
import zipfile
from pathlib import Path

import grpc_tools
import ts
from google.rpc import status_pb2
from grpc_tools import protoc

import catalog

STUBS = Path(__file__).resolve().parent / "grpc_stubs"
PROTOS = ("inference.proto", "management.proto")


def main():
    STUBS.mkdir(exist_ok=True)
    (STUBS / "__init__.py").touch()
    with zipfile.ZipFile(Path(ts.__file__).parent / "frontend" / "model-server.jar") as jar:
        for name in PROTOS:
            (STUBS / name).write_bytes(jar.read(name))
    googleapis = Path(status_pb2.__file__).parent.parent.parent  # holds google/rpc/status.proto
    well_known = Path(grpc_tools.__file__).parent / "_proto"  # google/protobuf/empty.proto
    # Paths relative to the repository root make the generated imports `from serving.grpc_stubs import ...`.
    args = ["protoc", f"-I{catalog.ROOT}", f"-I{googleapis}", f"-I{well_known}",
            f"--python_out={catalog.ROOT}", f"--grpc_python_out={catalog.ROOT}"] + [str(STUBS / p) for p in PROTOS]
    if protoc.main(args) != 0:
        raise SystemExit("error: protoc failed on TorchServe's .proto files")
    print(f"gRPC stubs written to {STUBS}")


if __name__ == "__main__":
    main()
