"""A gRPC client for TorchServe (stubs generated from its own .proto files by serving.generate_grpc).

Tokens travel as `authorization: Bearer <key>` metadata, as TorchServe's gRPC interceptor expects;
a refused key is read again from the key file, once, as the REST client does.
Errors raise serving.client.ServeError with an HTTP-like status, like the REST client.
"""
import json
import os

import grpc
from google.protobuf import empty_pb2

import catalog
from serving.client import ServeError, read_key, read_properties

try:
    from serving.grpc_stubs import inference_pb2, inference_pb2_grpc, management_pb2, management_pb2_grpc
except ImportError as e:  # stubs are generated at build time, not committed
    raise ImportError("gRPC stubs missing: run `make grpc` (python -m serving.generate_grpc)") from e

# gRPC status -> the HTTP status the REST API gives for the same failure
HTTP_STATUS = {grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.UNAUTHENTICATED: 401,
               grpc.StatusCode.PERMISSION_DENIED: 403, grpc.StatusCode.NOT_FOUND: 404,
               grpc.StatusCode.RESOURCE_EXHAUSTED: 413, grpc.StatusCode.INTERNAL: 500,
               grpc.StatusCode.UNAVAILABLE: None, grpc.StatusCode.DEADLINE_EXCEEDED: None}


class GrpcClient:
    def __init__(self, inference_target: str, management_target: str, key_file, timeout: float = 10.0,
                 client_name: str = "api"):
        self.key_file, self.timeout, self.client_name = key_file, timeout, client_name
        self._keys = {}  # kind -> key, see _key
        self.inference = inference_pb2_grpc.InferenceAPIsServiceStub(grpc.insecure_channel(inference_target))
        self.management = management_pb2_grpc.ManagementAPIsServiceStub(grpc.insecure_channel(management_target))

    @classmethod
    def from_config(cls, config=catalog.TS_CONFIG, key_file=None, timeout: float = 10.0,
                    client_name: str = "api"):
        props = read_properties(config)
        host = props.get("grpc_inference_address", "127.0.0.1")
        return cls(os.environ.get("TS_GRPC_INFERENCE", f"{host}:{props['grpc_inference_port']}"),
                   os.environ.get("TS_GRPC_MANAGEMENT",
                                  f"{props.get('grpc_management_address', host)}:{props['grpc_management_port']}"),
                   key_file or os.environ.get("TS_KEY_FILE", catalog.KEY_FILE), timeout, client_name)

    def _key(self, kind: str, refused: str | None = None) -> str:
        """As TorchServeClient._key: the key held, read when first needed and again after a refusal."""
        if refused is not None or kind not in self._keys:
            self._keys[kind] = read_key(self.key_file, kind, refused)
        return self._keys[kind]

    def _call(self, method, request, kind: str):
        key = self._key(kind)
        try:
            try:
                return self._rpc(method, request, key)
            except grpc.RpcError as e:
                if not refused_key(e):
                    raise
                return self._rpc(method, request, self._key(kind, refused=key))  # the key rolled over: retry once
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.UNAVAILABLE:
                raise ServeError(None, "TorchServe's gRPC port is not reachable: is it running (`make serve`)?") from None
            if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise ServeError(None, f"TorchServe did not answer within {self.timeout:.0f} s") from None
            # TorchServe reports an unknown model or version as INTERNAL; its exception name tells.
            status = 404 if "NotFoundException" in (e.details() or "") else HTTP_STATUS.get(e.code(), 500)
            raise ServeError(status, _message(e.details())) from None

    def _rpc(self, method, request, key: str):
        return method(request, timeout=self.timeout, metadata=[("authorization", f"Bearer {key}")])

    def ping(self) -> bool:
        return json.loads(self._call(self.inference.Ping, empty_pb2.Empty(), "inference").health)["status"] == "Healthy"

    def predict(self, model: str, image: bytes, version: str | None = None, **options) -> dict:
        """Options (top_k, return_input) and the client name travel as extra input fields, which the
        handler reads (gRPC metadata does not reach it)."""
        options = {"client": self.client_name, **options}
        inputs = {"data": image, **{k: str(v).lower().encode() for k, v in options.items()}}
        request = inference_pb2.PredictionsRequest(model_name=model, model_version=version or "", input=inputs)
        result = json.loads(self._call(self.inference.Predictions, request, "inference").prediction)
        # TorchServe's gRPC API drops the per-request HTTP status a handler sets; the body still has it.
        if result.get("code", 200) >= 400:
            raise ServeError(result["code"], result.get("message", "prediction failed"))
        return result

    def _manage(self, method, request):
        return json.loads(self._call(method, request, "management").msg)

    def list_models(self) -> list[str]:
        return [m["modelName"] for m in self._manage(self.management.ListModels,
                                                                 management_pb2.ListModelsRequest(limit=1000))["models"]]

    def describe(self, model: str, version: str = "all") -> list[dict]:
        return self._manage(self.management.DescribeModel,
                            management_pb2.DescribeModelRequest(model_name=model, model_version=version))

    def set_default(self, model: str, version: str) -> dict:
        return self._manage(self.management.SetDefault,
                            management_pb2.SetDefaultRequest(model_name=model, model_version=version))


def refused_key(error: grpc.RpcError) -> bool:
    """Whether a gRPC error is TorchServe 0.12's refusal of a missing, wrong or expired key: its token
    interceptor answers PERMISSION_DENIED (which also means "model API disabled", hence the details)."""
    return error.code() == grpc.StatusCode.PERMISSION_DENIED and \
        (error.details() or "").startswith("Token Authorization failed")


def _message(details: str) -> str:
    """TorchServe's status details: a message, then the Java exception's class name on its own line."""
    return (details or "gRPC error").splitlines()[0]
