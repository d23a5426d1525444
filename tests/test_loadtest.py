"""The load test against the real TorchServe: a ~15 s Locust smoke run over REST and gRPC, both
versions of LeNet-5, must end with zero errors and every response's label right; and its gates must
fail a run that gets errors, and a response with a wrong label. And, without a server, the one
LoadSpec that a run's command line becomes and Locust reads, and the benchmark's metrics parser."""
from pathlib import Path

import pytest

from catalog import archive_name
from conftest import start_torchserve
from drawing import draw_digit, png_bytes
from loadtest.images import Sample
from loadtest.probes import metric_totals
from loadtest.run import get_args_parser, locust_command, run_load, spec_of
from loadtest.spec import LoadSpec, Target, format_targets, parse_targets
from loadtest.traffic import wrong_answer
from serving import server

integration = pytest.mark.integration  # each module starts its own TorchServe

SMOKE_STEPS = "2,4"  # users per step: two steps, so the step shape and the per-step summary run too
SMOKE_STEP_S = 8  # x 2 steps: ~15 s of load


@pytest.fixture(scope="module")
def lenet_server(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("loadtest_ts")
    yield start_torchserve(run_dir, [f"mnist_lenet5={archive_name('mnist_lenet5', v)}" for v in ("1.0", "1.1")])
    server.stop(run_dir)


def run(client, out, *argv):
    """A real Locust run against `client`'s server, `argv` as `python -m loadtest.run` takes them ->
    (exit code, summary, Locust's log)."""
    args = get_args_parser().parse_args(["--ts-config", str(client.run_dir / "config.properties"),
                                         "--key-file", str(client.run_dir / "key_file.json"), "--warmup-s", "0", *argv])
    code, _, summary = run_load(spec_of(args), out)
    return code, summary, (out / "locust.log").read_text()


@integration
def test_smoke_load_has_no_errors_and_only_right_labels(lenet_server, tmp_path):
    code, summary, log = run(lenet_server, tmp_path, "--protocol", "both", "--check-every", "1",
                             "--max-error-rate", "0", "--step", "--step-users", SMOKE_STEPS,
                             "--step-s", str(SMOKE_STEP_S), "--settle-s", "1",
                             "--targets", "mnist_lenet5:1.0=2,mnist_lenet5:1.1=1,mnist_lenet5=1")
    assert code == 0, log[-2000:]
    total = summary["series"]["total"]
    assert total["failures"] == 0 and total["requests"] >= 100, total
    assert summary["wrong_labels"] == 0 and summary["checked"] == total["requests"]  # --check-every 1
    expected = {f"{p} mnist_lenet5/{v}" for p in ("POST", "gRPC") for v in ("1.0", "1.1", "default")}
    assert set(summary["series"]) - {"total"} == expected
    assert [s["users"] for s in summary["steps"]] == [2, 4]
    for name in ("summary.md", "latency.png", "report.html", "locust_stats.csv", "samples.csv"):
        assert (tmp_path / name).stat().st_size > 0, name
    spec = LoadSpec.read(tmp_path / "spec.json")  # what Locust read
    assert spec.step_users == (2, 4) and spec.protocol == "both" and spec.check_every == 1


@integration
def test_errors_fail_the_run(lenet_server, tmp_path):
    # Bounded by a request count, not a time: on a loaded machine Locust's users can take seconds to
    # start, and a 2 s run once ended before any request was made.
    code, summary, log = run(lenet_server, tmp_path, "--users", "2", "--duration", "60", "--max-requests", "20",
                             "--targets", "mnist_lenet5:9.9=1")  # a version that does not exist
    assert code != 0 and "LOAD TEST FAILED: error rate 100.00%" in log
    assert summary["series"]["total"]["failures"] == summary["series"]["total"]["requests"] > 0


@integration
def test_a_wrong_label_is_caught(lenet_server):
    seven = png_bytes(draw_digit(7))
    result = lenet_server.predict("mnist_lenet5", seven, version="1.1")
    assert wrong_answer(result, Target("mnist_lenet5", "1.1", 1), Sample(seven, "7")) is None
    assert "known label '1'" in wrong_answer(result, Target("mnist_lenet5", "1.1", 1), Sample(seven, "1"))
    assert "version '1.1', asked '1.0'" in wrong_answer(result, Target("mnist_lenet5", "1.0", 1), Sample(seven, "7"))


def test_the_command_line_becomes_one_typed_spec_that_survives_the_trip_to_locust(tmp_path):
    args = get_args_parser().parse_args(["--targets", "mnist_lenet5:1.1=2,ping", "--step", "--step-users", "1,3",
                                         "--think-ms", "7", "--key-file", "", "--data-dir", str(tmp_path)])
    spec = spec_of(args)
    assert spec.targets == (Target("mnist_lenet5", "1.1", 2.0), Target("ping", None, 1.0))
    assert spec.step_users == (1, 3) and spec.think_ms == 7 and spec.key_file == "" and spec.data_dir == tmp_path
    assert spec.load_s == 2 * spec.step_s
    spec.write(tmp_path / "spec.json")
    assert LoadSpec.read(tmp_path / "spec.json") == spec
    assert LoadSpec.read("") == LoadSpec() == spec_of(get_args_parser().parse_args([]))  # one set of defaults
    assert parse_targets(format_targets(spec.targets)) == spec.targets


def test_locust_gets_its_own_options_and_the_spec_file_only(tmp_path):
    spec = LoadSpec(targets=parse_targets("mnist_lenet5=1"), users=3, spawn_rate=3, duration=9, workers=2,
                    think_ms=5, host="http://127.0.0.1:1")
    cmd = locust_command(spec, tmp_path)
    assert cmd[cmd.index("--load-spec") + 1] == str(tmp_path / "spec.json")
    assert [cmd[cmd.index(o) + 1] for o in ("-u", "-r", "-t", "--processes")] == ["3", "3", "9s", "2"]
    ours = {o for o in cmd if o.startswith("--")} - {"--headless", "--only-summary", "--loglevel", "--csv", "--html",
                                                     "--processes", "--load-spec", "--samples-csv"}
    assert not ours, f"load options passed as argv: {ours}"
    step = locust_command(LoadSpec(targets=spec.targets, step=True, step_users=(1, 2), step_s=4), tmp_path)
    assert "-u" not in step and any(Path(f).name == "step_shape.py" for f in step[step.index("-f") + 1].split(","))


def test_prometheus_counters_are_summed_over_label_sets():
    text = """# HELP ts_inference_requests_total Total number of inference requests.
# TYPE ts_inference_requests_total counter
ts_inference_requests_total{model_name="mnist_lenet5",model_version="1.0",hostname="h",} 12.0
ts_inference_requests_total{model_name="mnist_lenet5",model_version="1.1",hostname="h",} 3.0
ts_queue_latency_microseconds{model_name="mnist_lenet5",model_version="1.0",hostname="h",} 250.5 1700000000000
ts_inference_requests_total_created 1.7e9
"""
    totals = metric_totals(text, ("ts_inference_requests_total", "ts_queue_latency_microseconds", "absent"))
    assert totals == {"ts_inference_requests_total": 15.0, "ts_queue_latency_microseconds": 250.5, "absent": 0.0}
