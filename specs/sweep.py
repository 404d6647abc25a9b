"""Expand a spec's `sweep.grid` into one validated spec per point."""

from __future__ import annotations

import copy
import itertools
from typing import Any

from specs.job import JobSpec
from specs.load import SpecError, SpecProblem, parse_spec


def _set_path(body: dict, path: str, value: Any) -> None:
    node = body
    *parents, leaf = path.split(".")
    for key in parents:
        if not isinstance(node, dict) or not isinstance(node.get(key), dict):
            raise KeyError(path)
        node = node[key]
    if not isinstance(node, dict) or leaf not in node:
        raise KeyError(path)
    node[leaf] = value


def expand_sweep(spec: JobSpec, source: str = "<spec>") -> list[tuple[dict, JobSpec]]:
    """[(point, spec)] for every combination of the grid; all problems reported at once.

    Each point's spec has no `sweep`, a name `<name>-NN`, and the sweep's W&B group (the spec's
    group, or its name), so all of a sweep's runs sit together in W&B.
    """
    if spec.sweep is None:
        return [({}, spec)]
    base = spec.model_dump(mode="json")
    base.pop("sweep")
    base["wandb"]["group"] = spec.wandb.group or spec.name
    keys = list(spec.sweep.grid)
    problems: list[SpecProblem] = []
    points = []
    for i, values in enumerate(itertools.product(*(spec.sweep.grid[k] for k in keys))):
        point = dict(zip(keys, values))
        body = copy.deepcopy(base)
        body["name"] = f"{spec.name}-{i:02d}"
        for key, value in point.items():
            try:
                _set_path(body, key, value)
            except KeyError:
                problems.append(SpecProblem(f"sweep.grid.{key}", "is not a field of this spec"))
        try:
            points.append((point, parse_spec(body, source)))
        except SpecError as err:
            problems += [SpecProblem(f"sweep point {point}: {p.path}", p.message, p.value)
                         for p in err.problems]
    if problems:
        unique = list(dict.fromkeys(problems))
        raise SpecError(source, unique)
    return points
