"""A forward hook that captures the pooled feature the classifier head sees, in the pass that yields the logits."""

from __future__ import annotations

from types import TracebackType
from typing import Any

import torch


class PooledFeatureHook:
    """Context manager: while inside, every forward of `model` stores the input of `model.<head>` (a forward pre-hook).

    For timm's Eva that input is the `fc_norm` output, i.e. `forward_head(x, pre_logits=True)`; a pre-hook on the head
    is exact whatever the pooling and norm layers are. The handle is removed and captured outputs cleared on exit.
    """

    def __init__(self, model: torch.nn.Module, head_name: str | None = None) -> None:
        name = (
            head_name or getattr(getattr(model, "pretrained_cfg", {}), "get", lambda *_: None)("classifier") or "head"
        )
        head = model.get_submodule(name)
        self._head = head
        self._handle: torch.utils.hooks.RemovableHandle | None = None
        self._captured: list[torch.Tensor] = []

    def _hook(self, module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        self._captured.append(args[0].detach())

    def __enter__(self) -> PooledFeatureHook:
        self._captured.clear()
        self._handle = self._head.register_forward_pre_hook(self._hook)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._captured.clear()

    def pop(self) -> torch.Tensor:
        """The feature captured by the last forward (exactly one must have run since the previous pop)."""
        if len(self._captured) != 1:
            raise RuntimeError(f"expected one captured forward, got {len(self._captured)}")
        return self._captured.pop()
