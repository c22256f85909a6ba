"""Mu-law companding (ITU-T G.711), the paper's 8-bit quantization of audio."""

from __future__ import annotations

import numbers

import torch
import torchaudio.functional as AF
from torch import Tensor

# 16-bit audio has no more levels to tell apart; in float32 torchaudio's arithmetic gives classes out of
# range (and decodes past [-1, 1]) from 2**24 on.
_MAX_CHANNELS = 2**16


def mu_law_encode(audio: Tensor, quantization_channels: int = 256) -> Tensor:
    """Float audio in [-1, 1] -> int64 classes in [0, quantization_channels).

    Equal to `torchaudio.functional.mu_law_encoding` on [-1, 1]; values outside are clipped first, where
    torchaudio would return classes out of range (a crash, or a silent wrong target, in the loss).

    Raises:
        TypeError: If `audio` is not a float tensor.
        ValueError: If `audio` holds NaN (it has no class: torchaudio gives INT64_MIN), or for
            `quantization_channels` out of [2, 65536].
    """
    if not isinstance(audio, Tensor) or not audio.is_floating_point():
        raise TypeError(f"mu_law_encode expects audio as a float tensor, got {_kind(audio)}")
    _check_channels(quantization_channels)
    # A pass over the audio: encoding runs once per file (data preparation, a prime), never per training step.
    if torch.isnan(audio).any():
        raise ValueError("mu_law_encode: audio holds NaN samples, which have no mu-law class")
    if audio.dtype.itemsize < 4:
        # torchaudio computes in the audio's dtype: in bfloat16, rounding put 1.0 in class 256 (out of range) and
        # 40 % of samples in another class than float32 does.
        audio = audio.float()
    return AF.mu_law_encoding(audio.clamp(-1.0, 1.0), quantization_channels)


def mu_law_decode(classes: Tensor, quantization_channels: int = 256) -> Tensor:
    """Int classes in [0, quantization_channels) -> float32 audio in [-1, 1]; `torchaudio`'s decoding.

    Raises:
        TypeError: If `classes` is not a tensor of integers.
        ValueError: For classes out of [0, quantization_channels) (torchaudio decodes them past [-1, 1]), or
            `quantization_channels` out of [2, 65536].
    """
    integers = isinstance(classes, Tensor) and not (classes.is_floating_point() or classes.is_complex())
    if not integers or classes.dtype == torch.bool:
        raise TypeError(f"mu_law_decode expects classes as an integer tensor, got {_kind(classes)}")
    _check_channels(quantization_channels)
    outside = classes < 0
    if quantization_channels <= torch.iinfo(classes.dtype).max:  # else the bound would wrap to the dtype's range
        outside |= classes >= quantization_channels
    if outside.any():
        raise ValueError(
            f"mu_law_decode: classes must be in [0, quantization_channels={quantization_channels}), "
            f"got values from {int(classes.min())} to {int(classes.max())}"
        )
    # torchaudio's float32 arithmetic gives the top class 1.0000001 for 467 of the level counts up to 1,099 (255
    # among them): past what a float WAV file or a later mu_law_encode takes as full scale.
    return AF.mu_law_decoding(classes, quantization_channels).to(torch.float32).clamp_(-1.0, 1.0)


def _check_channels(quantization_channels: int) -> None:
    if isinstance(quantization_channels, bool) or not isinstance(quantization_channels, numbers.Integral):
        raise TypeError(f"quantization_channels must be an integer, got {quantization_channels!r}")
    if not 2 <= quantization_channels <= _MAX_CHANNELS:
        raise ValueError(f"quantization_channels must be from 2 to {_MAX_CHANNELS}, got {quantization_channels}")


def _kind(value: object) -> str:
    """`a torch.float32 tensor`, or the type of anything else (`ndarray`, `list`), for a TypeError's message."""
    return f"a {value.dtype} tensor" if isinstance(value, Tensor) else type(value).__name__
