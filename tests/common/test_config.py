"""Service config: flags beat MANYLORA_* environment variables, which beat defaults."""

from __future__ import annotations

import pytest

from services.common.config import load_config
from services.gpu_worker.config import WorkerConfig


def test_defaults_run_on_a_laptop():
    config = load_config(WorkerConfig, [], env={})
    assert config.model == "tiny" and config.dummy and config.device == "auto"


def test_environment_fills_fields_and_flags_win():
    env = {
        "MANYLORA_PORT": "7000",
        "MANYLORA_MAX_NUM_SEQS": "3",
        "MANYLORA_DUMMY": "false",
        "MANYLORA_ADAPTERS": "a=/x, /y",
    }
    config = load_config(WorkerConfig, ["--port", "7100"], env=env)
    assert config.port == 7100
    assert config.max_num_seqs == 3
    assert config.dummy is False
    assert config.adapters == ["a=/x", "/y"]
    assert load_config(WorkerConfig, ["--dummy"], env=env).dummy is True


def test_bad_values_name_the_setting():
    with pytest.raises(ValueError, match="--port"):
        load_config(WorkerConfig, ["--port", "eighty"], env={})
    with pytest.raises(ValueError, match="dummy"):
        load_config(WorkerConfig, [], env={"MANYLORA_DUMMY": "maybe"})
