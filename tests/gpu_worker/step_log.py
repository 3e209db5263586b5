"""Keep every StepResult an engine returns, and every wait for a draw's tokens, for tests
that check which steps ran how and in what order."""

from __future__ import annotations

import pytest

from services.gpu_worker.engine import sampling
from services.gpu_worker.engine.engine import Engine, StepResult


def record_steps(engine: Engine) -> list[StepResult | None]:
    """Wrap `engine.step` so that each step's result is also appended to the list returned."""
    results: list[StepResult | None] = []
    step = engine.step

    def recorded_step() -> StepResult | None:
        results.append(step())
        return results[-1]

    engine.step = recorded_step  # type: ignore[method-assign]
    return results


def record_syncs(monkeypatch: pytest.MonkeyPatch, events: list[str]) -> None:
    """Append "sync" to `events` each time the engine waits for a draw's tokens."""
    real_result = sampling.PendingSample.result

    def result(self: sampling.PendingSample, per_row_fallback: bool = True) -> sampling.Sampled:
        events.append("sync")
        return real_result(self, per_row_fallback)

    monkeypatch.setattr(sampling.PendingSample, "result", result)
