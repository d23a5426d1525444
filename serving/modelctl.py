"""modelctl: manage the models and versions that TorchServe serves.

    python -m serving.modelctl list                              # archives in the store and what is live
    python -m serving.modelctl describe mnist_lenet5 [1.1]
    python -m serving.modelctl register mnist_lenet5_v1.1.mar    # an archive of model_store/ only
    python -m serving.modelctl set-default mnist_lenet5 1.1      # remembers the previous default
    python -m serving.modelctl rollback mnist_lenet5             # back to the previous default
    python -m serving.modelctl unregister mnist_lenet5 1.1       # refuses the default version
    python -m serving.modelctl scale mnist_lenet5 [1.1] --workers 2
    python -m serving.modelctl predict mnist_lenet5 digit.png [--version 1.1] [--grpc]

Tables for people, --json for scripts. Exit status 0 on success, 1 on a refused or failed action
(unknown model or version, server down, bad token), 2 on bad usage. The previous defaults live in
default_history.json beside TorchServe's key file (.run/ for `make serve`).
"""
import argparse
import json
import sys
from pathlib import Path

import catalog
from serving.client import ServeError, TorchServeClient


def table(rows: list[dict]) -> str:
    if not rows:
        return "(nothing)"
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    lines += ["  ".join(str(r.get(c, "")).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)


class History:
    """The previous default versions of each model, newest last, for rollback."""

    def __init__(self, path: Path):
        self.path = path

    def load(self) -> dict:
        return json.loads(self.path.read_text()) if self.path.exists() else {}

    def push(self, model: str, version: str):
        data = self.load()
        data.setdefault(model, []).append(version)
        self.path.write_text(json.dumps(data, indent=1))

    def pop(self, model: str) -> str | None:
        data = self.load()
        if not data.get(model):
            return None
        version = data[model].pop()
        self.path.write_text(json.dumps(data, indent=1))
        return version


def live_versions(client, model: str) -> list[dict]:
    described = client.describe(model, "all")
    default = client.default_version(model)
    known = catalog.read_manifest()
    return [{"model": model, "version": v["modelVersion"], "default": v["modelVersion"] == default,
             "format": known.get((model, v["modelVersion"]), {}).get("format", "?"),
             "workers": f"{sum(w['status'] == 'READY' for w in v['workers'])}/{len(v['workers'])} ready",
             "batch": v["batchSize"], "max_delay_ms": v["maxBatchDelay"],
             "test_acc": _percent(known.get((model, v["modelVersion"]), {}).get("test_accuracy"))}
            for v in described]


def _percent(value):
    return f"{100 * value:.2f}%" if value is not None else "?"


def cmd_list(client, args):
    live = {}
    try:
        for model in client.models():
            live.update({(r["model"], r["version"]): r for r in live_versions(client, model)})
    except ServeError as e:
        if e.status is not None:
            raise
        print(f"note: {e.message}; showing the model store only", file=sys.stderr)
    rows = []
    for (model, version), m in sorted(catalog.read_manifest().items()):
        state = live.pop((model, version), None)
        rows.append({"model": model, "version": version, "format": m["format"], "archive": m["archive"],
                     "live": "default" if state and state["default"] else ("yes" if state else "no"),
                     "workers": state["workers"] if state else "", "test_acc": _percent(m["test_accuracy"]),
                     "weights_sha256": m["weights_sha256"][:12], "created": m["created"]})
    rows += [dict(r, archive="?", live="default" if r["default"] else "yes") for r in live.values()]
    return rows


def cmd_describe(client, args):
    if args.version:
        return client.describe(args.model, args.version)
    return live_versions(client, args.model)


def cmd_register(client, args):
    archive = Path(args.archive)
    if archive.name != args.archive and archive.resolve().parent != catalog.STORE.resolve():
        raise ServeError(400, f"only archives in {catalog.STORE} can be registered, not {args.archive}")
    if not (catalog.STORE / archive.name).exists():
        raise ServeError(404, f"no archive {archive.name} in {catalog.STORE}: build it with `make archive`")
    return client.register(archive.name, args.workers)


def cmd_set_default(client, args, history: History):
    previous = client.default_version(args.model)
    if previous == args.version:
        return {"status": f"{args.model} {args.version} is already the default"}
    result = client.set_default(args.model, args.version)
    history.push(args.model, previous)
    return result


def cmd_rollback(client, args, history: History):
    previous = history.pop(args.model)
    if previous is None:
        raise ServeError(409, f"no earlier default of {args.model} is remembered in {history.path}")
    try:
        return client.set_default(args.model, previous)
    except ServeError:
        history.push(args.model, previous)  # keep it for the next try
        raise


def cmd_unregister(client, args):
    if client.default_version(args.model) == args.version:
        raise ServeError(409, f"{args.model} {args.version} is the default version: set another default first")
    return client.unregister(args.model, args.version)


def cmd_scale(client, args):
    return client.scale(args.model, args.version, args.workers)


def cmd_predict(client, args):
    image = Path(args.image).read_bytes()
    if args.grpc:
        from serving.grpc_client import GrpcClient
        client = GrpcClient.from_config(key_file=client.key_file, client_name="cli")
    return client.predict(args.model, image, version=args.version, top_k=args.top_k)


def get_args_parser():
    p = argparse.ArgumentParser(prog="python -m serving.modelctl", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--key-file", help="TorchServe's key_file.json (default .run/key_file.json or $TS_KEY_FILE)")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="archives in the model store and the live versions")
    d = sub.add_parser("describe", help="a model's live versions, or one version in full")
    d.add_argument("model")
    d.add_argument("version", nargs="?")
    r = sub.add_parser("register", help="load an archive of model_store/")
    r.add_argument("archive")
    r.add_argument("--workers", type=int, default=1)
    s = sub.add_parser("set-default", help="make VERSION what /predictions/MODEL answers with")
    s.add_argument("model")
    s.add_argument("version")
    b = sub.add_parser("rollback", help="restore the previous default version")
    b.add_argument("model")
    u = sub.add_parser("unregister", help="unload a version (never the default)")
    u.add_argument("model")
    u.add_argument("version")
    w = sub.add_parser("scale", help="set the number of workers")
    w.add_argument("model")
    w.add_argument("version", nargs="?")
    w.add_argument("--workers", type=int, required=True)
    q = sub.add_parser("predict", help="classify an image file")
    q.add_argument("model")
    q.add_argument("image")
    q.add_argument("--version")
    q.add_argument("--top-k", type=int, default=3)
    q.add_argument("--grpc", action="store_true", help="over gRPC instead of REST")
    return p


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    client = TorchServeClient.from_config(key_file=args.key_file, client_name="cli")
    history = History(Path(client.key_file).parent / "default_history.json")
    commands = {"list": cmd_list, "describe": cmd_describe, "register": cmd_register, "unregister": cmd_unregister,
                "scale": cmd_scale, "predict": cmd_predict,
                "set-default": lambda c, a: cmd_set_default(c, a, history),
                "rollback": lambda c, a: cmd_rollback(c, a, history)}
    try:
        result = commands[args.command](client, args)
    except ServeError as e:
        print(f"error: {e.message}" + (f" (HTTP {e.status})" if e.status else ""), file=sys.stderr)
        return 1
    except FileNotFoundError as e:
        print(f"error: {e.filename}: no such file", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, indent=1))
    elif isinstance(result, list) and result and isinstance(result[0], dict) and "version" in result[0]:
        print(table(result))
    elif isinstance(result, dict) and "status" in result:
        print(result["status"])
    else:
        print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
