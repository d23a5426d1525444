"""Waits until the deployment's containers are healthy, by their images' own HEALTHCHECKs (run with
`podman healthcheck run`: podman 4.3 runs them on a timer only under systemd).

    python3 deploy/wait.py [--timeout 600] [container ...]   # default: every container of compose.yaml
"""
import argparse
import os
import subprocess
import sys
import time

SERVICES = ["postgres", "ts1", "ts2", "nginx", "ui"]  # compose.yaml's services with a HEALTHCHECK


def containers(name: str = os.environ.get("DEPLOY_NAME", "digits")) -> list[str]:
    return [f"{name}-{service}" for service in SERVICES]


def healthy(container: str) -> bool:
    return subprocess.run(["podman", "healthcheck", "run", container], capture_output=True).returncode == 0


def wait(names=None, timeout: float = 600, quiet: bool = False) -> float:
    names = names or containers()
    start, waiting = time.time(), list(names)
    while waiting:
        waiting = [c for c in waiting if not healthy(c)]
        if waiting and time.time() - start > timeout:
            raise TimeoutError(f"not healthy after {timeout:.0f} s: {', '.join(waiting)} (podman logs <name>)")
        if waiting:
            time.sleep(2)
    if not quiet:
        print(f"healthy after {time.time() - start:.0f} s: {', '.join(names)}")
    return time.time() - start


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("containers", nargs="*", help="default: DEPLOY_NAME's (digits-ts1, ...)")
    p.add_argument("--timeout", type=float, default=600)
    args = p.parse_args()
    try:
        wait(args.containers or None, args.timeout)
    except TimeoutError as e:
        sys.exit(f"error: {e}")
