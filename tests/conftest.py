from __future__ import annotations

import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter. The switch is read when a
# kernel is defined, so it is set here, before any test module imports one.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Set to 1 by .ci/device: a device run must run GPU tests, not skip them all and pass.
REQUIRE_GPU_ENV = "MANYLORA_REQUIRE_GPU"


class GpuRequirement:
    """Fails the session where GPU tests were required and none passed."""

    def __init__(self) -> None:
        self.passed = 0

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when == "call" and report.passed and "gpu" in report.keywords:
            self.passed += 1

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        if self.passed == 0 and exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        if self.passed == 0:
            terminalreporter.write_line(
                f"{REQUIRE_GPU_ENV}=1 and no GPU test passed: the run checked no GPU path",
                red=True,
            )


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get(REQUIRE_GPU_ENV) == "1":
        config.pluginmanager.register(GpuRequirement(), "manylora-require-gpu")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    if os.environ.get(REQUIRE_GPU_ENV) == "1":
        raise pytest.UsageError(
            f"{REQUIRE_GPU_ENV}=1 but CUDA is not available here: the GPU tests would all "
            "skip (check the driver, CUDA_VISIBLE_DEVICES and torch's CUDA build)"
        )
    skip = pytest.mark.skip(reason="needs a CUDA device (runs on the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
