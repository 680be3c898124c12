"""`debm serve`: serve a registered model over MLflow's REST API.

Runs `mlflow models serve --env-manager local` (the scoring server in this environment, which has
distributed_ebm installed) after checking that the model URI resolves (tracking.describe_model),
waits until the server answers /ping, then prints its URL and an example request. The model and
its request format are the pyfunc's (distributed_ebm/serving.py).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from ..config import ConfigError, TrackingConfig
from ..tracking import describe_model, resolve_tracking_uri

EXAMPLE_REQUEST = {"dataframe_records": [{"task": "sample", "n": 4, "seed": 0}]}


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add `debm serve` to the `debm` command's subparsers."""
    serve = subparsers.add_parser("serve", help="serve a registered model over MLflow's REST API")
    serve.add_argument(
        "--model",
        required=True,
        help="model URI: models:/NAME@champion, models:/NAME/VERSION, runs:/RUN_ID/model",
    )
    serve.add_argument(
        "--host", default="127.0.0.1", help="interface to bind (0.0.0.0: all of them)"
    )
    serve.add_argument(
        "--port", type=int, default=5001, help="port (5000 is the usual MLflow tracking server's)"
    )
    serve.add_argument(
        "--workers", type=int, default=1, help="server processes, each holding the model"
    )
    serve.add_argument("--timeout", type=int, default=60, help="seconds one request may take")
    serve.add_argument("--device", default="auto",
                       help="device the model samples on: auto (the GPU where torch sees one), cpu or cuda")
    serve.add_argument(
        "--tracking-uri",
        help="MLflow tracking/registry URI; default as for debm train: MLFLOW_TRACKING_URI, "
        "else sqlite:///./mlflow.db",
    )
    serve.add_argument(
        "--startup-timeout",
        type=float,
        default=300.0,
        help="seconds to wait for the server to load the model and answer /ping",
    )
    return serve


def check_model(model_uri: str, tracking_uri: str) -> str:
    """Fail with the fix when `model_uri` does not resolve to a pyfunc model; return a description
    (for `models:/NAME@ALIAS`, the version the alias points at)."""
    described, flavors = describe_model(
        model_uri, tracking_uri, store_fix="pass --tracking-uri or set MLFLOW_TRACKING_URI"
    )
    if "python_function" not in flavors:
        raise ConfigError(
            f"{model_uri} is not a pyfunc model (flavors: {', '.join(flavors)}): serve a model "
            "registered by debm train or debm tune."
        )
    return described


def check_port(host: str, port: int) -> None:
    """Fail with the fix when the port is taken (before the server spends time on the model)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        try:
            probe.bind((host, port))
        except OSError as err:
            raise ConfigError(
                f"Cannot listen on {host}:{port} ({err.strerror}): pick another --port, "
                "or stop what is using it."
            ) from None


def server_command(
    model_uri: str, *, host: str, port: int, workers: int = 1, timeout: int = 60
) -> list[str]:
    """The `mlflow models serve` command line for a model, in this Python environment."""
    options = {"--model-uri": model_uri, "--host": host, "--port": port, "--workers": workers,
               "--timeout": timeout, "--env-manager": "local"}  # fmt: skip
    serve = [sys.executable, "-m", "mlflow", "models", "serve"]
    return serve + [str(item) for option in options.items() for item in option]


def start_server(command: list[str], tracking_uri: str, device: str = "auto", **popen) -> subprocess.Popen:
    """Start the scoring server in its own process group (so that stop_server ends all of it)."""
    from ..serving import SERVE_DEVICE_VARIABLE

    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking_uri, **{SERVE_DEVICE_VARIABLE: device})
    # MLflow starts `uvicorn` by name: put this environment's scripts first on PATH.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return subprocess.Popen(command, env=env, start_new_session=True, **popen)


def wait_until_ready(url: str, process: subprocess.Popen, timeout_s: float) -> None:
    """Poll `url`/ping until the server answers 200; fail if it exits or takes over timeout_s."""
    import requests

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ConfigError(
                f"The MLflow scoring server exited with code {process.returncode} before answering "
                "(its log is above): check the model URI, the port and the environment."
            )
        try:
            if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise ConfigError(
        f"The MLflow scoring server did not answer {url}/ping within {timeout_s:.0f} s: "
        "raise --startup-timeout, or look at its log above."
    )


def stop_server(process: subprocess.Popen, grace_s: float = 10.0) -> None:
    """End the server's process group: SIGTERM, then SIGKILL after grace_s."""
    if process.poll() is not None:
        return
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, grace_s)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def example_curl(url: str) -> str:
    """A curl command that asks the server for four samples."""
    return (
        f"curl -s {url}/invocations -H 'Content-Type: application/json' "
        f"-d '{json.dumps(EXAMPLE_REQUEST)}'"
    )


def run(args: argparse.Namespace) -> int:
    """Check the model and the port, serve until interrupted; the server's exit code."""
    tracking_uri = resolve_tracking_uri(TrackingConfig(uri=args.tracking_uri))
    described = check_model(args.model, tracking_uri)
    check_port(args.host, args.port)
    command = server_command(
        args.model, host=args.host, port=args.port, workers=args.workers, timeout=args.timeout
    )
    process = start_server(command, tracking_uri, args.device)
    # The server runs in its own process group: turn SIGTERM into SystemExit so `finally` stops it.
    previous_handler = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    # 0.0.0.0 / :: bind every interface; a client on this machine reaches them at the loopback.
    local = {"0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(
        args.host, f"[{args.host}]" if ":" in args.host else args.host
    )
    url = f"http://{local}:{args.port}"
    try:
        wait_until_ready(url, process, args.startup_timeout)
        print(
            f"Serving {described} at {url}/invocations (MLflow scoring server; Ctrl-C stops it).",
            flush=True,
        )
        print(f"Example request: {example_curl(url)}", flush=True)
        print(
            "Tasks: sample (n, steps, seed, label), inpaint (images, masks, method, …), "
            'interpolate (GGCN: rows, midpoints, …); add "return": "array" for float arrays.',
            flush=True,
        )
        return process.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        stop_server(process)
        signal.signal(signal.SIGTERM, previous_handler)
