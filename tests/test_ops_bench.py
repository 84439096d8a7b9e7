"""``minillm bench ops`` runs and reports both variants (figures come from running it, not from tests)."""

import re

from minillm import ops_bench
from minillm.cli import main


def test_bench_ops_layer_norm(capsys):
    assert main(["bench", "ops", "--case", "layer_norm", "--repeat", "1", "--memory"]) == 0
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.strip().startswith("layer_norm"))
    fused, composed, speedup = map(float, re.findall(r"([\d.]+) ms.*?([\d.]+) ms.*?([\d.]+)x", line)[0])
    assert abs(speedup - composed / fused) < 0.02 * speedup
    peak_fused, peak_composed = map(float, re.findall(r"peak (\d+) vs (\d+) MiB", line)[0])
    assert peak_fused < peak_composed   # the fused op keeps fewer arrays alive


def test_time_case_returns_both_variants():
    result = ops_bench.time_case("layer_norm", repeat=1)
    assert result["fused_ms"] > 0 and result["composed_ms"] > 0
