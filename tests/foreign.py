"""Code and data no one here wrote: Hugging Face models (random init from small configs) and scikit-learn's
bundled data sets, wrapped in thin LightningModules, for ``tests/test_foreign.py``.

The models are the library's own classes (``GPT2LMHeadModel``, ``BertForSequenceClassification``,
``T5ForConditionalGeneration``) with their own losses, dropout and initialization; the batches are dicts with
the keys those models take (``input_ids``, ``attention_mask``, ``labels``), as a Hugging Face data collator
gives them. No network: nothing is downloaded (no ``from_pretrained``, no ``fetch_*`` data sets).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import numpy as np
import torch
from helpers import trainer
from scenarios import LossRecorder
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

VOCAB = 64  # token ids 0 (pad / BOS / EOS / decoder start) and 1 (EOS for T5) are reserved where needed


# ---------------------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    """What one run left: NormCheck's findings, each batch's loss (recorded test-side), the time, an error."""

    findings: list[Any]
    losses: list[float]
    seconds: float
    exception: BaseException | None = None
    model: L.LightningModule | None = field(default=None, repr=False)
    announced: list[str] = field(default_factory=list)  # warnings/errors announced during fit, as logged
    disabled: list[str] = field(default_factory=list)  # NormCheck's monitors/rules switched off after failing

    def learned(self, k: int = 5) -> float:
        """Mean loss of the last ``k`` batches over the mean of the first ``k`` (below 1: the run learns)."""
        finite = [v for v in self.losses if math.isfinite(v)]
        if len(finite) < 2 * k:
            return math.nan
        return (sum(finite[-k:]) / k) / (sum(finite[:k]) / k)

    def bad(self) -> list[Any]:
        return [f for f in self.findings if f.severity in ("warning", "error")]

    def describe(self) -> str:
        return "\n".join(f"[{f.severity}] step {f.step} {f.code} {f.layer}: {f.message}" for f in self.findings)


def run(
    model: L.LightningModule,
    data: DataLoader,
    max_steps: int,
    callbacks: tuple[L.Callback, ...] = (),
    **trainer_kwargs: Any,
) -> Outcome:
    """Train ``model`` on CPU with ``NormCheck(print_summary=False)`` at the Trainer's ``log_every_n_steps=50``
    (only the dense early sampling can see a problem within the first 20 steps), recording each batch's loss,
    the lines NormCheck announces and its monitors that failed (a switched-off monitor is silent too).
    Seed before building the model and the data: this does not seed."""
    from lightning_normcheck import NormCheck

    cb = NormCheck(print_summary=False)
    rec = LossRecorder()
    kwargs: dict[str, Any] = dict(max_steps=max_steps, log_every_n_steps=50)
    kwargs.update(trainer_kwargs)
    heard = _Heard()
    announcer = logging.getLogger("lightning_normcheck")
    announcer.addHandler(heard)
    t0 = time.perf_counter()
    exc: BaseException | None = None
    try:
        trainer([cb, rec, *callbacks], **kwargs).fit(model, data)
    except Exception as err:  # noqa: BLE001 - reported by the test with the findings
        exc = err
    finally:
        announcer.removeHandler(heard)
    seconds = time.perf_counter() - t0
    return Outcome(cb.findings, rec.losses, seconds, exc, model, heard.lines, cb.disabled_monitors)


class _Heard(logging.Handler):
    """The lines NormCheck announces at warning level or above while it trains (a finding can be lowered to
    info later, when later evidence shows it was milder: the user has seen the line by then)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname.lower()}: {record.getMessage()}")


# ---------------------------------------------------------------------------------------------------------
# Hugging Face models
# ---------------------------------------------------------------------------------------------------------
class DictData(Dataset):
    """Rows of equal-length tensors served as dicts (what a Hugging Face collator yields, batched by torch's
    default collate)."""

    def __init__(self, **columns: torch.Tensor) -> None:
        self.columns = columns
        self.n = len(next(iter(columns.values())))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.columns.items()}


class HFModule(L.LightningModule):
    """Any Hugging Face model that returns ``.loss`` when given ``labels``, trained with AdamW."""

    def __init__(self, model: nn.Module, lr: float = 1e-3, weight_decay: float = 0.01) -> None:
        super().__init__()
        self.model = model
        self.lr = lr
        self.weight_decay = weight_decay

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.model(**batch).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)


class ZeroGradBeforeStepHF(HFModule):
    """Manual optimization with ``opt.zero_grad()`` between ``manual_backward`` and ``step`` (the bug as users
    write it): with ``set_to_none=True`` (torch's default) every gradient is ``None`` at the step, AdamW skips
    every parameter, weight decay included, and the weights never change."""

    def __init__(self, model: nn.Module, lr: float = 1e-3) -> None:
        super().__init__(model, lr=lr)
        self.automatic_optimization = False

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        opt = self.optimizers()
        loss = self.model(**batch).loss
        self.manual_backward(loss)
        opt.zero_grad()  # the bug: the gradients are cleared before the step uses them
        opt.step()
        return loss.detach()


def gpt2(vocab: int = VOCAB, seq: int = 32) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=seq, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)


def bert(vocab: int = VOCAB, seq: int = 32, dropout: float = 0.1) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=seq,
        num_labels=2,
        pad_token_id=0,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    return BertForSequenceClassification(cfg)


def t5(vocab: int = VOCAB) -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(
        vocab_size=vocab,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5ForConditionalGeneration(cfg)


def affine_tokens(seed: int, n: int = 1024, seq: int = 16, vocab: int = VOCAB, batch: int = 16) -> DataLoader:
    """Causal LM data: each sequence starts at a random token and follows ``next = (5 * prev + 3) % vocab``
    (a bijection: every token but the first is predictable from the one before). ``labels`` are the inputs;
    the model shifts them."""
    g = torch.Generator().manual_seed(seed)
    x = torch.empty(n, seq, dtype=torch.long)
    x[:, 0] = torch.randint(0, vocab, (n,), generator=g)
    for t in range(1, seq):
        x[:, t] = (5 * x[:, t - 1] + 3) % vocab
    data = DictData(input_ids=x, attention_mask=torch.ones_like(x), labels=x.clone())
    return DataLoader(data, batch_size=batch, shuffle=True, generator=g)


def count_tokens(seed: int, n: int, seq: int = 16, vocab: int = VOCAB) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence classification: label 1 when more tokens are below ``vocab // 2`` than above (ties dropped)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (n, seq), generator=g)
    score = (x < vocab // 2).sum(1) - (x >= vocab // 2).sum(1)
    keep = score != 0
    return x[keep], (score[keep] > 0).long()


def classify_loader(x: torch.Tensor, y: torch.Tensor, seed: int, batch: int = 16) -> DataLoader:
    data = DictData(input_ids=x, attention_mask=torch.ones_like(x), labels=y)
    return DataLoader(data, batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    was = model.training
    model.eval()
    logits = model(input_ids=x, attention_mask=torch.ones_like(x)).logits
    model.train(was)
    return float((logits.argmax(-1) == y).float().mean())


def reverse_tokens(seed: int, n: int = 1024, seq: int = 8, vocab: int = VOCAB, batch: int = 16) -> DataLoader:
    """Encoder-decoder data: the target is the source reversed, then EOS (1); token ids from 2 up."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(2, vocab, (n, seq), generator=g)
    eos = torch.ones(n, 1, dtype=torch.long)
    data = DictData(input_ids=x, attention_mask=torch.ones_like(x), labels=torch.cat([x.flip(1), eos], 1))
    return DataLoader(data, batch_size=batch, shuffle=True, generator=g)


# ---------------------------------------------------------------------------------------------------------
# scikit-learn's bundled data sets
# ---------------------------------------------------------------------------------------------------------
class TabularModule(L.LightningModule):
    """A small MLP on a ``(x, y)`` batch: cross-entropy on integer labels, MSE on float targets; Adam."""

    def __init__(self, d_in: int, d_out: int, lr: float = 1e-3, width: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(d_in, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, d_out)
        )
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        out = self(x)
        if y.is_floating_point():
            return nn.functional.mse_loss(out, y)
        return nn.functional.cross_entropy(out, y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


@dataclass
class Table:
    """A bundled data set split 75/25 (stratified for classification), as float32 numpy arrays."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classification: bool
    feature_names: list[str]

    @property
    def n_out(self) -> int:
        return int(self.y_train.max()) + 1 if self.classification else 1

    def standardized(self) -> Table:
        """Features (and a regression target) standardized with the training split's mean and std."""
        mean, std = self.x_train.mean(0), self.x_train.std(0)
        x_train, x_test = (self.x_train - mean) / std, (self.x_test - mean) / std
        y_train, y_test = self.y_train, self.y_test
        if not self.classification:
            y_mean, y_std = self.y_train.mean(), self.y_train.std()
            y_train, y_test = (y_train - y_mean) / y_std, (y_test - y_mean) / y_std
        return Table(self.name, x_train, y_train, x_test, y_test, self.classification, self.feature_names)

    def loader(self, seed: int, batch: int = 16) -> DataLoader:
        x = torch.from_numpy(self.x_train)
        y = torch.from_numpy(self.y_train)
        y = y.long() if self.classification else y.float().reshape(-1, 1)
        g = torch.Generator().manual_seed(seed)
        return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=True, generator=g)

    @torch.no_grad()
    def test_accuracy(self, model: nn.Module) -> float:
        pred = model(torch.from_numpy(self.x_test)).argmax(1).numpy()
        return float((pred == self.y_test).mean())


def table(name: str, seed: int) -> Table:
    """``wine``, ``breast_cancer`` or ``diabetes`` (raw, unscaled features) from scikit-learn's bundled files."""
    from sklearn import datasets
    from sklearn.model_selection import train_test_split

    if name == "diabetes":
        bunch = datasets.load_diabetes(scaled=False)
    else:
        bunch = getattr(datasets, f"load_{name}")()
    x = np.asarray(bunch.data, dtype=np.float32)
    classification = name != "diabetes"
    y = np.asarray(bunch.target, dtype=np.int64 if classification else np.float32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.25, random_state=seed, stratify=y if classification else None
    )
    return Table(name, x_train, y_train, x_test, y_test, classification, list(bunch.feature_names))


class FirstInputs(L.Callback):
    """The float inputs (``batch[0]``) of the first ``steps`` optimizer steps as numpy arrays, by step."""

    def __init__(self, steps: int = 20) -> None:
        self.steps = steps
        self.by_step: dict[int, np.ndarray] = {}

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step < self.steps:
            self.by_step.setdefault(trainer.global_step, batch[0].detach().cpu().numpy().copy())
