"""The flags of an unlearning run (``UnlearnSettings``): splits, steps, the method (a
``--method`` preset filled in, each part bound to its options from the registries), the
evaluation points and the best-point rule. Validated when built, before any model loads."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ngdiff_ds.adaptive_lr import AdaptiveLRConfig
from ngdiff_ds.combine import COMBINE_RULES
from ngdiff_ds.errors import ConfigError
from ngdiff_ds.eval.selection import check_rule
from ngdiff_ds.losses import FORGET_LOSSES, RETAIN_LOSSES
from ngdiff_ds.methods import DEFAULT_METHOD, PRESETS, method_help
from ngdiff_ds.registry import load_plugin, parse_option_strings
from ngdiff_ds.settings import invalid, option
from ngdiff_ds.starting_model import check_needs
from ngdiff_ds.trainer import Method


@dataclass
class UnlearnSettings:
    """The flags of an unlearning run that are not DeepSpeed's, the job's or the rate's."""

    forget_split: str | None = option(
        None, help="split(s) to unlearn; several joined by '+' are concatenated, QA and text "
                   "splits alike (default: forget10, and on the embedded default "
                   "forget10+forget10_text: the QA pairs and the passages)")
    retain_split: str | None = option(
        None, help="default: the TOFU complement of each --forget-split part (forget10 -> "
                   "retain90, forget10_text -> retain90_text)")
    output_dir: str = option("runs/ngdiff", help="where the run writes its files")
    max_steps: int = option(40, help="optimizer steps")
    lr: float | None = option(None, help="default: optimizer.params.lr of the JSON")
    method_name: str = option(DEFAULT_METHOD, flag="--method",
                              help=f"the method, as a preset of the three parts below "
                                   f"({method_help()}); an explicit part overrides its preset")
    combine: str | None = option(None, help="combine rule (default: the --method's): "
                                            + ", ".join(COMBINE_RULES.names()))
    forget_loss: str | None = option(None, help="forgetting loss (default: the --method's): "
                                                + ", ".join(FORGET_LOSSES.names()))
    retain_loss: str | None = option(None, help="retaining loss (default: the --method's): "
                                                + ", ".join(RETAIN_LOSSES.names()))
    adaptive_lr: bool = option(False, flag="--adaptive-lr",
                               help="the adaptive rate also for a --method that runs at a fixed "
                                    "rate (the baselines); --no-adaptive-lr turns it off for "
                                    "NGDiff")
    combine_options: list[str] = option(default_factory=list, flag="--combine-option",
                                        action="append", metavar="KEY=VALUE",
                                        help="an option of the combine rule (repeatable), e.g. "
                                             "alpha=0.5 for gdiff")
    forget_loss_options: list[str] = option(default_factory=list, flag="--forget-loss-option",
                                            action="append", metavar="KEY=VALUE",
                                            help="an option of the forgetting loss (repeatable)")
    retain_loss_options: list[str] = option(default_factory=list, flag="--retain-loss-option",
                                            action="append", metavar="KEY=VALUE",
                                            help="an option of the retaining loss (repeatable)")
    plugins: list[str] = option(default_factory=list, flag="--plugin", action="append",
                                metavar="MODULE_OR_FILE",
                                help="import a module (or .py file) that registers losses or "
                                     "combine rules, before the names above are looked up")
    log_every: int = option(1, help="print a step line every this many steps")
    eval_every: int = option(0, help="evaluate before, every this many steps, and after "
                                     "(0: only before and after)")
    evaluate: bool = option(True, flag="--no-eval", help="skip all metrics (the "
                                                         "training-target NLL is still reported)")
    evaluate_before: bool = option(True, flag="--no-eval-before",
                                   help="skip the evaluation of the starting model (runs that "
                                        "share it, as benchmarks/compare_methods.py's, score "
                                        "it once)")
    select_best: str | None = option(None, metavar="RULE",
                                     help="mark the best evaluation point by RULE in the summary "
                                          "and save its model as model_best/: fq_mu (the mean "
                                          "of forget quality and model utility) or fq_keep_mu "
                                          "(the best forget quality keeping >= 95%% of the "
                                          "starting model's utility); needs the evaluation "
                                          "and a retain-only reference")
    max_consecutive_skips: int = 10  # abort instead of burning GPU hours on a NaN model

    def __post_init__(self) -> None:
        for name in ("max_steps", "log_every"):
            if getattr(self, name) < 1:
                invalid(self, name, "must be at least 1")
        if self.eval_every < 0:
            invalid(self, "eval_every", "must be >= 0")
        if self.lr is not None and not self.lr > 0:
            invalid(self, "lr", "must be positive")
        if self.select_best is not None:
            check_rule(self.select_best)
            if not self.evaluate:
                raise ConfigError("--select-best picks an evaluation point: it cannot be used "
                                  "with --no-eval")
            if self.select_best == "fq_keep_mu" and not self.evaluate_before:
                raise ConfigError("--select-best fq_keep_mu compares with the starting model's "
                                  "utility: it cannot be used with --no-eval-before")
        for plugin in self.plugins:
            load_plugin(plugin)
        self._apply_preset()
        self.method()  # unknown names and options fail now, not after the model is loaded

    def _apply_preset(self) -> None:
        """Fill the parts not given explicitly from ``--method``; the preset's options come
        first (an explicit option of the same name wins) and only for its own loss or rule."""
        if self.method_name not in PRESETS:
            invalid(self, "method_name", f"must be one of {', '.join(PRESETS)}")
        preset = PRESETS[self.method_name]
        self.forget_loss = self.forget_loss or preset.forget_loss
        self.retain_loss = self.retain_loss or preset.retain_loss
        self.combine = self.combine or preset.combine
        # idempotent: settings built again from these values (dataclasses.replace) must not
        # prepend the preset's options twice
        if self.combine == preset.combine:
            self.combine_options = _with_prefix(preset.combine_options, self.combine_options)
        if self.forget_loss == preset.forget_loss:
            self.forget_loss_options = _with_prefix(preset.forget_loss_options,
                                                    self.forget_loss_options)
        if self.retain_loss == "kl" and self.combine in ("ngdiff", "pcgrad"):
            raise ConfigError(f"--combine {self.combine} with --retain-loss kl: the rule divides "
                              "by the retain gradient, and the KL to the starting model has "
                              "none at the start (0 up to rounding), so the step would follow "
                              "rounding noise; use --method gdiff_kl (fixed weights) or the "
                              "nll retaining loss")

    def rate_settings(self, rate: AdaptiveLRConfig) -> AdaptiveLRConfig:
        """``rate`` on or off as the method says: on for a preset with the adaptive rate or
        with --adaptive-lr, unless --no-adaptive-lr (``rate.enabled`` False)."""
        if self.adaptive_lr and not rate.enabled:
            raise ConfigError("--adaptive-lr and --no-adaptive-lr contradict each other")
        enabled = rate.enabled and (PRESETS[self.method_name].adaptive_lr or self.adaptive_lr)
        return rate if enabled == rate.enabled else dataclasses.replace(rate, enabled=enabled)

    def method_summary(self) -> dict:
        """The method as run: the preset's name and each part with the options given."""
        return {"name": self.method_name, "forget_loss": self.forget_loss,
                "retain_loss": self.retain_loss, "combine": self.combine,
                "forget_loss_options": list(self.forget_loss_options),
                "retain_loss_options": list(self.retain_loss_options),
                "combine_options": list(self.combine_options)}

    def method(self) -> Method:
        """The forgetting loss, retaining loss and combine rule, each bound to its options."""
        bound = {}
        for key, registry, name, pairs, flag in (
                ("forget_loss", FORGET_LOSSES, self.forget_loss, self.forget_loss_options,
                 "--forget-loss-option"),
                ("retain_loss", RETAIN_LOSSES, self.retain_loss, self.retain_loss_options,
                 "--retain-loss-option"),
                ("combine_rule", COMBINE_RULES, self.combine, self.combine_options,
                 "--combine-option")):
            bound[key] = registry.bind(name, parse_option_strings(registry, name, pairs, flag))
        for key, registry, name in (("forget_needs", FORGET_LOSSES, self.forget_loss),
                                    ("retain_needs", RETAIN_LOSSES, self.retain_loss)):
            bound[key] = registry.entry(name).needs
            check_needs(name, bound[key])
        return Method(**bound)


def _with_prefix(prefix: tuple[str, ...], options: list[str]) -> list[str]:
    """``options`` starting with ``prefix`` (added unless it is there already)."""
    prefix = list(prefix)
    return list(options) if options[:len(prefix)] == prefix else prefix + list(options)
