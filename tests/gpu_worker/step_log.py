"""Keep every StepResult an engine returns, for tests that check which steps ran how."""

from __future__ import annotations

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
