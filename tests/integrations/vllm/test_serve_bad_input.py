"""Bad requests to one real ``vllm serve --attention-backend kvplug``: each a 4xx, never a
5xx or a dead engine; a client that hangs up mid-prefill leaves nothing held.

One server for the module (quest, with ``full`` as its ``switch_to``; kvplug's routes
allowlisted by ``VLLM_PLUGINS=kvplug``), short context, small prefill chunks.
"""

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from kvplug.demo import free_port, stop_server, wait_ready
from kvplug.soak import metric, request_states, session_processes

pytestmark = pytest.mark.engine
MAX_MODEL_LEN = 512
NAME = "kvplug-test"
QUEST = {"policy": "quest", "budget": 128}


@pytest.fixture(scope="module")
def server(model_dir):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [str(Path(sys.executable).with_name("vllm")), "serve", str(model_dir),
           "--attention-backend", "kvplug", "--host", "127.0.0.1", "--port", str(port),
           "--dtype", "float32", "--enforce-eager", "--served-model-name", NAME,
           "--max-model-len", str(MAX_MODEL_LEN), "--enable-chunked-prefill",
           "--max-num-batched-tokens", "64", "--num-gpu-blocks-override", "64"]
    env = dict(os.environ, VLLM_PLUGINS="kvplug", VLLM_CPU_KVCACHE_SPACE="1",
               KVPLUG_CONFIG=json.dumps({**QUEST, "switch_to": [{"policy": "full"}]}))
    log = Path(tempfile.mkdtemp(prefix="kvplug-test-serve-")) / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    try:
        wait_ready(proc, url, log)
        yield url
    finally:
        stop_server(proc)
        assert session_processes(proc.pid) == {}


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=300)


def _still_serves(client, server):
    out = client.completions.create(model=NAME, prompt="The capital of France is",
                                    max_tokens=4, temperature=0.0)
    assert out.usage.completion_tokens == 4
    assert _drained_states(server)["live"] == 0


def _drained_states(url: str, timeout: float = 60) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while True:
        states = request_states(url)
        if states["live"] == 0 or time.monotonic() > deadline:
            return states
        time.sleep(0.2)


def _post(url: str, body: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.parametrize("kwargs, status", [
    ({"prompt": [100] * (MAX_MODEL_LEN + 1)}, 400),            # prompt over max_model_len
    ({"prompt": ""}, 400),
    ({"prompt": []}, 400),
    ({"prompt": "hi", "max_tokens": 0}, 400),
    ({"prompt": "hi", "max_tokens": -3}, 400),
    ({"prompt": "hi", "temperature": -0.5}, 400),
    ({"prompt": "hi", "model": "no-such-model"}, 404),
])
def test_bad_request_is_a_4xx_and_the_server_serves_on(client, server, kwargs, status):
    import openai

    kwargs = {"model": NAME, "max_tokens": 4, **kwargs}
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(**kwargs)
    assert e.value.status_code == status, str(e.value)[:500]
    _still_serves(client, server)


def test_policy_switch_bad_config_busy_and_idle(client, server):
    route = server + "/kvplug/policy"
    assert _post(route, b"{not json")[0] == 400
    status, body = _post(route, json.dumps({"policy": "snapkv", "budget": 64}).encode())
    assert status == 400 and "not one this engine keeps" in body["error"]["message"]
    status, body = _post(route, json.dumps({"policy": "quest", "budget": float("nan")}).encode())
    assert status == 400 and "'budget' must be int" in body["error"]["message"]

    # busy: a request decoding while the switch arrives
    stream = client.completions.create(model=NAME, prompt="Count: 1, 2, 3,", max_tokens=64,
                                       temperature=0.0, stream=True,
                                       extra_body={"ignore_eos": True})
    chunks = iter(stream)
    next(chunks)
    status, body = _post(route, json.dumps({"policy": "full"}).encode())
    assert status == 409 and "idle" in body["error"]["message"]
    assert sum(1 for _ in chunks) > 0          # the request runs to its end
    _still_serves(client, server)

    # idle: switched, served, switched back
    status, body = _post(route, json.dumps({"policy": "full"}).encode())
    assert (status, body) == (200, {"policy": {"policy": "full"}})
    _still_serves(client, server)
    assert _post(route, json.dumps(QUEST).encode())[0] == 200
    _still_serves(client, server)


def test_client_hanging_up_during_prefill_frees_everything(client, server):
    """A 480-token prompt is prefilled 64 tokens a step; the client leaves before the first
    token.  The server aborts it: no request running, no KV block held, no kvplug state."""
    from openai import OpenAI

    before = request_states(server)
    hung_up = threading.Event()

    def send():
        short = OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=0.3)
        try:
            short.completions.create(model=NAME, prompt=list(range(1000, 1480)),
                                     max_tokens=16, temperature=0.0)
        except Exception:  # the client's own timeout: it hangs up mid-prefill
            hung_up.set()

    thread = threading.Thread(target=send)
    thread.start()
    thread.join()
    assert hung_up.is_set(), "the request ended before the client could hang up"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (metric(server, "vllm:num_requests_running")
                                           or metric(server, "vllm:kv_cache_usage_perc")):
        time.sleep(0.2)
    assert metric(server, "vllm:num_requests_running") == 0
    assert metric(server, "vllm:kv_cache_usage_perc") == 0
    after = _drained_states(server)
    assert after["live"] == 0
    assert after.get("created", 0) > before.get("created", 0), "the prefill never started"
    _still_serves(client, server)
