"""Hypothesis strategies for job specs, derived from the spec's own pydantic models.

Every field's strategy comes from its annotation and constraints (Literal, bool, int and float
bounds, string patterns and lengths, lists, dicts, tuples, nested models, discriminated
unions), so a new field or constraint is generated without editing this file. A few fields get
narrower strategies where the whole range would only make the test slow without making it more
searching (see OVERRIDES: model widths, image sizes), and where random text would never name a
real thing (registry model names).
"""

from __future__ import annotations

import types
import typing
from typing import Any, Literal, Union

from hypothesis import strategies as st
from pydantic import BaseModel
from pydantic.fields import FieldInfo

BIG = 10**6  # the largest number an unbounded integer field gets (a spec may say more; it is
# refused or planned the same way)

# (model class name, field) -> strategy: where the full range says nothing new but costs time
OVERRIDES: dict[tuple[str, str], st.SearchStrategy] = {
    ("MLPModel", "hidden"): st.lists(st.integers(1, 300), min_size=1, max_size=4),
    ("TimmModel", "name"): st.sampled_from(["resnet10t", "resnet18", "mobilenetv3_small_050",
                                            "efficientnet_b0", "vit_tiny_patch16_224",
                                            "no_such_model"]),
    ("TorchvisionModel", "name"): st.sampled_from(["resnet18", "mobilenet_v3_small",
                                                   "squeezenet1_1", "shufflenet_v2_x0_5",
                                                   "no_such_model"]),
    ("PythonModel", "factory"): st.sampled_from(["usermodels.nets:make_student",
                                                 "usermodels.nets:not_a_model",
                                                 "somebody.elses:model"]),
    ("_RegistryModel", "kwargs"): st.just({}),
}
IMAGE_SIDE = st.integers(1, 40)  # image_size: resizing 1797 digits to 4096x4096 says nothing new


def _bounds(metadata: list) -> dict:
    out: dict[str, Any] = {}
    for m in metadata:
        for name in ("ge", "gt", "le", "lt", "min_length", "max_length", "pattern"):
            value = getattr(m, name, None)
            if value is not None:
                out[name] = value
        if isinstance(m, FieldInfo):
            out.update(_bounds(m.metadata))
    return out


def _number(kind: type, b: dict) -> st.SearchStrategy:
    if kind is int:
        lo = b["ge"] if "ge" in b else (b["gt"] + 1 if "gt" in b else -BIG)
        hi = b["le"] if "le" in b else (b["lt"] - 1 if "lt" in b else BIG)
        edges = [v for v in (lo, hi, lo + 1, 0, 1) if lo <= v <= hi]
        return st.one_of(st.sampled_from(edges), st.integers(lo, min(hi, lo + 2 * BIG)))
    lo = b.get("ge", b.get("gt", -1e6))
    hi = b.get("le", b.get("lt", 1e6))
    floats = st.floats(lo, hi, exclude_min="gt" in b, exclude_max="lt" in b, allow_nan=False,
                       allow_infinity=False)
    edges = [v for v in (lo, hi) if ("gt" not in b or v != lo) and ("lt" not in b or v != hi)]
    return st.one_of(floats, st.sampled_from(edges)) if edges else floats


def _string(b: dict) -> st.SearchStrategy:
    if "pattern" in b:  # Python's `$` also matches before a final newline; pydantic's does not
        text = st.from_regex(b["pattern"], fullmatch=True).filter(lambda s: not s.endswith("\n"))
    else:
        text = st.text(min_size=b.get("min_length", 0), max_size=b.get("max_length", 12))
    return text.filter(lambda s: b.get("min_length", 0) <= len(s) <= b.get("max_length", 10**9))


def for_annotation(annotation, metadata: list, owner: str = "", field: str = "") -> st.SearchStrategy:
    """A strategy for values of `annotation` (with the constraints in `metadata`)."""
    if owner == "ImagePreprocessing" and field == "image_size" or field == "image_size":
        return st.one_of(st.none(), st.tuples(IMAGE_SIDE, IMAGE_SIDE))
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    b = _bounds(metadata)
    if origin is typing.Annotated:
        return for_annotation(args[0], [*args[1:], *metadata], owner, field)
    if origin is Literal:
        return st.sampled_from(args)
    if origin in (Union, types.UnionType):  # a field's constraints hold for each member
        return st.one_of([for_annotation(a, metadata, owner, field) for a in args])
    if annotation is type(None):
        return st.none()
    if annotation is bool:
        return st.booleans()
    if annotation in (int, float):
        return _number(annotation, b)
    if annotation is str:
        return _string(b)
    if annotation is Any:
        return st.one_of(st.none(), st.integers(-3, 3), st.text(max_size=4))
    if origin is list:
        item = for_annotation(args[0], [], owner, field)
        return st.lists(item, min_size=b.get("min_length", 0), max_size=min(b.get("max_length", 4), 4))
    if origin is dict:
        return st.dictionaries(st.text(min_size=1, max_size=8), for_annotation(args[1], []),
                               min_size=b.get("min_length", 0), max_size=2)
    if origin is tuple:
        return st.tuples(*(for_annotation(a, [], owner, field) for a in args))
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return model_strategy(annotation)
    raise TypeError(f"no strategy for {annotation!r} ({owner}.{field})")


def _override(model: type[BaseModel], name: str):
    for klass in model.__mro__:
        if (klass.__name__, name) in OVERRIDES:
            return OVERRIDES[(klass.__name__, name)]
    return None


@st.composite
def _model_dict(draw, model: type[BaseModel]) -> dict:
    """A dict for `model`: every required field, and each optional one with probability 1/2."""
    out = {}
    for name, info in model.model_fields.items():
        if not info.is_required() and not draw(st.booleans()):
            continue
        strategy = _override(model, name)
        if strategy is None:
            strategy = for_annotation(info.annotation, info.metadata, model.__name__, name)
        value = draw(strategy)
        out[name] = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
    return out


def model_strategy(model: type[BaseModel]) -> st.SearchStrategy:
    return _model_dict(model)


def valid_specs(max_attempts_note: str = "") -> st.SearchStrategy:
    """Dicts that `JobSpec.model_validate` accepts (cross-field checks included)."""
    from pydantic import ValidationError

    from specs.job import JobSpec

    def valid(body: dict) -> bool:
        try:
            JobSpec.model_validate(body)
        except ValidationError:
            return False
        return True

    # sweeps expand into other specs; a point of one is generated here directly
    return model_strategy(JobSpec).map(lambda d: {k: v for k, v in d.items() if k != "sweep"}) \
        .filter(valid)
