"""Hostile bundles and damaged registries: nothing is written outside the registry, nothing unchecked is
used, and a malformed manifest is a RegistryError that names the bundle and the field."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from graftlm.registry import Registry, RegistryError, Version, index
from graftlm.registry.blobs import BlobStore
from graftlm.registry.bundle import export, import_bundle
from graftlm.registry.records import FileEntry
from tests.registry.test_store import fake_adapter

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Registry, Path, Registry]:
    """A server with s@1 (prod) and s@2, a full bundle of s@2 (made prod), and a device holding s@1."""
    server = Registry(tmp_path / "server")
    server.publish(fake_adapter(tmp_path / "a", 0), "s", aliases=["prod"])
    export(server, ["s@1"], tmp_path / "first")
    server.publish(fake_adapter(tmp_path / "b", 1), "s")
    server.promote("s@2")
    export(server, ["s@prod"], tmp_path / "bundle")
    device = Registry(tmp_path / "device")
    import_bundle(device, tmp_path / "first")
    return server, tmp_path / "bundle", device


def state(reg: Registry) -> tuple[Any, ...]:
    """Everything an import could change: versions, aliases, blobs and the files under the registry."""
    files = sorted(str(p.relative_to(reg.root)) for p in reg.root.rglob("*") if p.name not in ("registry.db-wal",))
    return [v.as_dict() for v in reg.versions()], reg.aliases(), sorted(reg.blobs.all()), files


def tampered(bundle: Path, out: Path, change: Callable[[dict[str, Any]], object]) -> Path:
    """A copy of `bundle` whose manifest `change` has edited in place."""
    shutil.copytree(bundle, out)
    m = json.loads((out / "manifest.json").read_text())
    change(m)
    (out / "manifest.json").write_text(json.dumps(m))
    return out


def rename_file(m: dict[str, Any], old: str, new: str) -> None:
    files = m["adapters"][0]["files"]
    files[new] = files.pop(old)


@pytest.mark.parametrize("evil", ["../../pwned.txt", "ABS"])
def test_a_file_path_outside_the_adapter_folder_is_refused(
    setup: tuple[Registry, Path, Registry], tmp_path: Path, evil: str
) -> None:
    _, bundle, device = setup
    evil = str(tmp_path / "abs" / "pwned.txt") if evil == "ABS" else evil
    bad = tampered(bundle, tmp_path / "bad", lambda m: rename_file(m, CONFIG, evil))
    before = state(device)
    with pytest.raises(RegistryError, match=r"bundle .*bad: adapters\[0\]\.files\[.*pwned\.txt'\]: a file path"):
        import_bundle(device, bad)
    assert state(device) == before and device.resolve("s").version == 1  # prod did not move
    device.checkout(device.resolve("s"))
    assert list(tmp_path.rglob("pwned*")) == []


def test_a_hash_that_is_a_path_is_refused(setup: tuple[Registry, Path, Registry], tmp_path: Path) -> None:
    _, bundle, device = setup
    secret = tmp_path / "secret.txt"
    secret.write_text("not for adapters")

    def point_at_secret(m: dict[str, Any]) -> None:
        entry = m["adapters"][0]["files"][CONFIG]
        m["files"].pop(entry["sha256"])  # a "delta" that says the file is already here
        entry.update(sha256=f"..{secret}", size=secret.stat().st_size)

    bad = tampered(bundle, tmp_path / "bad", point_at_secret)
    before = state(device)
    with pytest.raises(RegistryError, match=r"adapters\[0\]\.files\['adapter_config\.json'\]\.sha256: a sha256 is 64"):
        import_bundle(device, bad)
    assert state(device) == before
    with pytest.raises(RegistryError, match="64 lowercase hex"):
        device.blobs.path(f"..{secret}")
    with pytest.raises(RegistryError, match="64 lowercase hex"):
        BlobStore(tmp_path).has("../../etc/passwd")


def drop(key: str) -> Callable[[dict[str, Any]], object]:
    return lambda m: m["adapters"][0].pop(key)


def setv(key: str, value: object) -> Callable[[dict[str, Any]], object]:
    return lambda m: m["adapters"][0].update({key: value})


def first_file(m: dict[str, Any]) -> dict[str, Any]:
    return m["adapters"][0]["files"][CONFIG]


MALFORMED: list[tuple[str, Callable[[dict[str, Any]], object], str]] = [
    ("no files", drop("files"), r"adapters\[0\]: lacks files"),
    ("no name", drop("name"), r"adapters\[0\]: lacks name"),
    ("version -3", setv("version", -3), r"adapters\[0\]\.version: a version is a whole number"),
    ("version string", setv("version", "2"), r"adapters\[0\]\.version"),
    ("version bool", setv("version", True), r"adapters\[0\]\.version"),
    ("version float", setv("version", 2.0), r"adapters\[0\]\.version"),
    ("name with /", setv("name", "a/b"), r"adapters\[0\]\.name: 'a/b' is not a valid adapter name"),
    ("name newline", setv("name", "s\n"), r"adapters\[0\]\.name"),
    ("alias ../evil", setv("aliases", ["../evil"]), r"adapters\[0\]\.aliases\[0\]: '\.\./evil' is not a valid alias"),
    ("alias 7", setv("aliases", ["7"]), r"adapters\[0\]\.aliases\[0\]: '7' is not a valid alias"),
    ("alias newline", setv("aliases", ["prod\n"]), r"aliases\[0\]"),
    ("aliases not a list", setv("aliases", "prod"), r"adapters\[0\]\.aliases: must be a list"),
    ("created string", setv("created", "yesterday"), r"adapters\[0\]\.created: must be a finite number"),
    ("lineage list", setv("lineage", []), r"adapters\[0\]\.lineage: must be an object"),
    ("note number", setv("note", 3), r"adapters\[0\]\.note: must be a string"),
    ("files list", setv("files", []), r"adapters\[0\]\.files: must be a non-empty object"),
    ("size negative", lambda m: first_file(m).update(size=-1), r"files\['adapter_config\.json'\]\.size"),
    ("size string", lambda m: first_file(m).update(size="12"), r"\.size: a size is a whole number"),
    ("sha upper", lambda m: first_file(m).update(sha256="A" * 64), r"\.sha256: a sha256 is 64 lowercase hex"),
    ("file entry list", lambda m: m["adapters"][0]["files"].update({CONFIG: []}), r"exactly sha256 and size"),
    ("adapter not object", lambda m: m.update(adapters=[7]), r"adapters\[0\]: must be an object, not 7"),
    ("adapters empty", lambda m: m.update(adapters=[]), r"adapters must be a non-empty list"),
    ("adapters missing", lambda m: m.pop("adapters"), r"manifest\.json lacks adapters"),
    ("files not object", lambda m: m.update(files=[]), r"files must be an object"),
    ("files size", lambda m: m["files"].update({k: "big" for k in m["files"]}), r"files\['[0-9a-f]+'\]: a size"),
    ("files extra", lambda m: m["files"].update({"0" * 64: 1}), r"which no adapter in the bundle uses"),
    ("since string", lambda m: m.update(since="s@1"), r"since must be a list"),
    ("since bad ref", lambda m: m.update(since=["../x"]), r"since\[0\]"),
    ("format version bool", lambda m: m.update(format_version=True), r"format version True"),
    ("duplicate", lambda m: m["adapters"].append(m["adapters"][0]), r"adapters\[1\]: s@2 is in this bundle twice"),
]
PATHS = ["a\\b", "a/./b", "a//b", "a/", ".hidden", "a/.git/config", "x\x00y", "x\ny", "x\x1by", "a" * 2000, "b" * 300]


@pytest.mark.parametrize(("change", "message"), [(c, m) for _, c, m in MALFORMED], ids=[i for i, _, _ in MALFORMED])
def test_a_malformed_manifest_is_a_clear_error(
    setup: tuple[Registry, Path, Registry], tmp_path: Path, change: Callable[[dict[str, Any]], object], message: str
) -> None:
    _, bundle, device = setup
    bad = tampered(bundle, tmp_path / "bad", change)
    before = state(device)
    with pytest.raises(RegistryError, match=message) as e:
        import_bundle(device, bad)
    assert str(e.value).startswith(f"bundle {bad}: ")
    assert state(device) == before


@pytest.mark.parametrize("rel", PATHS, ids=range(len(PATHS)))
def test_every_unsafe_file_path_is_refused(setup: tuple[Registry, Path, Registry], tmp_path: Path, rel: str) -> None:
    _, bundle, device = setup
    bad = tampered(bundle, tmp_path / "bad", lambda m: rename_file(m, CONFIG, rel))
    with pytest.raises(RegistryError, match=r"adapters\[0\]\.files\[.*\]: a (file path|part of a file path)"):
        import_bundle(device, bad)
    assert device.resolve("s").version == 1


def test_a_file_where_another_needs_a_folder_is_refused(setup: tuple[Registry, Path, Registry], tmp_path: Path) -> None:
    _, bundle, device = setup
    bad = tampered(bundle, tmp_path / "bad", lambda m: rename_file(m, WEIGHTS, f"{CONFIG}/w"))
    with pytest.raises(RegistryError, match="is both a file and a folder"):
        import_bundle(device, bad)


def test_relpath_accepts_ordinary_paths() -> None:
    from graftlm.registry.records import check_relpath

    for rel in ("adapter_config.json", "sub/dir/file.bin", "a-b_c.d/e f", "é/ü.json"):
        assert check_relpath(rel) == rel


def test_references_take_only_sane_version_numbers() -> None:
    from graftlm.registry import Ref

    assert Ref.parse("s@7") == Ref("s", version=7)
    for bad in ("s@0", "s@99999999999999999999", "s@\u00b2", "s\n@1"):
        with pytest.raises(RegistryError):
            Ref.parse(bad)


def test_links_in_a_bundle_are_refused(setup: tuple[Registry, Path, Registry], tmp_path: Path) -> None:
    _, bundle, device = setup
    linked = tmp_path / "linked"
    shutil.copytree(bundle, linked)
    sha = next(p.name for p in linked.iterdir() if p.name != "manifest.json")
    (linked / sha).unlink()
    (linked / sha).symlink_to(bundle / sha)  # the same bytes, through a link
    before = state(device)
    with pytest.raises(RegistryError, match=f"{sha} is a link or not a regular file"):
        import_bundle(device, linked)
    shutil.rmtree(linked)
    linked.mkdir()
    (linked / "manifest.json").symlink_to(bundle / "manifest.json")
    with pytest.raises(RegistryError, match=r"manifest\.json is a link or not a regular file"):
        import_bundle(device, linked)
    assert state(device) == before


def insert(reg: Registry, files: dict[str, FileEntry], version: int = 2) -> Version:
    """An index row written without any check, as an older graftlm could have."""
    v = Version("s", version, time.time(), files)
    with reg.db() as db, index.transaction(db):
        index.insert_version(db, v)
    return v


def test_checkout_rechecks_rows_from_an_old_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reg = Registry(tmp_path / "reg")
    good = reg.publish(fake_adapter(tmp_path / "a", 0), "s").files
    secret = tmp_path / "secret.txt"
    secret.write_text("x" * 10)
    rows = {
        2: good | {"../../../../escaped.txt": good[CONFIG]},  # from tree/s/.2.tmp/ up to tmp_path
        3: good | {str(tmp_path / "abs_escaped.txt"): good[CONFIG]},
        4: good | {CONFIG: FileEntry(f"..{secret}", 10)},
        5: good | {f"{CONFIG}/x": good[CONFIG]},
    }
    for number, files in rows.items():
        insert(reg, files, number)
    for number in rows:
        with pytest.raises(RegistryError, match=rf"s@{number}: files"):
            reg.checkout(reg.resolve(f"s@{number}"))
    assert list(tmp_path.rglob("*escaped*")) == []
    assert not reg.trees.exists()  # refused before anything was made
    with monkeypatch.context() as m:  # the second line of defence: building never leaves its folder either
        m.setattr(Version, "check", lambda self, where="": self)
        for number, message in (
            (2, "outside its folder"),
            (3, "outside its folder"),
            (4, "64 lowercase"),
            (5, "place"),
        ):
            with pytest.raises(RegistryError, match=message):
                reg.checkout(reg.resolve(f"s@{number}"))
    assert list(tmp_path.rglob("*escaped*")) == []
    assert [p.name for p in (reg.trees / "s").iterdir()] == []  # no folder, no leftovers
    from graftlm.engine.adapter_finder import UnknownAdapterError
    from graftlm.engine.registry_finder import RegistryFinder

    with pytest.raises(UnknownAdapterError, match="s@2 cannot be served"):  # what a request for it gets
        RegistryFinder(reg).resolve("s@2")
    problems = reg.verify()
    assert any(p.startswith("index: s@2: '../../../../escaped.txt': a file path must be normalized") for p in problems)
    assert any(p.startswith("index: s@3: '/") for p in problems)
    assert any(p.startswith("index: s@4: 'adapter_config.json': a sha256 is 64") for p in problems)


def test_checkout_refuses_links_in_the_way(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg")
    v = reg.publish(fake_adapter(tmp_path / "a", 0), "s")
    outside = tmp_path / "outside"
    outside.mkdir()
    reg.trees.mkdir()
    (reg.trees / "s").symlink_to(outside)
    with pytest.raises(RegistryError, match="is a link; refused"):
        reg.checkout(v)
    assert list(outside.iterdir()) == []
    (reg.trees / "s").unlink()
    blob = reg.blobs.path(v.files[CONFIG].sha256)
    os.replace(blob, tmp_path / "moved")
    blob.symlink_to(tmp_path / "moved")  # a blob that is a link is no blob
    with pytest.raises(RegistryError, match="is missing from the store"):
        reg.checkout(v)
    assert not (reg.trees / "s" / "1").exists()


def test_verify_checks_the_built_folders(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg")
    v = reg.publish(fake_adapter(tmp_path / "a", 0), "s")
    reg.publish(fake_adapter(tmp_path / "b", 1), "s")
    tree = reg.checkout(v)
    reg.checkout(reg.resolve("s@2"))
    assert reg.verify() == []
    size = v.files[CONFIG].size
    (tree / CONFIG).unlink()  # the blob is a hard link: unlink, never write through it
    (tree / CONFIG).write_bytes(b"{" + b" " * (size - 2) + b"}")  # same size, other bytes
    (tree / "extra.bin").write_bytes(b"x")
    (tree / WEIGHTS).unlink()
    (tree / WEIGHTS).symlink_to(reg.blobs.path(v.files[WEIGHTS].sha256))
    (reg.trees / "s" / "9").mkdir()
    (reg.trees / "evil").symlink_to(tmp_path)
    two = reg.trees / "s" / "2"
    (two / CONFIG).unlink()
    assert reg.verify() == [
        "tree/evil is a link",
        f"tree/s/1/{WEIGHTS} is a link",
        "tree/s/1/extra.bin is not a file of s@1",
        f"tree/s/1/{CONFIG} does not match its sha256",
        f"tree/s/2/{CONFIG} is missing",
        "tree/s/9 is the folder of no version (stray; gc removes it)",
    ]
    quick = reg.verify(rehash=False)
    assert f"tree/s/1/{CONFIG} does not match its sha256" not in quick and len(quick) == 5


def test_gc_never_deletes_through_a_link(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg")
    reg.checkout(reg.publish(fake_adapter(tmp_path / "a", 0), "s"))
    outside = tmp_path / "outside"
    (outside / "7").mkdir(parents=True)
    (outside / "7" / "keep.txt").write_text("mine")
    (reg.trees / "evil").symlink_to(outside)
    (reg.trees / "s" / "8").symlink_to(outside)
    assert reg.gc().trees == 2
    assert (outside / "7" / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in reg.trees.iterdir()) == ["s"] and reg.verify() == []
