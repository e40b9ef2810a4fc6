"""Train one LoRA adapter from JSONL files and write it with its training record."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from graftlm import __version__
from graftlm.fileio import file_sha256
from graftlm.loading import catalog
from graftlm.lora.config import LoraConfig
from graftlm.lora.model import lora_state_dict
from graftlm.lora.peft_io import WEIGHTS_FILE, read_adapter, save_adapter
from graftlm.setting import setting
from graftlm.train.data import load_examples
from graftlm.train.trainer import TrainConfig, Trainer, TrainResult

log = logging.getLogger(__name__)
RECORD_FILE = "training.json"


@dataclass(frozen=True)
class DataSpec:
    train: Path
    valid: Path | None = None
    on_long: str = setting("truncate", "what to do with longer examples", choices=("truncate", "reject"))
    chat: bool = setting(
        True, "prompt/completion lines without the chat template", flag="--raw"
    )  # with it (the default), they go through the model's chat template when it has one


def checkpoint_dir(out: Path) -> Path:
    """Checkpoints live beside the adapter folder, which is swapped in whole at the end."""
    return out.parent / f".{out.name}.checkpoint"


def train_adapter(
    model_name: str,
    data: DataSpec,
    out: Path,
    lora: LoraConfig,
    config: TrainConfig,
    resume: bool = False,
    storage_dtype: str = "bfloat16",
    init_from: Path | None = None,
) -> TrainResult:
    """Train and write one adapter; with `init_from` it starts from that adapter's weights and settings
    (`lora` is then ignored)."""
    model, tok, source = catalog.load(model_name)
    train = load_examples(data.train, tok, config.max_length, data.on_long, data.chat)
    valid = load_examples(data.valid, tok, config.max_length, data.on_long, data.chat) if data.valid else None
    log.info(
        "%d training examples (%d target tokens)%s",
        len(train),
        sum(e.n_targets for e in train),
        f", {len(valid)} validation examples" if valid else "",
    )
    fingerprint = model.fingerprint()
    pad = tok.pad_id
    init = read_adapter(init_from) if init_from is not None else None
    if init is not None:
        lora = init.config
        log.info("starting from %s (rank %d)", init_from, init.config.r)
    trainer = Trainer(model, lora, config, pad, checkpoint_dir(out), init)
    result = trainer.run(train, valid, resume=resume)
    record = {
        "graftlm_version": __version__,
        "base_model": {"name": source.name, "origin": str(source.origin), "fingerprint": fingerprint},
        "data": {
            "train": {"path": str(data.train), "sha256": file_sha256(data.train), "examples": len(train)},
            "valid": (
                {"path": str(data.valid), "sha256": file_sha256(data.valid), "examples": len(valid)}
                if data.valid and valid
                else None
            ),
            "on_long": data.on_long,
            "chat": data.chat,
        },
        "config": trainer.config_record(),
        "init_from": (
            {"path": str(init_from), "sha256": file_sha256(init_from / WEIGHTS_FILE)} if init_from is not None else None
        ),
        "metrics": {
            "steps": result.steps,
            "train_loss": result.train_loss,
            "valid_loss": result.valid_loss,
            "tokens": result.tokens,
            "seconds": round(result.seconds, 2),
            "tokens_per_second": round(result.tokens / max(result.seconds, 1e-9), 1),
            "threads": torch.get_num_threads(),
        },
        "history": result.history,
    }
    save_adapter(
        out,
        lora,
        lora_state_dict(model),
        fingerprint,
        storage_dtype,
        base_model=source.name,
        extra_files={RECORD_FILE: json.dumps(record, indent=2)},
    )
    shutil.rmtree(checkpoint_dir(out), ignore_errors=True)
    log.info(
        "wrote %s: %d steps in %.0f s, train loss %.4f%s",
        out,
        result.steps,
        result.seconds,
        result.train_loss,
        f", valid loss {result.valid_loss:.4f}" if result.valid_loss is not None else "",
    )
    return result
