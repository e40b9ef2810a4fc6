"""Build the three example task datasets from real English text that no one in this project wrote.

    apt-get update -o Acquire::Languages=en      # Debian's package descriptions (Translation-en)
    pip install codespell==2.4.3                 # its dictionary of real-world misspellings
    python examples/build_datasets.py

Sources (Debian bookworm; see examples/README.md):
- summarize: a package's long description -> its one-line synopsis, both written by Debian maintainers
  (`Translation-en`, the `Description-en` field).
- proofread: sentences from those descriptions with real misspellings from codespell's dictionary
  swapped in -> the original sentence.
- extract: entries of the Debian changelogs installed on this machine (a fixed list of packages)
  -> the release as JSON: package, version, date (YYYY-MM-DD), author.

Deterministic: inputs are read in a fixed order, every choice is seeded by a hash of the item, and
splits are by a hash of the package name (summarize, proofread: no package is in two splits) or
of package and version (extract: no changelog entry is in two splits). The sha256 of
every input goes into examples/SOURCES.json.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import re
import subprocess
from email.utils import parsedate_to_datetime
from pathlib import Path

HERE = Path(__file__).parent
TRANSLATION = "/var/lib/apt/lists/deb.debian.org_debian_dists_bookworm_main_i18n_Translation-en.lz4"
CHANGELOG_PACKAGES = [
    "bash",
    "binutils-common",
    "coreutils",
    "curl",
    "debianutils",
    "e2fsprogs",
    "findutils",
    "gcc-12-base",
    "git",
    "gzip",
    "libc-bin",
    "libllvm15",
    "libssl3",
    "login",
    "mawk",
    "ncurses-base",
    "openssh-client",
    "perl-base",
    "procps",
    "python3.11-minimal",
    "systemd",
    "tar",
    "tzdata",
    "util-linux",
]
SIZES = {"summarize": (1200, 100, 200), "proofread": (1600, 100, 200), "extract": (600, 60, 150)}
INSTRUCTIONS = {
    "summarize": "Summarize this description in one short line.",
    "proofread": "Fix the spelling mistakes in this sentence. Reply with the corrected sentence only.",
    "extract": "Extract the release from this changelog entry as JSON with the keys package, version, "
    "date (YYYY-MM-DD) and author.",
}


def h(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:12], 16)


def split_of(key: str) -> str:
    bucket = h("split:" + key) % 100
    return "test" if bucket < 12 else "valid" if bucket < 18 else "train"


def sha256_file(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# -- Debian descriptions -------------------------------------------------------------------------
def descriptions() -> list[tuple[str, str, list[str]]]:
    """(package, synopsis, paragraphs) for every package, in file order."""
    text = subprocess.run(["lz4", "-dc", TRANSLATION], capture_output=True, check=True).stdout.decode()
    out = []
    for stanza in text.split("\n\n"):
        m = re.search(r"^Package: (\S+)$", stanza, re.M)
        d = re.search(r"^Description-en: (.*)\n((?: .*\n?)*)", stanza, re.M)
        if not m or not d:
            continue
        paragraphs, current = [], []
        for line in d.group(2).splitlines():
            line = line[1:]
            if line == ".":
                paragraphs.append(current)
                current = []
            else:
                current.append(line)
        paragraphs.append(current)
        # keep prose paragraphs only: no lists, no indented blocks
        prose = [" ".join(p) for p in paragraphs if p and not any(x.startswith((" ", "*", "-", "+", "o ")) for x in p)]
        out.append((m.group(1), d.group(1).strip(), prose))
    return out


def plain(text: str) -> bool:
    return text.isascii() and "http" not in text and "  " not in text


def summarize_items(descs: list[tuple[str, str, list[str]]]) -> list[tuple[str, dict]]:
    seen: set[str] = set()
    items = []
    for pkg, synopsis, prose in descs:
        body = " ".join(prose[:2])
        if not (150 <= len(body) <= 650 and 15 <= len(synopsis) <= 70 and plain(body) and plain(synopsis)):
            continue
        if body in seen:  # -data, -doc, -dev packages repeat their source's text
            continue
        seen.add(body)
        items.append((pkg, {"input": body, "output": synopsis}))
    return items


def misspellings() -> dict[str, list[str]]:
    """correct word -> real misspellings of it (codespell's dictionary, unambiguous entries only)."""
    import codespell_lib

    path = Path(codespell_lib.__file__).parent / "data" / "dictionary.txt"
    table: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        wrong, _, right = line.partition("->")
        right = right.strip()
        if "," in right or not wrong.isalpha() or not right.isalpha() or len(right) < 4:
            continue
        table.setdefault(right.lower(), []).append(wrong.lower())
    return {k: sorted(v) for k, v in sorted(table.items())}


def proofread_items(descs: list[tuple[str, str, list[str]]], typos: dict[str, list[str]]) -> list[tuple[str, dict]]:
    seen: set[str] = set()
    items = []
    for pkg, _, prose in descs:
        for paragraph in prose:
            for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z])", paragraph):
                if not (50 <= len(sentence) <= 160 and plain(sentence)) or sentence in seen:
                    continue
                seen.add(sentence)
                words = re.findall(r"[A-Za-z]+", sentence)
                candidates = sorted({w for w in words if w.lower() in typos})
                if not candidates:
                    continue
                rng = random.Random(h("typo:" + sentence))
                chosen = rng.sample(candidates, k=min(len(candidates), rng.choice((1, 2, 2, 3))))
                broken = sentence
                for w in chosen:
                    typo = rng.choice(typos[w.lower()])
                    typo = typo.capitalize() if w[0].isupper() else typo
                    broken = re.sub(rf"\b{w}\b", typo, broken, count=1)
                items.append((pkg, {"input": broken, "output": sentence}))
    return items


# -- Debian changelogs ---------------------------------------------------------------------------
ENTRY = re.compile(r"^(\S+) \(([^)]+)\) ([^;\n]+;[^\n]*)\n(.*?)\n -- (.+?) <([^>]*)>  (.+?)$", re.M | re.S)


def extract_items() -> tuple[list[tuple[str, dict]], dict[str, str]]:
    items, inputs = [], {}
    for pkg in CHANGELOG_PACKAGES:
        path = f"/usr/share/doc/{pkg}/changelog.Debian.gz"
        inputs[path] = sha256_file(path)
        text = gzip.decompress(Path(path).read_bytes()).decode("utf-8", "replace")
        for m in ENTRY.finditer(text):
            source, version, header, body, author, email, date = m.groups()
            try:
                day = parsedate_to_datetime(date).date().isoformat()
            except (TypeError, ValueError):
                continue
            lines, kept = [ln for ln in body.strip("\n").splitlines() if ln.strip()], []
            for ln in lines:  # keep the first changes, up to about 400 characters
                if sum(len(k) for k in kept) + len(ln) > 400:
                    break
                kept.append(ln)
            if not kept or not author.isascii():
                continue
            entry = f"{source} ({version}) {header}\n\n" + "\n".join(kept) + f"\n\n -- {author} <{email}>  {date}"
            answer = {"package": source, "version": version, "date": day, "author": author.strip()}
            items.append((f"{source}:{version}", {"input": entry, "output": json.dumps(answer)}))
    unique = {it["input"]: (k, it) for k, it in items}  # some packages share a source's changelog
    return sorted(unique.values(), key=lambda kv: kv[0]), inputs


# -- writing -------------------------------------------------------------------------------------
def to_chat(task: str, item: dict) -> dict:
    return {
        "messages": [
            {"role": "user", "content": f"{INSTRUCTIONS[task]}\n\n{item['input']}"},
            {"role": "assistant", "content": item["output"]},
        ]
    }


def write_task(task: str, items: list[tuple[str, dict]], metric: str, max_new_tokens: int) -> dict[str, int]:
    sizes = dict(zip(("train", "valid", "test"), SIZES[task], strict=True))
    by_split: dict[str, list[dict]] = {s: [] for s in sizes}
    for key, item in sorted(items, key=lambda kv: h(task + kv[0] + kv[1]["input"])):
        s = split_of(task + ":" + key)
        if len(by_split[s]) < sizes[s]:
            by_split[s].append(to_chat(task, item))
    folder = HERE / task
    folder.mkdir(exist_ok=True)
    for s, rows in by_split.items():
        (folder / f"{s}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "task.json").write_text(
        json.dumps(
            {
                "name": task,
                "metric": metric,
                "max_new_tokens": max_new_tokens,
                "instruction": INSTRUCTIONS[task],
                "train": {"lr": 1e-3, "epochs": 1, "batch_size": 8},
            },
            indent=2,
        )
        + "\n"
    )
    return {s: len(rows) for s, rows in by_split.items()}


def main() -> None:
    descs = descriptions()
    typos = misspellings()
    changelog_items, changelog_inputs = extract_items()
    counts = {
        "summarize": write_task("summarize", summarize_items(descs), "rouge_l", 32),
        "proofread": write_task("proofread", proofread_items(descs, typos), "exact_match", 64),
        "extract": write_task("extract", changelog_items, "json_field_f1", 64),
    }
    import codespell_lib

    sources = {
        "debian_translation_en": {"path": TRANSLATION, "sha256": sha256_file(TRANSLATION)},
        "codespell_dictionary": {"version": codespell_lib.__version__},
        "debian_changelogs": changelog_inputs,
        "examples": counts,
    }
    (HERE / "SOURCES.json").write_text(json.dumps(sources, indent=2) + "\n")
    print(json.dumps(counts, indent=2))


if __name__ == "__main__":
    main()
