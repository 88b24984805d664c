"""A forgetting loss that lives outside the library, for test_extension.py: loaded with
``--plugin tests/plugin_losses.py`` and chosen with ``--forget-loss scaled_ga``."""

from dataclasses import dataclass

from ngdiff_ds.errors import ConfigError
from ngdiff_ds.losses import FORGET_LOSSES, answer_nll


@dataclass(frozen=True)
class ScaledAscentOptions:
    scale: float = 1.0

    def __post_init__(self):
        if not self.scale > 0:
            raise ConfigError(f"scaled_ga option scale must be positive, got {self.scale}")


@FORGET_LOSSES.register("scaled_ga", ScaledAscentOptions)
def scaled_gradient_ascent(logits, batch, options: ScaledAscentOptions):
    """Gradient ascent with the loss multiplied by ``scale``."""
    return -options.scale * answer_nll(logits, batch["labels"])


@FORGET_LOSSES.register("broken")
def broken_loss(logits, batch):
    """A programming error inside a method: must surface as a traceback, not as bad input."""
    raise ValueError("a bug in a loss function")
