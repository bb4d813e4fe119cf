"""Typed records: what a monitor measured, as host numbers, handed to the rules.

A monitor measures on the device, moves its numbers to the host once per logging step and turns them into
these small frozen dataclasses. The rules take records and nothing else (no metric names, no modules, no
device tensors); the callbacks make metric names from records in one place, at emission; a report that
reads logged scalars back builds the same records and runs the same rules. Layer names are module names
(``"<root>"`` for the root module's own parameters), listed in forward order where it is known.

Example:
    >>> r = GradientTotals(steps=(0, 1), totals=(2.0, 1.5), optimizers=(0, 0))
    >>> r.series(0)
    [(0, 2.0), (1, 1.5)]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

INPUT_LABEL = "<input>"
ROOT_LABEL = "<root>"


# -- the run -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunInfo:
    """What a rule needs to know about the run, given once at the start of fit.

    Attributes:
        layers: the layers with trainable parameters, in registration order.
        optimizers: the optimizers' class names, in the Trainer's order.
        manual: manual optimization.
        amp_scaler: a GradScaler is active (fp16): it skips non-finite steps by design.
        clip_val: the Trainer's ``gradient_clip_val`` (``None``: no clipping by Lightning).
        clip_algorithm: ``"norm"`` or ``"value"``.
        normalized_by: ``"name (BatchNorm1d)"`` when the model's first layer is a BatchNorm, else ``None``.
        lr_arg: the model hyperparameter that holds the learning rate (``"lr"``), when there is one: a fix can
            then be given as the LightningCLI override ``--model.lr=...``.
    """

    layers: tuple[str, ...] = ()
    optimizers: tuple[str, ...] = ()
    manual: bool = False
    amp_scaler: bool = False
    clip_val: float | None = None
    clip_algorithm: str = "norm"
    normalized_by: str | None = None
    lr_arg: str | None = None


@dataclass(frozen=True)
class LayerInitStat:
    """The weight scale of one Linear/Conv layer at the start of fit."""

    name: str
    fan_in: int
    fan_out: int
    std: float


@dataclass(frozen=True)
class InitStats:
    """The weight scale of every Linear/Conv layer at the start of fit (for init advice)."""

    layers: tuple[LayerInitStat, ...]

    def get(self, name: str) -> LayerInitStat | None:
        return next((s for s in self.layers if s.name == name), None)


# -- gradients ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GradientTotals:
    """The total pre-clip gradient norm of every optimizer step since the last logging step.

    Attributes:
        steps: the optimizer steps, in order (a step may repeat when two optimizers step at one step).
        totals: the total norm of each.
        optimizers: the index of the optimizer of each (0 for the only one).
        norm_type: the p of the p-norm.
        scale: the AMP GradScaler's loss scale, read once at the logging step (``None``: no scaler).
    """

    steps: tuple[int, ...]
    totals: tuple[float, ...]
    optimizers: tuple[int, ...]
    norm_type: float = 2.0
    scale: float | None = None

    def series(self, optimizer: int | None = None) -> list[tuple[int, float]]:
        """``(step, total)`` pairs, of one optimizer or of all."""
        return [(s, v) for s, v, k in zip(self.steps, self.totals, self.optimizers) if optimizer in (None, k)]


@dataclass(frozen=True)
class GradientLayers:
    """Per-layer gradient norms of one optimizer at a sampled step.

    Attributes:
        step: the optimizer step.
        optimizer: the optimizer's index.
        layers: the layers of its parameters that had a gradient, in registration order.
        norms: the norm of each layer's gradients.
        params: per-parameter names and norms (``per_parameter=True`` only), else empty.
    """

    step: int
    optimizer: int
    layers: tuple[str, ...]
    norms: tuple[float, ...]
    params: tuple[tuple[str, float], ...] = ()

    def as_dict(self) -> dict[str, float]:
        return dict(zip(self.layers, self.norms))


@dataclass(frozen=True)
class LossSeries:
    """The training loss of every optimizer step since the last logging step (the mean of the step's
    micro-batches, as given to backward; ``nan`` or ``inf`` where it was not finite)."""

    steps: tuple[int, ...]
    values: tuple[float, ...]


@dataclass(frozen=True)
class LossCheck:
    """The first non-finite loss of the run so far (``step`` -1: none), kept on the device until a flush."""

    step: int
    value: float


# -- activations -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModuleStat:
    """The output of one hooked module at a sampled step.

    Attributes:
        name: the module name.
        type_name: its class name (``"Linear"``, ``"ReLU"``, ``"Tanh"``...).
        kind: ``"weight"`` (Linear/Conv-like), ``"relu"`` (output exactly 0 when dead), ``"bounded"``
            (tanh/sigmoid-like), ``""`` otherwise.
        rms: the RMS of its output over the step's calls.
        dead_batch: ReLU-like: the fraction of units zero for the whole batch.
        dead_window: ReLU-like: the fraction of units that never fired over the window of sampled batches.
        saturated: bounded: the fraction of outputs near the bounds.
    """

    name: str
    type_name: str
    kind: str
    rms: float
    dead_batch: float | None = None
    dead_window: float | None = None
    saturated: float | None = None


@dataclass(frozen=True)
class ActivationSample:
    """The hooked modules' outputs at one sampled step, in execution order.

    Attributes:
        step: the sampled step.
        modules: one :class:`ModuleStat` per hooked module that ran, in execution order.
        input_rms: the RMS of the model input (the first hooked module's input), if seen.
        window_samples: sampled batches in the dead-unit window so far (at most ``window``).
        window: the length of that window.
    """

    step: int
    modules: tuple[ModuleStat, ...]
    input_rms: float | None = None
    window_samples: int = 0
    window: int = 5

    @property
    def order(self) -> list[str]:
        return [m.name for m in self.modules]


# -- weights -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WeightSample:
    """Per-layer weight norms at a sampled step.

    Attributes:
        step: the step.
        layers: the layers with trainable parameters, in registration order.
        norms: the L2 norm of each layer's own parameters.
        start_norms: the same at the start of fit (``None`` without a reference copy).
        drift: ``||w - w_start|| / ||w_start||`` per layer (``None`` without a reference copy).
    """

    step: int
    layers: tuple[str, ...]
    norms: tuple[float, ...]
    start_norms: tuple[float, ...] | None = None
    drift: tuple[float, ...] | None = None


@dataclass(frozen=True)
class UpdateSample:
    """Update-to-weight ratios ``||w_after - w_before|| / ||w_after||`` of one optimizer's sampled step.

    Attributes:
        step: the optimizer step.
        optimizer: the optimizer's index.
        optimizer_name: its class name.
        lr: the learning rate of its first param group at that step.
        warming_up: that LR is below the scheduler's base LR.
        layers: its layers.
        ratios: the ratio of each.
    """

    step: int
    optimizer: int
    optimizer_name: str
    lr: float
    warming_up: bool
    layers: tuple[str, ...]
    ratios: tuple[float, ...]

    def as_dict(self) -> dict[str, float]:
        return dict(zip(self.layers, self.ratios))


# -- clipping ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClipWindow:
    """How often the pre-clip gradient exceeded the clip threshold over the last steps.

    Attributes:
        step: the logging step.
        threshold: the clip value.
        algorithm: ``"norm"`` or ``"value"``.
        rate: the fraction of the window's steps that were clipped.
        mean_excess: the mean pre-clip measure / threshold over the clipped steps.
        steps: how many steps the window holds.
        recent: the fraction of the latest (up to 5) steps that were clipped.
        window: the window's length.
    """

    step: int
    threshold: float
    algorithm: str
    rate: float
    mean_excess: float
    steps: int
    recent: float
    window: int


# -- data --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FeatureStat:
    """Statistics of one feature (column/channel) of a float batch tensor, over one batch."""

    index: int
    max_abs: float
    mean: float
    std: float
    min: float
    max: float
    near_zero: float  # fraction of entries with |x| <= 1% of max_abs


@dataclass(frozen=True)
class InputScale:
    """The largest features of one float input tensor of a sampled batch.

    Attributes:
        tensor: where it sits in the batch (``batch[0]``, ``batch['x']``).
        axis: what a feature is: ``column`` (2-D), ``feature`` (last dim of 3-D), ``channel`` (4-D+).
        n_features: how many features the tensor has.
        top: the features with the largest max |x|, largest first.
        n_above: how many features exceed the input-scale threshold.
        nonfinite: how many features hold a NaN or inf.
        min: the smallest value of the whole tensor.
        ndim: the tensor's number of dimensions.
        label: the short name used in metric keys (``0``, ``x``).
        max_abs: the largest |x| of the whole tensor.
    """

    tensor: str
    axis: str
    n_features: int
    top: Sequence[FeatureStat]
    n_above: int
    nonfinite: int
    min: float
    ndim: int
    label: str = ""
    max_abs: float = float("nan")


@dataclass(frozen=True)
class TargetScale:
    """Scale of the tensor that looked like the regression target, over one batch."""

    tensor: str
    median_abs: float
    rms: float
    mean: float
    std: float
    max_abs: float
    why: str  # why this tensor was taken as the target
    label: str = ""


@dataclass(frozen=True)
class BatchSample:
    """The scale of one sampled batch: its float inputs, its regression target, its loss.

    Attributes:
        step: the optimizer step of the batch.
        inputs: one entry per float input tensor (the target excluded).
        target: the tensor taken as the regression target, if any.
        loss: the training loss of that batch (scaled back for accumulation), if seen.
        task: ``"classification"`` (integer labels), ``"regression"`` (float target) or ``""``.
    """

    step: int
    inputs: tuple[InputScale, ...] = ()
    target: TargetScale | None = None
    loss: float | None = None
    task: str = ""


@dataclass(frozen=True)
class StepBatches:
    """Which training batch each optimizer step of a flush came from (for naming spikes), and the task the
    batches' labels say (``"classification"`` for integer labels, ``"regression"`` for a float target, or "")."""

    batches: dict[int, str] = field(default_factory=dict)  # step -> "epoch 0, batch 17"
    task: str = ""
    labels: dict[int, tuple[tuple[int, int], ...]] = field(default_factory=dict)  # step -> ((label, count), ...)


# -- training-loop bugs ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ZeroGradWindow:
    """What the watched gradients held before every backward pass between two steps of one optimizer.

    Attributes:
        step: the step that closed the window.
        previous_step: the step that opened it.
        optimizer: a label for the optimizer.
        stale_norm: the smallest watched-gradient norm seen at the start of a backward (0 after zero_grad).
        used_norm: the watched gradients' norm used by the previous step.
    """

    step: int
    previous_step: int
    optimizer: str
    stale_norm: float
    used_norm: float


@dataclass(frozen=True)
class OptimizerSteps:
    """Optimizer steps that came with no backward pass since the previous step of the same optimizer.

    Attributes:
        step: the current step.
        optimizer: a label for the optimizer.
        extra_steps: such steps so far.
        first_extra_step: the step of the first.
        total_steps: ``step()`` calls seen.
        batches: training batches seen.
        raw: one step of an extra pair bypassed Lightning.
    """

    step: int
    optimizer: str
    extra_steps: int
    first_extra_step: int
    total_steps: int
    batches: int
    raw: bool


@dataclass(frozen=True)
class AccumulationWindow:
    """The backward passes between two steps of one optimizer in manual optimization.

    Attributes:
        step: the step that closed the window.
        optimizer: a label for the optimizer.
        micro_batches: the backward passes that count as micro-batches (0: not accumulation).
        factor: the largest constant factor found on their losses (``None``: unknown).
        per_batch: one micro-batch per training batch (else parts of one batch).
    """

    step: int
    optimizer: str
    micro_batches: int
    factor: float | None
    per_batch: bool


@dataclass(frozen=True)
class ReductionProbe:
    """One two-halves probe: ``training_step`` re-run without gradients on two halves and on both."""

    step: int
    loss_a: float
    loss_b: float
    loss_full: float
    half: int


@dataclass(frozen=True)
class StaleState:
    """A recurrent state that still carries an earlier batch's autograd graph."""

    step: int
    module: str
    batch: int
    from_batch: int | None
    grad_fn: str
    shape: str


@dataclass(frozen=True)
class TrainingError:
    """Training raised.

    Attributes:
        step: the global step.
        type_name: the exception's class name.
        text: its first line.
        batches: batches started in this fit.
        rnn_modules: the model's recurrent modules.
        stale_modules: modules that received a stale state.
        extra_steps: the optimizer-step records with an extra step, if any.
    """

    step: int
    type_name: str
    text: str
    batches: int = 0
    rnn_modules: tuple[str, ...] = ()
    stale_modules: tuple[str, ...] = ()
    extra_steps: tuple[OptimizerSteps, ...] = ()


Record = (
    RunInfo
    | InitStats
    | GradientTotals
    | GradientLayers
    | LossCheck
    | LossSeries
    | ActivationSample
    | WeightSample
    | UpdateSample
    | ClipWindow
    | BatchSample
    | StepBatches
    | ZeroGradWindow
    | OptimizerSteps
    | AccumulationWindow
    | ReductionProbe
    | StaleState
    | TrainingError
)
