"""WaveNet (van den Oord et al., 2016): the network, its LightningModule, mu-law coding and generation.

The public names load on first use, so `import wavenet.errors` (and `train.py --help`) stays fast.
"""

from typing import TYPE_CHECKING

from wavenet._lazy import lazy_exports

if TYPE_CHECKING:
    # For type checkers and editors, which take a module's `__getattr__` to give `Any`: no completion of
    # `WaveNetModule(...)`'s arguments, no check of a call. At run time `__getattr__` below imports each on first use.
    from wavenet.data.mulaw import mu_law_decode, mu_law_encode
    from wavenet.generation import generate
    from wavenet.models.wavenet import WaveNet
    from wavenet.module import WaveNetModule

_EXPORTS = {
    "WaveNet": "wavenet.models.wavenet",
    "WaveNetModule": "wavenet.module",
    "generate": "wavenet.generation",
    "mu_law_encode": "wavenet.data.mulaw",
    "mu_law_decode": "wavenet.data.mulaw",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
