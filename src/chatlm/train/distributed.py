"""Multi-process runs: a process group that times out instead of hanging on a dead peer."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Optional

def strategy_with_timeout(strategy: Any, timeout_s: Optional[float]) -> Any:
    """A registry strategy name (``ddp``, ``ddp_spawn``, ``fsdp``...) as an instance whose process
    group times out after ``timeout_s`` seconds; anything else is returned unchanged."""
    if not timeout_s:
        return strategy
    if not isinstance(strategy, str):
        if hasattr(strategy, "_timeout"):  # DDPStrategy / FSDPStrategy / DeepSpeedStrategy given as a class_path
            strategy._timeout = timedelta(seconds=float(timeout_s))
        return strategy
    import inspect

    from lightning.pytorch.strategies import StrategyRegistry

    if strategy not in StrategyRegistry:
        return strategy
    entry = StrategyRegistry[strategy]
    cls = entry["strategy"]
    params = dict(entry.get("init_params") or {})
    try:
        accepts = "timeout" in inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        accepts = False
    if not accepts or "timeout" in params:
        return strategy
    return cls(**params, timeout=timedelta(seconds=float(timeout_s)))


