"""`wavenet.sweeper.OptunaSweeper` where Hydra looks for sweepers.

Hydra instantiates a sweeper only if its class is defined in the `hydra_plugins` namespace package, which it scans
at start-up: hence this subclass, for `hydra.sweeper._target_` (conf/hparams_search/optuna.yaml).
"""

from wavenet import sweeper


class OptunaSweeper(sweeper.OptunaSweeper):
    __doc__ = sweeper.OptunaSweeper.__doc__
