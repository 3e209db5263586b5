"""MANYLORA_REQUIRE_GPU=1 (set by .ci/device): a device run without CUDA, or one where no GPU
test passed, fails instead of reporting success with every GPU test skipped."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import REQUIRE_GPU_ENV

pytest_plugins = ["pytester"]

TESTS = """
import pytest

@pytest.mark.gpu
def test_on_the_gpu():
    pass

def test_on_the_cpu():
    pass
"""


@pytest.fixture
def run(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch):
    pytester.makeconftest('pytest_plugins = ["tests.conftest"]')
    pytester.makeini("[pytest]\nmarkers =\n    gpu: needs a CUDA device\n")
    pytester.makepyfile(test_sample=TESTS)

    def run(*args: str, cuda: bool, required: bool) -> pytest.RunResult:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        if required:
            monkeypatch.setenv(REQUIRE_GPU_ENV, "1")
        else:
            monkeypatch.delenv(REQUIRE_GPU_ENV, raising=False)
        return pytester.runpytest_inprocess("-p", "no:cacheprovider", "-p", "no:asyncio", *args)

    return run


def test_without_the_requirement_gpu_tests_skip_on_the_cpu(run):
    result = run("-m", "gpu", cuda=False, required=False)
    assert result.ret == pytest.ExitCode.OK
    result.assert_outcomes(skipped=1, deselected=1)


def test_required_without_cuda_fails_and_says_why(run):
    result = run("-m", "gpu", cuda=False, required=True)
    assert result.ret != pytest.ExitCode.OK
    assert "CUDA is not available" in result.stderr.str() + result.stdout.str()


def test_required_with_cuda_and_gpu_tests_passing_succeeds(run):
    result = run("-m", "gpu", cuda=True, required=True)
    assert result.ret == pytest.ExitCode.OK
    result.assert_outcomes(passed=1, deselected=1)


def test_required_and_no_gpu_test_ran_fails(run):
    # CUDA is there, but the selection runs only CPU tests: nothing on the GPU was checked.
    result = run("-m", "not gpu", cuda=True, required=True)
    result.assert_outcomes(passed=1, deselected=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*no GPU test passed*"])
