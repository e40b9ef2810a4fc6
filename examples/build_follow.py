"""Build examples/follow/: everyday requests with 1-2 verifiable constraints, for post-training a small model.

    python examples/build_follow.py

Writes prompts.jsonl (train), valid-prompts.jsonl and test.jsonl: prompts to answer, not training pairs
(graftlm synth makes those). Each line is {"prompt": ..., "checks": [...]} with checks from
graftlm.eval.checks (words, sentences, bullets, keywords, forbidden, json, case, starts_with, ends_with;
never language). About 60% of prompts carry one constraint and 40% two compatible ones. Train and valid
share one set of request wordings, constraint wordings, topics, keywords and start/end phrases; test uses a
disjoint set of each, with the same constraint kinds, so a test score measures transfer to new wording
rather than memorised prompts.
Every template and topic was written for this project (none comes from IFEval or another benchmark).
Deterministic: one seeded random.Random drives every choice; running it twice gives identical files.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

from graftlm.eval.checks import validate

OUT = Path(__file__).parent / "follow"
SEED = 1357
SIZES = {"train": 600, "valid": 60, "test": 150}
NUM = {1: "one", 2: "two", 3: "three", 4: "four"}
KINDS = ("words", "sentences", "bullets", "keywords", "forbidden", "json", "lower", "upper", "starts_with", "ends_with")
CLASH = {  # kinds never asked for together
    "json": ("bullets", "sentences", "lower", "upper", "starts_with", "ends_with"),
    "bullets": ("sentences", "upper", "starts_with", "ends_with"),
    "sentences": ("starts_with", "ends_with"),
    "upper": ("lower", "keywords", "starts_with", "ends_with"),
}
PAIRS = [(a, b) for a, b in combinations(KINDS, 2) if b not in CLASH.get(a, ()) and a not in CLASH.get(b, ())]


@dataclass(frozen=True)
class Topic:
    phrase: str
    keywords: tuple[str, ...]
    forbidden: tuple[str, ...]


@dataclass(frozen=True)
class Style:
    """The wording of one family of splits: its topics, and lines of wording by kind ("request" for the request,
    a constraint kind for the sentences stating it, "limit", "start", "end", "keys" for the values it uses)."""

    topics: tuple[Topic, ...]
    says: dict[str, tuple[str, ...]]


def topics(lines: str) -> tuple[Topic, ...]:
    """One topic a line: phrase|keyword,keyword,keyword|forbidden,forbidden."""
    out = []
    for line in lines.strip().splitlines():
        phrase, kw, fb = line.strip().split("|")
        out.append(Topic(phrase, tuple(kw.split(",")), tuple(fb.split(","))))
    return tuple(out)


def says(lines: str) -> dict[str, tuple[str, ...]]:
    """Wordings a line, "kind: one | another"; sentences= states an exact count, sentences< a maximum."""
    out: dict[str, tuple[str, ...]] = {}
    for line in lines.strip().splitlines():
        kind, text = line.strip().split(": ", 1)
        out[kind] = (*out.get(kind, ()), *text.split(" | "))
    return out


TRAIN = Style(
    topics=topics("""
        cooking rice on the stove|pot,lid,salt|water,boil
        making a simple green salad|lettuce,dressing,crunchy|tomato,oil
        baking cookies with kids|oven,dough,timer|chocolate,sugar
        storing leftovers safely|fridge,container,label|food,days
        watering tomato plants|soil,morning,roots|sun,leaves
        starting a small herb garden|basil,pots,sunlight|grow,seeds
        getting rid of garden weeds|mulch,gloves,roots|pull,grass
        packing for a weekend trip|charger,toothbrush,list|clothes,bag
        catching an early flight|alarm,passport,taxi|airport,late
        visiting a new city on a budget|map,walking,museum|money,cheap
        training a puppy to sit|treat,patience,praise|dog,command
        caring for a pet goldfish|tank,filter,flakes|water,fish
        keeping an indoor cat busy|toy,box,string|play,laser
        getting ready for a rainy day|umbrella,boots,jacket|rain,wet
        staying cool in a heat wave|shade,fan,ice|hot,sun
        teaching a child why sunsets look red|light,air,colors|sun,orange
        running a short team meeting|agenda,notes,timer|talk,boss
        writing a polite email to a coworker|subject,greeting,clear|please,sorry
        organizing a messy desk|drawer,folders,trash|clean,papers
        taking breaks during a long workday|stretch,walk,snack|tired,screen
        warming up before a soccer game|legs,jog,stretch|ball,muscles
        learning to swim as an adult|breath,float,lessons|water,pool
        choosing a pair of running shoes|fit,comfort,store|feet,price
        showing kids how magnets work|metal,poles,fridge|iron,force
        teaching kids why plants need light|leaves,food,energy|green,sun
        helping a child learn how rainbows form|raindrops,colors,prism|rain,sky
        fixing a dripping kitchen tap|washer,wrench,valve|water,leak
        painting a small bedroom|brush,tape,primer|paint,wall
        unclogging a bathroom sink|plunger,drain,vinegar|water,pipe
        saving money on groceries|list,coupons,budget|cheap,buy
        getting better sleep at night|bedtime,dark,routine|phone,tired
        studying for a math test|notes,quiz,schedule|read,exam
        making friends after moving to a new town|club,hello,neighbors|people,lonely
        cleaning a bathroom quickly|sponge,mirror,spray|dirty,soap
        picking a good novel to read|library,genre,reviews|story,author
        planning a birthday party|cake,guests,games|fun,gifts
    """),
    says=says("""
        request: Write a short note about {t}. | Explain the basics of {t}. | Give me some advice on {t}.
        request: Tell me about {t}. | List a few ideas for {t}. | What should a beginner know about {t}?
        limit: 20 | 25 | 30 | 40
        start: Here is my advice: | Quick tip: | Good question! | Sure thing. | In short, | Dear friend,
        end: Have a nice day! | That is all. | Good luck! | Thanks for reading.
        keys: tip reason | title summary | idea cost | step time | answer confidence
        words: Answer in at most {n} words. | Use no more than {n} words. | Keep your answer to {n} words or fewer.
        sentences=: Answer in exactly {ns}. | Write exactly {ns}, no more and no fewer.
        sentences<: Use at most {ns}. | Write no more than {ns}.
        bullets: Format the answer as exactly {k} bullet points, each starting with '-'.
        bullets: Use {k} '-' bullets, one per line.
        keywords: Include the {w} {q}. | Make sure your answer uses the {w} {q}. | Mention {q} in your answer.
        forbidden: Do not use the {w} {qo}. | Avoid the {w} {qo}. | Don't mention {qo}.
        json: Reply with JSON only: an object with the keys {j}.
        json: Answer only with a JSON object that has the keys {j}.
        lower: Write everything in lowercase letters. | Do not use any capital letters.
        upper: Keep it short and write it in capital letters only.
        upper: Write a short answer using only uppercase letters.
        starts_with: Start your answer with '{p}'. | Begin with the words '{p}'.
        ends_with: End your answer with '{p}'. | Finish with the exact phrase '{p}'.
    """),
)

TEST = Style(
    topics=topics("""
        making pancakes for breakfast|batter,pan,syrup|eggs,flour
        growing strawberries on a balcony|containers,runners,ripe|water,fruit
        riding a train across the country|ticket,window,snacks|seat,long
        adopting a pet rabbit|hay,hutch,vet|cute,cage
        preparing for a snowstorm|shovel,blankets,flashlight|cold,snow
        writing a weekly report at work|summary,progress,deadline|boss,task
        learning to ride a bike|helmet,balance,pedals|fall,wheels
        helping a child understand moon phases|orbit,shadow,crescent|sun,night
        patching a hole in drywall|spackle,sandpaper,putty knife|wall,paint
        keeping houseplants alive in winter|humidity,radiator,drafts|water,cold
        cooking vegetable soup on a cold day|broth,carrots,simmer|hot,pot
        camping for the first time|tent,campfire,sleeping bag|trees,night
        teaching a child to tie shoelaces|loop,bunny,knot|easy,shoes
        showing kids how volcanoes erupt|lava,magma,pressure|hot,fire
        walking a dog in the rain|leash,towel,raincoat|wet,mud
        finding a quiet place to focus at home|headphones,corner,door|noise,work
        packing a healthy school lunch|sandwich,apple,lunchbox|sugar,chips
        choosing a gift for a grandparent|photo,handmade,card|money,expensive
    """),
    says=says("""
        request: Could you jot down a brief message about {t}? | Help me get started with {t}.
        request: I need a few pointers on {t}. | Say something useful about {t}.
        request: Share some suggestions regarding {t}. | How would you describe {t} to a newcomer?
        limit: 24 | 30 | 35 | 45
        start: Well, | Great idea: | To begin with, | Here's the thing: | Hello there! | My answer:
        end: Hope this helps! | Take care. | See you soon! | End of message.
        keys: advice why | headline details | name description | main_point example
        words: Keep it under {n1} words total. | Your reply must not exceed {n} words.
        words: The whole response should be shorter than {n1} words.
        sentences=: Your response should contain precisely {ns}. | The reply must be made of {ns} exactly.
        sentences<: Don't go beyond {ns}. | Limit yourself to {ns} or fewer.
        bullets: Lay it out as a list of {k} lines, each beginning with '- '.
        bullets: Give {k} items, each on its own line starting with a dash (-).
        keywords: Work the {w} {q} into your reply. | Your answer has to contain {q}.
        keywords: Somewhere in the text, use {q}.
        forbidden: Never write {qo} anywhere in the reply. | Leave out the {w} {qo} entirely.
        forbidden: Steer clear of the {w} {qo}.
        json: Output nothing but a JSON object containing the fields {j}.
        json: Return a single JSON object with {j} as its keys, and no other text.
        lower: Every letter of the reply must be lower case. | Type the whole thing without any capitalization.
        upper: Answer briefly, in ALL CAPS. | Be brief, and make every letter a capital.
        starts_with: The first words of your reply should be '{p}'. | Open your response with '{p}'.
        ends_with: Close your reply with '{p}'. | The last words must be '{p}'.
    """),
)


def has(text: str, word: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(word.lower())}(?!\w)", text.lower()) is not None


def state(kind: str, style: Style, topic: Topic, rng: random.Random, lower: bool) -> tuple[str, dict[str, Any]]:
    """A sentence stating one constraint of `kind` about `topic`, and its check."""
    v: dict[str, Any] = {}
    if kind == "words":
        v["n"] = int(rng.choice(style.says["limit"]))
        v["n1"], check = v["n"] + 1, {"check": "words", "max": v["n"]}
    elif kind == "sentences":
        n, exact = rng.randint(1, 3), rng.random() < 0.5
        kind += "=" if exact else "<"
        v["ns"] = f"{NUM[n]} sentence{'s' * (n > 1)}"
        check = {"check": "sentences", "min": n, "max": n} if exact else {"check": "sentences", "max": n}
    elif kind == "bullets":
        n = rng.randint(2, 4)
        v["k"], check = NUM[n], {"check": "bullets", "min": n, "max": n}
    elif kind in ("keywords", "forbidden"):
        words = rng.sample(topic.keywords if kind == "keywords" else topic.forbidden, rng.choice((1, 2)))
        quoted = [f"'{w}'" for w in words]
        v["w"], v["q"], v["qo"] = "word" if len(words) == 1 else "words", " and ".join(quoted), " or ".join(quoted)
        check = {"check": kind, "words": words}
    elif kind == "json":
        keys = rng.choice(style.says["keys"]).split()
        v["j"] = " and ".join(f'"{k}"' for k in keys)
        check = {"check": "json", "schema": {"type": "object", "required": keys}}
    elif kind in ("lower", "upper"):
        check = {"check": "case", "case": kind}
    else:
        p = rng.choice(style.says["start" if kind == "starts_with" else "end"])
        v["p"] = p.lower() if lower else p
        check = {"check": kind, "text": v["p"]}
    text = rng.choice(style.says[kind]).format(**v)
    return re.sub(r"([.!?,:])'\.$", r"\1'", text), check  # no full stop after a quoted phrase that ends in one


def make(style: Style, n: int, rng: random.Random, seen: set[str]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    while len(rows) < n:
        topic = rng.choice(style.topics)
        kinds = [rng.choice(KINDS)] if rng.random() < 0.6 else rng.sample(rng.choice(PAIRS), 2)
        parts, checks = [rng.choice(style.says["request"]).format(t=topic.phrase)], []
        for kind in kinds:
            text, check = state(kind, style, topic, rng, "lower" in kinds)
            parts.append(text)
            checks.append(check)
        prompt = " ".join(parts)
        if prompt not in seen:
            seen.add(prompt)
            rows.append({"prompt": prompt, "checks": checks})
    return rows


def audit(style: Style) -> None:
    """Keywords and forbidden words are lowercase, absent from their topic, and never clash with a phrase."""
    for t in style.topics:
        assert not set(t.keywords) & set(t.forbidden), t
        for w in t.keywords + t.forbidden:
            assert w == w.lower() and not has(t.phrase, w), (t.phrase, w)
            assert not any(has(p, w) for p in style.says["start"] + style.says["end"]), (t.phrase, w)


def label(check: dict[str, Any]) -> str:
    return check["case"] if check["check"] == "case" else check["check"]


def main() -> None:
    for style in (TRAIN, TEST):
        audit(style)
    assert not {t.phrase for t in TRAIN.topics} & {t.phrase for t in TEST.topics}
    assert not {w for t in TRAIN.topics for w in t.keywords} & {w for t in TEST.topics for w in t.keywords}
    assert all(not set(TRAIN.says[k]) & set(TEST.says[k]) for k in TRAIN.says if k != "limit")

    rng, seen = random.Random(SEED), set()
    pool = make(TRAIN, SIZES["train"] + SIZES["valid"], rng, seen)
    splits = {
        "train": pool[: SIZES["train"]],
        "valid": pool[SIZES["train"] :],
        "test": make(TEST, SIZES["test"], rng, seen),
    }
    prompts = [r["prompt"] for rows in splits.values() for r in rows]
    assert len(prompts) == len(set(prompts)) == sum(SIZES.values())
    for name, rows in splits.items():
        for i, row in enumerate(rows):
            assert 1 <= len(row["checks"]) <= 2
            for c in row["checks"]:
                assert validate(c, f"{name} line {i + 1}")["check"] != "language"

    OUT.mkdir(exist_ok=True)
    # Prompts with checks, not training pairs: train.jsonl stays the name of supervised data (the demo and
    # the pipeline train on every example's train.jsonl), so the training prompts are prompts.jsonl.
    files = {"train": "prompts.jsonl", "valid": "valid-prompts.jsonl", "test": "test.jsonl"}
    for name, rows in splits.items():
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        (OUT / files[name]).write_text(text, encoding="utf-8")
    task = {"name": "follow", "graders": ["instructions"], "max_new_tokens": 96}
    (OUT / "task.json").write_text(json.dumps(task, indent=2) + "\n", encoding="utf-8")

    print(f"{'kind':12}" + "".join(f"{s:>7}" for s in splits))
    for kind in (*KINDS, "two checks"):
        counts = [
            sum(len(r["checks"]) == 2 for r in rows)
            if kind == "two checks"
            else sum(label(c) == kind for r in rows for c in r["checks"])
            for rows in splits.values()
        ]
        print(f"{kind:12}" + "".join(f"{n:>7}" for n in counts))
    print("validate() passed for every check; prompts unique:", len(prompts))
    for name in ("train", "test"):
        print(f"\n{name} samples:")
        for row in random.Random(SEED).sample(splits[name], 5):
            print(" ", json.dumps(row, ensure_ascii=False))


if __name__ == "__main__":
    main()
