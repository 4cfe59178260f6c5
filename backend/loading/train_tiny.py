"""Train a small Llama on Python's own standard library source: offline, seeded, a few minutes on 2 CPU cores.

A random-weight model predicts every token at about ln(vocab), whatever its weights are rounded to, so it
cannot show what quantization costs; this briefly trained one can. Training text: a fixed list of stdlib
modules (present on every Python install); held-out text: another module (`EVAL_MODULE`). The result is an
ordinary checkpoint folder (config.json, model.safetensors, tokenizer files) that loads through the engine.
A folder already trained with the same settings (and the same Python version) is reused.

The command line is backend/tools/train_tiny.py.
"""

from __future__ import annotations

import importlib.util
import json
import math
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from backend.loading.tiny_models import build_tokenizer

TRAIN_MODULES = (
    "argparse",
    "ast",
    "asyncio.base_events",
    "calendar",
    "configparser",
    "contextlib",
    "csv",
    "dataclasses",
    "dis",
    "doctest",
    "email.message",
    "enum",
    "fractions",
    "functools",
    "gettext",
    "heapq",
    "http.client",
    "imaplib",
    "inspect",
    "ipaddress",
    "logging",
    "mailbox",
    "optparse",
    "pickle",
    "pprint",
    "selectors",
    "shutil",
    "smtplib",
    "socket",
    "statistics",
    "subprocess",
    "tarfile",
    "tempfile",
    "threading",
    "tokenize",
    "typing",
    "unittest.case",
    "urllib.parse",
    "uuid",
    "weakref",
    "zipfile",
)
EVAL_MODULE = "collections"  # held out: collections/__init__.py
INFO_FILE = "train_info.json"


@dataclass(frozen=True)
class TrainConfig:
    vocab_size: int = 2048  # byte-level BPE trained on the training text
    hidden_size: int = 256  # a multiple of 128, so int4's default group of 128 applies as asked
    intermediate_size: int = 768
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    max_position_embeddings: int = 512
    seq_len: int = 256
    batch_size: int = 8
    steps: int = 600  # 1.2M tokens, ~4 min on 2 idle CPU cores
    lr: float = 3e-3
    warmup_steps: int = 20
    seed: int = 0
    train_modules: tuple[str, ...] = TRAIN_MODULES


@dataclass
class TrainResult:
    path: Path
    losses: list[float] = field(default_factory=list)  # training loss of each step
    seconds: float = 0.0


def module_source(name: str) -> str:
    """The source text of a pure-Python stdlib module (read from the installed file)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        raise FileNotFoundError(f"no Python source for module {name!r} on this install")
    return Path(spec.origin).read_text(encoding="utf-8")


def eval_text() -> str:
    """The held-out evaluation text (not in the training modules)."""
    return module_source(EVAL_MODULE)


def _lr_factor(step: int, cfg: TrainConfig) -> float:  # linear warm-up, then cosine to 10%
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))


def train(out: str | Path, cfg: TrainConfig = TrainConfig(), log: Callable[[str], None] = print) -> TrainResult:
    """Train from scratch and write the checkpoint + tokenizer + train_info.json to `out`."""
    out, t0 = Path(out), time.perf_counter()
    torch.manual_seed(cfg.seed)
    texts = [module_source(m) for m in cfg.train_modules]
    tokenizer = build_tokenizer(cfg.vocab_size, texts)
    ids = torch.tensor([t for text in texts for t in tokenizer.encode(text) + [tokenizer.eos_token_id]])
    if len(ids) <= cfg.seq_len:
        raise ValueError(f"the training text has {len(ids)} tokens, fewer than seq_len={cfg.seq_len}")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)  # fp32
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, cfg))
    generator = torch.Generator().manual_seed(cfg.seed)
    log(f"training {model.num_parameters() / 1e6:.2f}M params on {len(ids)} tokens for {cfg.steps} steps")
    result = TrainResult(out)
    model.train()
    for step in range(cfg.steps):
        starts = torch.randint(0, len(ids) - cfg.seq_len, (cfg.batch_size,), generator=generator).tolist()
        x = torch.stack([ids[s : s + cfg.seq_len] for s in starts])  # (B, L)
        loss = model(input_ids=x, labels=x).loss  # next-token loss (transformers shifts the labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        result.losses.append(loss.item())
        if step % 25 == 0 or step == cfg.steps - 1:
            log(f"step {step:4d}  loss {loss.item():.3f}  {time.perf_counter() - t0:.0f}s")
    result.seconds = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    model.eval().save_pretrained(out)
    tokenizer.save_pretrained(out)
    info = dict(
        config=_config_key(cfg),
        python=platform.python_version(),
        train_tokens=len(ids),
        first_loss=result.losses[0],
        final_loss=sum(result.losses[-10:]) / len(result.losses[-10:]),
        seconds=round(result.seconds, 1),
    )
    (out / INFO_FILE).write_text(json.dumps(info, indent=1))
    return result


def _config_key(cfg: TrainConfig) -> dict:
    return json.loads(json.dumps(asdict(cfg)))  # tuples -> lists, as read back from JSON


def ensure_trained(out: str | Path, cfg: TrainConfig = TrainConfig(), log: Callable[[str], None] = print) -> Path:
    """The trained checkpoint at `out` (the built-in tiny:trained lives in the project's cache: builtin.py),
    training it first unless it was trained with these settings."""
    out = Path(out).expanduser()
    info_path = out / INFO_FILE
    if info_path.exists() and (out / "config.json").exists():
        info = json.loads(info_path.read_text())
        if info.get("config") == _config_key(cfg) and info.get("python") == platform.python_version():
            return out
    return train(out, cfg, log).path
