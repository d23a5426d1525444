"""The logic that chose the shipped serving defaults (loadtest/tuning.py): which points the benchmark
measures, which changes it combines, and when it keeps the defaults. Pure functions, fed with made-up
measurements."""
import dataclasses

import pytest

from loadtest import tuning
from loadtest.tuning import ANY_FORMAT, MIN_GAIN, DEFAULT_FORMAT, ServingConfig

BASE = ServingConfig(workers=1, batch_size=8, max_batch_delay_ms=5, threads=1, netty_threads=2, version="1.0")
FORMATS = {"1.0": "torchscript", "1.1": "onnx", "1.3": "onnx_int8"}
LIMIT_MS = 50


def point(config: ServingConfig, rps: float, p99_ms: float | None = 10, passed: bool = True) -> dict:
    return {"name": config.differences(BASE, FORMATS), "config": dataclasses.asdict(config),
            "summary": {"passed": passed, "series": {"total": {"throughput_rps": rps, "p99_ms": p99_ms}}}}


def changed(**fields) -> ServingConfig:
    return dataclasses.replace(BASE, **fields)


def test_points_are_the_defaults_then_one_change_each_then_every_format():
    points = tuning.sweep_points("mnist_lenet5", BASE, FORMATS)
    assert points[0] == BASE and len(points) == len(set(points))
    assert all(len(p.differences(BASE, FORMATS).split(", ")) == 1 for p in points[1:])
    assert [p.version for p in points[-2:]] == ["1.1", "1.3"]  # 1.0 is the base itself
    assert changed(netty_threads=4) in points and changed(batch_size=32) not in points
    resnet = tuning.sweep_points("cifar10_resnet18", BASE, FORMATS)
    assert changed(batch_size=32) in resnet and changed(netty_threads=4) not in resnet


def test_a_point_is_named_by_what_it_changes():
    assert BASE.differences(BASE, FORMATS) == "current defaults"
    assert changed(workers=2, batch_size=4).differences(BASE, FORMATS) == "workers=2, batch_size=4"
    assert changed(workers=2, version="1.3").differences(BASE, FORMATS) == "workers=2, version=1.3 (onnx_int8)"


def test_the_defaults_stay_unless_beaten_by_more_than_the_noise():
    just_under = point(changed(workers=2), 100 * (1 + MIN_GAIN) - 0.1)
    assert tuning.pick([point(BASE, 100), just_under], LIMIT_MS) == BASE
    clear_win = point(changed(workers=2), 100 * (1 + MIN_GAIN) + 0.1)
    assert tuning.pick([point(BASE, 100), just_under, clear_win], LIMIT_MS) == changed(workers=2)


def test_the_pick_is_the_fastest_point_that_passed_within_the_p99_limit():
    points = [point(BASE, 100), point(changed(workers=2), 300, p99_ms=LIMIT_MS + 1),  # too slow at the tail
              point(changed(version="1.3"), 400, passed=False),  # answered labels wrongly
              point(changed(batch_size=4), 150, p99_ms=LIMIT_MS), point(changed(batch_size=16), 140)]
    assert tuning.pick(points, LIMIT_MS) == changed(batch_size=4)


def test_with_no_point_within_the_limit_the_fastest_that_passed_is_picked():
    points = [point(BASE, 100, p99_ms=90), point(changed(workers=2), 200, p99_ms=80),
              point(changed(workers=3), 250, p99_ms=None, passed=False)]
    assert tuning.pick(points, LIMIT_MS) == changed(workers=2)


def test_winning_changes_are_combined_and_the_faster_of_two_values_wins():
    points = [point(BASE, 100), point(changed(workers=2), 140), point(changed(workers=3), 130),
              point(changed(batch_size=4), 110), point(changed(max_batch_delay_ms=1), 104),  # within the noise
              point(changed(threads=2), 300, p99_ms=LIMIT_MS * 3)]  # fast, but over the p99 limit
    assert tuning.combined_config(BASE, points, LIMIT_MS) == changed(workers=2, batch_size=4)


def test_the_sweep_measures_each_point_once_and_the_combinations_it_needs():
    """workers=2 and batch_size=4 win in fp32, INT8 wins overall: the fp32 combination and the
    combination with INT8 are measured; the picks are the fastest of each scope."""
    rps = {BASE: 100, changed(workers=2): 150, changed(batch_size=4): 120, changed(version="1.3"): 300,
           changed(workers=2, batch_size=4): 170, changed(workers=2, batch_size=4, version="1.3"): 280}
    runs = []

    def measure(config, run):
        runs.append((config, run))
        return {key: value for key, value in point(config, rps.get(config, 90)).items() if key != "name"}

    points, picks = tuning.sweep(measure, "mnist_lenet5", BASE, FORMATS, LIMIT_MS)
    configs = [c for c, _ in runs]
    assert len(configs) == len(set(configs)) == len(tuning.sweep_points("mnist_lenet5", BASE, FORMATS)) + 2
    assert runs[-2:] == [(changed(workers=2, batch_size=4), f"combined-{len(configs) - 2}"),
                         (changed(workers=2, batch_size=4, version="1.3"), f"combined-{len(configs) - 1}")]
    assert points[-1]["name"] == "combined: workers=2, batch_size=4, version=1.3 (onnx_int8)"
    assert picks == {DEFAULT_FORMAT: changed(workers=2, batch_size=4), ANY_FORMAT: changed(version="1.3")}


def test_a_sweep_of_the_defaults_alone_measures_nothing_more():
    runs = []
    points, picks = tuning.sweep(lambda c, run: runs.append(run) or point(c, 100), "mnist_lenet5", BASE, FORMATS,
                                 LIMIT_MS, only=["current defaults"])
    assert runs == ["00"] and [p["name"] for p in points] == ["current defaults"]
    assert picks == {DEFAULT_FORMAT: BASE, ANY_FORMAT: BASE}


@pytest.mark.parametrize("model, baseline_p99, limit", [("mnist_lenet5", 50.9, 50.9), ("cifar10_resnet18", 229.9, 100)])
def test_the_p99_limit_is_the_baselines_for_lenet_and_the_slo_for_the_photo_model(model, baseline_p99, limit):
    assert tuning.p99_limit(model, baseline_p99) == limit
