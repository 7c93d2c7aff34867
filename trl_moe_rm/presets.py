"""
Named presets of [`MoERewardConfig`]: measured settings for a regime of data, selected by name.

`MoERewardConfig()` defaults to the recipe measured best or near-best on visible-context data (the prompt reveals how
a pair is judged; see the defaults table in `docs/benchmarks.md`). A preset replaces some of those defaults for
another regime:

- `"hidden_context"`: the prompt does not reveal what a pair is judged on (DSP, simulated users with mixed
  directions): 32 experts, the EM-style `loss_type="assignment"`, the experts initialised half at the signed principal
  directions of the pairs' standardised feature differences and half at response clusters
  (`expert_init="pca_clusters"`), and no router balance, sparsity or diversity term. Adapt each user afterwards with
  `fit_users(model, pairs, method="hyre_gradient", l2=1.0, prior="uniform")` (the fit this preset was measured with).

Select one from Python (`MoERewardConfig(output_dir=..., preset="hidden_context")`), from a `trl-moe-rm train --config`
YAML file (`preset: hidden_context`) or from the command line (`trl-moe-rm train --preset hidden_context ...`). A
preset sets only the fields still at their default: a field given another value keeps it. `trl-moe-rm diagnose` tells
which regime a dataset is in. See `docs/presets.md`.
"""

from __future__ import annotations

import dataclasses
from typing import Any


__all__ = ["PRESETS", "apply_preset", "preset_values"]

PRESETS: dict[str, dict[str, Any]] = {
    "hidden_context": {
        "num_experts": 32,
        "top_k": 2,
        "loss_type": "assignment",
        "expert_init": "pca_clusters",
        "assignment_temperature": 0.5,
        "assignment_balance_coef": 0.1,
        "router_assignment_coef": 1.0,
        "balance_coef": 0.0,
        "sparsity_coef": 0.0,
        "diversity_coef": 0.0,
    },
}
"""The presets, by name: the [`MoERewardConfig`] fields each one sets."""


def preset_values(name: str) -> dict[str, Any]:
    r"""
    The fields a preset sets.

    Args:
        name (`str`):
            A key of [`PRESETS`].

    Returns:
        `dict[str, Any]`: A copy of the preset's field values.

    Raises:
        `ValueError`: `name` is not a preset.
    """
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}; the presets are {sorted(PRESETS)} (see docs/presets.md).")
    return dict(PRESETS[name])


def apply_preset(config: Any, name: str) -> None:
    r"""
    Set the fields of a preset on a configuration, where the configuration still holds the field's default.

    A field whose value differs from its default was set by the user, who keeps it. (A field set explicitly *to* its
    default cannot be told apart from one left unset, and takes the preset's value.)

    Args:
        config ([`MoERewardConfig`]):
            The configuration, modified in place.
        name (`str`):
            A key of [`PRESETS`].
    """
    defaults = {field.name: field.default for field in dataclasses.fields(config)}
    for field_name, value in preset_values(name).items():
        if getattr(config, field_name) == defaults[field_name]:
            setattr(config, field_name, value)
