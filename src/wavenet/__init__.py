"""WaveNet (van den Oord et al., 2016): the network, its LightningModule, mu-law coding and generation.

The public names load on first use, so `import wavenet.errors` (and `train.py --help`) stays fast.
"""

from wavenet._lazy import lazy_exports

_EXPORTS = {
    "WaveNet": "wavenet.models.wavenet",
    "WaveNetModule": "wavenet.module",
    "generate": "wavenet.generation",
    "mu_law_encode": "wavenet.data.mulaw",
    "mu_law_decode": "wavenet.data.mulaw",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
