"""`make demo`: three real vLLM servers (CPU build) and the gateway in front, on this machine.

Model tiny-a on one server, two replicas of tiny-b on two more, exactly the setup the gateway
exists for; the models are tiny random-weight Llamas made here (they write gibberish, but
vLLM serves them as it serves any model). Prints the lines to try, then serves until Ctrl-C.
Run from the gateway's virtualenv; the vLLM virtualenv comes from bench/install_vllm.sh.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from bench.demo_layout import tiny_a_and_two_tiny_b
from bench.vllm_servers import DEFAULT_VENV, VllmServer, start_servers

CACHE = Path.home() / ".cache" / "vllm-gateway"


def _progress(elapsed: float, servers: Sequence[VllmServer]) -> None:
    states = []
    for server in servers:
        states.append(f"{server.name} {'ready' if server.ready_at else 'loading'}")
    print(f"  {elapsed:5.0f} s  " + ", ".join(states), flush=True)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _wait_ready(url: str, gateway: subprocess.Popen[bytes]) -> None:
    while True:
        if gateway.poll() is not None:
            raise SystemExit(f"demo: the gateway exited with code {gateway.returncode}")
        try:
            with urllib.request.urlopen(url + "/ready", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)


def _instructions(port: int) -> str:
    url = f"http://localhost:{port}"
    chat = (
        '{"model": "tiny-b", "stream": true, "max_tokens": 20, '
        '"messages": [{"role": "user", "content": "Hello"}]}'
    )
    completion = '{"model": "tiny-a", "prompt": "Once upon a time", "max_tokens": 20}'
    python = (
        "from openai import OpenAI; "
        f'c = OpenAI(base_url="{url}/v1", api_key="x"); '
        'print(c.chat.completions.create(model="tiny-a", max_tokens=20, '
        'messages=[{"role": "user", "content": "Hi"}]).choices[0].message.content)'
    )
    return "\n".join(
        [
            "",
            f"The gateway is up at {url}, in front of tiny-a (one server) and tiny-b (two"
            " replicas). Try, from another terminal:",
            "",
            f"  curl -s {url}/v1/models",
            f"  curl -N {url}/v1/chat/completions -H 'Content-Type: application/json' -d '{chat}'",
            f"  curl -s {url}/v1/completions -H 'Content-Type: application/json' -d '{completion}'",
            f"  .venv/bin/python -c '{python}'",
            "",
            "Ctrl-C stops the gateway and the three vLLM servers.",
        ]
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8080, help="the gateway's port")
    parser.add_argument("--vllm-ports", type=int, nargs=3, default=[8001, 8002, 8003])
    args = parser.parse_args()
    venv = Path(os.environ.get("VLLM_VENV") or DEFAULT_VENV)
    specs = tiny_a_and_two_tiny_b(CACHE / "models", args.vllm_ports, venv=venv)
    # SIGTERM ends the demo as Ctrl-C does, with every server stopped on the way out. SIGINT
    # is set too: a shell that starts a job in the background leaves it ignored.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    print("demo: starting three vLLM servers (about 1-2 minutes on two cores)", flush=True)
    try:
        with start_servers(
            specs, venv=venv, log_dir=CACHE / "logs", on_progress=_progress
        ) as servers:
            environ = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
            environ["GATEWAY_BACKENDS"] = ",".join(server.base_url for server in servers)
            environ["GATEWAY_PORT"] = str(args.port)
            environ["GATEWAY_HEALTH_INTERVAL_S"] = "2"
            print(f"demo: GATEWAY_BACKENDS={environ['GATEWAY_BACKENDS']} vllm-gateway", flush=True)
            gateway = subprocess.Popen([sys.executable, "-m", "gateway"], env=environ)
            try:
                _wait_ready(f"http://127.0.0.1:{args.port}", gateway)
                print(_instructions(args.port), flush=True)
                gateway.wait()
            finally:
                if gateway.poll() is None:
                    gateway.send_signal(signal.SIGTERM)
                    gateway.wait(timeout=40)
    except KeyboardInterrupt:
        print("\ndemo: stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
