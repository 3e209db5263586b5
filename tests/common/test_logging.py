"""`--log-format`: text lines with key=value fields that split back into their values, and
JSON lines (one object each) with the request id, fields and tracebacks; the flag on every
service."""

from __future__ import annotations

import json
import logging
import shlex

import pytest

from services.adapter_store.config import AdapterStoreConfig
from services.common.config import ConfigError, load_config
from services.common.logging import log_fields, request_id_var, setup_logging
from services.gpu_worker.serving.config import WorkerConfig
from services.router.config import RouterConfig

FIELDS = {
    "adapter": "a b",
    "n": 3,
    "ms": 1.5,
    "none": None,
    "odd": 'x="y"',
    "nl": "a\nb",
    "empty": "",
}


@pytest.fixture
def restore_root_logging():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def log_one_of_each(capsys) -> list[str]:
    logger = logging.getLogger("test.logging")
    token = request_id_var.set("rid-42")
    try:
        log_fields(logger, logging.INFO, "request summary", FIELDS)
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            logger.exception("failed")
    finally:
        request_id_var.reset(token)
    return capsys.readouterr().err.splitlines()


def test_json_lines_are_objects_with_request_id_and_fields(capsys, restore_root_logging):
    setup_logging("INFO", "json")
    lines = log_one_of_each(capsys)
    assert len(lines) == 2  # the traceback stays inside its line
    summary, failure = (json.loads(line) for line in lines)
    assert summary["message"] == "request summary" and summary["request_id"] == "rid-42"
    assert {k: summary[k] for k in FIELDS} == FIELDS
    assert summary["level"] == "INFO" and summary["logger"] == "test.logging"
    assert failure["level"] == "ERROR" and "RuntimeError: boom" in failure["exc_info"]


def test_text_fields_split_back_into_their_values(capsys, restore_root_logging):
    setup_logging("INFO", "text")
    line = log_one_of_each(capsys)[0]
    assert "[rid=rid-42] request summary " in line
    pairs = dict(part.split("=", 1) for part in shlex.split(line.split("request summary ", 1)[1]))
    assert pairs == {
        "adapter": "a b",
        "n": "3",
        "ms": "1.5",
        "none": "None",
        "odd": 'x="y"',
        "nl": "a\\nb",
        "empty": "",
    }


@pytest.mark.parametrize("config_cls", [RouterConfig, WorkerConfig, AdapterStoreConfig])
def test_every_service_takes_log_format(config_cls):
    assert load_config(config_cls, ["--log-format", "json"], env={}).log_format == "json"
    assert load_config(config_cls, [], env={"MANYLORA_LOG_FORMAT": "json"}).log_format == "json"
    assert load_config(config_cls, [], env={}).log_format == "text"
    with pytest.raises(ConfigError, match="--log-format"):
        load_config(config_cls, ["--log-format", "xml"], env={})
