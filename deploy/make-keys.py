"""Writes the deployment's keys, deploy/secrets/ts_keys.json, unless it exists: TorchServe's
key_file.json layout (an inference and a management key), 256 random bits each. nginx accepts them;
clients read the file (TS_KEY_FILE, loadtest --key-file). The folder is the host's guard (0700); the
file itself is 0644 because the containers read it through a bind mount as their own non-root users.

    python3 deploy/make-keys.py [--force]     # --force: new keys (then: make deploy-reload-keys)
"""
import json
import os
import secrets
import sys
from pathlib import Path

path = Path(__file__).resolve().parent / "secrets" / "ts_keys.json"
if path.exists() and "--force" not in sys.argv:
    sys.exit(0)
path.parent.mkdir(mode=0o700, exist_ok=True)
os.chmod(path.parent, 0o700)
keys = {kind: {"key": secrets.token_urlsafe(32)} for kind in ("inference", "management")}
tmp = path.with_suffix(".tmp")
tmp.write_text(json.dumps(keys, indent=2) + "\n")
os.chmod(tmp, 0o644)
tmp.replace(path)  # atomic: a client never reads half a file
print(f"new keys in {path}")
