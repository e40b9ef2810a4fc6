"""The training loop (LoRA adapters, palette tuning): AdamW, linear warmup then cosine decay, gradient
accumulation, validation on a schedule, checkpoints with exact resume, and a progress bar."""

from __future__ import annotations

import logging
import math
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from graftlm import native
from graftlm.errors import ConfigError
from graftlm.lora.config import AdapterError, LoraConfig
from graftlm.lora.model import add_lora, load_lora_state, lora_layers
from graftlm.lora.peft_io import Adapter, check_fits
from graftlm.model.llama import Llama
from graftlm.progress import progress
from graftlm.setting import setting
from graftlm.train import checkpoint
from graftlm.train.data import Batch, Example, bucketed_batches, collate
from graftlm.train.losses import completion_loss

log = logging.getLogger(__name__)


def length_or_auto(text: str) -> int | None:
    """A number, or "auto" (None) (--max-length, --checkpoint-layers)."""
    if text == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"expected a number or auto, not {text!r}") from None


@dataclass(frozen=True)
class TrainConfig:
    lr: float = setting(2e-4, "peak learning rate")
    epochs: int = setting(1, "passes over the training data")
    batch_size: int = setting(8, "examples per micro-batch", flag="--batch")
    grad_accum: int = setting(1, "micro-batches per optimizer step")
    max_length: int | None = setting(
        None,
        "tokens per example, or auto: enough for 99%% of the training examples within a memory budget (default: auto)",
        parse=length_or_auto,
    )
    warmup: float = setting(0.05, "warmup fraction of optimizer steps")
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = setting(0, "same seed, same data: same adapter")
    eval_every: int = setting(50, "optimizer steps between validations (0: only at the end)")
    save_every: int = setting(100, "optimizer steps between checkpoints (0: never)")
    max_steps: int = setting(0, "stop after this many optimizer steps (0: run all epochs)")
    checkpoint_layers: int | None = setting(
        None,
        "decoder layers whose activations are recomputed in the backward pass instead of kept (less memory, "
        "slower): a number, -1 for all, or auto: only as many as keep a batch within --activation-mb "
        "(default: auto)",
        parse=length_or_auto,
    )
    # 2.5 GB keeps a batch of 8 x 256 tokens of SmolLM2-135M (2.1 GB) whole: recomputing costs time
    activation_mb: float = setting(
        2560.0, "activation memory a micro-batch may keep before --checkpoint-layers auto recomputes layers"
    )

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_length is not None and self.max_length < 2:
            raise ConfigError(f"max_length must be at least 2 tokens (or auto), got {self.max_length}")
        if self.lr <= 0:
            raise ConfigError(f"learning rate must be positive, got {self.lr}")
        if not 0 <= self.warmup < 1:
            raise ConfigError(f"warmup must be a fraction in [0, 1), got {self.warmup}")


def recomputed_layers(model: Llama, tokens: int, config: TrainConfig) -> int:
    """How many decoder layers recompute their activations for a batch of `tokens` (padded) tokens.

    A layer keeps `activation_floats` per token for its backward pass; recomputed, only its input."""
    n = model.config.num_hidden_layers
    if config.checkpoint_layers is not None:
        return n if config.checkpoint_layers < 0 else min(n, config.checkpoint_layers)
    c = model.config
    kept = 4 * tokens * activation_floats(c)
    saved = kept - 4 * tokens * c.hidden_size  # what one recomputed layer gives back
    over = n * kept - config.activation_mb * 2**20
    return 0 if over <= 0 else min(n, math.ceil(over / saved))


def activation_floats(c: Any) -> int:
    """Floats a float32 decoder layer keeps per token for its backward pass: six of the hidden width (its
    input, the two norms' outputs, queries, attention's output, the residual), keys and values, and
    the MLP's three wide products (gate, up, their SwiGLU product). 8,448 for SmolLM2-135M, where
    PyTorch's saved tensors measured 8,704 (the rest: the adapters' rank-wide products)."""
    kv = c.num_key_value_heads * c.head_dim
    return 6 * c.hidden_size + 2 * kv + 3 * c.intermediate_size


def peak_rss_mb() -> float:
    """The process's peak resident memory so far, in MB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def lr_factor(step: int, total: int, warmup_steps: int) -> float:
    """Linear warmup to 1, then cosine decay to 0 at `total`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def evaluate_loss(model: Llama, examples: list[Example], batch_size: int, pad_id: int) -> float:
    """Mean cross-entropy per target token."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    ordered = sorted(examples, key=len)
    for i in range(0, len(ordered), batch_size):
        loss, n = completion_loss(model, collate(ordered[i : i + batch_size], pad_id, model.device))
        total += float(loss)
        count += n
    model.train(was_training)
    return total / max(1, count)


@dataclass
class TrainResult:
    steps: int
    train_loss: float
    valid_loss: float | None
    tokens: int
    seconds: float
    history: list[dict[str, float]]
    peak_rss_mb: float = 0.0  # the process's peak resident memory, training included


class Loop:
    """The optimisation loop over any parameters of a model: AdamW, warmup and cosine decay, gradient
    accumulation and clipping, validation on a schedule, checkpoints with exact resume, a progress bar.
    `Trainer` is it for LoRA adapters; palette tuning (`graftlm.recipes.tune`) runs it on lookup tables."""

    def __init__(
        self,
        model: Llama,
        params: dict[str, nn.Parameter],
        config: TrainConfig,
        pad_id: int,
        checkpoint_dir: Path | None = None,
        loss: Callable[[Llama, Batch], tuple[torch.Tensor, int]] = completion_loss,
    ):
        """params: the parameters to train, by name (checkpoints key them so). loss: summed loss of a
        batch and its target count (default: completion cross-entropy; distillation passes its KL)."""
        self.model, self.params, self.config, self.pad_id = model, params, config, pad_id
        self.checkpoint_dir = checkpoint_dir
        self.loss = loss
        self.optimizer = torch.optim.AdamW(params.values(), lr=config.lr, weight_decay=config.weight_decay)
        if not native.keep_freed_memory():
            log.debug("could not tune malloc: every step's activations are fresh memory")

    def run(
        self,
        train: list[Example],
        valid: list[Example] | None = None,
        resume: bool = False,
        on_step: Callable[[int, float], None] | None = None,
        description: str = "training",
    ) -> TrainResult:
        c = self.config
        per_epoch = math.ceil(math.ceil(len(train) / c.batch_size) / c.grad_accum)  # batches per epoch, in steps
        total = per_epoch * c.epochs if not c.max_steps else min(c.max_steps, per_epoch * c.epochs)
        warmup_steps = max(1, int(c.warmup * total))
        state: dict[str, Any] = {"step": 0, "tokens": 0, "seconds": 0.0, "history": []}
        if resume and self.checkpoint_dir is not None:
            state = checkpoint.load_checkpoint(self.checkpoint_dir, self.params, self.optimizer)
            log.info("resuming at step %d of %d", state["step"], total)
        self.model.train()
        t0 = time.perf_counter() - state["seconds"]
        last_loss = float("nan")
        with progress(description, total, "steps") as bar:
            bar.update(state["step"])
            for step, micro in self._steps(train, state["step"], total):
                for g in self.optimizer.param_groups:
                    g["lr"] = c.lr * lr_factor(step, total, warmup_steps)
                n_targets = sum(int(b.targets[:, 1:].sum()) for b in micro)
                loss_sum = 0.0
                for b in micro:
                    self.model.recompute = recomputed_layers(self.model, b.tokens.numel(), c)
                    loss, _ = self.loss(self.model, b)
                    (loss / n_targets).backward()
                    loss_sum += float(loss.detach())
                    state["tokens"] += b.n_tokens
                torch.nn.utils.clip_grad_norm_(self.params.values(), c.grad_clip)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                last_loss = loss_sum / n_targets
                state["step"] = step + 1
                state["seconds"] = time.perf_counter() - t0
                tps = state["tokens"] / state["seconds"]
                bar.update(state["step"], loss=f"{last_loss:.3f}", **{"tok/s": f"{tps:.0f}"})
                record = {"step": state["step"], "loss": last_loss, "lr": c.lr * lr_factor(step, total, warmup_steps)}
                if valid and c.eval_every and state["step"] % c.eval_every == 0 and state["step"] < total:
                    record["valid_loss"] = evaluate_loss(self.model, valid, c.batch_size, self.pad_id)
                    log.info(
                        "step %d: train loss %.4f, valid loss %.4f", state["step"], last_loss, record["valid_loss"]
                    )
                state["history"].append(record)
                if self.checkpoint_dir is not None and c.save_every and state["step"] % c.save_every == 0:
                    checkpoint.save_checkpoint(self.checkpoint_dir, self.params, self.optimizer, state)
                if on_step is not None:
                    on_step(state["step"], last_loss)
        self.model.recompute = 0
        valid_loss = evaluate_loss(self.model, valid, c.batch_size, self.pad_id) if valid else None
        self.model.eval()
        return TrainResult(
            state["step"],
            last_loss,
            valid_loss,
            state["tokens"],
            time.perf_counter() - t0,
            state["history"],
            peak_rss_mb(),
        )

    def _steps(self, train: list[Example], start: int, total: int):  # type: ignore[no-untyped-def]
        """(optimizer step, its micro-batches) from `start` on; the order depends only on the seed."""
        c = self.config
        step = 0
        for epoch in range(c.epochs):
            batches = bucketed_batches(train, c.batch_size, c.seed, epoch)
            for i in range(0, len(batches), c.grad_accum):
                if step >= total:
                    return
                if step >= start:
                    yield step, [collate(b, self.pad_id, self.model.device) for b in batches[i : i + c.grad_accum]]
                step += 1


class Trainer(Loop):
    """The loop for a LoRA adapter: adds the adapter to the model and trains its weights."""

    def __init__(
        self,
        model: Llama,
        lora: LoraConfig,
        config: TrainConfig,
        pad_id: int,
        checkpoint_dir: Path | None = None,
        init: Adapter | None = None,
        loss: Callable[[Llama, Batch], tuple[torch.Tensor, int]] = completion_loss,
    ):
        """init: an adapter to start from (its weights; `lora` must be its settings), e.g. the recovery
        adapter of a palettized base, which the new adapter then carries with it."""
        self.lora = lora
        torch.manual_seed(config.seed)  # LoRA init and dropout: same seed, same adapter
        add_lora(model, lora)
        if init is not None:
            if init.config != lora:
                raise AdapterError(f"{init.path}: a task adapter started from it takes its settings ({init.config})")
            check_fits(init, model)
            load_lora_state(model, init.tensors)
        params = {
            f"{path}.{name}": p
            for path, layer in lora_layers(model)
            for name, p in layer.named_parameters()
            if not name.startswith("base.")
        }
        super().__init__(model, params, config, pad_id, checkpoint_dir, loss)

    def config_record(self) -> dict[str, Any]:
        return {"train": asdict(self.config), "lora": self.lora.to_peft()}
