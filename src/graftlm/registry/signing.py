"""Ed25519 signatures for bundles: who made a bundle, checked before anything in it is used.

A signature covers the exact bytes of a bundle's manifest.json, which lists every file by its sha256,
so it covers the whole bundle. It is stored raw (64 bytes) in manifest.sig; keys are PEM files (PKCS8
private, SubjectPublicKeyInfo public), as `openssl genpkey -algorithm ed25519` writes them, so that
`openssl pkeyutl -verify -rawin -pubin -inkey KEY.pub -in manifest.json -sigfile manifest.sig` checks
a bundle without graftlm.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from graftlm.registry.records import RegistryError

SIGNATURE_SIZE = 64
MAX_KEY_FILE = 64 * 1024  # a PEM key is a few hundred bytes; refuse to read a huge file whole

PrivateKey = Ed25519PrivateKey
PublicKey = Ed25519PublicKey


def public_path(key: Path) -> Path:
    """Where `keygen` puts the public half of the private key `key`: `KEY.pub`."""
    return key.with_name(key.name + ".pub")


def keygen(out: Path) -> tuple[Path, Path]:
    """Write a new private key to `out` (mode 0600) and its public key to `out.pub`; returns both paths.
    Neither file may exist already: a signing key is never overwritten."""
    pub = public_path(out)
    for p in (out, pub):
        if os.path.lexists(p):
            raise RegistryError(f"{p} already exists; refusing to overwrite a key")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _write_new(out, private_pem, 0o600)
    try:
        _write_new(pub, public_pem, 0o644)
    except BaseException:
        out.unlink(missing_ok=True)  # ours: written just above
        raise
    return out, pub


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Write a file whole or not at all, and never over an existing one (a hard link does not replace)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # mkstemp: mode 0600
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError as e:
            raise RegistryError(f"{path} already exists; refusing to overwrite a key") from e
    finally:
        tmp.unlink(missing_ok=True)


def _read_key_file(path: Path, what: str) -> bytes:
    try:
        size = path.stat().st_size
        if size > MAX_KEY_FILE:
            raise RegistryError(f"{path} is not a {what} (a file of {size} bytes)")
        return path.read_bytes()
    except FileNotFoundError as e:
        raise RegistryError(f"no {what} at {path}") from e
    except IsADirectoryError as e:
        raise RegistryError(f"{path} is a folder, not a {what}") from e


def load_private_key(path: Path) -> PrivateKey:
    """An ed25519 private key from a PEM file (unencrypted PKCS8, as `keygen` or openssl write it)."""
    data = _read_key_file(path, "private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError as e:  # the key is encrypted
        raise RegistryError(f"{path}: the key is encrypted; graftlm signs with an unencrypted key ({e})") from e
    except (ValueError, UnsupportedAlgorithm) as e:
        raise RegistryError(f"{path} is not a PEM private key ({e})") from e
    if not isinstance(key, Ed25519PrivateKey):
        raise RegistryError(f"{path} holds a {type(key).__name__}, not an ed25519 private key")
    return key


def load_public_key(path: Path) -> PublicKey:
    """An ed25519 public key from a PEM file (SubjectPublicKeyInfo, as `keygen` or `openssl pkey -pubout`)."""
    data = _read_key_file(path, "public key")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as e:
        raise RegistryError(f"{path} is not a PEM public key ({e}); pass KEY.pub, not the private key") from e
    if not isinstance(key, Ed25519PublicKey):
        raise RegistryError(f"{path} holds a {type(key).__name__}, not an ed25519 public key")
    return key


def fingerprint(key: PublicKey | PrivateKey) -> str:
    """A short name for a key: the first 16 hex characters of the sha256 of its raw public bytes."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def sign(key: PrivateKey, data: bytes) -> bytes:
    return key.sign(data)


def check_signature(data: bytes, signature: bytes, trusted: Sequence[PublicKey], where: str) -> PublicKey:
    """The trusted key that signed `data`; RegistryError if none did."""
    if not trusted:
        raise RegistryError(f"{where}: no trusted keys to check the signature against")
    if len(signature) != SIGNATURE_SIZE:
        raise RegistryError(
            f"{where}: the signature is not an ed25519 signature ({len(signature)} bytes, not {SIGNATURE_SIZE})"
        )
    for key in trusted:
        try:
            key.verify(signature, data)
            return key
        except InvalidSignature:
            continue
    names = ", ".join(fingerprint(k) for k in trusted)
    raise RegistryError(
        f"{where}: the signature matches none of the trusted keys ({names}): the manifest was changed after "
        "signing, or another key signed it; refused"
    )
