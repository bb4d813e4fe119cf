"""The finding codes: one declaration each (default severity, title, likely causes ranked, fixes).

Every finding's message is built here by :func:`compose`, in one shape: what was seen (with the numbers),
where, the likely causes (most likely first) and what to try. A rule passes the numbers and, when the
context changes the ranking, the causes or fixes in the order that fits; everything else comes from the
registry. Adding a code means: one :class:`CodeSpec` here, one rule module that reports it, its tests.

Example:
    >>> REGISTRY["dead_units"].severity
    'warning'
    >>> compose("missing_zero_grad", "gradients are summed across steps.", causes=["no opt.zero_grad()"],
    ...         fixes=["call opt.zero_grad() once per step"])
    'gradients are summed across steps. Likely causes, most likely first: no opt.zero_grad(). What to try: call opt.zero_grad() once per step.'
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Severity = Literal["info", "warning", "error"]

#: Severities from least to most severe.
SEVERITIES: tuple[Severity, ...] = ("info", "warning", "error")


@dataclass(frozen=True)
class CodeSpec:
    """One finding code.

    Attributes:
        code: the stable identifier.
        severity: the severity a rule reports it with unless it says otherwise.
        title: a few words for tables.
        causes: the likely causes, most likely first.
        fixes: what to try, the first fix first.
    """

    code: str
    severity: Severity
    title: str
    causes: tuple[str, ...]
    fixes: tuple[str, ...]

    @property
    def fix(self) -> str:
        """The one-line fix."""
        return self.fixes[0]


#: The fix "clip the gradients", worded once: :mod:`~lightning_normcheck.diagnosis.fixes` replaces it in a message
#: with a clip value taken from the run's own pre-clip norms and the LightningCLI override that sets it.
CLIP_FIX = "clip gradients (gradient_clip_val=1.0)"
#: The fix of a clip value far below the typical norm, worded once (replaced the same way).
RAISE_CLIP_FIX = "set the clip value near the median pre-clip norm of a healthy run"
_CLIP = CLIP_FIX
_INIT = "re-initialize (std sqrt(2/fan_in) for ReLU/GELU, Xavier for tanh/sigmoid)"

_SPECS = (
    CodeSpec(
        "exploding_activations",
        "warning",
        "activations explode",
        (
            "init std too large for the activation that follows (weight std x sqrt(fan_in) above its Kaiming/Xavier"
            " value)",
            "depth without normalization or residuals",
            "learning rate too high (weights grew)",
        ),
        (_INIT, "add LayerNorm/BatchNorm", "lower the LR or add warmup"),
    ),
    CodeSpec(
        "vanishing_activations",
        "warning",
        "activations vanish",
        (
            "init std too small for the activation that follows (weight std x sqrt(fan_in) below its Kaiming/Xavier"
            " value)",
            "depth without normalization or residuals",
            "dead ReLUs",
        ),
        (_INIT, "add LayerNorm/BatchNorm or residual connections"),
    ),
    CodeSpec(
        "exploding_gradients",
        "warning",
        "gradients explode",
        (
            "learning rate too high",
            "no gradient clipping",
            "no warmup",
            "loss or label scale",
            "init std too large",
        ),
        ("lower the LR (e.g. 10x) or add warmup", _CLIP, "normalize the targets"),
    ),
    CodeSpec(
        "vanishing_gradients",
        "warning",
        "gradients vanish",
        (
            "saturating activations (sigmoid/tanh) in a deep stack",
            "depth without residual connections",
            "init std too small",
            "missing normalization",
        ),
        (
            "ReLU/GELU with Kaiming init (std sqrt(2/fan_in))",
            "add residual connections and pre-norm LayerNorm/BatchNorm",
            "use fewer layers",
        ),
    ),
    CodeSpec(
        "nonfinite_loss",
        "error",
        "loss is NaN/inf",
        (
            "learning rate too high (the run diverged: look for growing gradient norms before it)",
            "init std too large",
            "a log/sqrt/division of a value that reached 0 or below in the loss, or bad labels",
            "fp16 overflow",
        ),
        (
            "lower the LR or add warmup",
            _CLIP,
            "add an eps to log/sqrt/divisions",
            "run with Trainer(detect_anomaly=True) to find the op",
        ),
    ),
    CodeSpec(
        "nonfinite_gradients",
        "error",
        "gradients are NaN/inf",
        (
            "an op whose derivative is infinite at the point it is used (sqrt or norm of 0, log of 0, pow with a"
            " fractional exponent of 0, division by ~0)",
            "gradient overflow after exploding gradients (learning rate too high, no clipping)",
            "fp16 overflow",
        ),
        (
            "add an eps (torch.sqrt(x + 1e-12))",
            "clamp before log/division",
            _CLIP,
            "run Trainer(detect_anomaly=True) to name the op",
        ),
    ),
    CodeSpec(
        "dead_units",
        "warning",
        "dead ReLUs",
        (
            "learning rate too high (a large update pushed the pre-activations negative)",
            "a negative bias or bad init of the layer before it",
            "inputs not normalized",
            "missing normalization",
        ),
        (
            "lower the LR or add warmup",
            "init the layer before with Kaiming (std sqrt(2/fan_in)) and zero bias",
            "use LeakyReLU/GELU",
            "add BatchNorm/LayerNorm before the ReLU",
        ),
    ),
    CodeSpec(
        "saturated_activations",
        "warning",
        "tanh/sigmoid saturate",
        (
            "init std too large for tanh/sigmoid (pre-activations far from 0)",
            "inputs not normalized",
            "learning rate too high",
            "missing normalization",
        ),
        (
            "Xavier init (std sqrt(2/(fan_in+fan_out)))",
            "normalize the inputs",
            "add LayerNorm before the activation",
            "lower the LR, or switch to ReLU/GELU",
        ),
    ),
    CodeSpec(
        "high_clip_rate",
        "warning",
        "clipping on most steps",
        (
            "learning rate too high",
            "a clip value far below the typical gradient norm",
            "loss or label scale",
            "init std too large",
        ),
        (
            "lower the LR (or add warmup)",
            RAISE_CLIP_FIX,
            "normalize targets; if this is a deliberate choice, ignore",
        ),
    ),
    CodeSpec(
        "weight_norm_growth",
        "warning",
        "one layer's weights run away",
        (
            "a learning rate too high for this layer (its own param group or LR multiplier)",
            "no weight decay with Adam",
            "an accumulation or double-step bug scaling its updates",
            "no gradient clipping",
        ),
        (
            "lower this layer's LR",
            "add weight decay (AdamW, e.g. 0.01)",
            _CLIP,
            "add a normalization after this layer",
        ),
    ),
    CodeSpec(
        "missing_zero_grad",
        "error",
        "zero_grad missing",
        (
            "an `optimizer_zero_grad` override that does nothing",
            "a manual-optimization loop without `opt.zero_grad()`",
        ),
        (
            "call `opt.zero_grad()` once per optimizer step (before the first backward of each window)",
            "remove the `optimizer_zero_grad` override",
        ),
    ),
    CodeSpec(
        "double_optimizer_step",
        "error",
        "optimizer.step() twice",
        (
            "`opt.step()` twice in `training_step` or in an `optimizer_step` override",
            "another callback or hook stepping the torch optimizer again (`trainer.optimizers[0].step()`, which"
            " bypasses Lightning)",
        ),
        ("call `step()` exactly once per backward pass (or accumulation window), remove the extra call",),
    ),
    CodeSpec(
        "loss_sum_reduction",
        "warning",
        "loss summed over the batch",
        (
            "reduction='sum' in F.mse_loss/F.cross_entropy/nn.*Loss",
            "a hand-written `.sum()` over samples",
        ),
        (
            "reduction='mean', or divide the sum by the batch size (summing over features and averaging over"
            " samples is fine)",
            "then re-tune the learning rate",
        ),
    ),
    CodeSpec(
        "accumulation_not_averaged",
        "warning",
        "accumulated gradients not averaged",
        ("the losses given to `manual_backward` are not divided by the number of micro-batches",),
        ("`self.manual_backward(loss / k)`", "or lower the learning rate by the same factor"),
    ),
    CodeSpec(
        "hidden_state_not_detached",
        "error",
        "RNN state not detached",
        ("a recurrent state carried across batches without `.detach()`",),
        (
            "detach the state at each batch boundary (`self.hidden = tuple(h.detach() for h in hidden)`, or"
            " `h.detach()` for a GRU/RNN), i.e. truncated backpropagation through time",
            "do not use retain_graph=True to silence the error",
        ),
    ),
    CodeSpec(
        "gradient_spikes",
        "warning",
        "intermittent gradient spikes",
        (
            "a corrupted or mislabeled example in those batches",
            "a rare class the model keeps getting wrong",
            "an occasional bad batch (outliers, a different scale)",
        ),
        (
            "check those batches (with shuffle=True the batch index does not identify the samples: log the sample"
            " indices)",
            "fix or drop bad labels",
            "for a rare class use class weights (CrossEntropyLoss(weight=...)) or a WeightedRandomSampler",
        ),
    ),
    CodeSpec(
        "input_scale",
        "warning",
        "inputs of extreme scale",
        ("a raw, unscaled feature", "a constant column divided by a tiny std", "missing values left as NaN"),
        ("standardize with training-set statistics and a clamped std, (x - mean) / std.clamp_min(1e-3)",),
    ),
    CodeSpec(
        "label_scale",
        "warning",
        "regression targets of large scale",
        ("regression targets left unnormalized",),
        (
            "normalize the targets, (y - mean) / std with training-set statistics (or predict log1p(y)), and"
            " un-normalize predictions (pred * std + mean) for metrics and inference",
        ),
    ),
    CodeSpec(
        "learning_rate_too_high",
        "warning",
        "learning rate too high",
        (
            "the learning rate is far too high for this model and optimizer",
            "no warm-up (Adam/AdamW move every weight by ~lr on their first steps)",
            "a per-group LR or LR multiplier that scales every layer up",
        ),
        (
            "lower the learning rate (the message names one to try)",
            "add a linear warm-up over the first few hundred steps",
            _CLIP,
        ),
    ),
    CodeSpec(
        "zero_gradients",
        "error",
        "optimizer steps with zero gradients",
        (
            "`opt.zero_grad()` called between `backward` and `step` (the gradients are cleared before they are used)",
            "a loss built from detached tensors (`.detach()`, `.item()`, `torch.no_grad()`, a tensor rebuilt from"
            " numpy)",
            "parameters that are not in the graph (the optimizer holds another module's parameters, or a module"
            " that forward never uses)",
        ),
        (
            "call `opt.zero_grad()` before `backward` (or right after `step`), never between them",
            "compute the loss from the model's outputs without detaching them",
            "check that `configure_optimizers` passes the parameters forward uses",
        ),
    ),
)

#: Every registered code, by name.
REGISTRY: dict[str, CodeSpec] = {spec.code: spec for spec in _SPECS}

#: The codes of the public contract, in the order of the README's table.
CODES: tuple[str, ...] = tuple(REGISTRY)


def compose(
    code: str,
    seen: str,
    *,
    where: str = "",
    causes: Sequence[str] | None = None,
    fixes: Sequence[str] | None = None,
    note: str = "",
) -> str:
    """The message of a finding of ``code``: seen (numbers), where, likely causes, what to try, a note.

    Args:
        code: a registered code.
        seen: what was measured, with the numbers and the steps.
        where: the layer, module or batch it concerns, as a sentence (may be empty).
        causes: the likely causes in the order that fits the evidence (default: the registry's). An empty
            sequence leaves the sentence out.
        fixes: what to try in that order (default: the registry's). Empty: left out.
        note: a closing remark (an info-level caveat, a deliberate choice).

    Raises:
        KeyError: ``code`` is not registered.
    """
    spec = REGISTRY[code]
    causes = spec.causes if causes is None else causes
    fixes = spec.fixes if fixes is None else fixes
    parts = [_end(seen), _end(where)]
    if causes:
        parts.append(_end("Likely causes, most likely first: " + ", ".join(causes)))
    if fixes:
        parts.append(_end("What to try: " + "; ".join(fixes)))
    parts.append(_end(note))
    return " ".join(p for p in parts if p)


def _end(text: str) -> str:
    """``text`` stripped, ending with a full stop unless it already ends a sentence."""
    text = text.strip()
    if not text or text.endswith((".", "!", "?")):
        return text
    return text + "."


__all__ = ["CODES", "REGISTRY", "SEVERITIES", "CodeSpec", "Severity", "compose"]
