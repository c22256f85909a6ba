from wavenet.models.wavenet import WaveNet

__all__ = ["WaveNet"]
