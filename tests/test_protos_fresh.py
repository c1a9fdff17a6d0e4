"""The committed gRPC code must match protos/ (regenerate with `python tools/protogen.py`)."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

from google.protobuf import descriptor_pb2

from fewshot_api.fewshot.v1 import fewshot_pb2, fewshot_pb2_grpc

# tools/ is a development folder, not a package: load the generator from its file.
_SPEC = importlib.util.spec_from_file_location(
    "protogen", Path(__file__).resolve().parents[1] / "tools" / "protogen.py"
)
protogen = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(protogen)

REGENERATE = "stale generated code: run `python tools/protogen.py` and commit the result"


def without_json_names(
    file: descriptor_pb2.FileDescriptorProto,
) -> descriptor_pb2.FileDescriptorProto:
    """protoc's descriptor sets carry derived json_name fields that Python modules leave out."""

    def strip(messages) -> None:
        for message in messages:
            for field in message.field:
                field.ClearField("json_name")
            strip(message.nested_type)

    strip(file.message_type)
    return file


def proto_as_compiled_now(proto_root: Path = protogen.PROTO_ROOT) -> descriptor_pb2.FileDescriptorProto:
    files = descriptor_pb2.FileDescriptorSet.FromString(protogen.descriptor_set(proto_root=proto_root))
    (compiled,) = files.file
    return without_json_names(compiled)


def proto_as_generated() -> descriptor_pb2.FileDescriptorProto:
    # The bytes protoc embedded in the module when it generated it.
    return without_json_names(
        descriptor_pb2.FileDescriptorProto.FromString(fewshot_pb2.DESCRIPTOR.serialized_pb)
    )


def test_generated_messages_match_the_proto() -> None:
    assert proto_as_generated() == proto_as_compiled_now(), REGENERATE


def test_generated_stubs_cover_every_rpc() -> None:
    methods = [m.name for m in proto_as_compiled_now().service[0].method]
    assert methods == ["Embed", "Classify"]
    for method in methods:
        assert hasattr(fewshot_pb2_grpc.FewShotServicer, method), REGENERATE
        assert f"/fewshot.v1.FewShot/{method}" in Path(fewshot_pb2_grpc.__file__).read_text()


def test_the_check_notices_an_edited_proto(tmp_path: Path) -> None:
    """A field added to the .proto must make the comparison above fail."""
    shutil.copytree(protogen.PROTO_ROOT, tmp_path / "protos")
    proto = tmp_path / "protos" / protogen.PROTO_FILES[0]
    proto.write_text(
        proto.read_text().replace(
            "  string model_id = 2;\n}", "  string model_id = 2;\n  uint32 extra = 3;\n}", 1
        )
    )
    assert proto_as_generated() != proto_as_compiled_now(tmp_path / "protos")


def test_regeneration_writes_importable_package_code(tmp_path: Path) -> None:
    written = protogen.generate(tmp_path)
    names = sorted(path.name for path in written)
    assert names == ["fewshot_pb2.py", "fewshot_pb2.pyi", "fewshot_pb2_grpc.py"]
    grpc_code = (tmp_path / "fewshot" / "v1" / "fewshot_pb2_grpc.py").read_text()
    assert "from . import fewshot_pb2 as" in grpc_code and "from fewshot.v1 import" not in grpc_code
    for package in ("", "fewshot", "fewshot/v1"):
        assert (tmp_path / package / "__init__.py").is_file()

    # The committed type stubs name every message of the proto (their exact text varies with
    # the protoc version, so the descriptor comparison above is the strict check).
    stubs = Path(fewshot_pb2.__file__).with_suffix(".pyi").read_text()
    for message in proto_as_compiled_now().message_type:
        assert f"class {message.name}(" in stubs, REGENERATE
