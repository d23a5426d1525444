"""The load test against the real TorchServe: a ~15 s Locust smoke run over REST and gRPC, both
versions of LeNet-5, must end with zero errors and every response's label right; and its gates must
fail a run that gets errors, and a response with a wrong label."""
import pytest

from conftest import start_torchserve
from drawing import draw_digit, png_bytes
from loadtest.images import Sample
from loadtest.run import get_args_parser, run_load
from loadtest.traffic import Target, wrong_answer
from model_store.archive import archive_name
from serving import server

pytestmark = pytest.mark.integration  # each module starts its own TorchServe

SMOKE_STEPS = "2,4"  # users per step: two steps, so the step shape and the per-step summary run too
SMOKE_STEP_S = 8  # x 2 steps: ~15 s of load


@pytest.fixture(scope="module")
def lenet_server(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("loadtest_ts")
    yield start_torchserve(run_dir, [f"mnist_lenet5={archive_name('mnist_lenet5', v)}" for v in ("1.0", "1.1")])
    server.stop(run_dir)


def run(client, out, *argv):
    """A real Locust run against `client`'s server -> (exit code, summary, Locust's log)."""
    args = get_args_parser().parse_args(["--ts-config", str(client.run_dir / "config.properties"),
                                         "--key-file", str(client.run_dir / "key_file.json"),
                                         "--out", str(out), "--warmup-s", "0", *argv])
    code, _, summary = run_load(args)
    return code, summary, (out / "locust.log").read_text()


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


def test_errors_fail_the_run(lenet_server, tmp_path):
    # Bounded by a request count, not a time: on a loaded machine Locust's users can take seconds to
    # start, and a 2 s run once ended before any request was made.
    code, summary, log = run(lenet_server, tmp_path, "--users", "2", "--duration", "60", "--max-requests", "20",
                             "--targets", "mnist_lenet5:9.9=1")  # a version that does not exist
    assert code != 0 and "LOAD TEST FAILED: error rate 100.00%" in log
    assert summary["series"]["total"]["failures"] == summary["series"]["total"]["requests"] > 0


def test_a_wrong_label_is_caught(lenet_server):
    seven = png_bytes(draw_digit(7))
    result = lenet_server.predict("mnist_lenet5", seven, version="1.1")
    assert wrong_answer(result, Target("mnist_lenet5", "1.1", 1), Sample(seven, "7")) is None
    assert "known label '1'" in wrong_answer(result, Target("mnist_lenet5", "1.1", 1), Sample(seven, "1"))
    assert "version '1.1', asked '1.0'" in wrong_answer(result, Target("mnist_lenet5", "1.0", 1), Sample(seven, "7"))
