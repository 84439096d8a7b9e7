"""``minillm.bench.ops``: both variants of a case are timed (figures come from running it, not from tests)."""

from minillm.bench import ops


def test_time_case_smoke():
    """Both variants are timed; the times may be any positive number (a smoke test)."""
    result = ops.time_case("layer_norm", repeat=1)
    assert result["fused_ms"] > 0 and result["composed_ms"] > 0
