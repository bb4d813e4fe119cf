"""Fault isolation: a monitor (or a rule family) that raises is reported once and switched off; the user's
training goes on unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.utilities import rank_zero_warn as _rank_zero_warn

if TYPE_CHECKING:
    from lightning_normcheck.callbacks._base import _Monitor
    from lightning_normcheck.callbacks._budget import _Budget
    from lightning_normcheck.callbacks._run import _Run

log = logging.getLogger("lightning_normcheck")


def rank_zero_warn(message: str, category: type[Warning] = UserWarning) -> None:
    """Lightning's rank_zero_warn that can never raise into training (e.g. under ``-W error``)."""
    try:
        _rank_zero_warn(message, category=category)
    except Exception:  # noqa: BLE001
        log.warning("%s", message)


def failure_message(what: str, error: BaseException) -> str:
    return (
        f"lightning_normcheck: {what} failed ({type(error).__name__}: {error}) and is switched off for the rest"
        " of this fit; training goes on unchanged."
    )


class _Isolation:
    """The fault isolation of a callback's monitors (mixed into the callback base)."""

    _monitors: list[_Monitor]
    _disabled: set[str]
    _removal_pending: list[_Monitor]
    _run: _Run | None
    _budget: _Budget | None = None  # the overhead budget of the current fit, if any

    def _active(self) -> list[_Monitor]:
        return [m for m in self._monitors if m.name not in self._disabled]

    def _handlers(self, method: str) -> list[_Monitor]:
        """The active monitors that implement the Lightning hook ``method`` (most leave most hooks empty: calling
        them all costs a Python call each on every step). Cached until a monitor is switched off."""
        state = (id(self._monitors), id(self._disabled), len(self._disabled))
        cache: tuple[tuple[int, int, int], dict[str, list[_Monitor]]] | None = self.__dict__.get("_handler_cache")
        if cache is None or cache[0] != state:
            cache = self.__dict__["_handler_cache"] = (state, {})
        handlers = cache[1].get(method)
        if handlers is None:
            from lightning_normcheck.callbacks._base import _Monitor

            base = getattr(_Monitor, method)
            handlers = cache[1][method] = [
                m for m in self._active() if getattr(getattr(m, method, None), "__func__", None) is not base
            ]
        return handlers

    def _disable(self, monitor: _Monitor, error: BaseException, inside_hook: bool = False) -> None:
        if monitor.name in self._disabled:
            return
        self._disabled.add(monitor.name)
        rank_zero_warn(failure_message(f"the {monitor.name} monitor", error), category=RuntimeWarning)
        if inside_hook:
            # torch may be iterating over the dict that holds this hook (optimizer step hooks iterate it
            # live): removing now would raise "mutated during iteration" in the user's step. The wrapper
            # is already a no-op; the handles go at the next Lightning hook.
            self._removal_pending.append(monitor)
            return
        self._remove_monitor_hooks(monitor)

    @staticmethod
    def _remove_monitor_hooks(monitor: _Monitor) -> None:
        try:
            monitor.remove_hooks()
        except Exception:  # noqa: BLE001 - best effort while already failing
            pass

    def _drain_removals(self) -> None:
        while self._removal_pending:
            self._remove_monitor_hooks(self._removal_pending.pop())

    def _teardown_hooks(self) -> None:
        self._removal_pending = []
        for m in self._monitors:
            self._remove_monitor_hooks(m)

    def _safely(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run a piece of the shared plumbing; if it fails, switch every monitor off (one warning)."""
        try:
            fn(*args)
        except Exception as err:  # noqa: BLE001 - a monitor must never break training
            if len(self._disabled) < len(self._monitors):
                rank_zero_warn(failure_message(type(self).__name__, err), category=RuntimeWarning)
            self._disabled.update(m.name for m in self._monitors)
            self._teardown_hooks()

    def _call(self, method: str, *args: Any) -> None:
        if self._removal_pending:
            self._drain_removals()
        run = self._run
        if run is None:
            return
        budget = self._budget
        if budget is not None and not budget.depth:
            budget.timed(self._dispatch, run, method, *args)
        else:
            self._dispatch(run, method, *args)

    def _dispatch(self, run: _Run, method: str, *args: Any) -> None:
        for m in self._handlers(method):
            try:
                getattr(m, method)(run, *args)
            except Exception as err:  # noqa: BLE001 - a monitor must never break training
                self._disable(m, err)

    def _guard(self, monitor: _Monitor, fn: Callable[..., Any]) -> Callable[..., Any]:
        """Wrap a hook that runs inside the user's code (forward/optimizer hooks): never raise."""

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            if monitor.name in self._disabled:
                return None
            budget = self._budget  # the overhead budget clocks hooks in the user's code too (outermost only)
            t0 = budget.clock() if budget is not None and not budget.depth else None
            if t0 is not None:
                budget.depth = 1  # type: ignore[union-attr]
            try:
                return fn(*args, **kwargs)
            except Exception as err:  # noqa: BLE001
                # module hooks run from a copy of the hook dict: safe to remove them at once
                self._disable(monitor, err, inside_hook=not (args and isinstance(args[0], torch.nn.Module)))
                return None
            finally:
                if t0 is not None:
                    budget.spent += budget.clock() - t0  # type: ignore[union-attr]
                    budget.depth = 0  # type: ignore[union-attr]

        return wrapped
