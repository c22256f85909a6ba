"""The sampling temperature's range: checked by `wavenet.generate`, and by generate.py before torch loads."""

from __future__ import annotations

import numbers

# float32's largest finite value (torch.finfo(torch.float32).max), written out so that no torch is needed.
_FLOAT32_MAX = 3.4028234663852886e38
# Noise is Gumbel draws times the temperature, in float32. The largest draw from float32 uniforms is
# -log(-log(1 - 2**-24)) = 16.6: past float32's max / 17 some noise would be inf, and the argmax of tied
# infinities is the lowest class. Sampling is all but uniform long before.
MAX_TEMPERATURE = _FLOAT32_MAX / 17


def check_temperature(temperature: float) -> None:
    """Raises TypeError or ValueError unless `temperature` is a number in [0, MAX_TEMPERATURE]."""
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a number, got {type(temperature).__name__}")
    if not 0 <= temperature <= MAX_TEMPERATURE:  # NaN fails every comparison
        raise ValueError(f"temperature must be 0 (greedy) or more, at most {MAX_TEMPERATURE:.0e}, got {temperature}")
