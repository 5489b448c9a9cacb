"""enginekit: PyTorch models to compiled, quantized engines, run on edge boxes.

The runtime path (:func:`load` and the task objects it returns) imports numpy,
Pillow and the chosen backend only; torch, timm and transformers are needed for
export alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["load", "__version__"]

if TYPE_CHECKING:
    from enginekit.api import load


def __getattr__(name: str) -> Any:
    # Lazy so `import enginekit` stays cheap and side-effect free.
    if name == "load":
        from enginekit.api import load

        return load
    raise AttributeError(f"module 'enginekit' has no attribute {name!r}")
