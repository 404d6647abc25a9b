"""Load a job spec from YAML and report every problem at once, each with its YAML path."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from specs.errors import InputError
from specs.job import JobSpec


@dataclass(frozen=True)
class SpecProblem:
    path: str  # dotted YAML path, e.g. "pruning.target_sparsity" or "student.model.hidden[1]"
    message: str
    value: Any = None

    def __str__(self) -> str:
        given = "" if self.value is None else f" (given: {self.value!r})"
        return f"{self.path or '<spec>'}: {self.message}{given}"


class SpecError(InputError):
    """A spec that cannot be used; `problems` lists every error found."""

    def __init__(self, source: str, problems: list[SpecProblem]):
        self.source = source
        self.problems = problems
        lines = [f"{source}: {len(problems)} problem(s) in the job spec"]
        lines += [f"  - {p}" for p in problems]
        super().__init__("\n".join(lines))


def _yaml_path(loc: tuple, raw: Any) -> tuple[str, Any]:
    """Turn a pydantic error location into a YAML path and the value the user wrote there.

    pydantic puts the discriminator's value (e.g. `mnist`) into the location of errors inside a
    tagged union; the user never wrote such a key, so it is dropped by walking the raw YAML.
    """
    parts: list[str] = []
    node = raw
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
            node = node[item] if isinstance(node, list) and 0 <= item < len(node) else None
            continue
        if isinstance(node, dict) and item not in node and node.get("kind") == item:
            continue  # the union's tag, not a key
        if not isinstance(node, dict) and node is not None:
            continue  # a union member's name (e.g. `literal['all']`): the user wrote a scalar
        if item.startswith("function-"):  # pydantic-internal location parts
            continue
        parts.append(("." if parts else "") + str(item))
        node = node.get(item) if isinstance(node, dict) else None
    return "".join(parts), node


def problems_from_validation(err: ValidationError, raw: Any) -> list[SpecProblem]:
    problems = []
    for e in err.errors(include_url=False):
        path, value = _yaml_path(tuple(e["loc"]), raw)
        message = e["msg"]
        if e["type"] == "extra_forbidden":
            message = "unknown key (misspelled?)"
        if message.startswith("Value error, "):
            message = message[len("Value error, ") :]
        if isinstance(value, (dict, list)):
            value = None  # a whole section; its path says enough
        problems.append(SpecProblem(path, message, value))
    return problems


def parse_spec(raw: Any, source: str = "<spec>", overrides: dict | None = None) -> JobSpec:
    """Validate an already-parsed YAML document; `overrides` are top-level keys set on top."""
    if not isinstance(raw, dict):
        raise SpecError(source, [SpecProblem("", "the spec must be a YAML mapping")])
    if overrides:
        raw = {**raw, **{k: v for k, v in overrides.items() if v is not None}}
    try:
        return JobSpec.model_validate(raw)
    except ValidationError as err:
        raise SpecError(source, problems_from_validation(err, raw)) from None


def load_spec(path: str | Path, overrides: dict | None = None) -> JobSpec:
    """Read and validate a spec file; raises `SpecError` listing every problem."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise SpecError(str(path), [SpecProblem("", f"cannot read the file: {err.strerror}")])
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise SpecError(str(path), [SpecProblem("", f"not valid YAML: {where}{problem}")])
    return parse_spec(raw, str(path), overrides)


def spec_hash(spec: JobSpec) -> str:
    """Stable hash of everything that determines a job's results (run_dir excluded)."""
    body = spec.model_dump(mode="json", exclude={"run_dir"})
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]
