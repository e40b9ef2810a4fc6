"""Train one LoRA adapter from JSONL files and write it with its training record."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from graftlm import __version__
from graftlm.fileio import file_sha256
from graftlm.loading.catalog import Placement
from graftlm.lora.config import LoraConfig
from graftlm.lora.model import lora_state_dict
from graftlm.lora.peft_io import WEIGHTS_FILE, read_adapter, save_adapter
from graftlm.model.tokenizer import Tokenizer
from graftlm.setting import setting
from graftlm.train.data import Example, encode_file, fit_examples
from graftlm.train.long import ON_LONG, LongReport, auto_limit
from graftlm.train.trainer import TrainConfig, Trainer, TrainResult

log = logging.getLogger(__name__)
RECORD_FILE = "training.json"


@dataclass(frozen=True)
class DataSpec:
    train: Path
    valid: Path | None = None
    on_long: str = setting(
        "truncate-prompt",
        "what an example longer than --max-length loses: the middle of its user text (truncate-prompt), its end "
        "(truncate-end), or it is refused (reject) or left out (drop)",
        choices=ON_LONG,
    )
    chat: bool = setting(
        True, "prompt/completion lines without the chat template", flag="--raw"
    )  # with it (the default), they go through the model's chat template when it has one


def _examples(
    data: DataSpec, tok: Tokenizer, config: TrainConfig, context: int
) -> tuple[list[Example], list[Example] | None, LongReport, TrainConfig]:
    """The training and validation examples within one limit (chosen from the data when it is `auto`),
    what the limit did to them, and the config with the limit it used."""
    train_all = encode_file(data.train, tok, data.chat)
    valid_all = encode_file(data.valid, tok, data.chat) if data.valid else None
    limit = config.max_length
    if limit is None:
        limit, why = auto_limit([len(e.ids) for e in train_all], config.batch_size, context)
        log.info(why)
        config = replace(config, max_length=limit)
    train, report = fit_examples(train_all, tok, limit, data.on_long, data.chat)
    log.info(report.line())
    valid = fit_examples(valid_all, tok, limit, data.on_long, data.chat)[0] if valid_all else None
    return train, valid, report, config


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
    place: Placement = Placement(),
) -> TrainResult:
    """Train and write one adapter; with `init_from` it starts from that adapter's weights and settings
    (`lora` is then ignored)."""
    model, tok, source = place.load(model_name)
    train, valid, report, config = _examples(data, tok, config, model.config.max_position_embeddings)
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
            "long": report.as_dict(),
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
            "peak_rss_mb": round(result.peak_rss_mb),
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
        "wrote %s: %d steps in %.0f s (%.0f tokens/s), train loss %.4f%s; peak memory %.2f GB",
        out,
        result.steps,
        result.seconds,
        result.tokens / max(result.seconds, 1e-9),
        result.train_loss,
        f", valid loss {result.valid_loss:.4f}" if result.valid_loss is not None else "",
        result.peak_rss_mb / 1024,
    )
    return result
