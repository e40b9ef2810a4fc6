"""`/metrics` of graftlm on Ray Serve: every replica keeps its latest Prometheus text in the cluster's
key-value store (Ray's GCS, where Ray Serve keeps its own state; no actor of graftlm's waking beside the
engines), and the replica answering `/metrics` merges them: every series summed, then each replica's with a
`replica` label, showing a caller only the adapters it may use."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable

KV_NAMESPACE = "graftlm"
SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")
ADAPTER_LABEL = re.compile(r'adapter="((?:[^"\\]|\\.)*)"')


def _key(app: str, replica: str = "") -> str:
    return f"metrics/{app}/{replica}"


def publish(app: str, replica: str, text: str) -> None:
    """Keep `replica`'s latest metrics (a blocking call to the GCS: run it off the event loop)."""
    from ray.experimental import internal_kv

    value = json.dumps({"at": time.time(), "text": text})
    internal_kv._internal_kv_put(_key(app, replica), value, namespace=KV_NAMESPACE)


def forget(app: str, replica: str) -> None:
    """Drop `replica`'s metrics (it is stopping)."""
    from ray.experimental import internal_kv

    internal_kv._internal_kv_del(_key(app, replica), namespace=KV_NAMESPACE)


def fresh(app: str, within_s: float) -> dict[str, str]:
    """Every replica's latest metrics written within `within_s`; older ones (replicas gone) are deleted."""
    from ray.experimental import internal_kv

    out: dict[str, str] = {}
    now = time.time()
    for key in internal_kv._internal_kv_list(_key(app), namespace=KV_NAMESPACE):
        raw = internal_kv._internal_kv_get(key, namespace=KV_NAMESPACE)
        try:
            entry = json.loads(raw) if raw is not None else {}
            recent = now - float(entry["at"]) <= within_s
        except (ValueError, KeyError, TypeError):
            recent = False
        if recent:
            out[key.decode().rpartition("/")[2]] = entry["text"]
        else:
            internal_kv._internal_kv_del(key, namespace=KV_NAMESPACE)
    return out


def visible(text: str, shown: Callable[[str], bool]) -> str:
    """`text` without the series of adapters `shown` rejects (`render_metrics`' rule, applied to a text)."""
    kept = []
    for line in text.splitlines():
        m = ADAPTER_LABEL.search(line) if not line.startswith("#") else None
        if m is None or shown(m.group(1).replace('\\"', '"').replace("\\\\", "\\")):
            kept.append(line)
    return "\n".join(kept) + "\n"


def merge(texts: dict[str, str]) -> str:
    """Prometheus texts of several replicas as one: every series summed over replicas, then each replica's
    series again with a `replica` label."""
    meta: dict[str, str] = {}
    totals: dict[str, float] = {}
    per_replica: list[str] = []
    for replica, text in sorted(texts.items()):
        for line in text.splitlines():
            if line.startswith("#"):
                meta.setdefault(line, line)
                continue
            m = SAMPLE.match(line.strip())
            if m is None:
                continue
            name, labels, value = m.group(1), m.group(2) or "", m.group(3)
            try:
                totals[name + labels] = totals.get(name + labels, 0.0) + float(value)
            except ValueError:
                continue
            inner = labels[1:-1]
            tagged = f'replica="{replica}"' + ("," + inner if inner else "")
            per_replica.append(f"{name}{{{tagged}}} {value}")
    lines = list(meta) + [f"{k} {_number(v)}" for k, v in totals.items()] + per_replica
    lines.append(f"graftlm_replicas {len(texts)}")
    return "\n".join(lines) + "\n"


def _number(v: float) -> str:
    return str(int(v)) if v == int(v) and abs(v) < 2**53 else repr(v)
