"""A small REST client for TorchServe that reads the tokens from TorchServe's key file.

Defaults come from config.properties and .run/key_file.json (what `make serve` uses) and can be
changed with TS_INFERENCE_URL, TS_MANAGEMENT_URL and TS_KEY_FILE.
"""
import json
import logging
import os
import time
from pathlib import Path

import requests

import catalog

log = logging.getLogger(__name__)
REREAD_S = 0.1  # pause before reading a key file caught mid-rewrite again
# Pauses before retrying a prediction TorchServe shed (its queue full: 503 "has no worker to serve"):
# safe, since a shed request never reached a worker. A burst clears in well under a second.
BUSY_RETRY_S = (0.1, 0.3, 0.9)
SHED = "has no worker to serve inference request"


class ServeError(RuntimeError):
    """TorchServe answered with an error (status, message) or could not be reached (status None)."""

    def __init__(self, status: int | None, message: str):
        super().__init__(f"{status}: {message}" if status else message)
        self.status, self.message = status, message


def read_keys(key_file) -> dict:
    """TorchServe's key file. TorchServe rewrites it in place (truncate, then write: not atomic) at
    start and whenever a key is renewed (serving/keys.py), so a read can catch it empty or half
    written: such a read is repeated once, a moment later."""
    for retry in (True, False):
        try:
            return json.loads(Path(key_file).read_text())
        except FileNotFoundError:
            raise ServeError(None, f"no TorchServe key file at {key_file}: is TorchServe running (`make serve`)?") from None
        except json.JSONDecodeError:
            if not retry:
                raise ServeError(None, f"TorchServe's key file {key_file} is not valid JSON") from None
            time.sleep(REREAD_S)


def read_key(key_file, kind: str, refused: str | None = None) -> str:
    """The `kind` ("inference" or "management") key from TorchServe's key file. `refused`: the key the
    server has just refused. TorchServe replaces a key in memory a moment before it rewrites the file,
    so a file that still holds the refused key is read once more, a moment later."""
    key = read_keys(key_file)[kind]["key"]
    if key == refused:
        time.sleep(REREAD_S)
        key = read_keys(key_file)[kind]["key"]
    return key


def refused_key(status: int, body: str) -> bool:
    """Whether an HTTP answer is TorchServe 0.12's refusal of a missing, wrong or expired key:
    400 InvalidKeyException (not 401)."""
    if status != 400:
        return False
    try:
        return json.loads(body).get("type") == "InvalidKeyException"
    except (TypeError, ValueError, AttributeError):  # no body, not JSON, or JSON but not an object
        return False


def read_properties(path) -> dict:
    props = {}
    for line in Path(path).read_text().splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            key, value = line.split("=", 1)
            props[key.strip()] = value.strip()
    return props


class TorchServeClient:
    def __init__(self, inference_url: str, management_url: str, key_file, timeout: float = 10.0,
                 client_name: str = "api"):
        self.client_name = client_name  # sent as X-Client: the prediction log records who asked
        self.inference_url = inference_url.rstrip("/")
        self.management_url = management_url.rstrip("/")
        self.key_file = Path(key_file)
        self.timeout = timeout
        self.session = requests.Session()
        self._keys = {}  # kind -> key, see _key

    @classmethod
    def from_config(cls, config=catalog.TS_CONFIG, key_file=None, timeout: float = 10.0,
                    client_name: str = "api"):
        props = read_properties(config)
        return cls(os.environ.get("TS_INFERENCE_URL", props["inference_address"]),
                   os.environ.get("TS_MANAGEMENT_URL", props["management_address"]),
                   key_file or os.environ.get("TS_KEY_FILE", catalog.KEY_FILE), timeout, client_name)

    def _key(self, kind: str, refused: str | None = None) -> str:
        """The `kind` key this client holds: read from the key file when first needed, and again after
        the server refused `refused` (keys change at every start and roll over while it runs)."""
        if refused is not None or kind not in self._keys:
            self._keys[kind] = read_key(self.key_file, kind, refused)
        return self._keys[kind]

    def _request(self, method: str, url: str, kind: str, retry_shed: bool = False, **kwargs):
        key = self._key(kind)
        response = self._send(method, url, key, **kwargs)
        if refused_key(response.status_code, response.text):  # the key rolled over: read it again, retry once
            response = self._send(method, url, self._key(kind, refused=key), **kwargs)
        for pause in BUSY_RETRY_S if retry_shed else ():
            if response.status_code != 503 or SHED not in response.text:
                break
            log.info("TorchServe shed the request (503, queue full): retry in %.1f s", pause)
            time.sleep(pause)
            response = self._send(method, url, self._key(kind), **kwargs)
        if response.status_code >= 400:
            try:
                message = response.json().get("message", response.text)
            except ValueError:
                message = response.text
            raise ServeError(response.status_code, message)
        return response.json()

    def _send(self, method: str, url: str, key: str, headers: dict | None = None, **kwargs) -> requests.Response:
        try:
            return self.session.request(method, url, headers={"Authorization": f"Bearer {key}", **(headers or {})},
                                        timeout=self.timeout, **kwargs)
        except requests.ConnectionError:
            raise ServeError(None, f"TorchServe is not reachable at {url.split('/')[2]}: is it running "
                                   f"(`make serve`)?") from None
        except requests.Timeout:
            raise ServeError(None, f"TorchServe did not answer within {self.timeout:.0f} s") from None

    def ping(self) -> bool:
        return self._request("GET", f"{self.inference_url}/ping", "inference").get("status") == "Healthy"

    def predict(self, model: str, image: bytes, version: str | None = None, **options) -> dict:
        """POST the image as the raw body; options (top_k=3, return_input=True) go as X- headers,
        since TorchServe does not pass query parameters on to the handler."""
        return self._send_image("predictions", model, image, version, options)

    def explain(self, model: str, image: bytes, version: str | None = None, **options) -> dict:
        """POST the image to TorchServe's explanations API: the prediction and an attribution map over
        the image the model saw (`attribution`, H x W in [-1, 1]; handlers/explain.py). Options and
        retries as for predict."""
        return self._send_image("explanations", model, image, version, options)

    def _send_image(self, api: str, model: str, image: bytes, version: str | None, options: dict) -> dict:
        path = f"{model}/{version}" if version else model
        headers = {f"X-{k.replace('_', '-').title()}": str(v).lower() for k, v in options.items()}
        headers.setdefault("X-Client", self.client_name)  # client="ui-live" names another caller
        return self._request("POST", f"{self.inference_url}/{api}/{path}", "inference", retry_shed=True,
                             data=image, headers=headers)

    def models(self) -> list[str]:
        return [m["modelName"] for m in self._request("GET", f"{self.management_url}/models", "management")["models"]]

    def describe(self, model: str, version: str = "all") -> list[dict]:
        return self._request("GET", f"{self.management_url}/models/{model}/{version}", "management")

    def default_version(self, model: str) -> str:
        """GET /models/{model} describes the default version only."""
        return self._request("GET", f"{self.management_url}/models/{model}", "management")[0]["modelVersion"]

    def set_default(self, model: str, version: str) -> dict:
        return self._request("PUT", f"{self.management_url}/models/{model}/{version}/set-default", "management")

    def register(self, archive: str, workers: int = 1) -> dict:
        """Load an archive of the model store (a bare file name: TorchServe resolves it in its store)."""
        return self._request("POST", f"{self.management_url}/models", "management",
                             params={"url": archive, "initial_workers": workers, "synchronous": "true"})

    def unregister(self, model: str, version: str) -> dict:
        return self._request("DELETE", f"{self.management_url}/models/{model}/{version}", "management")

    def scale(self, model: str, version: str | None, workers: int) -> dict:
        path = f"{model}/{version}" if version else model
        return self._request("PUT", f"{self.management_url}/models/{path}", "management",
                             params={"min_worker": workers, "max_worker": workers, "synchronous": "true"})

    def ready_workers(self, model: str) -> int:
        return sum(w.get("status") == "READY" for v in self.describe(model, "all") for w in v.get("workers", []))
