"""Device check that the Llama-7B-width all-linear oracle test can fail: run it with MLP LoRA
switched off in every batch (the planted bug) and exit 0 only if the test then fails.

    python -m benchmarks.checks.plant_no_mlp_lora
"""

from __future__ import annotations

import sys

import pytest

from services.gpu_worker.engine import engine
from services.gpu_worker.engine.batch_builder import DeviceTokens
from services.gpu_worker.engine.forward_batch import ForwardBatch
from services.gpu_worker.engine.sequence import Sequence

TEST = (
    "tests/gpu_worker/test_all_linear_oracle.py::test_llama7b_shapes_all_linear_under_cuda_graphs"
)


def main() -> int:
    build = engine.Engine.build_batch

    def without_mlp_lora(
        self: engine.Engine,
        seqs: list[Sequence],
        q_lens: list[int] | None = None,
        in_flight: DeviceTokens | None = None,
    ) -> ForwardBatch:
        batch = build(self, seqs, q_lens, in_flight)
        batch.mlp_lora = False
        return batch

    engine.Engine.build_batch = without_mlp_lora  # type: ignore[method-assign]
    code = pytest.main(["-q", "-m", "gpu", "-p", "no:cacheprovider", "-p", "no:logging", TEST])
    caught = code == pytest.ExitCode.TESTS_FAILED
    print(f"planted bug (no MLP LoRA): test {'FAILED as it must' if caught else 'did not fail'}")
    return 0 if caught else 1


if __name__ == "__main__":
    sys.exit(main())
