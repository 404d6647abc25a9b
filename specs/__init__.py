"""Job specs: pydantic models loaded from YAML. Imports pydantic and yaml only."""

from specs.job import JobSpec
from specs.load import SpecError, SpecProblem, load_spec, parse_spec, spec_hash

__all__ = ["JobSpec", "SpecError", "SpecProblem", "load_spec", "parse_spec", "spec_hash"]
