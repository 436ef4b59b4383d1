"""`frozen_jit`: jit a function of an NNX module whose weights it only reads.

`nnx.jit` returns the module's state from the compiled program so that mutations inside flow back out;
for inference that means a fresh output buffer for every weight on every call (checked: the kernel's
device pointer changes after each `nnx.jit` call), so the call's peak holds the weights twice. On an H100
the A14B expert's forward under `nnx.jit` peaked at 57.5 GiB for 28.6 GiB of weights (2026-11-25). The
sampler has always called the DiT as `jax.jit(f)(graphdef, state, ...)`; this is that pattern in one place
for every other inference call (encoders, bench scripts).
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable, TypeVar

import jax
from flax import nnx

R = TypeVar("R")


def frozen_jit(fn: Callable[..., R] | None = None, *, static_argnames: tuple[str, ...] = ()):
    """Decorator: `fn(module, *args, **kwargs)` compiled with the module's state as a read-only input.

    The module is split on every call (host work of milliseconds for a 14B model) and merged inside the
    trace; only `fn`'s result comes back, so no weight is copied. Mutations of the module inside `fn` are
    not propagated: use it for inference only.
    """

    def wrap(fn: Callable[..., R]) -> Callable[..., R]:
        @functools.partial(jax.jit, static_argnums=0, static_argnames=static_argnames)
        def pure(graphdef, state, *args, **kwargs):
            return fn(nnx.merge(graphdef, state), *args, **kwargs)

        sig = inspect.signature(fn)
        by_name = not any(p.kind is p.VAR_POSITIONAL for p in sig.parameters.values())

        def arguments(module, args, kwargs) -> tuple[tuple, dict]:
            # jax.jit matches static_argnames by keyword only: pass every argument by name (positionally
            # given static arguments would otherwise be traced)
            if not by_name:
                return args, kwargs
            bound = sig.bind(module, *args, **kwargs)
            named = dict(list(bound.arguments.items())[1:])
            extra = next((p.name for p in sig.parameters.values() if p.kind is p.VAR_KEYWORD), None)
            if extra in named:
                named.update(named.pop(extra))
            return (), named

        @functools.wraps(fn)
        def call(module: nnx.Module, *args, **kwargs) -> R:
            graphdef, state = nnx.split(module)
            args, kwargs = arguments(module, args, kwargs)
            return pure(graphdef, state, *args, **kwargs)

        def lower(module: nnx.Module, *args, **kwargs):  # for memory_analysis() / cost_analysis()
            graphdef, state = nnx.split(module)
            args, kwargs = arguments(module, args, kwargs)
            return pure.lower(graphdef, state, *args, **kwargs)

        call.lower = lower
        return call

    return wrap if fn is None else wrap(fn)


__all__ = ["frozen_jit"]
