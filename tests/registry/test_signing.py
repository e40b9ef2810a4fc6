"""Signed bundles: ed25519 over the exact bytes of manifest.json, checked before anything is written."""

from __future__ import annotations

import json
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from graftlm.cli.main import main
from graftlm.registry import Registry, RegistryError, signing
from graftlm.registry.bundle import export, import_bundle
from tests.registry.test_store import fake_adapter


@pytest.fixture
def server(tmp_path: Path) -> Registry:
    reg = Registry(tmp_path / "server")
    reg.publish(fake_adapter(tmp_path / "a", 0), "s", aliases=["prod"])
    return reg


def keys(tmp_path: Path, name: str) -> tuple[signing.PrivateKey, signing.PublicKey]:
    private, public = signing.keygen(tmp_path / "keys" / name)
    return signing.load_private_key(private), signing.load_public_key(public)


def test_keygen_writes_a_private_key_only_its_owner_reads_and_never_overwrites(tmp_path: Path) -> None:
    private, public = signing.keygen(tmp_path / "k")
    assert public == tmp_path / "k.pub"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert private.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert public.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    before = private.read_bytes()
    with pytest.raises(RegistryError, match="already exists; refusing to overwrite a key"):
        signing.keygen(tmp_path / "k")
    assert private.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["k", "k.pub"]
    with pytest.raises(RegistryError, match="not a PEM public key"):
        signing.load_public_key(private)
    with pytest.raises(RegistryError, match="no public key at"):
        signing.load_public_key(tmp_path / "missing.pub")


def test_a_signed_bundle_imports_with_any_trusted_key(server: Registry, tmp_path: Path) -> None:
    (k1, p1), (_, p2) = keys(tmp_path, "one"), keys(tmp_path, "two")
    export(server, ["s@prod"], tmp_path / "b", sign_with=k1)
    assert len((tmp_path / "b" / "manifest.sig").read_bytes()) == 64
    device = Registry(tmp_path / "device")
    assert [v.ref for v in import_bundle(device, tmp_path / "b", trust=[p2, p1])] == ["s@1"]
    assert device.resolve("s@prod").version == 1 and device.verify() == []
    assert import_bundle(Registry(tmp_path / "plain"), tmp_path / "b")[0].ref == "s@1"  # no --trust: as before


def test_unsigned_tampered_and_foreign_bundles_are_refused(server: Registry, tmp_path: Path) -> None:
    (k1, p1), (k2, _) = keys(tmp_path, "one"), keys(tmp_path, "two")
    device = Registry(tmp_path / "device")
    export(server, ["s@prod"], tmp_path / "unsigned")
    with pytest.raises(RegistryError, match=r"is not signed \(it has no manifest\.sig\)"):
        import_bundle(device, tmp_path / "unsigned", trust=[p1])

    export(server, ["s@prod"], tmp_path / "foreign", sign_with=k2)
    with pytest.raises(RegistryError, match="the signature matches none of the trusted keys"):
        import_bundle(device, tmp_path / "foreign", trust=[p1])

    export(server, ["s@prod"], tmp_path / "tampered", sign_with=k1)
    m = tmp_path / "tampered" / "manifest.json"
    m.write_text(json.dumps(json.loads(m.read_text()) | {"since": []}))  # same meaning, other bytes
    with pytest.raises(RegistryError, match="the manifest was changed after signing"):
        import_bundle(device, tmp_path / "tampered", trust=[p1])

    export(server, ["s@prod"], tmp_path / "short", sign_with=k1)
    (tmp_path / "short" / "manifest.sig").write_bytes(b"abc")
    with pytest.raises(RegistryError, match=r"not an ed25519 signature \(3 bytes"):
        import_bundle(device, tmp_path / "short", trust=[p1])

    export(server, ["s@prod"], tmp_path / "linked", sign_with=k1)
    sig = tmp_path / "linked" / "manifest.sig"
    shutil.move(sig, tmp_path / "elsewhere.sig")
    sig.symlink_to(tmp_path / "elsewhere.sig")
    with pytest.raises(RegistryError, match=r"manifest\.sig is a link"):
        import_bundle(device, tmp_path / "linked", trust=[p1])
    assert device.versions() == [] and list(device.blobs.all()) == []


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl on PATH")
def test_openssl_keys_sign_and_check_bundles(server: Registry, tmp_path: Path) -> None:
    key, pub = tmp_path / "k.pem", tmp_path / "k.pem.pub"
    subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(key)], check=True)
    subprocess.run(["openssl", "pkey", "-in", str(key), "-pubout", "-out", str(pub)], check=True)
    export(server, ["s@prod"], tmp_path / "b", sign_with=signing.load_private_key(key))
    device = Registry(tmp_path / "device")
    assert import_bundle(device, tmp_path / "b", trust=[signing.load_public_key(pub)])[0].ref == "s@1"
    b = tmp_path / "b"
    check = ["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", str(pub), "-rawin"]
    check += ["-in", str(b / "manifest.json"), "-sigfile", str(b / "manifest.sig")]
    done = subprocess.run(check, capture_output=True, text=True)
    if "rawin" in done.stderr:  # an openssl before 3.0 cannot check ed25519 over a file
        pytest.skip("this openssl has no -rawin")
    assert done.returncode == 0, done.stderr


def said(capsys: pytest.CaptureFixture[str]) -> str:
    """What the CLI printed to stdout and stderr, with rich's line wrapping undone."""
    out, err = capsys.readouterr()
    return " ".join((out + err).split())


def test_cli_keygen_export_sign_and_import_trust(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GRAFTLM_REGISTRY", raising=False)
    server, device = ["--registry", str(tmp_path / "server")], ["--registry", str(tmp_path / "device")]
    key = str(tmp_path / "key")
    assert main(["registry", "keygen", "--out", key, *server]) == 0
    assert "key.pub" in said(capsys)
    assert main(["registry", "keygen", "--out", key, *server]) == 2
    assert "refusing to overwrite a key" in said(capsys)

    assert (
        main(["registry", "publish", str(fake_adapter(tmp_path / "a", 0)), "--name", "s", "--alias", "prod", *server])
        == 0
    )
    assert main(["registry", "export", "s@prod", "--out", str(tmp_path / "signed"), "--sign", key, *server]) == 0
    assert "signed by key" in said(capsys)
    assert main(["registry", "export", "s@prod", "--out", str(tmp_path / "unsigned"), *server]) == 0

    assert main(["registry", "import", str(tmp_path / "unsigned"), "--trust", key + ".pub", *device]) == 2
    assert "is not signed" in said(capsys)
    assert not (tmp_path / "device").exists()  # refused before the registry was even made
    assert main(["registry", "import", str(tmp_path / "signed"), "--trust", key, *device]) == 2
    assert "not a PEM public key" in said(capsys)

    assert main(["registry", "import", str(tmp_path / "signed"), "--trust", key + ".pub", *device]) == 0
    assert "imported s@1" in (out := said(capsys)) and "signed by trusted key" in out
    assert main(["registry", "import", str(tmp_path / "unsigned"), *device]) == 0
    assert "unsigned" in said(capsys)
    assert main(["registry", "verify", *device]) == 0


def test_cli_verify_reports_a_tampered_tree(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    reg = Registry(tmp_path / "reg")
    tree = reg.checkout(reg.publish(fake_adapter(tmp_path / "a", 0), "s"))
    (tree / "extra.bin").write_bytes(b"x")
    assert main(["registry", "verify", "--quick", "--registry", str(reg.root)]) == 1
    assert "tree/s/1/extra.bin is not a file of s@1" in said(capsys)
