"""Load-test and benchmark settings, in one place, with their units. The project's paths are
catalog.py's; a run's own options are loadtest/spec.py's LoadSpec, whose defaults are these."""
import os
from pathlib import Path

import catalog

# What the benchmark serves and the Flask baseline loads: the project's archives and exports, unless
# these point elsewhere (e.g. archives built from a training checkpoint, to measure before training ends).
MODEL_STORE = Path(os.environ.get("LOADTEST_MODEL_STORE") or catalog.STORE)
EXPORT_DIR = Path(os.environ.get("LOADTEST_EXPORT_DIR") or catalog.EXPORT_DIR)
# Where each tool writes, git-ignored: one folder per run (log_overhead.py: one folder, rewritten).
RESULTS_DIR = catalog.RESULTS_DIR / "loadtest"
BENCH_DIR = catalog.RESULTS_DIR / "bench"
SOAK_DIR = catalog.RESULTS_DIR / "soak"
OVERLOAD_DIR = catalog.RESULTS_DIR / "overload"
LOG_OVERHEAD_DIR = catalog.RESULTS_DIR / "log_overhead"

# Traffic. A target is "model[:version]=weight"; "ping=weight" requests /ping instead.
MODEL_WEIGHTS = {"mnist_lenet5": 6, "mnist_alexnet": 2, "cifar10_resnet18": 2}  # share of traffic per model,
# split evenly over its served versions when --targets is not given
CLIENT_NAME = "loadtest"  # X-Client header: the prediction log tells load-test rows apart by it
THINK_TIME_MS = 0  # pause between a user's requests; 0 = closed loop, each user always has one in flight
REQUEST_TIMEOUT_S = 10  # a request unanswered this long is a failure
MAX_REQUESTS = 1_000_000  # a run stops by itself after this many requests, whatever its duration

# Correctness. Only images whose label the model is sure of are sent (see loadtest/images.py).
POOL_SIZE = 256  # test images tried per model
MIN_MARGIN = 0.1  # top-1 minus top-2 probability (in-process reference) for an image to be used:
# exporters and batch sizes move logits by ~1e-5, far too little to flip such a label
CHECK_EVERY = 10  # check 1 response in this many (parsing every JSON body costs load-generator CPU)
MAX_ERROR_RATE = 0.001  # fraction of failed requests above which a run exits non-zero

# Fixed-load runs (make loadtest)
USERS = 16  # concurrent users (= requests in flight with no think time)
SPAWN_RATE = 16  # users started per second
DURATION_S = 60
WARMUP_S = 5  # first seconds of a run left out of the summary (connections, first batches, JIT)

# Step load: users rise step by step; the knee is the highest throughput whose p99 stays under the SLO.
SLO_P99_MS = 100
STEP_USERS = (1, 2, 4, 8, 12, 16, 24, 32, 48)
STEP_S = 15  # seconds per step
SETTLE_S = 3  # first seconds of each step left out (users still starting, queues filling)

# The Flask baseline (loadtest/flask_baseline.py), started by the benchmark on this port.
BASELINE_PORT = 8090
