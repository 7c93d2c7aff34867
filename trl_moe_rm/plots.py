# Copyright 2025 The trl_moe_rm authors. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""
Figures for the analysis of Mixture-of-Experts reward models.

Every function writes one PNG file (creating its parent directories) and returns its path. Matplotlib is imported
lazily inside the functions, so importing `trl_moe_rm` never requires it nor touches its backend. Figures are drawn on
`matplotlib.figure.Figure` objects rendered by the Agg canvas and never registered with `pyplot`: nothing is displayed,
no window or GUI backend is needed, and an interactive session's (e.g. Jupyter's) backend is left unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from transformers.utils import add_end_docstrings


__all__ = [
    "plot_expert_attribute_heatmap",
    "plot_routing_entropy",
    "plot_routing_heatmap",
    "plot_weight_shift",
    "plot_weight_shift_heatmap",
]

_ENTROPY_KEY = "moe/routing_entropy"


def _figure(width: float, height: float) -> Any:
    """A pyplot-free figure with an Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Any, path: str | os.PathLike) -> str:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, format="png")
    return str(path)


def _check_names(names: Sequence[Any] | None, size: int, what: str, default_prefix: str) -> list[str]:
    if names is None:
        return [f"{default_prefix}{index}" for index in range(size)]
    names = [str(name) for name in names]
    if len(names) != size:
        raise ValueError(f"Got {len(names)} {what} for {size} rows/columns.")
    return names


def _heatmap(
    values: Any,
    row_names: Sequence[Any] | None,
    column_names: Sequence[Any] | None,
    path: str | os.PathLike,
    title: str,
    labels: tuple[str, str, str],
    diverging: bool,
    limit: float | None = None,
) -> str:
    """
    Annotated heatmap of a `(rows, columns)` matrix. `labels` are the x (column), y (row) and colorbar labels; the x
    and y labels also name the default tick labels (`expert 0`, `expert 1`, ...) when `row_names` or `column_names`
    is `None`.
    """
    xlabel, ylabel, colorbar_label = labels
    matrix = np.asarray(values, dtype=np.float64)
    if matrix.ndim != 2 or matrix.size == 0:
        raise ValueError(f"The {ylabel} x {xlabel} matrix must be a non-empty 2-D array, got shape {matrix.shape}.")
    rows, columns = matrix.shape
    row_names = _check_names(row_names, rows, f"{ylabel} names", f"{ylabel} ")
    column_names = _check_names(column_names, columns, f"{xlabel} names", f"{xlabel} ")
    figure = _figure(max(4.0, 0.8 * columns + 2.5), max(3.0, 0.45 * rows + 1.8))
    axes = figure.add_subplot()
    if diverging:
        limit = limit or float(np.nanmax(np.abs(matrix))) or 1.0
        image = axes.imshow(matrix, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    else:
        image = axes.imshow(matrix, cmap="viridis", aspect="auto")
    figure.colorbar(image, ax=axes, label=colorbar_label)
    axes.set_xticks(
        range(columns), column_names, rotation=45 if columns > 6 else 0, ha="right" if columns > 6 else "center"
    )
    axes.set_yticks(range(rows), row_names)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    if rows * columns <= 400:
        low, high = image.get_clim()
        for row in range(rows):
            for column in range(columns):
                value = matrix[row, column]
                relative = (value - low) / (high - low) if high > low else 0.5
                dark = relative > 0.8 or relative < 0.2 if diverging else relative < 0.5
                axes.text(
                    column,
                    row,
                    f"{value:.2f}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if dark else "black",
                )
    return _save(figure, path)


# The arguments the expert heatmaps share, appended to their docstrings (which end inside their `Args:` section).
_EXPERT_HEATMAP_DOCSTRING = r"""    path (`str` or `os.PathLike`):
            Destination PNG file.
        expert_names (`Sequence[str]`, *optional*):
            The `K` expert labels. Defaults to `expert 0`, `expert 1`, ...
        title (`str`, *optional*):
            Figure title; the default is in the signature.

    Returns:
        `str`: The path written.
"""


@add_end_docstrings(_EXPERT_HEATMAP_DOCSTRING)
def plot_routing_heatmap(
    matrix: Any,
    category_names: Sequence[Any],
    path: str | os.PathLike,
    expert_names: Sequence[str] | None = None,
    title: str = "Mean routing weight per category",
) -> str:
    r"""
    Heatmap of the category x expert mean routing weights.

    Args:
        matrix (`array-like` of shape `(C, K)`):
            Output of [`~trl_moe_rm.routing.routing_matrix`].
        category_names (`Sequence`):
            The `C` category names (row labels).
    """
    labels = ("expert", "category", "routing weight")
    return _heatmap(matrix, category_names, expert_names, path, title, labels, diverging=False)


@add_end_docstrings(_EXPERT_HEATMAP_DOCSTRING)
def plot_expert_attribute_heatmap(
    corr: Any,
    attribute_names: Sequence[str],
    path: str | os.PathLike,
    expert_names: Sequence[str] | None = None,
    title: str = "Expert x attribute Spearman correlation",
) -> str:
    r"""
    Diverging heatmap of the expert x attribute correlations, on a fixed `[-1, 1]` color scale.

    Args:
        corr (`array-like` of shape `(K, A)`):
            Output of [`~trl_moe_rm.specialization.expert_attribute_correlation`].
        attribute_names (`Sequence[str]`):
            The `A` attribute names (column labels).
    """
    labels = ("attribute", "expert", "Spearman rho")
    return _heatmap(corr, expert_names, attribute_names, path, title, labels, diverging=True, limit=1.0)


def plot_routing_entropy(log_history: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> str:
    r"""
    Routing entropy over training, from a TRL trainer's `trainer.state.log_history`.

    Training entries carry the key `moe/routing_entropy` and evaluation entries `eval_moe/routing_entropy`; both are
    plotted against their `step` (the entry's position when it has none).

    Args:
        log_history (`Sequence[Mapping[str, Any]]`):
            The trainer's `state.log_history`.
        path (`str` or `os.PathLike`):
            Destination PNG file.

    Returns:
        `str`: The path written.
    """
    series = {}
    for key, label in ((_ENTROPY_KEY, "train"), (f"eval_{_ENTROPY_KEY}", "eval")):
        points = [
            (entry.get("step", position), float(entry[key]))
            for position, entry in enumerate(log_history)
            if key in entry and entry[key] is not None
        ]
        if points:
            series[label] = points
    if not series:
        raise ValueError(
            f"No `{_ENTROPY_KEY}` entry in the log history; it is logged by MoERewardTrainer (check `logging_steps`)."
        )
    figure = _figure(6.0, 3.5)
    axes = figure.add_subplot()
    for label, points in series.items():
        steps, values = zip(*points)
        axes.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3, label=label)
    axes.set_xlabel("step")
    axes.set_ylabel("routing entropy (nats)")
    axes.set_title("Router entropy")
    axes.grid(alpha=0.3)
    axes.legend()
    return _save(figure, path)


def plot_weight_shift(
    shift: Any, expert_names: Sequence[str] | None, path: str | os.PathLike, title: str = "Expert weight shift"
) -> str:
    r"""
    Bar chart of a per-expert weight shift (e.g. a user's fitted mixture weights minus the router's average weights).

    Args:
        shift (`array-like` of shape `(K,)`):
            Shift of each expert's weight; positive bars are blue, negative bars red.
        expert_names (`Sequence[str]`, *optional*):
            The `K` bar labels. `None` uses `expert 0`, `expert 1`, ...
        path (`str` or `os.PathLike`):
            Destination PNG file.
        title (`str`, *optional*, defaults to `"Expert weight shift"`):
            Figure title.

    Returns:
        `str`: The path written.
    """
    shift = np.asarray(shift, dtype=np.float64)
    if shift.ndim != 1 or shift.size == 0:
        raise ValueError(f"`shift` must be a non-empty 1-D array, got shape {shift.shape}.")
    names = _check_names(expert_names, shift.size, "expert names", "expert ")
    figure = _figure(max(4.0, 0.6 * shift.size + 2.0), 3.5)
    axes = figure.add_subplot()
    axes.bar(range(shift.size), shift, color=["tab:blue" if value >= 0 else "tab:red" for value in shift])
    axes.axhline(0.0, color="black", linewidth=0.8)
    axes.set_xticks(range(shift.size), names, rotation=45 if shift.size > 6 else 0)
    axes.set_ylabel("weight shift")
    axes.set_title(title)
    return _save(figure, path)


def plot_weight_shift_heatmap(
    shifts: Any,
    user_ids: Sequence[Any],
    expert_names: Sequence[str] | None,
    path: str | os.PathLike,
    title: str = "Expert weight shift per user",
) -> str:
    r"""
    Diverging heatmap of per-user, per-expert weight shifts.

    Args:
        shifts (`array-like` of shape `(U, K)`):
            Shift of each expert's weight for each user.
        user_ids (`Sequence`):
            The `U` user ids (row labels).
        expert_names (`Sequence[str]`, *optional*):
            The `K` column labels. `None` uses `expert 0`, `expert 1`, ...
        path (`str` or `os.PathLike`):
            Destination PNG file.
        title (`str`, *optional*, defaults to `"Expert weight shift per user"`):
            Figure title.

    Returns:
        `str`: The path written.
    """
    return _heatmap(shifts, user_ids, expert_names, path, title, ("expert", "user", "weight shift"), diverging=True)
