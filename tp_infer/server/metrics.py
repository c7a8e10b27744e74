"""Prometheus metrics of the server, in a registry of its own: requests, tokens prompted, cached, computed and
generated (and restored from host memory and disk), time to first token and between tokens, turns running and
waiting, and the use of the pool and its tiers."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from tp_infer.engine.engine import Engine
from tp_infer.engine.request import Turn

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60)


class Metrics:
    def __init__(self, engine: Engine):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("tp_infer_requests", "Requests answered", ["endpoint", "status"], registry=registry)
        self.prompt_tokens = Counter("tp_infer_prompt_tokens", "Prompt tokens", registry=registry)
        self.cached_tokens = Counter("tp_infer_cached_tokens", "Prompt tokens found in the cache", registry=registry)
        self.restored_tokens = Counter(
            "tp_infer_restored_tokens", "Cached prompt tokens restored from a tier", ["tier"], registry=registry
        )
        self.computed_tokens = Counter("tp_infer_computed_tokens", "Prompt tokens prefilled", registry=registry)
        self.generated_tokens = Counter("tp_infer_generated_tokens", "Tokens generated", registry=registry)
        self.ttft = Histogram(
            "tp_infer_time_to_first_token_seconds", "Time to first token", buckets=LATENCY_BUCKETS, registry=registry
        )
        self.itl = Histogram(
            "tp_infer_inter_token_latency_seconds", "Time between tokens", buckets=LATENCY_BUCKETS, registry=registry
        )
        scheduler, manager = engine.scheduler, engine.manager
        gauges = {
            "tp_infer_running_turns": ("Turns running", lambda: len(scheduler.running)),
            "tp_infer_waiting_turns": ("Turns waiting", lambda: len(scheduler.waiting)),
            "tp_infer_pool_blocks_used": ("KV pool blocks in use", lambda: manager.allocator.num_used),
            "tp_infer_pool_blocks": ("KV pool blocks", lambda: manager.num_blocks),
            "tp_infer_pool_blocks_cached": ("Blocks the prefix tree holds", lambda: manager.tree.num_nodes),
            "tp_infer_pool_cached_tokens": ("Tokens the prefix tree holds", lambda: manager.tree.cached_tokens),
            "tp_infer_host_blocks": ("Blocks the host tier holds", lambda: engine.cache_usage().host_blocks),
            "tp_infer_disk_blocks": ("Blocks the disk tier holds", lambda: engine.cache_usage().disk_blocks),
        }
        for name, (doc, read) in gauges.items():
            Gauge(name, doc, registry=registry).set_function(read)

    def turn_done(self, turn: Turn, gaps: list[float]) -> None:
        s = turn.stats
        self.prompt_tokens.inc(s.prompt_tokens)
        self.cached_tokens.inc(s.reused_tokens)
        self.restored_tokens.labels("host").inc(s.host_tokens)
        self.restored_tokens.labels("disk").inc(s.disk_tokens)
        self.computed_tokens.inc(s.computed_tokens)
        self.generated_tokens.inc(len(turn.generated))
        if turn.generated:
            self.ttft.observe(turn.first_token_at - turn.submitted)
        for gap in gaps:
            self.itl.observe(gap)

    def text(self) -> bytes:
        return generate_latest(self.registry)
