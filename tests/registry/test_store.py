"""The registry: versions, lineage, aliases, rollback, delete, gc, verify, diff and bundles."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from graftlm.fileio import file_sha256
from graftlm.registry import Registry, RegistryError
from graftlm.registry.bundle import export, import_bundle, read_manifest
from graftlm.registry.records import Ref, diff


def fake_adapter(folder: Path, seed: int, record: dict | None = None) -> Path:
    """An adapter-shaped folder: a real safetensors header with a base fingerprint, and seeded bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    header = json.dumps({"__metadata__": {"graftlm.base_fingerprint": "base0"}}).encode()
    payload = bytes((seed * 7 + i) % 251 for i in range(4096))
    (folder / "adapter_model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + payload)
    if record is not None:
        (folder / "training.json").write_text(json.dumps(record))
    return folder


def test_publish_stores_every_file_once_with_lineage(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg")
    record = {
        "graftlm_version": "0.1.0",
        "base_model": {"name": "tiny", "fingerprint": "basefp"},
        "data": {"train": {"path": "t.jsonl", "sha256": "d" * 64}, "valid": None},
        "config": {"lr": 0.001},
        "init_from": {"path": "recovery", "sha256": "e" * 64},
    }
    a = fake_adapter(tmp_path / "a", 1, record)
    v1 = reg.publish(a, "summarize", metrics={"rouge_l": 0.4})
    v2 = reg.publish(a, "summarize")  # same bytes: a new version, no new blobs
    assert (v1.version, v2.version) == (1, 2)
    assert len(list(reg.blobs.all())) == 3
    assert v1.lineage["base_fingerprint"] == "basefp"
    assert v1.lineage["data"] == {"train": {"sha256": "d" * 64, "path": "t.jsonl"}}
    assert v1.lineage["parent"]["sha256"] == "e" * 64 and v1.lineage["code_version"] == "0.1.0"
    tree = reg.checkout(reg.resolve("summarize@1"))
    for f in a.iterdir():
        assert file_sha256(tree / f.name) == file_sha256(f) == v1.files[f.name].sha256
    assert reg.verify() == []


def test_references_aliases_and_rollback(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg")
    for i in range(3):
        reg.publish(fake_adapter(tmp_path / f"a{i}", i), "s", aliases=["staging"] if i == 2 else [])
    assert reg.resolve("s").version == 3  # no prod yet: the latest
    reg.promote("s@1")
    assert reg.resolve("s").version == 1 and reg.resolve("s@prod").version == 1
    assert reg.resolve("s@staging").version == 3
    reg.promote("s@staging")
    assert reg.resolve("s@prod").version == 3
    assert reg.rollback("s") == (3, 1)
    assert reg.resolve("s").version == 1
    assert [m["version"] for m in reg.history("s")] == [1, 3, 1]
    for bad, message in (
        ("nope", "no adapter named 'nope'"),
        ("s@9", "no version 9"),
        ("s@canary", "no alias 'canary'"),
        ("s@bad alias", "version number or an alias"),
    ):
        with pytest.raises(RegistryError, match=message):
            reg.resolve(bad)
    with pytest.raises(RegistryError, match="not a valid alias"):
        reg.promote("s@2", alias="7")
    with pytest.raises(RegistryError, match="no earlier version"):
        reg.rollback("s", "staging")


def test_publish_refuses_what_is_not_an_adapter(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RegistryError, match=r"lacks adapter_config\.json"):
        reg.publish(tmp_path / "empty", "x")
    with pytest.raises(RegistryError, match="not a valid adapter name"):
        reg.publish(fake_adapter(tmp_path / "a", 0), "bad/name")
    with pytest.raises(RegistryError, match="no registry"):
        Registry(tmp_path / "missing", create=False)
    assert reg.versions() == []


def test_delete_gc_and_verify(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg")
    reg.publish(fake_adapter(tmp_path / "a", 0), "s", aliases=["prod"])
    v2 = reg.publish(fake_adapter(tmp_path / "b", 1), "s")
    reg.checkout(v2)
    with pytest.raises(RegistryError, match="is prod"):
        reg.delete("s@1")
    with pytest.raises(RegistryError, match="name the version"):
        reg.delete("s")
    reg.delete("s@2")
    report = reg.gc()
    assert report.blobs == 1 and report.trees == 0  # the config is shared with s@1; the tree went with delete
    assert reg.verify() == []
    (blob,) = [sha for sha in reg.blobs.all() if reg.resolve("s@1").files["adapter_model.safetensors"].sha256 == sha]
    path = reg.blobs.path(blob)
    os.chmod(path, 0o644)
    path.write_bytes(b"tampered")
    assert reg.verify() == ["s@1: adapter_model.safetensors does not match its sha256"]
    path.unlink()
    assert reg.verify(rehash=False) == ["s@1: adapter_model.safetensors is missing"]
    reg.delete("s@1", force=True)
    assert reg.aliases() == {} and reg.versions() == []


def test_diff_names_what_changed(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg")
    rec = {"data": {"train": {"sha256": "1" * 64}}, "config": {"lr": 0.1}}
    a = reg.publish(fake_adapter(tmp_path / "a", 0, rec), "s", metrics={"score": 0.5})
    rec["config"]["lr"] = 0.2
    b = reg.publish(fake_adapter(tmp_path / "b", 1, rec), "s", metrics={"score": 0.6})
    d = diff(a, b)
    assert d["files"]["changed"] == ["adapter_model.safetensors", "training.json"]
    assert d["lineage"] == {"config.lr": (0.1, 0.2)}
    assert d["metrics"] == {"score": (0.5, 0.6)}


def test_bundles_sync_only_what_changed_and_refuse_tampering(tmp_path: Path) -> None:
    server = Registry(tmp_path / "server")
    server.publish(fake_adapter(tmp_path / "a", 0), "s", aliases=["prod"])
    v2 = server.publish(fake_adapter(tmp_path / "b", 1), "s")
    full = export(server, ["s@prod"], tmp_path / "full")
    assert len(full["files"]) == 2 and full["adapters"][0]["aliases"] == ["prod"]
    device = Registry(tmp_path / "device")
    assert [v.ref for v in import_bundle(device, tmp_path / "full")] == ["s@1"]
    assert device.resolve("s").version == 1

    server.promote("s@2")
    delta = export(server, ["s@prod"], tmp_path / "delta", since=["s@1"])
    assert list(delta["files"]) == [v2.files["adapter_model.safetensors"].sha256]  # the config did not change
    with pytest.raises(RegistryError, match="not in this delta bundle"):
        import_bundle(Registry(tmp_path / "fresh"), tmp_path / "delta")
    assert import_bundle(device, tmp_path / "delta")[0].ref == "s@2"
    assert device.resolve("s@prod").version == 2 and device.verify() == []
    assert import_bundle(device, tmp_path / "delta") == []  # again: nothing new

    sha = next(iter(delta["files"]))
    (tmp_path / "delta" / sha).write_bytes(b"x" * delta["files"][sha])  # same size, other bytes
    other = Registry(tmp_path / "other")
    import_bundle(other, tmp_path / "full")
    with pytest.raises(RegistryError, match="does not match its sha256; refused"):
        import_bundle(other, tmp_path / "delta")
    assert [v.ref for v in other.versions()] == ["s@1"] and other.verify() == []
    (tmp_path / "delta" / "manifest.json").write_text("{")
    with pytest.raises(RegistryError, match="not valid JSON"):
        read_manifest(tmp_path / "delta")


def test_ref_parsing() -> None:
    assert Ref.parse("a") == Ref("a")
    assert Ref.parse("a@12") == Ref("a", version=12)
    assert Ref.parse("a@prod") == Ref("a", alias="prod")
    assert str(Ref.parse("a@prod")) == "a@prod"


CRASHER = """
import sys, random
from pathlib import Path
from graftlm.registry import Registry
reg, src, seed = Registry(Path(sys.argv[1])), Path(sys.argv[2]), int(sys.argv[3])
rng = random.Random(seed)
folders = sorted(p for p in src.iterdir())
print("ready", flush=True)
while True:
    v = reg.publish(rng.choice(folders), rng.choice(["a", "b"]), aliases=["staging"] if rng.random() < 0.3 else [])
    reg.promote(v.ref)
    if rng.random() < 0.2:
        try:
            reg.rollback(v.name)
        except Exception:
            pass
"""


def test_sigkill_during_publish_and_promote_leaves_a_consistent_registry(tmp_path: Path) -> None:
    """50 trials: kill the writer at a random moment; the registry must open, every file must match its
    hash, every alias must point at a complete version, and a gc must leave it whole."""
    import random
    import time

    src = tmp_path / "src"
    for i in range(4):
        fake_adapter(src / f"f{i}", i)
        (src / f"f{i}" / "big.bin").write_bytes(os.urandom(1 << 20))  # writes take long enough to interrupt
    root = tmp_path / "reg"
    Registry(root)
    rng = random.Random(0)
    leftovers = 0
    for trial in range(50):
        proc = subprocess.Popen(
            [sys.executable, "-c", CRASHER, str(root), str(src), str(trial)], stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.15))
        proc.kill()
        proc.wait()
        reg = Registry(root, create=False)
        assert reg.verify(rehash=trial % 10 == 0) == [], f"trial {trial}"
        for (name, alias), number in reg.aliases().items():
            v = reg.resolve(f"{name}@{alias}")
            assert v.version == number and set(v.files) >= {"adapter_config.json", "big.bin"}
            assert all(reg.blobs.has(f.sha256) for f in v.files.values())
        if trial % 10 == 9:
            report = reg.gc()
            leftovers += report.temporary + report.blobs
            assert reg.verify() == []
    assert len(Registry(root).versions()) > 10  # the writer got work done between kills
    assert leftovers > 0  # and some kills landed in the middle of a publish
