"""Command line: `torchrun --nproc-per-node N -m tp_infer.serve --ckpt-path DIR [--host 127.0.0.1] [--port 8000]`.
Every rank loads its shard; rank 0 runs the engine on its main thread and the OpenAI-compatible HTTP server on
another; the other ranks follow."""

import json
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
from tp_infer.server.app import MAX_BODY_BYTES, MAX_MESSAGES, ServerSettings, build_app
from tp_infer.server.bridge import EngineLoop
from tp_infer.server.metrics import Metrics
from tp_infer.tokenizer import ChatTokenizer


def trained_length(config_path: Path) -> int | None:
    """The longest sequence a Hugging Face config says the model was made for (max_position_embeddings); None if it
    says none. (A reference config's max_seq_len is a runtime option, which the engine's max_seq_len already is.)"""
    try:
        raw = json.loads(config_path.read_text())
    except (OSError, ValueError):
        return None  # loading the model has read it already: nothing to add
    value = raw.get("max_position_embeddings") if isinstance(raw, dict) and "model_type" in raw else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def max_model_len(engine: Engine, config_path: Path) -> int:
    """The longest conversation (prompt and reply) this server runs: the engine's max_seq_len (already no more than
    the pool holds), the pool's capacity, and what the model's config allows."""
    manager = engine.manager
    limits = [engine.max_seq_len, manager.num_blocks * manager.block_size, trained_length(config_path)]
    return min(x for x in limits if x is not None)


@dataclass
class ServerFrontEnd(FrontEnd):
    host: str
    port: int
    api_keys: tuple[str, ...]
    model_name: str
    max_waiting: int
    config_path: Path
    max_body_bytes: int = MAX_BODY_BYTES
    max_messages: int = MAX_MESSAGES
    require_cache_salt: bool = False
    salt_with_api_key: bool = False
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
        engine.max_seq_len = max_model_len(engine, self.config_path)  # what /v1/models reports is what runs
        loop = EngineLoop(engine, self.max_waiting)
        settings = ServerSettings(
            model_name=self.model_name,
            max_seq_len=engine.max_seq_len,
            sampling=sampling,
            api_keys=self.api_keys,
            max_body_bytes=self.max_body_bytes,
            max_messages=self.max_messages,
            require_cache_salt=self.require_cache_salt,
            salt_with_api_key=self.salt_with_api_key,
        )
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
    "api_keys",
    multiple=True,
    envvar="TP_INFER_API_KEY",
    help="Require `Authorization: Bearer KEY` on every endpoint but /health (or set TP_INFER_API_KEY); give it "
    "once per client to let several keys in.",
)
@click.option("--served-model-name", help="The model's name in the API (default: the checkpoint folder's name).")
@click.option(
    "--max-waiting",
    default=256,
    show_default=True,
    type=click.IntRange(min=0),
    help="Requests that may wait beyond the running turns; more are answered 503.",
)
@click.option(
    "--max-body-bytes",
    default=MAX_BODY_BYTES,
    show_default=True,
    type=click.IntRange(min=1),
    help="Largest request body; larger ones are answered 413 before they are read.",
)
@click.option(
    "--max-messages",
    default=MAX_MESSAGES,
    show_default=True,
    type=click.IntRange(min=1),
    help="Most messages in a chat request; more are answered 400 before rendering.",
)
@click.option(
    "--require-cache-salt",
    is_flag=True,
    help="Answer 400 to requests without a `cache_salt` (requests share cached prefixes only with the same salt).",
)
@click.option(
    "--salt-with-api-key",
    is_flag=True,
    help="Make the client's API key part of its cache salt, so that clients with different keys never share "
    "cached prefixes (nor learn each other's prompts from cached_tokens).",
)
def main(
    host,
    port,
    api_keys,
    served_model_name,
    max_waiting,
    max_body_bytes,
    max_messages,
    require_cache_salt,
    salt_with_api_key,
    **options,
):
    """OpenAI-compatible chat server: every request's history is found in the cache, whoever sent it (with the
    same cache_salt)."""
    name = served_model_name or Path(options["ckpt_path"]).resolve().name
    config_path = Path(options["config_path"] or Path(options["ckpt_path"]) / "config.json")
    keys = tuple(key for key in api_keys if key)
    start(
        lambda: ServerFrontEnd(
            host=host,
            port=port,
            api_keys=keys,
            model_name=name,
            max_waiting=max_waiting,
            config_path=config_path,
            max_body_bytes=max_body_bytes,
            max_messages=max_messages,
            require_cache_salt=require_cache_salt,
            salt_with_api_key=salt_with_api_key,
        ),
        **options,
    )


def serve_cli() -> None:
    cli(main)


if __name__ == "__main__":
    serve_cli()
