"""Depth-profile images and the TensorBoard layout, read back from what each logger wrote to disk.

Real tiny fits. The profiles are checked against norms computed here with ``torch.linalg.vector_norm``; the
images are read back from TensorBoard event files, a CSV log dir, an MLflow file store and a W&B offline run;
the finding counts and the clip threshold are read back as scalars, and the Custom Scalars layout is checked
against the tags the run logged.
"""

from __future__ import annotations

import csv
import io
import logging
import re
import warnings
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from helpers import LitModel, MemLogger, fit, loader, mlp, regression_data
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from scenarios import _lit, init_mlp, reg

from lightning_normcheck import NormCheck, profiles
from lightning_normcheck.callbacks import _base, _emission

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SEVERITIES = ("info", "warning", "error")


class Reference(L.Callback):
    """Independent of the package: each layer's gradient norm before the optimizer step (torch.linalg), each
    batch's loss, and the finding counts of ``watched`` after it handled each batch (listed after it)."""

    def __init__(self, watched: NormCheck) -> None:
        self.watched = watched
        self.grad: dict[int, dict[str, float]] = {}
        self.losses: list[float] = []
        self.counts: dict[int, Counter[str]] = {}

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: Any, optimizer: Any) -> None:
        by_layer: dict[str, list[torch.Tensor]] = defaultdict(list)
        for name, p in pl_module.named_parameters():
            if p.grad is not None:
                by_layer[name.rsplit(".", 1)[0]].append(p.grad.reshape(-1))
        self.grad[trainer.global_step] = {
            layer: float(torch.linalg.vector_norm(torch.cat(gs))) for layer, gs in by_layer.items()
        }

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
        self.losses.append(float(outputs["loss"]))
        self.counts[trainer.global_step - 1] = Counter(f.severity for f in self.watched.findings)


def events(log_dir: str) -> Any:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(log_dir, size_guidance={"images": 0, "tensors": 0, "scalars": 0})
    ea.Reload()
    return ea


def check_png(data: bytes) -> tuple[int, int]:
    """A PNG that decodes to a picture: its (height, width)."""
    from matplotlib.image import imread

    assert data[:8] == PNG_SIGNATURE
    pixels = imread(io.BytesIO(data), format="png")
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert float(pixels[..., :3].min()) < 0.5  # something is drawn on the white background
    return pixels.shape[0], pixels.shape[1]


def marked_layers(cb: NormCheck, layers: tuple[str, ...]) -> tuple[str, ...]:
    named = {f.layer for f in cb.findings if f.severity != "info" and f.layer}
    return tuple(name for name in layers if name in named)


def test_healthy_run_profiles_match_torch_images_in_tensorboard_and_csv(tmp_path: Path) -> None:
    """A run that learns: the grad_norm profile at its latest step is the per-layer gradient norm computed with
    torch.linalg; no layer is marked; each kind's picture is in the IMAGES tab and as a PNG beside the CSV."""
    torch.manual_seed(0)
    cb = NormCheck(print_summary=False, log_every_n_steps=7)
    ref = Reference(cb)
    tb, csv_logger = TensorBoardLogger(tmp_path, name="tb"), CSVLogger(tmp_path, name="csv")
    fit(LitModel(mlp(), lr=0.05), loader(regression_data()), [cb, ref], max_steps=30, logger=[tb, csv_logger])

    assert sum(ref.losses[-5:]) < 0.5 * sum(ref.losses[:5])  # it learns
    assert [f for f in cb.findings if f.severity != "info"] == []
    got = {p.kind: p for p in cb.profiles()}
    assert set(got) == set(profiles.KINDS)
    assert all(p.marked == () for p in got.values())
    grad = got["grad_norm"]
    assert grad.steps == (0, 14, 28)  # first, middle, latest sampled step (every 7th past the dense start)
    want = ref.grad[grad.steps[-1]]
    assert grad.layers == tuple(want)  # forward (registration) order
    assert grad.values[-1] == pytest.approx([want[layer] for layer in grad.layers], rel=1e-5)
    assert grad.values[0] == pytest.approx([ref.grad[0][layer] for layer in grad.layers], rel=1e-5)

    ea = events(tb.log_dir)
    tags = {f"{_emission.PROFILE_KEY}/{kind}" for kind in profiles.KINDS}
    assert tags <= set(ea.Tags()["images"])
    for tag in tags:
        images = ea.Images(tag)
        # the end of fit only: the first pictures during a fit come 5 minutes after its start
        assert [im.step for im in images] == [29]
        assert check_png(images[-1].encoded_image_string) == (images[-1].height, images[-1].width)
    for kind in profiles.KINDS:
        for log_dir in (csv_logger.log_dir, tb.log_dir):
            check_png((Path(log_dir) / _emission.PROFILE_DIR / f"{kind}.png").read_bytes())
    with open(Path(csv_logger.log_dir) / "metrics.csv") as fh:  # the finding counts are metrics there too
        header = next(csv.reader(fh))
    assert set(_emission.COUNT_KEYS.values()) <= set(header)


def test_buggy_run_marks_the_named_layers_and_logs_counts_threshold_and_layout(tmp_path: Path) -> None:
    """Exploding activations from init: the layers named in warning/error findings are marked in every profile;
    the finding counts at each logging step and the clip threshold are scalars; the Custom Scalars layout holds
    them."""
    cb = NormCheck(print_summary=False)
    ref = Reference(cb)
    tb = TensorBoardLogger(tmp_path, name="tb")
    model = _lit(init_mlp(8, gain=3.0), lr=1e-4, optimizer="adam")
    fit(model, reg(), [cb, ref], max_steps=12, logger=tb, gradient_clip_val=0.5)

    named = {f.layer for f in cb.findings if f.severity != "info" and f.layer}
    assert any(f.code == "exploding_activations" for f in cb.findings) and named
    by_kind = {p.kind: p for p in cb.profiles()}
    assert set(by_kind["act_rms"].marked) == named  # every named layer is a module with an activation
    for p in by_kind.values():
        assert p.marked == marked_layers(cb, p.layers)

    ea = events(tb.log_dir)
    images = ea.Images(f"{_emission.PROFILE_KEY}/act_rms")
    assert [im.step for im in images] == [11]  # a run shorter than the dense start: the end of fit's only
    check_png(images[0].encoded_image_string)

    logged_steps = set()
    for severity, key in _emission.COUNT_KEYS.items():
        points = {e.step: e.value for e in ea.Scalars(key)}
        logged_steps |= set(points)
        for step, value in points.items():
            assert value == ref.counts[step][severity], (key, step)
    assert max(logged_steps) == 11  # the end of fit flushes the steps since the last logging step (10)
    last = {severity: ea.Scalars(key)[-1].value for severity, key in _emission.COUNT_KEYS.items()}
    assert last == {severity: Counter(f.severity for f in cb.findings)[severity] for severity in SEVERITIES}
    assert last["warning"] + last["error"] >= 2
    assert {e.value for e in ea.Scalars(_emission.CLIP_THRESHOLD_KEY)} == {0.5}

    from tensorboard.plugins.custom_scalar import layout_pb2

    (event,) = ea.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(event.tensor_proto.string_val[0])
    charts = {c.title: list(c.multiline.tag) for cat in layout.category for c in cat.chart}
    scalars = ea.Tags()["scalars"]

    def matched(title: str) -> list[str]:
        return sorted(t for t in scalars if any(re.match(p, t) for p in charts[title]))

    assert matched("findings by severity") == sorted(_emission.COUNT_KEYS.values())
    assert matched("total gradient norm (pre-clip) and clip rate") == sorted(
        [_emission.TOTAL_KEY, _emission.CLIP_THRESHOLD_KEY, _emission.CLIP_RATE_KEY]
    )


def test_mlflow_run_has_the_profile_artifacts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("mlflow")
    from lightning.pytorch.loggers import MLFlowLogger

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3 refuses a file store unless asked
    cb = NormCheck(print_summary=False)
    logger = MLFlowLogger(experiment_name="normcheck", tracking_uri="file:" + str(tmp_path / "mlruns"))
    fit(LitModel(mlp()), loader(regression_data()), [cb], max_steps=8, logger=logger)

    folder = tmp_path / "mlruns" / str(logger.experiment_id) / str(logger.run_id) / "artifacts" / "normcheck"
    assert {p.kind for p in cb.profiles()} == set(profiles.KINDS)
    for kind in profiles.KINDS:
        check_png((folder / f"profile_{kind}.png").read_bytes())


def test_wandb_offline_run_has_the_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wandb = pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    cb = NormCheck(print_summary=False)
    logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="normcheck")
    try:
        fit(LitModel(mlp()), loader(regression_data()), [cb], max_steps=8, logger=logger)
        files = Path(logger.experiment.dir)
    finally:
        wandb.finish()

    for kind in profiles.KINDS:  # media/images/normcheck/profile/<kind>_<step>_<hash>.png
        found = list(files.glob(f"media/images/normcheck/profile/{kind}_*.png"))
        assert len(found) == 1, sorted(str(p.relative_to(files)) for p in files.rglob("*"))
        check_png(found[0].read_bytes())


def test_without_matplotlib_no_images_one_info_line_and_the_rest_works(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(profiles, "available", lambda: False)
    monkeypatch.setattr(_base, "_said_no_matplotlib", False)
    cb, again = NormCheck(print_summary=False), NormCheck(print_summary=False)
    tb, csv_logger = TensorBoardLogger(tmp_path, name="tb"), CSVLogger(tmp_path, name="csv")
    with caplog.at_level(logging.INFO, logger="lightning_normcheck"):
        fit(LitModel(mlp()), loader(regression_data()), [cb], max_steps=8, logger=[tb, csv_logger])
        fit(LitModel(mlp()), loader(regression_data()), [again], max_steps=4, logger=MemLogger())
    said = [r for r in caplog.records if "matplotlib is not installed" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.INFO
    assert {p.kind for p in cb.profiles()} == set(profiles.KINDS)  # the numbers are still kept
    assert "images" not in events(tb.log_dir).Tags() or not events(tb.log_dir).Tags()["images"]
    for log_dir in (tb.log_dir, csv_logger.log_dir):
        assert not (Path(log_dir) / _emission.PROFILE_DIR).exists()
        assert (Path(log_dir) / "findings.json").exists()


def test_depth_profiles_off_argument_and_checkpoint_key(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"NormCheck: `depth_profiles` must be True or False, got 'yes'"):
        NormCheck(depth_profiles="yes")  # type: ignore[arg-type]
    assert NormCheck(depth_profiles=False).state_key == NormCheck().state_key  # it changes no measurement
    cb = NormCheck(print_summary=False, depth_profiles=False)
    csv_logger = CSVLogger(tmp_path, name="csv")
    fit(LitModel(mlp()), loader(regression_data()), [cb], max_steps=6, logger=csv_logger)
    assert cb.profiles() == [] and not (Path(csv_logger.log_dir) / _emission.PROFILE_DIR).exists()


def test_failures_warn_once_and_training_goes_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A logger that cannot take the images is warned about once and skipped; a drawing that fails switches
    the images off with one warning. Metrics and findings files still go out."""
    (tmp_path / "a_file").write_text("")

    class Unwritable(MemLogger):
        @property
        def log_dir(self) -> str:  # under a file: makedirs fails
            return str(tmp_path / "a_file" / "logs")

    monkeypatch.setattr(_base, "PROFILE_INTERVAL_S", 0.0)  # pictures at every logging step past the dense start
    monkeypatch.setattr(_base, "PROFILE_COST_FACTOR", 0.0)
    cb, bad, good = NormCheck(print_summary=False), Unwritable(), TensorBoardLogger(tmp_path, name="tb")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(LitModel(mlp()), loader(regression_data()), [cb], max_steps=27, logger=[bad, good])
    assert [im.step for im in events(good.log_dir).Images(f"{_emission.PROFILE_KEY}/grad_norm")] == [20, 25, 26]
    ours = [w for w in caught if "depth-profile images to Unwritable" in str(w.message)]
    assert len(ours) == 1 and bad.rows  # three publications: warned once; its metrics still went to it
    assert (Path(good.log_dir) / _emission.PROFILE_DIR / "grad_norm.png").exists()

    def broken(profile: profiles.Profile) -> Any:
        raise RuntimeError("no display")

    monkeypatch.setattr(profiles, "pixels", broken)
    cb2, good2 = NormCheck(print_summary=False), CSVLogger(tmp_path, name="csv2")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(LitModel(mlp()), loader(regression_data()), [cb2], max_steps=27, logger=good2)
    ours = [w for w in caught if "drawing the depth-profile images" in str(w.message)]
    assert len(ours) == 1 and "no display" in str(ours[0].message)
    assert not (Path(good2.log_dir) / _emission.PROFILE_DIR).exists()
    assert (Path(good2.log_dir) / "findings.json").exists() and cb2.profiles()


def test_a_crashed_run_keeps_its_pictures(tmp_path: Path) -> None:
    class Crashes(LitModel):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            if self.trainer.global_step == 6:
                raise RuntimeError("data loader died")
            return super().training_step(batch, batch_idx)

    cb, logger = NormCheck(print_summary=False), CSVLogger(tmp_path, name="csv")
    with pytest.raises(RuntimeError, match="data loader died"):
        fit(Crashes(mlp()), loader(regression_data()), [cb], max_steps=20, logger=logger)
    assert cb.profiles()[0].steps[-1] == 5  # the latest sampled step before the crash (dense start, every 5)
    for kind in profiles.KINDS:
        check_png((Path(logger.log_dir) / _emission.PROFILE_DIR / f"{kind}.png").read_bytes())


def test_two_callbacks_draw_each_kind_once(tmp_path: Path) -> None:
    """NormCheck and an ActivationNormMonitor both have activation profiles: the one listed first draws them."""
    from lightning_normcheck import ActivationNormMonitor

    a, b = NormCheck(print_summary=False), ActivationNormMonitor(print_summary=False)
    logger = TensorBoardLogger(tmp_path, name="tb")
    fit(LitModel(mlp()), loader(regression_data()), [a, b], max_steps=8, logger=logger)
    assert [p.kind for p in b.profiles()] == ["act_rms"]
    ea = events(logger.log_dir)
    assert sorted(ea.Tags()["images"]) == sorted(f"{_emission.PROFILE_KEY}/{kind}" for kind in profiles.KINDS)
    assert [im.step for im in ea.Images(f"{_emission.PROFILE_KEY}/act_rms")] == [7]
