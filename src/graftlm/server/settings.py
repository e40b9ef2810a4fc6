"""What an HTTP server allows: who may call it, what administration is open, and how large a request may be."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from graftlm.errors import GraftlmError
from graftlm.server.auth import KeyRing
from graftlm.setting import setting


@dataclass(frozen=True)
class ServerSettings:
    model_name: str  # the base model's name in the API: a request naming it uses no adapter
    keys: KeyRing = field(default_factory=KeyRing)  # empty: no authentication (loopback only)
    allow_runtime_loading: bool = setting(False, "open /v1/load_lora_adapter and /v1/unload_lora_adapter to admin keys")
    adapter_root: Path | None = setting(
        None, "the folder runtime loads may read from (by default the --adapters folder)", metavar="DIR"
    )
    max_body_mb: float = setting(4.0, "largest request body, in MB; a larger one gets 413 before it is parsed")
    max_choices: int = setting(64, "most completions (prompts x n) in one request")

    def __post_init__(self) -> None:
        if self.allow_runtime_loading:
            if not self.keys.has_admin:
                raise GraftlmError(
                    "runtime loading needs an admin key: pass --api-key, or a --keys file with admin = true"
                )
            if self.adapter_root is None or not self.adapter_root.is_dir():
                raise GraftlmError("runtime loading needs a folder to load from: --adapters or --adapter-root DIR")
        if self.max_body_bytes < 1024 or self.max_choices < 1:
            raise GraftlmError("the body limit is at least 1 KiB and max choices at least 1")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 2**20)


def check_host(host: str, keys: KeyRing, insecure: bool) -> None:
    """Without keys a server answers anyone who reaches it: only loopback, unless told otherwise."""
    if keys or insecure or is_loopback(host):
        return
    raise GraftlmError(
        f"refusing to listen on {host} without API keys: anyone who can reach it could use and read every "
        "adapter. Pass --api-key or --keys, or --insecure if the network in front of it is trusted"
    )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
