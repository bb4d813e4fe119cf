"""NormCheck on code and data no one here wrote: Hugging Face models built from small configs (random init,
their own losses, dropout and module types) and scikit-learn's bundled data sets.

A healthy run gives no warning or error and is shown to learn (its loss, recorded test-side); a planted fault is
found within the first 20 steps and shown to be there by a measurement that does not use the package (weights
bit-identical, the loss rising, a raw feature's max |x| computed with numpy). The models and data are in
``tests/foreign.py``. The slower seeds and lengths: ``pytest -m slow tests/test_foreign.py``.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import foreign as F
import lightning as L
import numpy as np
import pytest
import torch
from foreign import Outcome

SEEDS = (0, 1, 2)

_cache: dict[tuple[Any, ...], Outcome] = {}


def cached(key: tuple[Any, ...], go: Callable[[], Outcome]) -> Outcome:
    """One run per key for the whole module (several tests judge the same run)."""
    if key not in _cache:
        _cache[key] = go()
    return _cache[key]


def assert_silent(o: Outcome, what: str) -> None:
    assert o.exception is None, f"{what}: {o.exception!r}"
    assert not o.disabled, f"{what}: NormCheck switched off {o.disabled} (a failed monitor is silent too)"
    assert o.bad() == [], f"{what}: false alarms\n{o.describe()}"


def assert_found(o: Outcome, code: str, what: str, severities: tuple[str, ...] = ("warning", "error")) -> Any:
    """The first finding of ``code`` at one of ``severities``, within the first 20 steps."""
    assert o.exception is None, f"{what}: {o.exception!r}"
    hits = [f for f in o.findings if f.code == code and f.severity in severities]
    assert hits, f"{what}: no {code} at {severities}; got\n{o.describe()}"
    f = min(hits, key=lambda f: f.step)
    assert f.step < 20, f"{what}: {code} only at step {f.step}, the problem is there from step 0"
    assert any(ch.isdigit() for ch in f.message) and len(f.message) > 80, f.message
    return f


# ---------------------------------------------------------------------------------------------------------
# a decoder LM: GPT2LMHeadModel
# ---------------------------------------------------------------------------------------------------------
def gpt2_run(seed: int, lr: float, steps: int) -> Outcome:
    def go() -> Outcome:
        L.seed_everything(seed, verbose=False)
        return F.run(F.HFModule(F.gpt2(), lr=lr), F.affine_tokens(seed), steps)

    return cached(("gpt2", seed, lr, steps), go)


@pytest.mark.parametrize("seed", SEEDS)
def test_gpt2_lm_adamw_is_silent_and_learns(seed: int) -> None:
    pytest.importorskip("transformers")
    o = gpt2_run(seed, lr=1e-3, steps=100)
    assert_silent(o, f"GPT-2 AdamW lr 1e-3, seed {seed}")
    # measured 0.44-0.45 after 100 steps on seeds 0-2 (4.17 = ln(64) at the start, ~1.9 at the end)
    assert o.learned() < 0.6, f"seed {seed} must learn: last/first loss {o.learned():.3f}"


@pytest.mark.parametrize("seed", SEEDS)
def test_gpt2_lm_lr_1_is_learning_rate_too_high(seed: int) -> None:
    pytest.importorskip("transformers")
    o = gpt2_run(seed, lr=1.0, steps=20)
    assert_found(o, "learning_rate_too_high", f"GPT-2 AdamW lr 1.0, seed {seed}")
    # independent: the loss rises (measured 4.2 at step 0, 20-50 from step 1 on, seeds 0-2)
    last = sum(o.losses[-5:]) / 5
    assert last > 3 * o.losses[0], f"seed {seed}: the loss must rise: {o.losses}"


# ---------------------------------------------------------------------------------------------------------
# an encoder classifier fine-tuned to convergence: BertForSequenceClassification
# ---------------------------------------------------------------------------------------------------------
def bert_run(seed: int, steps: int) -> tuple[Outcome, float]:
    """AdamW lr 1e-3 on "more tokens below vocab/2 than above": the run and its held-out accuracy."""
    x, y = F.count_tokens(seed, n=4000)
    n_train = 3000

    def go() -> Outcome:
        L.seed_everything(seed, verbose=False)
        model = F.HFModule(F.bert(), lr=1e-3)
        return F.run(model, F.classify_loader(x[:n_train], y[:n_train], seed), steps)

    o = cached(("bert", seed, steps), go)
    return o, F.accuracy(o.model.model, x[n_train:], y[n_train:])


# The converged encoder keeps a heavy tail of per-batch gradient norms: a hard example near the class boundary
# takes the total norm from ~0.04 to ~40 for a few batches (measured: seed 0 steps 250-255, seed 2 steps
# 217-222, 1e3x; the loss of those batches 0.15-0.55 against ~0.005 around them and ~0.69 at the start). It used
# to be announced as exploding_gradients; a growth of the norm now counts as a divergence only when the loss
# climbs back to where the run started.


def _bert_param(steps: int, seed: int) -> Any:
    marks: list[Any] = []
    if steps != 400 and seed != 0:  # seed 0 at 300 steps (the burst in the last 50 steps) stays in the default run
        marks.append(pytest.mark.slow)
    return pytest.param(steps, seed, marks=marks, id=f"{steps}steps-seed{seed}")


@pytest.mark.parametrize(("steps", "seed"), [_bert_param(n, s) for n in (400, 300) for s in SEEDS])
def test_bert_classifier_fine_tuned_to_convergence_is_silent(steps: int, seed: int) -> None:
    pytest.importorskip("transformers")
    o, acc = bert_run(seed, steps)
    assert acc >= 0.95, f"seed {seed}: held-out accuracy {acc:.3f}"
    # the median of the last 10 losses over the first 5: a hard example takes one batch's loss to 0.2-0.5 at any
    # time (above), which a mean of the last few is not robust to (seed 1, 300 steps, one thread: 0.222 two steps
    # before the end made the mean of the last 5 0.085 of the start; the median of the last 10: 0.021)
    learned = statistics.median(o.losses[-10:]) / statistics.mean(o.losses[:5])
    assert learned < 0.05, f"seed {seed} must converge: last/first loss {learned:.3f}"
    assert_silent(o, f"BERT fine-tuned {steps} steps, seed {seed}")


@pytest.mark.parametrize("seed", SEEDS)
def test_bert_classifier_converged_announces_no_warning_mid_run(seed: int) -> None:
    """What the user reads in the log while it trains: no warning line either, even one lowered later."""
    pytest.importorskip("transformers")
    o, _ = bert_run(seed, 400)
    assert o.announced == [], f"seed {seed}: announced during fit: {o.announced}"


# ---------------------------------------------------------------------------------------------------------
# an encoder-decoder: T5ForConditionalGeneration
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", SEEDS)
def test_t5_reverse_task_is_silent_and_learns(seed: int) -> None:
    pytest.importorskip("transformers")

    def go() -> Outcome:
        L.seed_everything(seed, verbose=False)
        return F.run(F.HFModule(F.t5(), lr=3e-3), F.reverse_tokens(seed), 100)

    o = cached(("t5", seed), go)
    assert_silent(o, f"T5 reverse, seed {seed}")
    # measured 0.79-0.80 on seeds 0-2 (4.8 -> 3.7)
    assert o.learned() < 0.9, f"seed {seed} must learn: last/first loss {o.learned():.3f}"


# ---------------------------------------------------------------------------------------------------------
# a manual-optimization bug around a Hugging Face model
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["gpt2", "bert"])
@pytest.mark.parametrize("seed", SEEDS)
def test_zero_grad_between_backward_and_step_is_zero_gradients(arch: str, seed: int) -> None:
    pytest.importorskip("transformers")
    L.seed_everything(seed, verbose=False)
    if arch == "gpt2":
        net, data = F.gpt2(), F.affine_tokens(seed)
    else:
        x, y = F.count_tokens(seed, n=800)
        net, data = F.bert(), F.classify_loader(x, y, seed)
    model = F.ZeroGradBeforeStepHF(net)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    o = F.run(model, data, 20)
    f = assert_found(o, "zero_gradients", f"{arch} zero_grad before step, seed {seed}", severities=("error",))
    # independent: AdamW (weight decay 0.01) stepped 20 times and not one bit of any parameter changed
    changed = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert changed == [], f"seed {seed}: weights changed: {changed[:5]}"
    assert len(o.losses) == 20 and all(np.isfinite(o.losses)), o.losses
    assert "zero_grad" in f.message


# ---------------------------------------------------------------------------------------------------------
# scikit-learn's bundled tables in a small MLP
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["wine", "breast_cancer"])
@pytest.mark.parametrize("seed", SEEDS)
def test_raw_sklearn_features_are_input_scale(name: str, seed: int) -> None:
    pytest.importorskip("sklearn")
    table = F.table(name, seed)
    L.seed_everything(seed, verbose=False)
    inputs = F.FirstInputs()
    o = F.run(F.TabularModule(table.x_train.shape[1], table.n_out, lr=3e-3), table.loader(seed), 30, (inputs,))
    f = assert_found(o, "input_scale", f"raw {name}, seed {seed}", severities=("warning",))
    # independent: numpy's largest |x| column, in the batch of the finding's step and in the training split
    batch = np.abs(inputs.by_step[f.step]).max(0)
    col = int(batch.argmax())
    whole = np.abs(table.x_train).max(0)
    assert int(whole.argmax()) == col and whole[col] > 1e3, (table.feature_names[col], whole[col])
    assert f.extra.get("feature") == col, f"expected column {col} ({table.feature_names[col]}); {f.message}"
    assert f"column {col} of batch[0]" in f.message, f.message
    assert f.value == pytest.approx(float(batch[col]), rel=1e-5)


@pytest.mark.parametrize("name", ["wine", "breast_cancer", "diabetes"])
@pytest.mark.parametrize("seed", SEEDS)
def test_standardized_sklearn_data_is_silent_and_learns(name: str, seed: int) -> None:
    pytest.importorskip("sklearn")
    table = F.table(name, seed).standardized()
    L.seed_everything(seed, verbose=False)
    model = F.TabularModule(table.x_train.shape[1], table.n_out, lr=3e-3)
    o = F.run(model, table.loader(seed), 60)
    assert_silent(o, f"standardized {name}, seed {seed}")
    assert np.abs(table.x_train).max() < 25  # what standardizing leaves (measured <= 12 on the three tables)
    # measured: classification 0.03-0.07, diabetes 0.42-0.55 (an R^2 of ~0.5 is what this data set allows)
    bound = 0.8 if name == "diabetes" else 0.2
    assert o.learned() < bound, f"{name} seed {seed} must learn: last/first loss {o.learned():.3f}"
    if table.classification:  # measured 0.96-1.0 held out
        assert table.test_accuracy(model) >= 0.9
    else:
        with torch.no_grad():
            pred = model(torch.from_numpy(table.x_test)).numpy().ravel()
        # measured 0.48-0.53 held out on seeds 0-2; predicting the mean gives ~1 (the standardized target's variance)
        assert float(np.mean((pred - table.y_test) ** 2)) < 0.8
