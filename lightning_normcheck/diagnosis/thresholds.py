"""Every threshold of the rules, one frozen dataclass per family, each default with where it comes from.

Thresholds are per instance: pass a :class:`Thresholds` to ``NormCheck(thresholds=...)`` (or to any of the
single callbacks), or set them from LightningCLI YAML::

    trainer:
      callbacks:
        - class_path: lightning_normcheck.NormCheck
          init_args:
            thresholds:
              activations: {dead_fraction: 0.7}
              gradients: {spike_factor: 20.0}

Example:
    >>> th = Thresholds(activations=ActivationThresholds(dead_fraction=0.7))
    >>> th.activations.dead_fraction, th.gradients.grad_growth
    (0.7, 100.0)
    >>> Thresholds(clipping=ClipThresholds(high_rate=2.0))
    Traceback (most recent call last):
    ...
    ValueError: ClipThresholds: `high_rate` must be in (0, 1], got 2.0
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields


def _check_positive(owner: object) -> None:
    """Every number of a thresholds dataclass must be a finite number > 0 (fractions also <= 1)."""
    for f in fields(owner):  # type: ignore[arg-type]
        v = getattr(owner, f.name)
        name = type(owner).__name__
        if isinstance(v, tuple):
            ok = all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v)
            if not ok:
                raise ValueError(f"{name}: `{f.name}` must be a pair of finite numbers, got {v!r}")
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"{name}: `{f.name}` must be a finite number > 0, got {v!r}")
        if f.metadata.get("fraction") and v > 1:
            raise ValueError(f"{name}: `{f.name}` must be in (0, 1], got {v!r}")
        if f.metadata.get("integer") and (not isinstance(v, int) or v < 1):
            raise ValueError(f"{name}: `{f.name}` must be an int >= 1, got {v!r}")


def _fraction(default: float) -> float:
    return field(default=default, metadata={"fraction": True})


def _count(default: int) -> int:
    return field(default=default, metadata={"integer": True})


@dataclass(frozen=True)
class ActivationThresholds:
    """Depth trends and drift of activation RMS; dead and saturated units."""

    #: Mean layer-to-layer RMS ratio of a geometric trend (the RMS must also never reverse along it).
    #: Kaiming-initialized nets measure 0.8-1.25 per layer; 1.3 compounds to 14x over 10 layers.
    act_step_ratio: float = 1.3
    #: Layers of one trend needed (3 ratios): one odd layer (a projection, the output head) is no trend.
    act_min_layers: int = _count(4)
    #: Total RMS change along the trend: 50x, 5x beyond the ~10x that a default-init (gain 0.58) ReLU MLP
    #: with biases settles at, and far beyond the ~3x of healthy nets; a gain 1.8x too high over 6 layers.
    act_total_ratio: float = 50.0
    #: A layer's RMS vs its own first sample, with the input RMS steady: 100x over training is a drift,
    #: not learning (the healthy scenario runs measured at most 15x, a default-init MLP over 200 steps).
    act_time_ratio: float = 100.0
    #: ...and the drifted layer must now be this many times the input RMS: a layer that recovers from a
    #: vanished start is no drift.
    act_time_vs_input: float = 10.0
    #: The mirror bound for a shrunk layer: now below this fraction of the input RMS. 0.01 is the original
    #: rule's value, kept as it was (stricter than the inverse of act_time_vs_input).
    act_time_below_input: float = _fraction(0.01)
    #: Sampled steps in a row (the latest ones) the drift must hold: one odd batch is no drift.
    act_time_samples: int = _count(2)
    #: Sampled steps of RMS kept per layer; the drift reference is the oldest kept sample (the first one
    #: until this many were sampled: at log_every_n_steps=50, 200 samples are ~10k steps).
    act_time_history: int = _count(200)
    #: The input RMS must stay within this factor of its first sample for a drift to be judged.
    act_input_steady: float = 10.0
    #: An RMS of exactly 0 (every unit dead) enters the log-scale trend as this: below any nonzero RMS of a
    #: float32 sum of squares (the square root of the smallest float32, 1.4e-45, is ~4e-23).
    rms_floor: float = _fraction(1e-30)
    #: Fraction of a ReLU's units that never fired over the whole window (5 sampled batches by default).
    #: SageMaker's DeadRelu uses 50%; healthy Kaiming MLPs measure under 0.25 over 10 batches (0.37 in one
    #: batch) and a default-init CNN without BatchNorm 0.44 over 5, so 60%. Planted cases measure 90-100%.
    dead_fraction: float = _fraction(0.6)
    #: Dead fraction that makes the finding an error: the layer has almost no capacity left.
    dead_error: float = _fraction(0.9)
    #: Mean fraction of a tanh/sigmoid's outputs at its bounds over the window. Xavier-initialized tanh
    #: nets measure ~1% (a confident sigmoid output head 19%, and heads are exempt); half the outputs
    #: pinned means half the units pass no gradient.
    saturated_fraction: float = _fraction(0.5)
    saturated_error: float = _fraction(0.9)
    #: No sampled step of the window may be below this share of saturated_fraction (half): a mean carried
    #: by a few pinned batches is no saturation.
    saturated_floor: float = _fraction(0.5)

    def __post_init__(self) -> None:
        _check_positive(self)


@dataclass(frozen=True)
class InitThresholds:
    """When a layer's init scale is called off for the activation that follows it."""

    #: A layer's gain (std x sqrt(fan_in)) over the right one above which it is "too high": the RMS then
    #: grows by that factor per layer, 1.25**10 is ~9x over ten layers.
    gain_high: float = 1.25
    #: ... and below which it is "too low" (0.8 = 1/1.25).
    gain_low: float = 0.8

    def __post_init__(self) -> None:
        _check_positive(self)


@dataclass(frozen=True)
class GradientThresholds:
    """Depth trends and growth of gradient norms, the first non-finite value, spikes."""

    #: Median grad norm of the input-side third of the layers vs the output-side third. Healthy pre-norm
    #: transformers differ by 20x (ratio ~0.06), the healthy scenario runs measured >= 0.03 (a CNN without
    #: BatchNorm); 1e-3 (three orders) is 30x beyond that.
    grad_depth_ratio: float = 1e-3
    #: Consecutive sampled steps the depth ratio must hold (a window, not one batch).
    grad_depth_samples: int = _count(2)
    #: Layers with a finite, non-zero gradient needed to compare the input-side and output-side thirds (4: each
    #: third holds at least one layer and one layer lies between them).
    grad_depth_min_layers: int = _count(4)
    #: Steps of per-step total norms over which growth is judged (at most), and at least.
    grad_window: int = _count(10)
    grad_min_steps: int = _count(4)
    #: Total-norm growth over that window: 100x. Healthy runs start high (up to ~80) and fall; the
    #: step-0 norm is no reference, the window's minimum is.
    grad_growth: float = 100.0
    #: Fraction of the window's step-to-step changes that must be increases (geometric, not one spike).
    grad_growth_monotone: float = _fraction(0.7)
    #: Newest steps that must all be grad_growth x the window's minimum: a single high newest value (one bad
    #: batch) falls back on the next step and is a gradient spike; a geometric explosion is past it one step
    #: later (2 keeps the measured burst 200 -> 684 -> 4 from being judged at its peak alone).
    grad_growth_persist: int = _count(2)
    #: Per-step totals kept per optimizer (bounded memory, as the 200-entry history before); the oldest
    #: grad_start_steps of them are the start a growth must pass, so late in a run the reference is recent.
    grad_history: int = _count(200)
    #: The first steps whose largest norm a growth must pass by :attr:`grad_start_factor` (a healthy run
    #: falls from a high start; only growth past it counts) unless the growth is itself grad_start_factor x
    #: :attr:`grad_growth` (10 x 100 = 1e3).
    grad_start_steps: int = _count(3)
    grad_start_factor: float = 10.0
    #: Finite steps after a reported growth whose median must be back within sqrt(grad_growth) = 10x of the
    #: growth's start for the finding to become info (a burst of bad batches, measured 200 -> 684 -> 4).
    growth_fallback_steps: int = _count(3)
    #: A growth of the norm is a divergence only when the loss during it climbs back to this many times the
    #: lowest loss of the run's first steps (or goes non-finite): a converged classifier's burst of hard
    #: examples lifted the norm 0.04 -> 40 for 5+ steps while its loss stayed at 0.15-0.55 against a start of
    #: 0.69 (a BERT-style encoder at 100% held-out accuracy); a diverging run's loss passes its start.
    growth_loss_rise: float = 1.0
    #: Total gradient norm at init that is reported as exploding, when activations also explode with depth
    #: from initialization: healthy runs start at up to ~80 and fall; 1e3 is 10x beyond.
    init_grad_norm: float = 1e3
    #: Non-finite gradient steps in a row before an AMP GradScaler run is flagged (it skips such steps
    #: and halves the scale; a few are normal, a run of them is not).
    amp_nonfinite_steps: int = _count(5)
    #: ...and only once the loss scale (read at the logging step) is at most this: below 1 the scaler no longer
    #: magnifies the gradients, so they are non-finite unscaled. A run that ends while the scale is higher was the
    #: scaler calibrating (measured: a regression loss of ~800 at the default scale 2**16 skipped 8 steps in a row,
    #: then trained). From 2**16, halved on each skipped step, a persistent run reaches 1 with step 15.
    amp_scale_floor: float = 1.0
    #: Spike: total gradient norm above this multiple of its running median. Measured: a clean run stays
    #: within 3x at batch sizes 2-32; a corrupted label gives 60-80x, a 1% rare class at batch size 8 15-30x.
    spike_factor: float = 10.0
    #: Steps of history before a spike can be judged (a median of fewer values is too noisy).
    spike_min_history: int = _count(8)
    #: Length of the running-median window, in optimizer steps.
    spike_window: int = _count(50)
    #: The baseline is the larger of that median and the median of the last spike_recent steps: the norm of
    #: a healthy run can rise 5-10x within 50 steps (LR warm-up: OneCycleLR measured 0.2 -> 13 by step 27,
    #: with 36-45 steps 3.5x its recent median but 15-18x the 50-step one); a bad batch in a steady run
    #: gives both.
    spike_recent: int = _count(8)
    #: A spike must fall back within this many steps, to within fallback_band x the median it broke from or
    #: to fallback_drop x below its own peak: a steady climb (exploding_gradients) or a rise to a new
    #: plateau never falls back. "Within 3x" is the clean-run band above; the drop covers a bad batch that
    #: knocked the weights (measured: 160 -> 7.6 with a median of 2, no clipping, then slowly back).
    spike_fallback_steps: int = _count(3)
    fallback_band: float = 3.0
    fallback_drop: float = 5.0
    #: A spike must also reach this many times the highest running median the run has shown: a converged
    #: classifier's norms are heavy-tailed once its loss nears 0 (a small transformer at 100% held-out accuracy:
    #: easy batches 0.001-0.02, a hard example's batch 13-55x the collapsing median, yet at most 5.5x the run's
    #: highest median), while a corrupted label in a steady run is 86-92x both.
    spike_run_scale: float = 10.0
    #: With integer labels, a label below this fraction of the labels seen is rare: spikes in batches holding it
    #: are a rare class the model keeps getting wrong even below the run's scale (the suite's rare class: 1%).
    rare_label_fraction: float = _fraction(0.05)
    #: Spike steps kept for the message and the finding's details (bounded memory).
    spike_max_listed: int = _count(50)

    def __post_init__(self) -> None:
        _check_positive(self)


@dataclass(frozen=True)
class WeightThresholds:
    """One layer's weights running away; large early updates with Adam."""

    #: A layer's weight-norm growth (now / start) vs the median layer's: about 5x is suspicious (a CNN
    #: head may grow 2.3x early in a healthy run while the others stay flat; healthy scenario runs <= 2.2x).
    weight_relative_growth: float = 5.0
    #: ...and the layer itself must have grown at least this much (not a tiny layer moving a little).
    weight_min_growth: float = 3.0
    #: Layers with a start norm below this fraction of the median start norm are skipped (zero-init).
    weight_min_start: float = _fraction(0.05)
    #: Sampled steps in a row the relative growth must hold.
    weight_samples: int = _count(2)
    #: Layers (with a usable start norm) needed for a median layer: with two, the median is their mean and
    #: one layer can never be 5x it.
    weight_min_layers: int = _count(3)
    #: Adam's first step moves every weight by ~lr, so the update-to-weight ratio is ~lr / rms(w). The usual
    #: rule of thumb is ~1e-3 per step; a median layer moving 5% of its norm per step is 50x that.
    adam_update_ratio: float = 0.05
    #: Only the first steps say whether the run started at full LR (dense sampling covers them).
    early_steps: int = _count(20)

    def __post_init__(self) -> None:
        _check_positive(self)


@dataclass(frozen=True)
class ClipThresholds:
    """Clipping on most steps."""

    #: A clip rate above this over a full window is "most steps": gradients "almost always above the clip
    #: threshold" (also ``NormCheck(high_clip_rate=...)``).
    high_rate: float = _fraction(0.5)
    #: Minimum optimizer steps in the clip window before judging: 16 fits the dense early sampling
    #: (flushes up to step 18) and is past the ~10 steps a healthy step-0 gradient peak takes to fall.
    clip_min_steps: int = _count(16)
    #: The fraction of the latest steps that must still be clipped (clipping only early in a window is
    #: the start-up peak falling, not clipping on most steps).
    clip_recent: float = _fraction(0.8)
    #: Mean pre-clip norm / threshold on clipped steps below which frequent clipping is only info: a
    #: clip value just under the typical norm is a mild LR change (a healthy Adam classifier clipped at 1.0
    #: measured 1.7-2.0x over 240 steps); 3x shrinks every SGD update to a third.
    clip_warn_excess: float = 3.0
    #: Mean pre-clip norm / threshold that makes a high clip rate an error (updates shrunk 10x) when the
    #: clip rate is also at least clip_error_rate.
    clip_error_excess: float = 10.0
    clip_error_rate: float = _fraction(0.95)

    def __post_init__(self) -> None:
        _check_positive(self)


@dataclass(frozen=True)
class DataThresholds:
    """Inputs of extreme scale and regression targets of large scale."""

    #: Standardized features sit within ~5 (Gaussian) and rarely pass ~100 (heavy tails); a column truly
    #: standardized over N rows has |z| <= sqrt(N - 1) (Samuelson), so 1e3 needs 1e6+ rows and one value
    #: carrying all the variance. Raw features "in the thousands and up" and a tiny-std column (~1e4+) are
    #: split from them by 1e3.
    input_scale: float = 1e3
    #: A feature is "mostly near zero" when this fraction of its entries is within 1% of its max |x|:
    #: a nearly constant column divided by a tiny std is ~0 except for rare huge values.
    near_zero_fraction: float = _fraction(0.5)
    #: Raw 0-255 pixels: above 1 (so not [0, 1]) and at most 255 (uint8 range); reported as info only.
    pixel_max: float = 255.0
    #: ...and "above 1": pixels already scaled to [0, 1] stay at or below it.
    pixel_low: float = 1.0
    #: A feature whose std is at most this fraction of its max |x| is constant in the batch: float32 keeps
    #: ~7 significant digits, so a constant column's std is rounding noise of ~1e-7 of its value.
    constant_std: float = 1e-6
    #: Typical target magnitude (median |y|) above which regression targets drive MSE and its gradients:
    #: healthy labels "in the tens" stay below 1e2 (3x margin); zero-mean targets scaled by 1e3 have a median
    #: |y| of ~0.67e3 and prices "in the tens of thousands" ~1e4: both must be reported.
    label_scale: float = 300.0
    #: The loss is "on the targets' squared scale" when it is at least this fraction of median|y|^2: MSE of
    #: an untrained model is ~E[y^2]; a model that already handles the scale (log targets, an output
    #: de-normalization) has a loss orders of magnitude smaller.
    loss_on_target_scale: float = 1e-2

    def __post_init__(self) -> None:
        _check_positive(self)


@dataclass(frozen=True)
class BugThresholds:
    """Training-loop bugs."""

    #: Two-halves ratio ``loss(full) / (loss(A) + loss(B))``: 1.0 for a sum, 0.5 for a mean (0.495 measured
    #: with BatchNorm); bands of +-0.15 and +-0.1 leave room for Dropout/BatchNorm noise.
    sum_ratio_band: tuple[float, float] = (0.85, 1.15)
    mean_ratio_band: tuple[float, float] = (0.4, 0.6)
    #: Halves whose losses add up to less than this in size give no ratio (a loss at ~0 is a perfect fit, not
    #: a reduction): far below any float32 training loss that still moves.
    probe_min_loss: float = 1e-12
    #: Probes that must agree before a verdict (one batch can be odd; two agreeing ones are not by chance).
    probes_to_agree: int = _count(2)
    #: A scale factor within 5% of 1.0 means "not divided" (1/k is at most 0.5 for k >= 2).
    unscaled_tol: float = _fraction(0.05)
    #: Windows in a row with the same k > 1 before accumulation is called accumulation (not a skipped step).
    accum_windows: int = _count(2)
    #: Extra steps seen before reporting a double step (one could be a deliberate one-off, two are a pattern).
    double_step_min: int = _count(2)

    def __post_init__(self) -> None:
        _check_positive(self)


@dataclass(frozen=True)
class UpdateThresholds:
    """Optimizer steps that change nothing (zero gradients) or far too much (learning rate too high)."""

    #: Steps in a row of one optimizer with every gradient zero or None: a skipped batch (training_step
    #: returning None) gives single zero steps between real ones (the suite's skipped-batch run: 30 of 60,
    #: never two in a row), so 8 in a row is no skipped batch; 8 fits in the first 20 steps.
    zero_grad_steps: int = _count(8)
    #: Median over layers of the update-to-weight ratio ||w_after - w_before|| / ||w_after|| of a sampled step.
    #: Healthy runs of the scenario suite (3 seeds, 52 runs, the first 20 steps sampled) peak at 0.26 (a
    #: sigmoid-output MLP with Adam), 0.12 (Adam at lr 3e-2 that converges) and below 0.09 elsewhere; the
    #: planted too-high learning rates measure 0.7-1.0 (AdamW at lr 1.0 on a small transformer: 0.99).
    lr_update_ratio: float = 0.5
    #: Sampled steps with the ratio that high. One is enough with the damage required below: the ratio falls
    #: as the weights grow (AdamW at lr 1.0: 0.99 at step 0, 0.50 at step 1, 0.31 at step 2, the weights
    #: 8x larger after one step).
    lr_samples: int = _count(1)
    #: The damage that confirms it: each loss of the latest steps at least this many times the lowest loss of
    #: the first steps (a run that learns falls; AdamW at lr 1.0 on a small transformer went 4.2 -> 26 by
    #: step 2, 50-100 after; squared, it makes the finding an error)...
    lr_loss_rise: float = 2.0
    #: ...over this many steps (the first ones for the reference, the latest ones for the rise: all of them
    #: must be that high, a single bad batch is no damage)...
    lr_loss_steps: int = _count(3)
    #: ...or every layer's weights growing together: the median layer's weight norm this many times its
    #: start (healthy suite runs: at most 4.4x; the planted too-high learning rates 1e8x+, AdamW at lr 1.0 190x).
    lr_weight_growth: float = 10.0
    #: The update-to-weight ratio an LR to try aims at: the usual rule of thumb of ~1e-3 per step.
    lr_target_ratio: float = 1e-3

    def __post_init__(self) -> None:
        _check_positive(self)


@dataclass(frozen=True)
class Thresholds:
    """The thresholds of every rule family (each a frozen dataclass with documented defaults)."""

    activations: ActivationThresholds = field(default_factory=ActivationThresholds)
    init: InitThresholds = field(default_factory=InitThresholds)
    gradients: GradientThresholds = field(default_factory=GradientThresholds)
    weights: WeightThresholds = field(default_factory=WeightThresholds)
    clipping: ClipThresholds = field(default_factory=ClipThresholds)
    data: DataThresholds = field(default_factory=DataThresholds)
    bugs: BugThresholds = field(default_factory=BugThresholds)
    updates: UpdateThresholds = field(default_factory=UpdateThresholds)


__all__ = [
    "ActivationThresholds",
    "BugThresholds",
    "ClipThresholds",
    "DataThresholds",
    "GradientThresholds",
    "InitThresholds",
    "Thresholds",
    "UpdateThresholds",
    "WeightThresholds",
]
