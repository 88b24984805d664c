"""Unlearning methods as users name them: ``--method NAME`` sets the forgetting loss, the
retaining loss and the combine rule with its weights; an explicit ``--forget-loss``,
``--retain-loss`` or ``--combine`` (and their ``-option`` flags) still overrides each part.

The weights are open-unlearning's (``configs/trainer/*.yaml``): GradDiff's loss is
``gamma * forget_loss + alpha * retain_loss``, our ``gdiff`` rule's ``d = alpha * g_r +
gamma * g_f``. Where open-unlearning's method of the same name adds a retain term (its NPO
and SimNPO do, with NLL and alpha 1), ours does too; the forget-only NPO of its paper is
``npo``, open-unlearning's NPO is ``npo_gdiff``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    forget_loss: str
    retain_loss: str
    combine: str
    combine_options: tuple[str, ...] = ()  # applied only when the combine rule is this one's
    forget_loss_options: tuple[str, ...] = ()  # likewise, for the forgetting loss
    about: str = ""
    # NGDiff sets its rate by the parabola fit (GeN); the baselines run at a fixed rate, as
    # in their papers and in open-unlearning (--adaptive-lr gives them the adaptive rate)
    adaptive_lr: bool = False


PRESETS = {
    "ga": Preset("ga", "nll", "ga",
                 about="gradient ascent on the forget set; the retain set is not used"),
    "gdiff": Preset("ga", "nll", "gdiff", ("alpha=1", "gamma=1"),
                    about="gradient difference: ascent on forget + NLL on retain, fixed weights"),
    "gdiff_kl": Preset("ga", "kl", "gdiff", ("alpha=1", "gamma=1"),
                       about="gradient difference with KL to the starting model on retain"),
    "npo": Preset("npo", "nll", "ga", about="NPO on the forget set only (beta 0.1)"),
    "npo_gdiff": Preset("npo", "nll", "gdiff", ("alpha=1", "gamma=1"),
                        about="NPO + NLL on retain (open-unlearning's NPO)"),
    "simnpo": Preset("simnpo", "nll", "gdiff", ("alpha=1", "gamma=0.125"),
                     about="SimNPO (beta 4.5, delta 0) + NLL on retain, open-unlearning's weights"),
    "ngdiff": Preset("ga", "nll", "ngdiff", adaptive_lr=True,
                     about="NGDiff: ascent on forget and NLL on retain, each gradient "
                           "normalised, adaptive rate"),
    "ngdiff_npo": Preset("npo", "nll", "ngdiff", adaptive_lr=True,
                         about="NGDiff with NPO as the forgetting loss, adaptive rate"),
}
DEFAULT_METHOD = "ngdiff"


def method_help() -> str:
    return "; ".join(f"{name}: {preset.about}" for name, preset in PRESETS.items()) + \
        "; the baselines run at a fixed rate (the --lr), NGDiff's at the adaptive one"
