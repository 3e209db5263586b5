"""The benchmarks' all-linear options on the CPU with the tiny model: the serving benchmark's
--target-modules, the decode benchmark's targets table, and the target-set parser."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

import pytest
import torch

from benchmarks import decode_bench, serving_bench
from benchmarks.serving import grpc_stack
from benchmarks.synthetic_adapters import AdapterBank, parse_targets
from services.common.base_model import DUMMY_PRESETS, BaseModelShape

TRACE_ARGS = shlex.split(
    "--preset tiny --rate 15 --duration 1.0 --seed 3 --num-adapters 1 --no-progress --device cpu"
)
MLP = ("gate_proj", "up_proj", "down_proj")


def test_target_sets_parse_and_bad_names_are_refused() -> None:
    assert parse_targets("attention") == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert parse_targets("all-linear")[-3:] == MLP and len(parse_targets("all-linear")) == 7
    assert parse_targets("q_proj,down_proj") == ("q_proj", "down_proj")
    for bad in ("", "lm_head", "q_proj,mlp"):
        with pytest.raises(ValueError):
            parse_targets(bad)
    with pytest.raises(SystemExit):
        serving_bench.parse_args([*TRACE_ARGS, "--target-modules", "gate", "--out", "x"])


def test_all_linear_bank_adapters_carry_the_mlp_projections() -> None:
    shape = BaseModelShape.from_hf_config(DUMMY_PRESETS["tiny"])
    bank = AdapterBank(
        shape,
        lambda i: 8,
        torch.float32,
        torch.device("cpu"),
        1,
        targets=parse_targets("all-linear"),
    )
    adapter = bank.adapter(0, "a")
    assert set(adapter.lora_a) >= set(MLP)
    assert adapter.lora_a["down_proj"].shape == (shape.num_layers, 8, shape.intermediate_size)
    # The gRPC mode's size check counts the MLP too: 4 bytes per value of A and B.
    attention = grpc_stack.upload_bytes("tiny", [("a", 8)])
    every = grpc_stack.upload_bytes("tiny", [("a", 8)], parse_targets("all-linear"))
    mlp_values = 8 * shape.num_layers * 3 * (shape.hidden_size + shape.intermediate_size)
    assert every - attention == 4 * mlp_values


def test_serving_bench_runs_all_linear_adapters_with_uniform_popularity(tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    (attention,) = serving_bench.main([*TRACE_ARGS, "--out", str(out)])
    (every,) = serving_bench.main(
        [*TRACE_ARGS, "--target-modules", "all-linear", "--alpha", "0", "--out", str(out)]
    )
    assert attention["target_modules"] == "attention" and every["target_modules"] == "all-linear"
    assert every["alpha"] == 0
    for row in (attention, every):
        assert row["num_requests"] == row["finished"] > 0 and row["failed"] == 0
    # The same adapters take more slots with their MLP modules resident too.
    assert every["pool"]["peak_adapter_slots"] > attention["pool"]["peak_adapter_slots"]
    assert "on all-linear" in serving_bench.summary_line(every)


def test_decode_targets_table_on_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    rows = decode_bench.targets_table("tiny", torch.device("cpu"), (2,), steps=2, distinct=1)
    (row,) = rows
    assert row["batch"] == 2
    for key in ("base_step_s", "attention_step_s", "all-linear_step_s"):
        assert row[key] > 0
    decode_bench.print_targets_table(rows)
    assert "all-linear" in capsys.readouterr().out


def test_decode_bench_has_the_targets_table_flag(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The one-command table: --targets-table runs only it, at batches 32 and 128."""
    called: dict[str, object] = {}

    def fake(preset: str, device: torch.device, batches: tuple[int, ...], steps: int):
        called.update(preset=preset, batches=batches)
        return [
            {"batch": b, "base_step_s": 1.0, "attention_step_s": 1.1, "all-linear_step_s": 1.3}
            for b in batches
        ]

    monkeypatch.setattr(decode_bench, "targets_table", fake)
    args = argparse.Namespace(out=str(tmp_path), quick=True, no_baselines=False, targets_table=True)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", lambda self, *a: args)
    decode_bench.main()
    assert called == {"preset": "llama-7b", "batches": (32, 128)}
    assert (tmp_path / "decode_targets.json").is_file()


def test_engine_switches_reach_the_engine_config() -> None:
    """The serving benchmark's A/B switches (graphs of prompt-only steps, async output) set
    the engine's settings, defaults on."""
    on = serving_bench.run_options(serving_bench.parse_args([*TRACE_ARGS, "--out", "x"]))
    assert on.settings.prefill_graphs and on.settings.async_output
    args = [*TRACE_ARGS, "--no-prefill-graphs", "--no-async-output", "--out", "x"]
    off = serving_bench.run_options(serving_bench.parse_args(args))
    assert not off.settings.prefill_graphs and not off.settings.async_output
