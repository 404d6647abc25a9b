"""Everything about a job that can be checked before Ray starts or a file is written.

    stillhouse plan SPEC [--data-dir D] [--trust-module PKG]   # prints the plan, or exit 2

A spec that passes validation can still not fit its data or its models: a model that does not
run on the data's images, a layer pattern that matches nothing, a batch larger than a worker's
share of the data, a sparsity that leaves no weight. `preflight` loads the data (an in-memory set)
or lists it (a streamed one), builds the models on it, loads the teacher file, and plans the
phases, the steps and the DeepSpeed config, so that each of these is an `InputError` (exit 2,
naming its YAML path) before anything starts, instead of a traceback minutes later. It is what
`stillhouse run` does first, and what the generated-spec test runs on specs that parse.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from specs import JobSpec
from specs.errors import InputError
from specs.job import CheckpointTeacher, ExportedTeacher, ImageFolderData, ParquetData


class PlanError(InputError):
    """The spec parses, but cannot give a useful result on this data and these models."""


@dataclass
class Preflight:
    """What the checks found, handed on to the job so nothing is loaded twice."""

    data: object | None  # an in-memory Dataset, or None for a streamed source (see `listing`)
    listing: object | None  # a streamed source's Listing (trainers/image_sources.py)
    image_shape: tuple[int, int, int]
    num_classes: int
    train_rows: int
    teacher_blob: bytes | None = None  # the bytes of a teacher file the spec names
    teacher_model: object | None = None
    phases: list = field(default_factory=list)
    engines: list = field(default_factory=list)  # DeepSpeed configs: student (and teacher)
    warnings: list[str] = field(default_factory=list)
    rows_are: str = "images"  # what a training row is: "images", or "sequences" of tokens

    def describe(self) -> list[str]:
        if self.rows_are == "sequences":
            lines = [f"data: {self.train_rows:,} training sequences of {self.image_shape[0]} "
                     f"tokens, a vocabulary of {self.num_classes:,}"]
        else:
            lines = [f"data: {self.train_rows:,} training images of shape {self.image_shape}, "
                     f"{self.num_classes} classes"]
        for p in self.phases:
            target = f", target sparsity {p.target_sparsity:.4f}" if p.kind == "prune" else ""
            lines.append(f"phase {p.name}: {p.epochs} epochs{target}")
        lines += [f"warning: {w}" for w in self.warnings]
        return lines


def preflight(spec: JobSpec, data_dir: str | None, trusted: frozenset[str]) -> Preflight:
    """Check the job against its data and models; raises an InputError naming what is wrong."""
    import torch

    from trainers.models import build_model, check_model

    if spec.language_model:  # text data and Hugging Face models
        return _language_model(spec, data_dir)
    for path, model_spec in spec.model_specs():  # untrusted code: refused before any import
        if model_spec.kind == "python":
            from trainers.models import check_trusted

            check_trusted(model_spec, trusted, path)
    plan = _data(spec, data_dir)
    shape, classes = plan.image_shape, plan.num_classes
    _batch_fits(spec, plan)

    student = None
    for path, model_spec in spec.model_specs():
        torch.manual_seed(spec.seed)
        model = build_model(model_spec, shape, classes, trusted, where=path)
        check_model(model, shape, classes, path)
        if path == "student.model":
            student = model
    _layers_fit(spec, student, shape, classes)
    if spec.distillation.features:  # module names exist, shapes can match
        from trainers.features import check_feature_spec

        check_feature_spec(spec, shape, classes, trusted)
    if isinstance(spec.teacher, (CheckpointTeacher, ExportedTeacher)):
        plan.teacher_blob, plan.teacher_model = _teacher_file(spec, shape, classes, trusted)

    from trainers.plan import student_phases

    plan.phases = student_phases(spec)
    _engines_and_export(spec, plan, student, trusted)
    return plan


def _engines_and_export(spec: JobSpec, plan: Preflight, student, trusted: frozenset[str]) -> None:
    """The DeepSpeed configs of both stages and the export's plan: the compact file's
    architecture must rebuild the student, and its layers must have codec kinds."""
    from trainers.engine_config import deepspeed_config
    from trainers.models import architecture, build_from_architecture
    from trainers.quantize import layer_kinds

    world = spec.resources.student_workers
    sections = [spec.student] + ([spec.teacher] if spec.teacher.kind == "train" else [])
    plan.engines = [deepspeed_config(spec, micro_batch=s.batch_size, world_size=world, lr=s.lr,
                                     weight_decay=s.weight_decay, grad_clip=s.grad_clip)
                    for s in sections]
    arch = architecture(spec.student.model, plan.image_shape, plan.num_classes)
    build_from_architecture(arch, trusted)
    kinds = layer_kinds(student, spec.quantization.method, spec.quantization.bits)
    if spec.quantization.method != "none" and not kinds:
        raise PlanError(f"`quantization.method` {spec.quantization.method}: the student has no "
                        "Linear or Conv layer to quantize")


def _language_model(spec: JobSpec, data_dir: str | None) -> Preflight:
    """A language-model job: the text tokenized, the tokenizers compared, the models built
    offline and run on a block (trainers/lm_job.py), then the batch and the pruning target."""
    from trainers.lm_job import plan_language_model
    from trainers.lm_pruning import prunable_projections
    from trainers.plan import student_phases

    lm = plan_language_model(spec, data_dir)
    plan = Preflight(lm.data, None, (lm.data.seq_len,), lm.vocab_size, lm.data.train_rows,
                     teacher_model=lm.teacher, warnings=lm.warnings, rows_are="sequences")
    _batch_fits(spec, plan)
    if spec.pruning.enabled and spec.pruning.granularity == "channel":
        _structure_shrinks(spec.pruning, lm.student)
    elif spec.pruning.enabled:
        try:
            params = prunable_projections(lm.student, spec.pruning)
        except ValueError as err:
            raise PlanError(f"`pruning.layers`: {err}") from None
        _target_leaves_weights(spec.pruning, params)
    plan.phases = student_phases(spec)
    return plan


def _structure_shrinks(pruning, student) -> None:
    """Structured pruning of a language model: the last round's plan on the fresh student cuts
    out into a config transformers accepts (GPT-2's heads, for one, cannot be cut out)."""
    from trainers.hf_models import HFModelError
    from trainers.lm_pruning import plan_structured, shrunk_config

    try:
        shrunk_config(student, plan_structured(student, mlp_sparsity=pruning.target_sparsity,
                                               head_sparsity=pruning.heads, norm=pruning.norm))
    except HFModelError as err:
        raise PlanError(f"`pruning.heads` {pruning.heads}: {err}") from None


def _data(spec: JobSpec, data_dir: str | None) -> Preflight:
    if isinstance(spec.data, (ParquetData, ImageFolderData)):
        from trainers.image_sources import list_source

        listing = list_source(spec.data, data_dir)
        return Preflight(None, listing, (listing.channels, *listing.size), len(listing.classes),
                         listing.train_rows)
    from trainers.data import load_dataset

    data = load_dataset(spec.data, data_dir, spec.seed)
    return Preflight(data, None, data.image_shape, data.num_classes, data.train_rows)


def _batch_fits(spec: JobSpec, plan: Preflight) -> None:
    """A batch larger than a worker's share of the training set trains nothing (in-memory sets
    drop the partial batch) or one step per epoch: refused, with the numbers."""
    workers = spec.resources.student_workers
    share = plan.train_rows // workers
    sections = [("student", spec.student.batch_size)]
    if spec.teacher.kind == "train":
        sections.append(("teacher", spec.teacher.batch_size))
    for section, batch in sections:
        if batch > share:
            raise PlanError(
                f"`{section}.batch_size` {batch} is larger than each worker's share of the "
                f"training set ({plan.train_rows:,} {plan.rows_are} / {workers} workers = "
                f"{share:,}): "
                f"no full batch per epoch; use at most {max(1, share // 8):,} for several steps "
                "per epoch"
            )
        if share // batch < 4:
            plan.warnings.append(
                f"`{section}.batch_size` {batch}: only {share // batch} steps per epoch per "
                f"worker ({share:,} {plan.rows_are} each)")


def _layers_fit(spec: JobSpec, student, shape, classes: int) -> None:
    """The pruning layer selection matches the student's layers, and the target sparsity leaves
    at least one weight per layer."""
    pruning = spec.pruning
    if not pruning.enabled:
        return
    import torch

    from trainers.pruning import prunable_parameters

    try:
        if pruning.granularity == "channel":
            from trainers.structured import channel_groups

            selection = pruning.selection
            channel_groups(student, torch.zeros(2, *shape), classes,
                           include=list(selection.include), exclude=list(selection.exclude))
            return
        params = prunable_parameters(student, pruning)
    except ValueError as err:
        raise PlanError(f"`pruning.layers`: {err}") from None
    _target_leaves_weights(pruning, params)


def _target_leaves_weights(pruning, params: dict) -> None:
    """The target sparsity leaves at least one weight per layer (global magnitude pruning)."""
    total = sum(p.numel() for p in params.values())
    pruned = int(round(pruning.target_sparsity * total))
    layers = len(params)
    if total - pruned < layers:
        raise PlanError(
            f"`pruning.target_sparsity` {pruning.target_sparsity} prunes {pruned:,} of the "
            f"{total:,} prunable weights, leaving {total - pruned} for {layers} layers: at least "
            "one layer would be emptied and the model would predict a constant. The largest "
            f"target that leaves one weight per layer is {math.floor((1 - layers / total) * 1e6) / 1e6}"
        )


def _teacher_file(spec: JobSpec, shape, classes: int, trusted: frozenset[str]):
    """The teacher file's bytes and model; a bad file or a model that does not answer
    (B, num_classes) logits for the data's images is a TeacherLoadError."""
    from trainers.teacher_server import TeacherLoadError, load_teacher

    path = Path(spec.teacher.path)
    if not path.is_file():
        raise TeacherLoadError(f"`teacher.path`: no such file {str(path)!r}")
    blob = path.read_bytes()
    model = load_teacher(spec.teacher, blob, shape, classes, trusted)
    if isinstance(spec.teacher, ExportedTeacher):
        import torch

        from trainers.teacher_server import inference_mode_

        inference_mode_(model)
        try:
            with torch.no_grad():
                out = model(torch.zeros(2, *shape))
        except Exception as err:
            raise TeacherLoadError(
                f"`teacher.path`: the {spec.teacher.format} program does not run on a batch of "
                f"2 images of shape {tuple(shape)} (what the data section makes): "
                f"{type(err).__name__}: {str(err).splitlines()[0][:300]}") from None
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, classes):
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise TeacherLoadError(f"`teacher.path`: the program answers {got} for 2 images, "
                                   f"not (2, {classes}) logits")
    return blob, model
