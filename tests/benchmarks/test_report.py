"""The results table and the target checks, on hand-made result rows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks import serving_bench
from benchmarks.serving import report


def row(
    variant: str,
    n: int,
    req_s: float,
    mode: str = "inprocess",
    failed: int = 0,
    served: int | None = None,
) -> dict[str, Any]:
    counts = {} if served is None else {"distinct_adapters": served}
    return {
        **counts,
        "mode": mode,
        "variant": variant,
        "preset": "S2",
        "model": "llama-7b",
        "num_adapters": n,
        "rate": 20.0,
        "alpha": 1.0,
        "cv": 1.0,
        "trace_duration_s": 30.0,
        "seed": 0,
        "finished": 100 - failed,
        "num_requests": 100,
        "failed": failed,
        "throughput_req_s": req_s,
        "throughput_tok_s": req_s * 260,
        "avg_latency_s": 1.0,
        "p99_latency_s": 2.0,
        "avg_ttft_s": 0.1,
        "p99_ttft_s": None,
        "slo_attainment": 1.0,
        "cache_hit_rate": 0.9,
    }


def verdicts(rows: list[dict[str, Any]]) -> dict[str, tuple[str, str]]:
    return {name: (result, verdict) for name, result, verdict in report.targets(rows)}


def test_targets_pair_runs_of_the_same_trace() -> None:
    rows = [
        row("manylora", 5, 10.0, served=5),
        row("manylora", 2000, 9.6, served=2000),
        row("hf-peft", 2000, 0.2),
        row("no-unified-pool", 2000, 9.7),
        row("bmm", 2000, 8.0),
        row("manylora", 2000, 9.0, mode="grpc"),
        row("manylora", 100, 1.0, mode="grpc"),
    ]
    got = verdicts(rows)
    name = "2,000+ distinct adapters served in one run, no failed request"
    assert got[name] == ("2000 adapters served", "met")
    assert got["throughput at 2,000 adapters ≥ 95% of at 5"][1] == "met"  # 0.96
    assert got["≥ 30× HF PEFT (tokens/s)"] == ("48.000× (n=2000, R=20, 1 pair(s))", "met")
    assert got["unified pool ≥ no-unified-pool"][1] == "missed"  # 9.6 < 9.7
    assert got["kernels ≥ bmm"][1] == "met"
    # The grpc run at n=100 has no in-process partner; the one at 2000 gives 9.0/9.6.
    assert got["gRPC stack ≥ 90% of in-process"] == ("0.938× (n=2000, R=20, 1 pair(s))", "met")


def test_failures_and_missing_runs_are_reported_as_such(tmp_path: Path) -> None:
    failing = verdicts([row("manylora", 4000, 5.0, failed=3, served=2100)])
    assert failing["2,000+ distinct adapters served in one run, no failed request"] == (
        "1 run(s), each with failed requests",
        "missed",
    )
    rows = [row("manylora", 4000, 5.0, failed=3)]
    got = verdicts(rows)
    assert got["≥ 30× HF PEFT (tokens/s)"] == ("not measured", "–")
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n")
    text = report.main([str(path)])
    assert "| S2 | inprocess | manylora | 4000 | 20 | 1 | 1 | 97 | 100 | 5.00 | 1300 |" in text
    assert "| – |" in text  # p99 TTFT missing
    assert text.splitlines()[0].endswith("| hits | adapters served |")
    assert "| 90.0% | – |" in text  # a row from before distinct_adapters was recorded
    rows[0]["distinct_adapters"] = 1234
    assert report.table(rows).splitlines()[2].endswith("| 90.0% | 1234 |")


def test_repeated_runs_are_compared_by_their_mean() -> None:
    """Two runs each at 5 and 2,000 adapters: the verdict uses the means (9.5 / 10.0), not
    the worst pairing of single runs (9.0 / 10.5), which would miss."""
    rows = [
        row("manylora", 5, 10.5),
        row("manylora", 5, 9.5),
        row("manylora", 2000, 9.0),
        row("manylora", 2000, 10.0),
    ]
    result, verdict = verdicts(rows)["throughput at 2,000 adapters ≥ 95% of at 5"]
    assert (result, verdict) == ("0.950× (n=2000, R=20, 1 pair(s); 2 and 2 runs)", "met")


def test_peft_is_compared_on_tokens_per_second() -> None:
    """A cut-off PEFT run that finished no request still streamed tokens: the ratio is over
    those, not a division by zero finished requests."""
    peft = {**row("hf-peft", 5, 0.0), "throughput_tok_s": 26.0}
    result, verdict = verdicts([row("manylora", 5, 5.0), peft])["≥ 30× HF PEFT (tokens/s)"]
    assert (result, verdict) == ("50.000× (n=5, R=20, 1 pair(s))", "met")


def test_summary_line_says_how_many_adapters_were_served() -> None:
    served = row("manylora", 2000, 9.6) | {"distinct_adapters": 812}
    assert "100/100 done, 812 adapters served," in serving_bench.summary_line(served)


def test_many_adapters_counts_the_adapters_served_not_the_trace_size() -> None:
    name = "2,000+ distinct adapters served in one run, no failed request"
    # A trace over 4,000 adapters that served 400 of them has not shown 2,000.
    assert verdicts([row("manylora", 4000, 5.0, served=400)])[name] == (
        "at most 400 adapters served in one run",
        "missed",
    )
    # Records from before the count cannot show it either way.
    assert verdicts([row("manylora", 4000, 5.0)])[name] == ("not measured", "–")
