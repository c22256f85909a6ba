"""Audio data: files -> prepared mu-law shards (cached) -> windows -> batches; optionally streamed.

The public names load on first use, as in `wavenet`: `wavenet.data.mulaw` (used by generation) does not
pull in Lightning.
"""

from wavenet._lazy import lazy_exports

_EXPORTS = {
    "AudioFolderDataModule": "wavenet.data.datamodule",
    "SyntheticMusicDataModule": "wavenet.data.datamodule",
    "StreamingDataModule": "wavenet.data.streaming",
    "Manifest": "wavenet.data.prepare",
    "PrepareSettings": "wavenet.data.prepare",
    "prepare_corpus": "wavenet.data.prepare",
    "list_sources": "wavenet.data.layouts",
    "publish": "wavenet.data.streaming",
    "audio_info": "wavenet.data.audio",
    "find_audio_files": "wavenet.data.audio",
    "read_audio": "wavenet.data.audio",
    "write_wav": "wavenet.data.audio",
    "mu_law_encode": "wavenet.data.mulaw",
    "mu_law_decode": "wavenet.data.mulaw",
    "synthesize_dataset": "wavenet.data.synthetic",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
