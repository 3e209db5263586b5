"""Service config: flags beat MANYLORA_* environment variables, which beat defaults; a bad
setting is one line naming its flag and variable, exit status 2, in every program."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from services.adapter_store.config import AdapterStoreConfig
from services.common.config import ConfigError, UsageError, exit_on_startup_error, load_config
from services.gpu_worker.serving.config import WorkerConfig
from services.router.config import RouterConfig

REPO = Path(__file__).resolve().parents[2]


def test_defaults_run_on_a_laptop():
    config = load_config(WorkerConfig, [], env={})
    assert config.model == "tiny" and config.dummy and config.device == "auto"


def test_environment_fills_fields_and_flags_win(tmp_path: Path):
    env = {
        "MANYLORA_PORT": "7000",
        "MANYLORA_MAX_NUM_SEQS": "3",
        "MANYLORA_MODEL": str(tmp_path),
        "MANYLORA_DUMMY": "true",
        "MANYLORA_ADAPTERS": "a=/x, /y",
    }
    config = load_config(WorkerConfig, ["--port", "7100"], env=env)
    assert config.port == 7100
    assert config.max_num_seqs == 3
    assert config.dummy is True
    assert config.adapters == ["a=/x", "/y"]
    assert load_config(WorkerConfig, ["--no-dummy"], env=env).dummy is False


def test_a_model_folder_means_its_real_weights_and_presets_are_random_by_nature(tmp_path: Path):
    assert load_config(WorkerConfig, ["--model", str(tmp_path)], env={}).dummy is False
    assert load_config(WorkerConfig, ["--model", str(tmp_path), "--dummy"], env={}).dummy
    assert load_config(WorkerConfig, ["--model", "llama-7b", "--no-dummy"], env={}).dummy


def test_bad_values_name_the_flag_and_its_variable():
    with pytest.raises(ConfigError, match=r"^--port \(MANYLORA_PORT\): cannot read 'eighty'"):
        load_config(WorkerConfig, ["--port", "eighty"], env={})
    with pytest.raises(ConfigError, match=r"^--dummy \(MANYLORA_DUMMY\): .*'maybe'"):
        load_config(WorkerConfig, [], env={"MANYLORA_DUMMY": "maybe"})
    with pytest.raises(ConfigError, match=r"^--port \(MANYLORA_PORT\): 70000 is above"):
        load_config(RouterConfig, [], env={"MANYLORA_PORT": "70000"})
    with pytest.raises(ConfigError, match=r"^--log-level \(MANYLORA_LOG_LEVEL\): 'LOUD'"):
        load_config(AdapterStoreConfig, ["--log-level", "LOUD"], env={})
    with pytest.raises(UsageError, match="--bogus"):
        load_config(AdapterStoreConfig, ["--bogus"], env={})
    with pytest.raises(ConfigError, match=r"^--adapter-fetch-concurrency .*0 is below"):
        load_config(WorkerConfig, [], env={"MANYLORA_ADAPTER_FETCH_CONCURRENCY": "0"})


def test_worker_check_names_the_setting_that_points_at_nothing(tmp_path: Path, monkeypatch):
    (tmp_path / "config.json").write_text("{}")
    no_weights = load_config(WorkerConfig, ["--model", str(tmp_path)], env={})
    with pytest.raises(ConfigError, match=r"^--model \(MANYLORA_MODEL\): .*no \*\.safetensors"):
        no_weights.check()
    load_config(WorkerConfig, ["--model", str(tmp_path), "--dummy"], env={}).check()
    missing = load_config(WorkerConfig, ["--model", str(tmp_path / "nope"), "--dummy"], env={})
    with pytest.raises(ConfigError, match=r"^--model \(MANYLORA_MODEL\): .*neither"):
        missing.check()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"^--device \(MANYLORA_DEVICE\): .*CUDA is not"):
        load_config(WorkerConfig, ["--device", "cuda"], env={}).check()
    with pytest.raises(ConfigError, match=r"^--device .*'gpu' is not one of"):
        load_config(WorkerConfig, ["--device", "gpu"], env={}).check()


def test_store_and_router_checks():
    with pytest.raises(ConfigError, match=r"^--max-upload-bytes \(MANYLORA_MAX_UPLOAD_BYTES\)"):
        load_config(AdapterStoreConfig, ["--max-upload-bytes-in-flight", "10"], env={}).check()
    with pytest.raises(ConfigError, match=r"^--workers \(MANYLORA_WORKERS\)"):
        load_config(RouterConfig, [], env={}).check()
    with pytest.raises(ConfigError, match=r"^--adapter-store .*'nowhere' is not host:port"):
        load_config(RouterConfig, ["--workers", "h:1", "--adapter-store", "nowhere"]).check()


def test_startup_error_is_one_line_and_status_2(capsys):
    with pytest.raises(SystemExit) as exited, exit_on_startup_error("prog"):
        load_config(WorkerConfig, [], env={"MANYLORA_MAX_NUM_SEQS": "x"})
    assert exited.value.code == 2
    assert capsys.readouterr().err == (
        "prog: error: --max-num-seqs (MANYLORA_MAX_NUM_SEQS): cannot read 'x' as int\n"
    )


def test_help_shows_the_program_and_every_default(capsys):
    with pytest.raises(SystemExit) as exited:
        load_config(WorkerConfig, ["--help"], env={}, prog="python -m services.gpu_worker")
    text = " ".join(capsys.readouterr().out.split())
    assert exited.value.code == 0
    assert text.startswith("usage: python -m services.gpu_worker ")
    assert "(default: 0; env MANYLORA_MAX_NUM_SEQS)" in text
    assert "(default: off; env MANYLORA_DUMMY)" in text
    assert "(default: none; env MANYLORA_ADAPTERS)" in text


def _run_programs(commands: dict[str, tuple[list[str], dict[str, str]]]) -> dict[str, tuple]:
    """Run `python -m ...` programs side by side (each imports torch: seconds)."""
    base_env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'protos'}"}
    started = {
        name: subprocess.Popen(
            [sys.executable, "-m", *argv],
            cwd=REPO,
            env={**base_env, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, (argv, env) in commands.items()
    }
    results = {}
    for name, process in started.items():
        out, err = process.communicate(timeout=120)
        results[name] = (process.returncode, out, err)
    return results


def test_programs_refuse_bad_settings_in_one_line_without_traceback(tmp_path: Path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    metrics_port = str(taken.getsockname()[1])
    results = _run_programs(
        {
            "store bad flag value": (["services.adapter_store", "--port", "x"], {}),
            "store bad env value": (["services.adapter_store"], {"MANYLORA_MAX_RANK": "big"}),
            "store bad Redis URL": (
                ["services.adapter_store", "--port", "0", "--data-dir", str(tmp_path / "data")],
                {"MANYLORA_REDIS_URL": "redis://host:notaport/0"},
            ),
            "worker without CUDA": (
                ["services.gpu_worker", "--device", "cuda"],
                {"CUDA_VISIBLE_DEVICES": ""},
            ),
            "worker without weights": (["services.gpu_worker", "--model", str(model_dir)], {}),
            "router bad env value": (["services.router"], {"MANYLORA_LOAD_BOUND": "most"}),
            "router metrics port taken": (
                [
                    "services.router",
                    "--port",
                    "0",
                    "--workers",
                    "127.0.0.1:1",
                    "--metrics-port",
                    metrics_port,
                ],
                {},
            ),
            "router help": (["services.router", "--help"], {}),
        }
    )
    taken.close()
    expected = {
        "store bad flag value": ("services.adapter_store", "--port (MANYLORA_PORT)"),
        "store bad env value": ("services.adapter_store", "--max-rank (MANYLORA_MAX_RANK)"),
        "store bad Redis URL": ("services.adapter_store", "--redis-url (MANYLORA_REDIS_URL)"),
        "worker without CUDA": ("services.gpu_worker", "--device (MANYLORA_DEVICE)"),
        "worker without weights": ("services.gpu_worker", "--model (MANYLORA_MODEL)"),
        "router bad env value": ("services.router", "--load-bound (MANYLORA_LOAD_BOUND)"),
    }
    for name, (module, setting) in expected.items():
        code, out, err = results[name]
        assert code == 2, (name, err)
        assert err.count("\n") == 1, (name, err)
        assert err.startswith(f"python -m {module}: error: {setting}: "), (name, err)
    # The metrics port is taken only once the gRPC server runs: its log line may come first.
    code, out, err = results["router metrics port taken"]
    assert code == 2 and "Traceback" not in err, err
    assert err.splitlines()[-1].startswith(
        "python -m services.router: error: --metrics-port (MANYLORA_METRICS_PORT): "
    ), err
    code, out, _ = results["router help"]
    assert code == 0 and out.startswith("usage: python -m services.router ")
    assert "(default: 1.25; env MANYLORA_LOAD_BOUND)" in " ".join(out.split())
