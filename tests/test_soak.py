"""The soak's short form (`make soak` runs 20 minutes): 2 minutes of mixed REST + gRPC load on a
TorchServe of its own, with memory sampled; no failure, no replaced worker, a log row for every answer,
and no process whose memory grows past the warm-up beyond loadtest.soak.GROWTH_LIMIT."""
import pytest

from loadtest.soak import USERS, soak

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_two_minute_soak(tmp_path):
    result = soak(tmp_path, minutes=2, sample_s=2)
    assert not result["problems"], result["problems"]
    assert result["answers"] > 1000 and result["answers"] <= result["log_rows"] <= result["answers"] + USERS
    workers = [name for name in result["processes"] if name.startswith("worker")]
    assert "frontend" in result["processes"] and workers, result["processes"]
    assert len(result["memory"]) > 30  # sampled through the run, not once
    for name in ("soak.md", "soak.png", "soak.json"):
        assert (tmp_path / name).stat().st_size > 0, name
