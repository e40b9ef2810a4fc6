"""`graftlm rl`: on-policy reinforcement learning of a LoRA adapter with leave-one-out advantages.

Each step takes a batch of prompts, samples k answers to each from the current policy through the
serving engine (the same batched code that serves; the policy adapter is written to disk after every
update and the engine's cache picks up the new file), scores them with the reward's graders, turns
rewards into leave-one-out advantages and moves the adapter by one or more AdamW updates of the RLOO or
MDLOO loss (`graftlm.train.policy`). Reward, KL to the reference and to the base, answer length and pass
rate are logged per step, so that reward hacking shows next to the reward. Checkpoints resume exactly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from graftlm import __version__
from graftlm.engine.adapter_finder import Source
from graftlm.engine.engine import Engine, EngineConfig
from graftlm.engine.offline import Job, run_jobs
from graftlm.engine.sampling import SamplingParams
from graftlm.errors import ConfigError
from graftlm.eval.grade import Case
from graftlm.eval.rewards import Reward, RewardError
from graftlm.eval.runner import load_cases
from graftlm.fileio import file_sha256
from graftlm.loading.catalog import Placement
from graftlm.lora.config import LoraConfig
from graftlm.lora.model import add_lora, load_lora_state, lora_layers, lora_state_dict
from graftlm.lora.peft_io import check_fits, read_adapter, save_adapter
from graftlm.model.llama import Llama
from graftlm.model.tokenizer import Tokenizer
from graftlm.progress import progress
from graftlm.setting import setting
from graftlm.train import checkpoint
from graftlm.train.policy import ALGOS, Rollouts, adapter_off, leave_one_out, policy_loss, swapped, token_logprobs
from graftlm.train.sft import checkpoint_dir

log = logging.getLogger(__name__)
RECORD_FILE = "rl.json"
KL_BASE_EVERY = 5  # steps between measures of the KL to the base when the reference is another adapter


@dataclass(frozen=True)
class RLConfig:
    algo: str = setting("rloo", "rloo: clipped policy gradient; mdloo: mirror-descent step (Apple's)", choices=ALGOS)
    k: int = setting(4, "answers sampled per prompt (leave-one-out needs at least 2)")
    batch: int = setting(8, "prompts per step")
    steps: int = setting(50, "steps (each samples batch x k answers)")
    updates: int = setting(1, "optimizer updates per batch of answers (later ones are held near the sampler)")
    lr: float = setting(5e-5, "AdamW learning rate")
    beta: float = setting(0.05, "weight of the KL penalty to the reference")
    clip: float = setting(0.2, "ratio clip (rloo)")
    eta: float = setting(1.0, "mirror-descent step size: KL to the sampling policy weighs 1/eta (mdloo)")
    temperature: float = setting(1.0, "sampling temperature (the loss uses the same)")
    max_new_tokens: int = setting(96, "most tokens per answer")
    ref: str = setting(
        "init",
        "the KL penalty's reference: init (the starting adapter; the base from zero) or base",
        choices=("init", "base"),
    )
    save_every: int = setting(10, "steps between checkpoints (0: never)")
    seed: int = setting(0, "same seed, same prompts and samples: same adapter")
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        if self.k < 2:
            raise ConfigError(f"--k must be at least 2: a leave-one-out advantage needs another answer (got {self.k})")
        for name in ("batch", "steps", "updates", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.beta < 0 or self.eta <= 0 or not 0 < self.clip < 1:
            raise ConfigError("lr and eta must be positive, beta >= 0, clip in (0, 1)")
        if not 0.05 <= self.temperature <= 5:
            raise ConfigError(f"temperature must be within [0.05, 5] for sampling, got {self.temperature}")


@dataclass
class Policy:
    """The adapter being trained on its own copy of the model, its optimizer and its reference."""

    model: Llama
    lora: LoraConfig
    params: dict[str, torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    ref: dict[str, torch.Tensor] | None  # reference adapter weights; None: the base

    @classmethod
    def start(cls, model: Llama, lora: LoraConfig, config: RLConfig, init: Path | None) -> Policy:
        torch.manual_seed(config.seed)
        if init is not None:
            adapter = read_adapter(init)
            check_fits(adapter, model)
            lora = adapter.config
        add_lora(model, replace(lora, dropout=0.0))  # on-policy ratios need the sampler's exact function
        if init is not None:
            load_lora_state(model, adapter.tensors)
        params = {
            f"{p}.{n}": w
            for p, layer in lora_layers(model)
            for n, w in layer.named_parameters()
            if not n.startswith("base.")
        }
        optimizer = torch.optim.AdamW(params.values(), lr=config.lr, weight_decay=0.0)
        # from zero the starting adapter is the base (B = 0): the base is the reference either way
        ref = None if config.ref == "base" or init is None else {k: p.detach().clone() for k, p in params.items()}
        model.eval()
        return cls(model, lora, params, optimizer, ref)

    def logprobs(self, batch: Rollouts, config: RLConfig, which: str = "ref") -> torch.Tensor:
        """Answer-token log-probs [N] under the reference or the base, one prompt's k answers at a time."""
        parts = []
        for i in range(0, batch.tokens.shape[0], config.k):
            micro = batch.rows(slice(i, i + config.k))
            if which == "base" or self.ref is None:
                with adapter_off(self.model):
                    parts.append(token_logprobs(self.model, micro, config.temperature))
            else:
                with swapped(self.params, self.ref):
                    parts.append(token_logprobs(self.model, micro, config.temperature))
        return torch.cat(parts)

    def update(
        self, batch: Rollouts, old: torch.Tensor | None, ref: torch.Tensor, config: RLConfig
    ) -> tuple[dict[str, float], torch.Tensor]:
        """One AdamW step on the whole batch, one prompt's k answers per forward and backward pass; the
        loss's figures and the answer tokens' log-probs before the step. `old` None: this is the first
        update on these answers, so the policy now is the sampler and its log-probs are `old`."""
        rows = batch.tokens.shape[0]
        seq_all = batch.seq
        figures = {"loss": 0.0, "kl_ref": 0.0, "kl_ref_seq": 0.0, "clipped": 0.0}
        before, start = [], 0
        for i in range(0, rows, config.k):
            micro = batch.rows(slice(i, i + config.k))
            n = int(micro.answer.sum())
            sl = slice(start, start + n)
            start += n
            with torch.enable_grad():
                logp = token_logprobs(self.model, micro, config.temperature)
                before.append(logp.detach())
                o = logp.detach() if old is None else old[sl]
                terms = policy_loss(
                    logp,
                    o,
                    ref[sl],
                    seq_all[sl] - i,
                    micro.advantages,
                    config.algo,
                    config.beta,
                    config.clip,
                    config.eta,
                )
                share = micro.tokens.shape[0] / rows
                (terms.loss * share).backward()
            figures["loss"] += float(terms.loss.detach()) * share
            figures["kl_ref"] += terms.kl_ref * n / max(1, len(ref))
            figures["kl_ref_seq"] += terms.kl_ref_seq * share
            figures["clipped"] += terms.clipped * n / max(1, len(ref))
        torch.nn.utils.clip_grad_norm_(self.params.values(), config.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return figures, torch.cat(before)

    def save(self, path: Path, fingerprint: str, dtype: str = "float32", extra: dict[str, str] | None = None) -> None:
        save_adapter(path, self.lora, lora_state_dict(self.model), fingerprint, dtype, extra_files=extra)


def sample_seed(seed: int, step: int, prompt: int, j: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{step}/{prompt}/{j}".encode()).digest()[:8], "little")


def step_prompts(n: int, config: RLConfig, step: int) -> list[int]:
    """The prompts of a step: passes over the file in an order that depends only on the seed."""
    per = config.batch
    first = step * per
    out = []
    for pos in range(first, first + per):
        epoch, at = divmod(pos, n)
        order = list(range(n))
        random.Random(config.seed * 1_000_003 + epoch).shuffle(order)
        out.append(order[at])
    return out


def sampler_engine(model: Llama, tok: Tokenizer, config: RLConfig, longest: int, rank: int) -> Engine:
    engine_config = EngineConfig(
        max_batch=min(64, config.batch * config.k),
        max_len=longest + config.max_new_tokens,
        max_rank=rank,
        adapter_dtype="float32",  # the sampler computes the trained adapter exactly
        adapter_cache_mb=64,
        prefix_cache_mb=0,
        max_waiting=2**31,
        max_queued_per_tenant=2**31,
    )
    return Engine(model, tok, engine_config)


@dataclass
class RLResult:
    steps: int
    history: list[dict[str, float]]
    seconds: float
    tokens_sampled: int


def train_rl(
    model_name: str,
    prompts_path: Path,
    reward: Reward,
    config: RLConfig,
    out: Path,
    lora: LoraConfig | None = None,
    init_from: Path | None = None,
    resume: bool = False,
    storage_dtype: str = "bfloat16",
    place: Placement = Placement(),
) -> RLResult:
    """Train an adapter by RL on the prompts of `prompts_path` (lines with `prompt` or `messages` and the
    fields the reward reads) and write it to `out` with its record (`rl.json`)."""
    cases = load_cases(prompts_path, need_reference=False)
    if not cases:
        raise ConfigError(f"{prompts_path} holds no prompts")
    model, tok, source = place.load(model_name)
    sampler_model, _, _ = place.load(model_name)
    fingerprint = model.fingerprint()
    policy = Policy.start(model, lora or LoraConfig(), config, init_from)
    prompts = [tok.encode_chat(c.messages) for c in cases]
    engine = sampler_engine(sampler_model, tok, config, max(map(len, prompts)), policy.lora.r)
    ckpt = checkpoint_dir(out)
    state: dict[str, Any] = {"step": 0, "seconds": 0.0, "tokens": 0, "history": []}
    if resume:
        state = checkpoint.load_checkpoint(ckpt, policy.params, policy.optimizer)
        log.info("resuming at step %d of %d", state["step"], config.steps)
    sampled = out.parent / f".{out.name}.policy"  # the adapter the engine samples from, rewritten each step
    policy.save(sampled, fingerprint)
    source_ = Source("rl-policy", "", sampled)
    t0 = time.perf_counter() - state["seconds"]
    try:
        with progress("rl", config.steps, "steps") as bar:
            bar.update(state["step"])
            while state["step"] < config.steps:
                try:
                    record = _step(policy, engine, source_, cases, prompts, reward, config, state["step"], tok.pad_id)
                except RewardError:
                    checkpoint.save_checkpoint(ckpt, policy.params, policy.optimizer, state)
                    log.error("stopped at step %d; the checkpoint in %s resumes it (--resume)", state["step"], ckpt)
                    raise
                policy.save(sampled, fingerprint)
                state["step"] += 1
                state["tokens"] += int(record["tokens"])
                state["seconds"] = time.perf_counter() - t0
                state["history"].append(record)
                _log_step(state["step"], record)
                bar.update(
                    state["step"], reward=f"{record['reward']:.3f}", kl=f"{record['kl_ref_seq']:.2f}",
                    **{"tok/s": f"{state['tokens'] / state['seconds']:.0f}"},
                )  # fmt: skip
                if config.save_every and state["step"] % config.save_every == 0:
                    checkpoint.save_checkpoint(ckpt, policy.params, policy.optimizer, state)
    finally:
        engine.stop()
    result = RLResult(state["step"], state["history"], time.perf_counter() - t0, state["tokens"])
    record = _record(model_name, source.name, fingerprint, prompts_path, reward, config, policy, init_from, result)
    policy.save(out, fingerprint, storage_dtype, {RECORD_FILE: json.dumps(record, indent=2)})
    shutil.rmtree(ckpt, ignore_errors=True)
    log.info(
        "wrote %s: %d steps in %.0f s, %d tokens sampled", out, result.steps, result.seconds, result.tokens_sampled
    )
    return result


def _step(
    policy: Policy,
    engine: Engine,
    source: Source,
    cases: list[Case],
    prompts: list[list[int]],
    reward: Reward,
    config: RLConfig,
    step: int,
    pad: int,
) -> dict[str, float]:
    """Sample, score, update: one step's figures."""
    chosen = step_prompts(len(cases), config, step)
    jobs = [
        Job(
            prompts[i],
            SamplingParams(config.max_new_tokens, config.temperature, seed=sample_seed(config.seed, step, i, j)),
            ((source, 1.0),),
        )
        for i in chosen
        for j in range(config.k)
    ]
    t0 = time.perf_counter()
    answers = run_jobs(engine, jobs, f"sampling step {step + 1}")
    t_sample = time.perf_counter() - t0
    scored = reward.score([cases[i] for i in chosen for _ in range(config.k)], [a.text.strip() for a in answers])
    rewards = torch.tensor([s.reward for s in scored], dtype=torch.float32).view(len(chosen), config.k)
    advantages = leave_one_out(rewards).flatten()
    batch = Rollouts.of(
        [prompts[i] for i in chosen for _ in range(config.k)],
        [a.token_ids for a in answers],
        advantages,
        pad,
        policy.model.device,
    )
    t1 = time.perf_counter()
    with torch.no_grad():
        ref = policy.logprobs(batch, config)
    figures, old = policy.update(batch, None, ref, config)
    for _ in range(config.updates - 1):
        policy.update(batch, old, ref, config)
    kl_base = float("nan")
    if policy.ref is None:  # the reference is the base
        kl_base = figures["kl_ref_seq"]
    elif (step + 1) % KL_BASE_EVERY == 0 or step + 1 == config.steps:
        with torch.no_grad():
            base = policy.logprobs(batch, config, "base")
        kl_base = float(torch.zeros(len(answers), device=old.device).index_add(0, batch.seq, old - base).mean())
    tokens = sum(len(a.token_ids) for a in answers)
    return {
        "step": step + 1,
        "reward": float(rewards.mean()),
        "reward_std": float(rewards.std()),
        "pass_rate": sum(s.passed for s in scored) / len(scored),
        "kl_ref_seq": figures["kl_ref_seq"],
        "kl_ref": figures["kl_ref"],
        "kl_base_seq": kl_base,
        "length": tokens / len(answers),
        "clipped": figures["clipped"],
        "loss": figures["loss"],
        "tokens": tokens,
        "sample_seconds": round(t_sample, 3),
        "update_seconds": round(time.perf_counter() - t1, 3),
    }


def _log_step(step: int, r: dict[str, float]) -> None:
    base = "" if math.isnan(r["kl_base_seq"]) else f" (base {r['kl_base_seq']:.3f})"  # measured every few steps
    log.info(
        "step %d: reward %.3f, pass %.2f, KL to ref %.3f%s nats/answer, length %.1f tokens, "
        "%.0f sampled tok/s, update %.1f s",
        step, r["reward"], r["pass_rate"], r["kl_ref_seq"], base, r["length"],
        r["tokens"] / max(r["sample_seconds"], 1e-9), r["update_seconds"],
    )  # fmt: skip


def _record(
    model_name: str,
    base_name: str,
    fingerprint: str,
    prompts: Path,
    reward: Reward,
    config: RLConfig,
    policy: Policy,
    init_from: Path | None,
    result: RLResult,
) -> dict[str, Any]:
    return {
        "graftlm_version": __version__,
        "base_model": {"name": base_name, "requested": model_name, "fingerprint": fingerprint},
        "prompts": {"path": str(prompts), "sha256": file_sha256(prompts)},
        "reward": reward.spec,
        "config": {"rl": asdict(config), "lora": policy.lora.to_peft()},
        "init_from": str(init_from) if init_from is not None else None,
        "metrics": {
            "steps": result.steps,
            "seconds": round(result.seconds, 1),
            "tokens_sampled": result.tokens_sampled,
            "final": result.history[-1] if result.history else {},
        },
        "history": result.history,
    }
