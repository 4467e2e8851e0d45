"""`rbee queen` as a real process: the demo, configuration errors, and the
admin token rule for listening beyond loopback."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _queen(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "rbee.cli", "queen", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, **(env or {})},
    )


def _wait_healthy(url: str, process: subprocess.Popen, timeout: float = 60) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if process.poll() is not None:
            raise AssertionError(f"the queen exited: {process.stderr.read()}")
        try:
            return httpx.get(url + "/health", timeout=2).json()
        except httpx.HTTPError:
            time.sleep(0.2)
    raise AssertionError("the queen did not come up")


def test_demo_serves_a_simulated_cluster(tmp_path):
    port = _free_port()
    process = _queen("--demo", "--listen", f"127.0.0.1:{port}",
                     "--state-path", str(tmp_path / "q.db"))
    url = f"http://127.0.0.1:{port}"
    try:
        health = _wait_healthy(url, process)
        assert health["demo"] is True and health["workers"]["total"] >= 6
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        models = [m.id for m in client.models.list().data]
        assert models
        text_model = next(m for m in models if "llama" in m)
        stream = client.chat.completions.create(
            model=text_model, messages=[{"role": "user", "content": "hello"}],
            max_tokens=5, stream=True)
        tokens = [c.choices[0].delta.content for c in stream
                  if c.choices and c.choices[0].delta.content]
        assert len(tokens) == 5
        state = httpx.get(url + "/v1/state").json()
        assert all(w["labels"].get("simulated") == "true" for w in state["workers"])
        assert len(state["pools"]) >= 3
    finally:
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    assert "SIMULATED" in out


def test_listening_beyond_loopback_needs_an_admin_token(tmp_path):
    env = {"RBEE_ADMIN_TOKEN": ""}
    process = _queen("--listen", f"0.0.0.0:{_free_port()}",
                     "--state-path", str(tmp_path / "q.db"), env=env)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 1
    assert "RBEE_ADMIN_TOKEN" in err and "Traceback" not in err


def test_unknown_configuration_keys_are_named(tmp_path):
    config = tmp_path / "queen.yaml"
    config.write_text("listen: 127.0.0.1:0\nqueue:\n  capacity: 5\n  colour: red\n"
                      "workers:\n  - id: a\n    url: http://127.0.0.1:9/v1\n    slotz: 3\n")
    process = _queen("--config", str(config))
    out, err = process.communicate(timeout=60)
    assert process.returncode == 1
    assert "queue.colour: unknown key" in err
    assert "workers.0.slotz: unknown key" in err


def test_a_worker_key_that_is_not_set_stops_the_start(tmp_path):
    config = tmp_path / "queen.yaml"
    config.write_text(f"listen: 127.0.0.1:0\nstate_path: {tmp_path / 'q.db'}\n"
                      "workers:\n  - id: a\n    url: http://127.0.0.1:9/v1\n"
                      "    api_key_env: RBEE_TEST_UNSET_KEY\n")
    process = _queen("--config", str(config), env={"RBEE_TEST_UNSET_KEY": ""})
    out, err = process.communicate(timeout=60)
    assert process.returncode == 1
    assert "workers.0.api_key_env" in err and "RBEE_TEST_UNSET_KEY is not set" in err
    assert "Traceback" not in err


def test_a_refused_policy_file_stops_the_start(tmp_path):
    policy = tmp_path / "scheduler.rhai"
    policy.write_text("fn schedule_job(job, pools, workers) {\n    workers.(\n}\n")
    config = tmp_path / "queen.yaml"
    config.write_text(f"listen: 127.0.0.1:0\nstate_path: {tmp_path / 'q.db'}\n"
                      f"scheduler: scheduler.rhai\n")
    process = _queen("--config", str(config))
    out, err = process.communicate(timeout=60)
    assert process.returncode == 1
    assert f"{policy}:2:" in err


def test_json_logs_are_one_object_per_line(tmp_path):
    port = _free_port()
    process = _queen("--listen", f"127.0.0.1:{port}", "--state-path", str(tmp_path / "q.db"),
                     "--log-format", "json")
    try:
        _wait_healthy(f"http://127.0.0.1:{port}", process)
    finally:
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
    lines = [json.loads(line) for line in err.splitlines() if line.strip()]
    assert any(entry["logger"] == "rbee.queen" and "listening" in entry["msg"]
               for entry in lines)
    assert all({"ts", "level", "logger", "msg"} <= set(entry) for entry in lines)
