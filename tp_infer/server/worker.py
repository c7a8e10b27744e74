"""What a gateway in front of several replicas reads from each (the Shepherd Model Gateway, `smg`, and SGLang's
router before it): /server_info and /model_info when it registers the replica (and their older names /get_*), the
load it polls for load-aware routing, /v1/loads in SGLang's shape (running and waiting requests, KV pool use, cache
hit rate), and the cache flush it may pass on (carried out on the engine's thread, between two steps). /health
and /v1/models are the app's own.

The numbers are read from the engine's thread without a lock, as /metrics reads them: each is a length or a counter
that Python reads whole, and a snapshot a few microseconds old is what a load poll can use anyway."""

from __future__ import annotations

from dataclasses import asdict
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

from fastapi import APIRouter

from tp_infer.server.bridge import Busy, EngineLoop
from tp_infer.server.protocol import APIError, ErrorResponse

if TYPE_CHECKING:
    from tp_infer.server.app import ServerSettings


UNAUTHORIZED = {401: {"model": ErrorResponse, "description": "Missing or wrong API key (with --api-key)"}}


def package_version() -> str:
    try:
        return version("tp_infer")
    except PackageNotFoundError:  # run from a source tree that was not installed
        return "unknown"


def held_blocks(turns: list) -> int:
    """Blocks of the pool the given turns hold (a block several share counted once)."""
    return len({block for turn in turns if turn.table is not None for block in turn.table.blocks})


def worker_router(loop: EngineLoop, settings: ServerSettings) -> APIRouter:
    """The gateway-facing endpoints of one replica (one torchrun group: tensor parallel over its ranks)."""
    router = APIRouter()
    engine = loop.engine
    tp_size = engine.runner.ctx.world_size

    def pool_tokens() -> int:
        usage = engine.cache_usage()
        return usage.total_blocks * usage.block_size

    @router.get("/server_info", responses=UNAUTHORIZED)
    @router.get("/get_server_info", include_in_schema=False)
    async def server_info() -> dict:
        """SGLang's /server_info, the fields a gateway reads when it registers this replica."""
        return {
            "model_path": settings.model_name,
            "served_model_name": settings.model_name,
            "tp_size": tp_size,
            "dp_size": 1,  # one scheduler per replica: a gateway routes to the replica, not inside it
            "pp_size": 1,
            "context_length": settings.max_seq_len,
            "max_total_tokens": pool_tokens(),
            "max_running_requests": engine.max_running,
            "max_queued_requests": loop.max_in_flight - engine.max_running,
            "is_embedding": False,
            "version": package_version(),
            "engine": "tp_infer",
        }

    @router.get("/model_info", responses=UNAUTHORIZED)
    @router.get("/get_model_info", include_in_schema=False)
    async def model_info() -> dict:
        """SGLang's /model_info."""
        args = engine.runner.model.args
        return {
            "model_path": settings.model_name,
            "served_model_name": settings.model_name,
            "is_generation": True,
            "has_image_understanding": False,
            "has_audio_understanding": False,
            "model_type": args.model_type,
            "max_context_length": settings.max_seq_len,
            "vocab_size": args.vocab_size,
        }

    @router.get("/v1/loads", responses=UNAUTHORIZED)
    async def loads() -> dict:
        """SGLang's /v1/loads: this replica as one data-parallel rank. Waiting counts every accepted request not
        yet running, the ones still crossing over to the engine's thread included. Used tokens are the blocks the
        running turns hold, as SGLang counts them: cached prefixes nobody runs on are evicted on demand, and a
        gateway reading a pool full of cache as full would divert conversations away from their history
        (smg leaves a worker out of routing at 0.8 of it)."""
        usage, totals = engine.cache_usage(), engine.totals
        turns = list(engine.scheduler.running)
        running, in_flight = len(turns), loop.in_flight
        capacity = usage.total_blocks * usage.block_size
        used = held_blocks(turns) * usage.block_size
        load = {
            "dp_rank": 0,
            "num_running_reqs": running,
            "num_waiting_reqs": max(0, in_flight - running),
            "num_total_reqs": in_flight,
            "num_used_tokens": used,
            "max_total_num_tokens": capacity,
            "max_running_requests": engine.max_running,
            "token_usage": used / capacity if capacity else 0.0,
            "cache_hit_rate": totals.reused_tokens / totals.prompt_tokens if totals.prompt_tokens else 0.0,
            "utilization": running / engine.max_running,
            "gen_throughput": 0.0,  # not measured here: tp_infer_generated_tokens on /metrics counts them
        }
        stamp = datetime.now(timezone.utc).isoformat()
        return {"timestamp": stamp, "version": package_version(), "dp_rank_count": 1, "loads": [load]}

    @router.api_route("/flush_cache", methods=["GET", "POST"], include_in_schema=False)  # a control call
    @router.post("/reset_prefix_cache", include_in_schema=False)  # vLLM's name, AIPerf's --reset-kv-cache default
    async def flush_cache() -> dict:
        """SGLang's cache flush, which a gateway passes on to every replica (smg's POST /flush_cache): drops every
        cached block that no running turn holds, in the pool and in the host and disk tiers, between two steps of
        the engine. Running turns go on undisturbed; later turns recompute what they no longer find, to the same
        replies. Remembered reply ids are kept: they are the conversations' text, not cache."""
        try:
            dropped = await loop.command(lambda engine: engine.drop_cache())
        except Busy as e:
            raise APIError(503, f"the cache was not flushed: {e}", kind="server_error") from None
        return {"message": "Cache flushed.", **asdict(dropped)}

    return router
