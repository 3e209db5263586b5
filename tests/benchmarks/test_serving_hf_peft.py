"""The HF PEFT baseline (static batches with per-row adapters) on a short CPU trace."""

from __future__ import annotations

import dataclasses

import torch

from benchmarks.serving import hf_peft
from benchmarks.workload import PRESETS, generate


def test_static_batches_serve_every_request_its_tokens() -> None:
    params = dataclasses.replace(PRESETS["tiny"], rate=12.0, duration_s=1.0, seed=3)
    trace = generate(params)
    ranks = {r.adapter: r.rank for r in trace.requests}
    model = hf_peft.build_peft_model("tiny", ranks, torch.device("cpu"))
    records, duration = hf_peft.replay(model, trace, batch_size=4, progress=False)
    assert len(records) == len(trace.requests) >= 6
    for record, req in zip(records, trace.requests, strict=True):
        assert record.finished, record.error
        assert record.tokens == req.output_len
        assert record.first_token_s is not None and record.finish_s is not None
        assert req.arrival_s <= record.first_token_s <= record.finish_s <= duration
    # Static batching: a request never starts before every earlier request has started, and
    # no batch holds more than 4 (first tokens come in groups of at most 4).
    firsts = [r.first_token_s or 0.0 for r in records]
    assert firsts == sorted(firsts)
    assert max(firsts.count(t) for t in set(firsts)) <= 4


def test_a_timeout_stops_generation_mid_batch() -> None:
    params = dataclasses.replace(
        PRESETS["tiny"], rate=50.0, duration_s=1.0, seed=4, output_range=(200, 300)
    )
    trace = generate(params)
    model = hf_peft.build_peft_model(
        "tiny", {r.adapter: r.rank for r in trace.requests}, torch.device("cpu")
    )
    records, duration = hf_peft.replay(model, trace, batch_size=8, timeout_s=0.3, progress=False)
    # Serving all 50 would take seconds; the first batch stops at its first step past 0.3 s.
    assert duration < 3.0
    assert not any(r.finished for r in records)
    assert all(r.error for r in records)
    assert 0 < records[0].tokens < records[0].output_len  # cut inside the batch
