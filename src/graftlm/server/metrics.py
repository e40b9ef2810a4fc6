"""`/metrics` in Prometheus' text format: per-adapter counters, queue depth, batch size, memory."""

from __future__ import annotations

from collections.abc import Callable

from graftlm.engine.engine import Engine

ADAPTER_COUNTERS = (
    ("requests", 'requests finished, by adapter ("" = base model)'),
    ("prompt_tokens", "prompt tokens of finished requests"),
    ("completion_tokens", "tokens generated for finished requests"),
    ("hits", "requests whose adapter was resident"),
    ("misses", "requests that had to wait for their adapter to load"),
    ("evictions", "times the adapter was evicted from the cache"),
    ("loads", "times the adapter was loaded from disk"),
    ("load_failures", "failed loads (corrupt or mismatched files)"),
    ("load_seconds", "seconds spent loading the adapter"),
    ("spec_steps", "speculative decode steps (tokens per forward = (accepted + spec_steps) / spec_steps)"),
    ("drafted", "tokens drafted by speculation"),
    ("accepted", "drafted tokens the model accepted (acceptance = accepted / drafted)"),
)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render_metrics(engine: Engine, shown: Callable[[str], bool] | None = None) -> str:
    """Every counter; per-adapter ones only for the adapters `shown` accepts (None: all of them)."""
    lines: list[str] = []
    with engine.cache.lock:
        stats = {name: vars(st).copy() for name, st in engine.cache.stats.items() if shown is None or shown(name)}
        resident = len(engine.cache.resident())
    for field, doc in ADAPTER_COUNTERS:
        metric = f"graftlm_adapter_{field}_total"
        lines += [f"# HELP {metric} {doc}", f"# TYPE {metric} counter"]
        for name in sorted(stats):
            lines.append(f'{metric}{{adapter="{_label(name)}"}} {stats[name][field]}')
    gauges = (
        ("graftlm_queue_depth", "requests waiting to be admitted", engine.queue_depth),
        ("graftlm_batch_size", "rows in the running decode batch", engine.batch_size),
        ("graftlm_prefilling", "admitted requests still prefilling", len(engine.prefilling)),
        ("graftlm_adapters_resident", "adapters in the cache", resident),
        ("graftlm_adapter_slots", "adapter slots (the cache's capacity)", engine.slots.n_slots),
        ("graftlm_adapter_cache_bytes", "bytes reserved for adapter slots", engine.cache.nbytes),
        ("graftlm_kv_cache_bytes", "bytes reserved for the KV cache", engine.kv.nbytes),
    )
    for metric, doc, value in gauges:
        lines += [f"# HELP {metric} {doc}", f"# TYPE {metric} gauge", f"{metric} {value}"]
    counters = (
        ("graftlm_engine_steps_total", "engine iterations that ran the model", engine.steps),
        ("graftlm_generated_tokens_total", "tokens generated", engine.tokens_generated),
        ("graftlm_engine_step_errors_total", "engine steps that failed", engine.step_errors),
        ("graftlm_decode_steps_total", "decode steps", engine.decode_steps),
        ("graftlm_decode_rows_total", "rows decoded, summed over steps (/ steps = mean batch)", engine.decode_rows),
        ("graftlm_decode_seconds_total", "seconds spent in decode steps", round(engine.decode_seconds, 3)),
        ("graftlm_prefill_tokens_total", "prompt tokens prefilled (with padding)", engine.prefill_tokens),
        ("graftlm_prefill_seconds_total", "seconds spent prefilling", round(engine.prefill_seconds, 3)),
    )
    prefix = engine.prefix
    if prefix is not None:
        counters += (
            ("graftlm_prefix_cache_hits_total", "prompts that reused a cached prefix", prefix.hits),
            ("graftlm_prefix_cache_tokens_total", "prompt tokens taken from the prefix cache", prefix.tokens_reused),
            ("graftlm_prefix_cache_evictions_total", "prefix blocks evicted", prefix.evictions),
        )
        lines += [
            "# HELP graftlm_prefix_cache_bytes bytes of cached prefix keys and values",
            "# TYPE graftlm_prefix_cache_bytes gauge",
            f"graftlm_prefix_cache_bytes {prefix.nbytes}",
        ]
    for metric, doc, value in counters:
        lines += [f"# HELP {metric} {doc}", f"# TYPE {metric} counter", f"{metric} {value}"]
    return "\n".join(lines) + "\n"
