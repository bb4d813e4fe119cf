"""NormCheck: every lightning_normcheck monitor in one callback, with defaults that are cheap anywhere."""

from __future__ import annotations

import dataclasses
from typing import Literal

from lightning_normcheck.callbacks import (
    _signals,
    activation_norm_monitor,
    clip_rate_tracker,
    gradient_norm_monitor,
    training_bug_detector,
    weight_drift_monitor,
)
from lightning_normcheck.callbacks._args import _check_bool, _check_float
from lightning_normcheck.callbacks._base import _Monitor, _NormCheckBase
from lightning_normcheck.diagnosis.thresholds import GradientThresholds, Thresholds


class NormCheck(_NormCheckBase):
    r"""Watch gradient, activation and weight norms, clipping and the training loop in one callback.

    ``NormCheck()`` bundles :class:`GradientNormMonitor`, :class:`ActivationNormMonitor`,
    :class:`WeightDriftMonitor`, :class:`ClipRateTracker` and :class:`TrainingBugDetector`, plus checks of
    the data (on sampled steps, the scale of the batch's float inputs and of the regression target:
    ``normcheck/input/max_abs/<tensor>``, ``normcheck/target/median_abs/<tensor>``) and of intermittent
    gradient-norm spikes against a running median. They share one gradient-norm pass per optimizer
    step, one sampling schedule, one host transfer and one logger
    call per logging step. Its findings are in :attr:`findings` (one per code and layer), printed as a
    table at the end of fit, sent to Python logging (logger ``lightning_normcheck``; not raised as
    ``warnings``), and written as text to TensorBoard. Works with automatic and manual optimization and with any Lightning logger (or none).
    With ``Trainer(gradient_clip_val=...)`` clipping by norm, Lightning's clip uses the total gradient norm
    NormCheck measured instead of computing it again (the same number to the last bit, so training is unchanged;
    when the gradients changed after NormCheck saw them, Lightning computes it as usual).

    Args:
        log_every_n_steps: cadence of per-layer measurements, in optimizer steps (default: the
            Trainer's ``log_every_n_steps``); the first 20 steps are sampled densely regardless.
        gradients: enable the gradient-norm monitor.
        activations: enable the activation monitor (forward hooks on sampled steps only).
        weights: enable the weight-drift monitor.
        clipping: enable the clipping-rate tracker (active when a clip threshold is known).
        bugs: enable the training-bug detector.
        data: enable the batch-scale checks: float inputs of extreme magnitude (``input_scale``) and
            regression targets whose scale drives the loss (``label_scale``), on sampled steps.
        spike_factor: a total gradient norm above this multiple of its running median, falling back
            right after, is a ``gradient_spikes`` spike (needs ``gradients``).
        norm_type: p of the gradient p-norm.
        per_parameter: also log one gradient-norm key per parameter.
        include_types: activation monitor: only hook modules of these class names.
        exclude_types: activation monitor: never hook modules of these class names.
        include_names: activation monitor: only hook modules matching these glob patterns.
        exclude_names: activation monitor: never hook modules matching these glob patterns.
        saturation_threshold: fraction of a bounded activation's range past which a unit is saturated.
        activation_window: sampled steps over which dead and saturated units are judged.
        track_drift: keep a copy of the start-of-fit weights and log the drift from it.
        clip_threshold: the clipping threshold when you clip by hand (default: ``gradient_clip_val``).
        clip_algorithm: ``"norm"`` or ``"value"`` (default: the Trainer's).
        clip_window: optimizer steps the clip rate is computed over.
        high_clip_rate: a clip rate above this over a full window is reported.
        loss_probe: bug detector: re-run ``training_step`` without gradients on two halves of a few batches
            to tell a summed loss from an averaged one (automatic optimization; training is unchanged).
        max_loss_probes: bug detector: most batches per fit the loss probe runs on (>= 2).
        print_summary: print the findings table at the end of fit.
        thresholds: every threshold of the rules, per family
            (:class:`~lightning_normcheck.diagnosis.thresholds.Thresholds`, settable from YAML);
            ``spike_factor`` and ``high_clip_rate``, when not their defaults, set
            ``thresholds.gradients.spike_factor`` and ``thresholds.clipping.high_rate``.
        stop_on: ``None`` (default: never stop), ``"warning"`` or ``"error"``: when a finding of that
            severity or worse exists at a logging step, training stops cleanly at the end of that step
            (``trainer.should_stop``, decided the same way on every rank) and one line names the finding;
            ``trainer.fit`` returns normally, :attr:`stopped_by` holds the finding.
        depth_profiles: keep each kind's depth profile (:meth:`profiles`: every layer's value against its
            depth at the first, a middle and the latest sampled step) and, when matplotlib is installed, draw it
            for every logger: TensorBoard images ``normcheck/profile/<kind>``, W&B images, MLflow artifacts
            ``normcheck/profile_<kind>.png``, ``normcheck_profiles/<kind>.png`` in a local ``log_dir``. Drawn
            at the end of fit (and on an exception) and during it every 5 minutes at most, the first 5 minutes
            after the start (0.5-1.5 s each time: at most 1% of the wall time). Without matplotlib: no pictures,
            one info line.
        max_overhead: the largest share of the training step time the per-layer measurements of sampled steps may
            take, averaged over steps (default 0.03; ``None``: no budget). NormCheck clocks its own hooks; when
            they take more, the per-layer cadence is stretched (to a multiple of ``log_every_n_steps``, at most
            every 1000 steps), logged as ``normcheck/cadence`` and said once in an info line; it comes back down
            when the share falls well below the budget. Never stretched: the total gradient norm of every step
            (``normcheck/grad_norm/total``, the part NormCheck costs on every step, not counted) and the dense
            sampling of the first 20 steps.

    Raises:
        ValueError: an argument is out of range (the message names it, the value and what is allowed).
        TypeError: an argument has the wrong type.

    Example:
        >>> from lightning_normcheck import NormCheck
        >>> NormCheck(activations=False, clip_threshold=1.0).findings
        []

    LightningCLI::

        trainer:
          callbacks:
            - class_path: lightning_normcheck.NormCheck
              init_args:
                log_every_n_steps: 25
                exclude_types: [LayerNorm]
                stop_on: error          # stop a doomed run at its first error finding
                max_overhead: 0.05      # per-layer measurements may take 5% of the step time (null: no budget)
                thresholds:
                  activations: {dead_fraction: 0.7}
    """

    def __init__(
        self,
        log_every_n_steps: int | None = None,
        gradients: bool = True,
        activations: bool = True,
        weights: bool = True,
        clipping: bool = True,
        bugs: bool = True,
        data: bool = True,
        spike_factor: float = 10.0,
        norm_type: float = 2.0,
        per_parameter: bool = False,
        include_types: list[str] | None = None,
        exclude_types: list[str] | None = None,
        include_names: list[str] | None = None,
        exclude_names: list[str] | None = None,
        saturation_threshold: float = 0.99,
        activation_window: int = 5,
        track_drift: bool = True,
        clip_threshold: float | None = None,
        clip_algorithm: Literal["norm", "value"] | None = None,
        clip_window: int = 50,
        high_clip_rate: float = 0.5,
        loss_probe: bool = True,
        max_loss_probes: int = 3,
        print_summary: bool = True,
        thresholds: Thresholds | None = None,
        stop_on: Literal["warning", "error"] | None = None,
        depth_profiles: bool = True,
        max_overhead: float | None = 0.03,
    ) -> None:
        owner = type(self).__name__
        thresholds = _with_shortcuts(owner, thresholds, spike_factor, high_clip_rate)
        super().__init__(
            log_every_n_steps=log_every_n_steps,
            print_summary=print_summary,
            thresholds=thresholds,
            stop_on=stop_on,
            depth_profiles=depth_profiles,
            max_overhead=max_overhead,
        )
        th = self.thresholds
        for arg, val in (
            ("gradients", gradients),
            ("activations", activations),
            ("weights", weights),
            ("clipping", clipping),
            ("bugs", bugs),
            ("data", data),
        ):
            _check_bool(owner, arg, val)
        # every part validates its own arguments (even when switched off), naming NormCheck's argument
        parts: list[tuple[bool, _Monitor]] = [
            # data causes first: their findings exist before the gradient diagnosis runs at the same flush
            (data, _signals._make_batch_scale(owner, th.data.input_scale)),
            (gradients, _signals._make_spikes(owner)),
            (gradients, gradient_norm_monitor._make_monitor(owner, norm_type=norm_type, per_parameter=per_parameter)),
            (
                activations,
                activation_norm_monitor._make_monitor(
                    owner,
                    include_types=include_types,
                    exclude_types=exclude_types,
                    include_names=include_names,
                    exclude_names=exclude_names,
                    saturation_threshold=saturation_threshold,
                    activation_window=activation_window,
                ),
            ),
            (weights, weight_drift_monitor._make_monitor(owner, track_drift=track_drift)),
            (
                clipping,
                clip_rate_tracker._make_monitor(
                    owner,
                    clip_threshold=clip_threshold,
                    clip_algorithm=clip_algorithm,
                    clip_window=clip_window,
                ),
            ),
            (
                bugs,
                training_bug_detector._make_monitor(owner, loss_probe=loss_probe, max_loss_probes=max_loss_probes),
            ),
        ]
        self._monitors = [m for on, m in parts if on]


def _with_shortcuts(
    owner: str, thresholds: Thresholds | None, spike_factor: float, high_clip_rate: float
) -> Thresholds:
    """``thresholds`` with the two thresholds that have their own argument set from it when not the default."""
    _check_float(owner, "spike_factor", spike_factor, low=1.0)
    th = clip_rate_tracker.with_clip_rate(owner, thresholds, high_clip_rate)
    if float(spike_factor) != GradientThresholds().spike_factor:
        th = dataclasses.replace(th, gradients=dataclasses.replace(th.gradients, spike_factor=float(spike_factor)))
    return th


__all__ = ["NormCheck"]
