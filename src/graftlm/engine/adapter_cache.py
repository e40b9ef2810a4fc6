"""The serving engine's adapters: found on disk, loaded on first use off the request path, kept in a
cache bounded in bytes (the preallocated adapter slots), least recently used evicted first.

Adapters are found by name through an `AdapterFinder` (a folder of PEFT adapters, or the registry),
or registered by path with `load`.

Rules the engine relies on:
- a cold adapter is read and installed by one loader thread; any number of requests waiting for it
  cause one load, and requests for other adapters keep running meanwhile;
- an adapter held by a running request (`refs > 0`) or pinned is never evicted;
- replacing an adapter (new files under the same name, or `load` with a new path) is a hot swap: the
  old weights stay in their slot until the last request using them finishes, new requests get the new ones;
- a corrupt or mismatched adapter fails its load with a clear error and touches no other slot.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from graftlm.engine.adapter_finder import NAME, AdapterFinder, AdapterFolder, Source, UnknownAdapterError
from graftlm.errors import GraftlmError
from graftlm.lora.config import AdapterError
from graftlm.lora.peft_io import WEIGHTS_FILE, Adapter, check_fits, open_adapter, read_adapter
from graftlm.lora.slots import AdapterSlots

log = logging.getLogger(__name__)


@dataclass
class AdapterStats:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    loads: int = 0
    load_failures: int = 0
    load_seconds: float = 0.0
    spec_steps: int = 0  # decode steps that verified drafts for its requests
    drafted: int = 0
    accepted: int = 0


@dataclass(eq=False)
class Entry:
    """One adapter version resident in (or loading into) a slot."""

    source: Source
    stamp: tuple[int, int, int]  # (inode, mtime_ns, size) of the weights file when the load started
    slot: int
    state: str = "loading"  # loading | ready | failed | retired
    refs: int = 0
    pinned: bool = False
    last_used: float = field(default_factory=time.monotonic)
    use_dora: bool = False
    load_ms: float = 0.0
    error: str = ""
    public: str = ""  # the reason of a failed load in words safe to show a client (see AdapterError.public)
    settled: threading.Event = field(default_factory=threading.Event)  # set when the load ends, either way


def _stamp(path: Path) -> tuple[int, int, int]:
    st = os.stat(path / WEIGHTS_FILE)
    return (st.st_ino, st.st_mtime_ns, st.st_size)


class AdapterCache:
    def __init__(self, slots: AdapterSlots, finder: AdapterFinder | Path | None = None, force: bool = False):
        self.slots = slots
        self.finder = AdapterFolder(finder) if isinstance(finder, Path) else finder
        self.force = force
        self.lock = threading.RLock()
        self.entries: dict[str, Entry] = {}  # key -> the current entry of that adapter version
        self.retired: list[Entry] = []  # replaced or unloaded, still held by running requests
        self.free = list(range(slots.n_slots - 1, -1, -1))
        self.registered: dict[str, Path] = {}  # name -> path, added through `load`
        self.stats: dict[str, AdapterStats] = {}
        self.on_change: Callable[[], None] = lambda: None  # the engine's wake-up
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="adapter-loader")

    # ---- names -------------------------------------------------------------------------------
    def resolve(self, ref: str) -> Source:
        """`name`, `name@version` (or whatever the finder allows) to the folder it names; an adapter
        registered by `load` wins; unknown names raise UnknownAdapterError."""
        name, _, version = ref.partition("@")
        if not NAME.match(name):
            raise UnknownAdapterError(f"{ref[:80]!r} is not a valid adapter name")
        if name in self.registered:
            if version:
                raise UnknownAdapterError(
                    f"adapter {name} was loaded from a path and has no version {version!r}", known=True
                )
            return Source(name, "", self.registered[name])
        found = self.finder.resolve(ref) if self.finder is not None else None
        if found is None:  # no list of the others: a client may not be allowed to know them
            raise UnknownAdapterError(f"adapter {name!r} not found")
        return found

    def names(self) -> list[str]:
        """Every adapter a request may name."""
        return sorted(set(self.registered) | set(self.finder.names() if self.finder else ()))

    # ---- the engine's side -------------------------------------------------------------------
    def try_acquire(self, sources: Iterable[Source], first_try: bool) -> list[Entry] | None:
        """Hold every adapter in `sources` if all are resident, else start loading the missing ones and
        return None (the request waits). A failed load raises AdapterError for the waiting request."""
        sources = list(sources)
        with self.lock:
            entries = []
            for src in sources:
                entry = self.entries.get(src.key)
                if entry is not None and entry.state == "failed":
                    if not (first_try and self._replaced(entry)):
                        raise AdapterError(f"adapter {src.key} failed to load: {entry.error}", entry.public)
                    del self.entries[src.key]  # its files changed since: try again
                    entry = None
                if entry is not None and entry.state == "ready" and not entry.pinned and self._replaced(entry):
                    self._retire(entry)
                    entry = None
                if first_try:
                    st = self._stat(src.name)
                    if entry is not None and entry.state == "ready":
                        st.hits += 1
                    else:
                        st.misses += 1
                if entry is None:
                    entry = self._start_load(src)
                entries.append(entry)
            if any(e is None for e in entries) and self._pinned() + len(sources) > self.slots.n_slots:
                # no slot will ever come free for it: fail now rather than wait forever
                raise AdapterError(
                    f"{len(sources)} adapter slot(s) needed, but {self._pinned()} of the server's "
                    f"{self.slots.n_slots} are pinned",
                    "every adapter slot this request needs is pinned by other adapters",
                )
            if any(e is None or e.state != "ready" for e in entries):
                return None
            now = time.monotonic()
            for e in entries:
                e.refs += 1
                e.last_used = now
            return entries

    def release(self, entries: Iterable[Entry]) -> None:
        with self.lock:
            for e in entries:
                e.refs -= 1
                e.last_used = time.monotonic()
                if e.state == "retired" and e.refs == 0:
                    self._free_slot(e)

    # ---- the operator's side -----------------------------------------------------------------
    def load(self, name: str, path: Path | None = None, pin: bool = False) -> Entry:
        """Load (or reload) an adapter now; with `path`, register it under `name`. A bad adapter raises
        AdapterError and leaves no trace (no name, slot or counter); a good one replaces the old version
        (hot swap). A name the finder serves cannot be taken over by a path."""
        if not NAME.match(name):
            raise AdapterError(f"{name[:80]!r} is not a valid adapter name (letters, digits, '.', '_', '-')")
        if path is not None and name not in self.registered and self._found(name):
            msg = f"{name} is served from the adapters on disk; load the path under another name"
            raise AdapterError(msg, msg)
        src = Source(name, "", Path(path)) if path is not None else self.resolve(name)
        adapter = read_adapter(src.path, dtype=None)  # raises on a corrupt or malformed adapter
        check_fits(adapter, self.slots.model, self.force)
        self._check_rank(adapter)
        stamp = _stamp(src.path)
        with self.lock:
            slot = self._reserve_slot()
            if slot is None:
                msg = f"no free adapter slot for {name}: all {self.slots.n_slots} are in use or pinned"
                raise AdapterError(msg, msg)
        t0 = time.perf_counter()
        try:
            self.slots.load(slot, adapter, checked=True)
        except BaseException:
            with self.lock:
                self.slots.clear(slot)
                self.free.append(slot)
            raise
        entry = Entry(src, stamp, slot, state="ready", use_dora=adapter.config.use_dora)
        entry.load_ms = (time.perf_counter() - t0) * 1000
        entry.settled.set()
        with self.lock:
            old = self.entries.get(src.key)
            if old is not None:
                entry.pinned = old.pinned
                self._retire(old)
            entry.pinned = entry.pinned or pin
            if path is not None:
                self.registered[name] = Path(path)
            self.entries[src.key] = entry
            st = self._stat(src.name)
            st.loads += 1
            st.load_seconds += entry.load_ms / 1000
        log.info("loaded adapter %s into slot %d in %.1f ms", src.key, slot, entry.load_ms)
        self.on_change()
        return entry

    def _found(self, name: str) -> bool:
        """Does the finder serve `name` (with any version)?"""
        try:
            return self.finder is not None and self.finder.resolve(name) is not None
        except UnknownAdapterError:
            return True  # known, without a usable version

    def unload(self, name: str) -> bool:
        """Drop an adapter from memory (at once, or when its last running request ends). False if it
        was not loaded. An adapter registered by path is forgotten; one on disk may be loaded again."""
        with self.lock:
            self.registered.pop(name, None)
            hit = [e for k, e in list(self.entries.items()) if e.source.name == name or k == name]
            for e in hit:
                self._retire(e)
            return bool(hit)

    def pin(self, name: str, pinned: bool = True) -> None:
        """Keep an adapter resident whatever the traffic (loads it if needed)."""
        src = self.resolve(name)
        with self.lock:
            entry = self.entries.get(src.key)
            if entry is None or entry.state == "failed":
                entry = self._start_load(src)
                if entry is None:
                    raise AdapterError(f"no free adapter slot to pin {name}")
            entry.pinned = pinned

    def wait_ready(self, name: str, timeout: float = 30.0) -> Entry:
        """Block until `name` is resident (for tests and warm-up); raise its load error if it failed."""
        src = self.resolve(name)
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            with self.lock:
                e = self.entries.get(src.key)
            if e is None:
                raise AdapterError(f"adapter {src.key} is not loading")
            e.settled.wait(left)
            with self.lock:
                if e.state == "ready":
                    return e
                if e.state == "failed":
                    raise AdapterError(f"adapter {src.key} failed to load: {e.error}", e.public)
        raise TimeoutError(f"adapter {name} not loaded within {timeout} s")

    def resident(self) -> list[Entry]:
        with self.lock:
            return [e for e in self.entries.values() if e.state == "ready"] + list(self.retired)

    @property
    def nbytes(self) -> int:
        return self.slots.nbytes

    def close(self) -> None:
        self._loader.shutdown(wait=True, cancel_futures=True)

    # ---- internals (lock held) ---------------------------------------------------------------
    def stat(self, name: str) -> AdapterStats:
        """The counters of one adapter (created on first use; "" is the base model)."""
        with self.lock:
            return self._stat(name)

    def _stat(self, name: str) -> AdapterStats:
        return self.stats.setdefault(name, AdapterStats())

    def _pinned(self) -> int:
        """Slots that stay taken whatever happens: pinned adapters, loaded or loading."""
        return sum(e.pinned and e.state in ("ready", "loading") for e in self.entries.values())

    def _replaced(self, entry: Entry) -> bool:
        """Have the adapter's files changed since it was loaded (a hot swap on disk)?"""
        try:
            return _stamp(entry.source.path) != entry.stamp
        except OSError:
            return False  # gone from disk: keep serving what is loaded

    def _retire(self, entry: Entry) -> None:
        if self.entries.get(entry.source.key) is entry:
            del self.entries[entry.source.key]
        if entry.state == "loading":
            entry.state = "retired"  # the loader frees the slot when it finishes
            return
        entry.state = "retired"
        if entry.refs == 0:
            self._free_slot(entry)
        else:
            self.retired.append(entry)

    def _free_slot(self, entry: Entry) -> None:
        if entry in self.retired:
            self.retired.remove(entry)
        if entry.slot >= 0:
            self.slots.clear(entry.slot)  # zero the slot: nothing of the adapter stays in memory
            self.free.append(entry.slot)
            entry.slot = -1

    def _reserve_slot(self) -> int | None:
        if self.free:
            return self.free.pop()
        idle = [e for e in self.entries.values() if e.state == "ready" and e.refs == 0 and not e.pinned]
        if not idle:
            return None
        victim = min(idle, key=lambda e: e.last_used)
        del self.entries[victim.source.key]
        victim.state = "retired"
        self._stat(victim.source.name).evictions += 1
        log.info("evicted adapter %s from slot %d", victim.source.key, victim.slot)
        slot, victim.slot = victim.slot, -1
        return slot

    def _start_load(self, src: Source) -> Entry | None:
        try:
            stamp = _stamp(src.path)
        except OSError as e:
            entry = Entry(src, (0, 0, 0), -1, state="failed", error=f"cannot read {src.path}: {e}")
            entry.public = "its weights file cannot be read"
            self.entries[src.key] = entry
            return entry
        slot = self._reserve_slot()
        if slot is None:
            return None  # every slot is held by running requests: try again after one finishes
        entry = Entry(src, stamp, slot)
        self.entries[src.key] = entry
        self._loader.submit(self._load, entry)
        return entry

    def _load(self, entry: Entry) -> None:
        t0 = time.perf_counter()
        error = public = ""
        try:
            with open_adapter(entry.source.path) as lazy:  # tensors stream into the slot as read
                check_fits(lazy, self.slots.model, self.force)
                self._check_rank(lazy)
                self.slots.load(entry.slot, lazy, checked=True)
                use_dora = lazy.config.use_dora
        except AdapterError as e:
            error, public = str(e), e.public or ""
        except (GraftlmError, OSError) as e:
            error = str(e)
        except Exception as e:  # a bug must not kill the loader thread
            log.exception("loading adapter %s", entry.source.key)
            error = f"{type(e).__name__}: {e}"
        seconds = time.perf_counter() - t0
        with self.lock:
            st = self._stat(entry.source.name)
            if error:
                st.load_failures += 1
                log.warning("adapter %s failed to load: %s", entry.source.key, error)
                entry.error, entry.public = error, public
                self.slots.clear(entry.slot)
                self.free.append(entry.slot)
                entry.slot = -1
                entry.state = "failed" if entry.state == "loading" else entry.state
            else:
                st.loads += 1
                st.load_seconds += seconds
                entry.load_ms = seconds * 1000
                entry.use_dora = use_dora
                if entry.state == "retired":  # replaced or unloaded while loading
                    self._free_slot(entry)
                else:
                    entry.state = "ready"
                    log.info("loaded adapter %s into slot %d in %.1f ms", entry.source.key, entry.slot, entry.load_ms)
            entry.settled.set()
        self.on_change()

    def _check_rank(self, adapter: Adapter) -> None:
        ranks = [adapter.config.rank_alpha(p)[0] for p in adapter.modules()]
        if max(ranks, default=0) > self.slots.r_max:
            raise AdapterError(
                f"adapter {adapter.name} has rank {max(ranks)}; this server's slots hold rank <= "
                f"{self.slots.r_max} (start it with a larger --max-rank)",
                f"its rank is larger than this server's slots hold ({self.slots.r_max})",
            )
