"""WaveNet (van den Oord et al., 2016): the network, its LightningModule, mu-law coding and generation.

The public names load on first use, so `import wavenet.errors` (and `train.py --help`) stays fast.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "WaveNet": "wavenet.models.wavenet",
    "WaveNetModule": "wavenet.module",
    "generate": "wavenet.generation",
    "mu_law_encode": "wavenet.data.mulaw",
    "mu_law_decode": "wavenet.data.mulaw",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'wavenet' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
