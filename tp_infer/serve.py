"""Command line: `torchrun --nproc-per-node N -m tp_infer.serve --ckpt-path DIR [--host 127.0.0.1] [--port 8000]`.
Every rank loads its shard; rank 0 runs the engine on its main thread and the OpenAI-compatible HTTP server on
another; the other ranks follow."""

import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import click
import uvicorn

from tp_infer.chat import ReplyMemory
from tp_infer.engine.engine import Engine
from tp_infer.engine.sampling import SamplingParams
from tp_infer.generate import FrontEnd, cli, engine_options, start
from tp_infer.server.app import ServerSettings, build_app
from tp_infer.server.bridge import EngineLoop
from tp_infer.server.metrics import Metrics
from tp_infer.tokenizer import ChatTokenizer


@dataclass
class ServerFrontEnd(FrontEnd):
    host: str
    port: int
    api_key: str | None
    model_name: str
    max_waiting: int
    chat_required = True

    def check(self) -> None:
        with socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((self.host, self.port))
            except OSError as e:
                raise ValueError(f"--host {self.host} --port {self.port}: cannot listen there ({e.strerror})") from None

    def run(
        self, engine: Engine, tokenizer: ChatTokenizer, sampling: SamplingParams, seed: int, replies: ReplyMemory
    ) -> int:
        loop = EngineLoop(engine, self.max_waiting)
        settings = ServerSettings(self.model_name, engine.max_seq_len, sampling, self.api_key)
        app = build_app(loop, tokenizer, settings, Metrics(engine), replies)
        stop = []  # the signal that asked to stop, set before anyone can reach the server
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: stop.append(signum))
        server = uvicorn.Server(uvicorn.Config(app, host=self.host, port=self.port, log_level="warning"))
        thread = threading.Thread(target=server.run, name="http", daemon=True)
        thread.start()
        while not server.started and thread.is_alive():
            time.sleep(0.05)
        if not server.started:
            raise RuntimeError(f"the HTTP server could not start on {self.host}:{self.port}")
        click.echo(f"tp_infer: serving {self.model_name} on http://{self.host}:{self.port}", err=True)
        try:
            loop.serve(lambda: bool(stop) or not thread.is_alive())
        finally:
            server.should_exit = True
            thread.join(timeout=10)
        return 0


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@engine_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (rank 0).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="Port to listen on.")
@click.option(
    "--api-key",
    envvar="TP_INFER_API_KEY",
    help="Require `Authorization: Bearer KEY` on every endpoint but /health (or set TP_INFER_API_KEY).",
)
@click.option("--served-model-name", help="The model's name in the API (default: the checkpoint folder's name).")
@click.option(
    "--max-waiting",
    default=256,
    show_default=True,
    type=click.IntRange(min=0),
    help="Requests that may wait beyond the running turns; more are answered 503.",
)
def main(host, port, api_key, served_model_name, max_waiting, **options):
    """OpenAI-compatible chat server: every request's history is found in the cache, whoever sent it."""
    name = served_model_name or Path(options["ckpt_path"]).resolve().name
    start(lambda: ServerFrontEnd(host, port, api_key, name, max_waiting), **options)


def serve_cli() -> None:
    cli(main)


if __name__ == "__main__":
    serve_cli()
