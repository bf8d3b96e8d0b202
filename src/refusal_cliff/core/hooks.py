"""The one context manager through which every hook in the toolkit is installed.

Hooks are removed in `finally`, so an exception inside the block never leaves a
model patched. A missing target module fails loudly before anything is hooked.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from torch import nn

Hook = Callable[..., object]


class StopForward(Exception):
    """Raised by a hook to end a forward pass early (after the deepest layer needed)."""


@contextmanager
def add_hooks(
    forward_pre_hooks: Sequence[tuple[nn.Module, Hook]] = (),
    forward_hooks: Sequence[tuple[nn.Module, Hook]] = (),
    with_kwargs: bool = False,
) -> Iterator[None]:
    """Install forward pre-hooks and forward hooks for the duration of the block.

    Args:
        forward_pre_hooks: (module, hook) pairs; hook(module, args) may return new args.
        forward_hooks: (module, hook) pairs; hook(module, args, output) may return a new output.
        with_kwargs: pass keyword arguments to the hooks as well (torch's `with_kwargs`).
    """
    for module, hook in (*forward_pre_hooks, *forward_hooks):
        if module is None or not isinstance(module, nn.Module):
            raise ValueError(f"hook target is not a module: {module!r}")
        if not callable(hook):
            raise ValueError(f"hook is not callable: {hook!r}")
    handles = []
    try:
        for module, hook in forward_pre_hooks:
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=with_kwargs))
        for module, hook in forward_hooks:
            handles.append(module.register_forward_hook(hook, with_kwargs=with_kwargs))
        yield
    finally:
        for handle in handles:
            handle.remove()
