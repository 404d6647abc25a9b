"""The job spec: one YAML file describes a whole compression job.

Every default lives here, on the models. The typed spec is the only configuration: the driver,
the teacher replicas and the student workers all receive it (as JSON) and read fields from it.

This module imports pydantic only, so `stillhouse validate` is instant.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union

from pydantic import Discriminator, Field, PositiveInt, Tag, model_validator

from specs.base import Strict
from specs.lm import (
    ForwardKL,
    GeneralizedJSD,
    HFModel,
    ReverseKL,
    TextData,
    TokenCacheSpec,
    validate_topk_loss,
)


# --------------------------------------------------------------------------------------- data


class Normalization(Strict):
    """Per-channel mean and standard deviation of pixel values in [0, 1]."""

    mean: list[Annotated[float, Field(ge=-1e3, le=1e3)]] = Field(min_length=1, max_length=3)
    # pixel values are in [0, 1]: a std below 1e-6 is no image's, and below float32's range
    # it would divide by zero
    std: list[Annotated[float, Field(ge=1e-6, le=1e3)]] = Field(min_length=1, max_length=3)

    @model_validator(mode="after")
    def _same_length(self) -> "Normalization":
        if len(self.mean) != len(self.std):
            raise ValueError(f"`mean` has {len(self.mean)} values but `std` has {len(self.std)}")
        return self


class Augmentation(Strict):
    """Training-time augmentation, applied to each training batch before both the teacher and
    the student see it (never to the test set). Off by default."""

    random_crop_padding: int = Field(
        0, ge=0, le=32, description="pad by this many pixels, then crop back at a random "
        "offset: random shifts of up to this many pixels"
    )
    hflip: bool = Field(False, description="mirror half the images left to right")

    @property
    def enabled(self) -> bool:
        return self.random_crop_padding > 0 or self.hflip


class ImagePreprocessing(Strict):
    """What every image source does to its images, in this order: resize to `image_size`,
    convert to `channels`, scale pixels to [0, 1], normalize. The teacher receives exactly the
    tensor the student receives (after augmentation during training)."""

    image_size: tuple[Annotated[int, Field(ge=1, le=4096)], Annotated[int, Field(ge=1, le=4096)]] | None = Field(
        None, description="[height, width] to resize every image to (bilinear, antialiased); "
        "required when the images differ in size"
    )
    channels: Literal[1, 3] | None = Field(
        None, description="1 (grey) or 3 (RGB); default: as the images are"
    )
    normalize: Literal["auto", "none"] | Normalization = Field(
        "auto", description="`auto`: mean and std per channel computed once on the training "
        "set (recorded in the report); `none`: pixels in [0, 1], e.g. for a teacher exported with "
        "its own normalization folded in; or `{mean: [...], std: [...]}`"
    )
    augment: Augmentation = Field(default_factory=Augmentation)

    @model_validator(mode="after")
    def _normalization_fits_channels(self) -> "ImagePreprocessing":
        if isinstance(self.normalize, Normalization) and self.channels is not None:
            if len(self.normalize.mean) not in (1, self.channels):
                raise ValueError(
                    f"`normalize` gives {len(self.normalize.mean)} values for `channels` "
                    f"{self.channels}: give one per channel (or one for all)"
                )
        return self


class DigitsData(ImagePreprocessing):
    """scikit-learn's bundled 8x8 digits (1797 images); works offline, no data dir needed."""

    kind: Literal["digits"]
    test_fraction: float = Field(0.25, gt=0.0, lt=1.0, description="held-out share, stratified")
    normalize: Literal["auto", "none"] | Normalization = Field(
        "none", description="default `none`: pixels in [0, 1] (see `ImagePreprocessing`)"
    )


MNIST_NORMALIZATION = {"mean": [0.1307], "std": [0.3081]}


class MnistData(ImagePreprocessing):
    """MNIST: the `idx` source with MNIST's file names and md5 sums, in `<data_dir>/mnist/`."""

    kind: Literal["mnist"]
    dir: str | None = Field(
        None, description="folder holding `mnist/`; `--data-dir` on the command line overrides it"
    )
    download: bool = Field(
        False, description="fetch missing files from the public mirrors (needs network)"
    )
    train_limit: int | None = Field(
        None, gt=0, le=60000, description="use only the first N training images (quick runs)"
    )
    normalize: Literal["auto", "none"] | Normalization = Field(
        default_factory=lambda: Normalization(**MNIST_NORMALIZATION),
        description="default: MNIST's usual mean 0.1307 and std 0.3081",
    )


IDX_FILES = {
    "train_images": "train-images-idx3-ubyte.gz", "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz", "test_labels": "t10k-labels-idx1-ubyte.gz",
}


FILE_NAME = r"^[^/\\\x00-\x1f]+$"  # a file name: no folder separators, no control characters


class IdxFiles(Strict):
    """The four IDX files of a set, relative to its `dir` (gzip-compressed or not)."""

    train_images: str = Field(IDX_FILES["train_images"], pattern=FILE_NAME)
    train_labels: str = Field(IDX_FILES["train_labels"], pattern=FILE_NAME)
    test_images: str = Field(IDX_FILES["test_images"], pattern=FILE_NAME)
    test_labels: str = Field(IDX_FILES["test_labels"], pattern=FILE_NAME)


class IdxData(ImagePreprocessing):
    """Any data set in MNIST's IDX format (unsigned-byte images (N, H, W) or (N, H, W, C), labels
    (N,)), such as Fashion-MNIST or KMNIST. Loaded into memory."""

    kind: Literal["idx"]
    dir: str | None = Field(
        None, description="the folder holding the files; `--data-dir` on the command line overrides it"
    )
    files: IdxFiles = Field(default_factory=IdxFiles)
    md5: dict[str, Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]] = Field(
        default_factory=dict, description="file name -> md5 of its uncompressed bytes; files "
        "named here are verified, others are not"
    )
    classes: list[Annotated[str, Field(min_length=1)]] | None = Field(
        None, min_length=2, description="class names by label; default: the labels as text"
    )
    train_limit: int | None = Field(None, gt=0, description="use only the first N training images")


SOURCE_URI = r"^[^\s]+$"


class StreamedImages(ImagePreprocessing):
    """Settings shared by the streamed sources. Their images are decoded, resized and converted
    once by parallel Ray tasks into a prepared copy (uint8 shards on disk, keyed by the source
    files and the preprocessing), which Ray Data then streams to the workers every epoch; no
    process ever holds the whole set."""

    cache_dir: str | None = Field(
        None, description="where prepared copies go; default `<run dir>/../data-cache`"
    )
    shard_rows: int = Field(
        4096, ge=16, description="rows per prepared shard: a unit of reading and of the file-level "
        "shuffle"
    )
    shuffle_buffer_rows: int = Field(
        8192, ge=0, description="rows each worker shuffles among locally as they stream by "
        "(0: file-level shuffle only)"
    )
    classes: list[Annotated[str, Field(min_length=1)]] | None = Field(
        None, min_length=2, description="class names; integer labels index this list, string "
        "labels must be in it. Default: folder names (image_folder), or the sorted labels"
    )


class ParquetData(StreamedImages):
    """Parquet files whose rows hold an image (PNG/JPEG bytes, or an array of pixels) and a
    label. Paths are globs, local or any URI pyarrow's file systems read (s3://, gs://, ...)."""

    kind: Literal["parquet"]
    train: str = Field(min_length=1, pattern=SOURCE_URI, description="glob of training files")
    test: str = Field(min_length=1, pattern=SOURCE_URI, description="glob of test files")
    image_column: str = Field("image", min_length=1)
    label_column: str = Field("label", min_length=1)


class ImageFolderData(StreamedImages):
    """Image files laid out as `DIR/<class name>/<file>` (PNG, JPEG, ... anything Pillow reads),
    one folder per class, as torchvision's ImageFolder reads them."""

    kind: Literal["image_folder"]
    train: str = Field(min_length=1, pattern=SOURCE_URI, description="folder of class folders")
    test: str = Field(min_length=1, pattern=SOURCE_URI, description="folder of class folders")


DataSpec = Annotated[
    Union[DigitsData, MnistData, IdxData, ParquetData, ImageFolderData, TextData],
    Field(discriminator="kind"),
]


# ------------------------------------------------------------------------------------- models


class MLPModel(Strict):
    """Fully connected ReLU network; LeNet-300-100 is `hidden: [300, 100]`."""

    kind: Literal["mlp"]
    hidden: list[Annotated[int, Field(gt=0)]] = Field(min_length=1)


class LeNet5Model(Strict):
    """LeNet-5 as in Caffe / Han et al.: conv20-pool-conv50-pool-fc500-fc10."""

    kind: Literal["lenet5"]
    padding: int = Field(0, ge=0, le=2, description="conv padding; 2 lets 8x8 digits through")
    widths: tuple[PositiveInt, PositiveInt, PositiveInt] = Field(
        (20, 50, 500), description="conv1 filters, conv2 filters, hidden units (Caffe's: 20, 50, "
        "500); a wider LeNet makes a teacher")


# keyword arguments the data or stillhouse decides: given in `kwargs` they would say things twice
# (or download weights)
RESERVED_KWARGS = {
    "timm": ("num_classes", "in_chans", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay",
             "checkpoint_path"),
    "torchvision": ("num_classes", "weights", "weights_backbone", "progress"),
    "python": ("num_classes", "in_channels"),
}
JsonValue = Union[None, bool, int, float, str, list[Any], dict[str, Any]]


class _RegistryModel(Strict):
    kwargs: dict[str, JsonValue] = Field(
        default_factory=dict, description="keyword arguments of the builder"
    )

    @model_validator(mode="after")
    def _no_reserved_kwargs(self):
        reserved = sorted(set(self.kwargs) & set(RESERVED_KWARGS[self.kind]))
        if reserved:
            raise ValueError(
                f"`kwargs` must not set {reserved}: the number of classes and input channels "
                "come from the data, and weights come from the teacher's `path` (nothing is "
                "downloaded)"
            )
        return self


class TimmModel(_RegistryModel):
    """Any model of timm's registry, built with `timm.create_model(name, pretrained=False,
    num_classes=<from the data>, in_chans=<from the data>, **kwargs)`."""

    kind: Literal["timm"]
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.]+$", description="e.g. resnet18")


class TorchvisionModel(_RegistryModel):
    """Any classification model of torchvision's registry, built with
    `torchvision.models.get_model(name, weights=None, num_classes=<from the data>, **kwargs)`;
    a first convolution made for 3 channels is rebuilt for the data's channels."""

    kind: Literal["torchvision"]
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_]+$", description="e.g. mobilenet_v3_small")


class PythonModel(_RegistryModel):
    """A model built by your own code: `factory` is `package.module:function`, called as
    `function(num_classes=..., in_channels=..., **kwargs)` and returning an `nn.Module` that maps
    (B, C, H, W) to (B, num_classes). A spec alone never runs code: the factory's top-level
    package must be trusted on the command line (`--trust-module PACKAGE`) or in
    `STILLHOUSE_TRUSTED_MODULES`."""

    kind: Literal["python"]
    factory: str = Field(
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$",
        description="`package.module:function`",
    )

    @property
    def package(self) -> str:
        """The top-level package that must be trusted."""
        return self.factory.split(":")[0].split(".")[0]


ModelSpec = Annotated[
    Union[MLPModel, LeNet5Model, TimmModel, TorchvisionModel, PythonModel, HFModel],
    Field(discriminator="kind"),
]


# ------------------------------------------------------------------------------------ teacher


class TrainedTeacher(Strict):
    """Train the teacher inside the job (cross-entropy, same DeepSpeed workers as the student)."""

    kind: Literal["train"]
    model: ModelSpec
    epochs: int = Field(10, gt=0)
    lr: float = Field(1e-3, gt=0.0)
    batch_size: int = Field(64, gt=0, description="per worker")
    weight_decay: float = Field(0.0, ge=0.0)
    grad_clip: float = Field(0.0, ge=0.0, description="0 turns clipping off")
    augment: Augmentation | None = Field(
        None, description="training augmentation of the teacher's own training, instead of "
        "`data.augment` (the default): e.g. shifted images for the teacher while the student "
        "learns from cached logits of the images as stored, as Hinton et al. (2015) trained "
        "their MNIST teacher on jittered images and distilled on the plain ones"
    )


class CheckpointTeacher(Strict):
    """A trained model loaded as it is: a registry model whose weights are in a safetensors file
    (`path`, loaded weights-only), or a Hugging Face model whose `save_pretrained` directory is
    `model.path` (config.json and safetensors weights; no `path` here)."""

    kind: Literal["checkpoint"]
    model: ModelSpec
    path: str | None = Field(
        None, min_length=1, description="a .safetensors state dict of `model` (registry "
        "models; an `hf` model names its directory in `model.path`)",
    )

    @model_validator(mode="after")
    def _weights_named_once(self) -> "CheckpointTeacher":
        if isinstance(self.model, HFModel):
            if self.model.path is None:
                raise ValueError(
                    "a `checkpoint` teacher of kind hf is loaded from its `save_pretrained` "
                    "directory: set `model.path` (a fresh `model.config` is for `kind: train`)")
            if self.path is not None:
                raise ValueError(
                    "an hf teacher's weights are in its directory `model.path`: drop `path`")
        elif self.path is None:
            raise ValueError(f"`path` is required: the safetensors weights of the "
                             f"{self.model.kind} model")
        return self


class ExportedTeacher(Strict):
    """A user's own model saved with `torch.export.save` (.pt2) or TorchScript (`torch.jit.save`).

    Both formats hold a program, not pickled Python objects, so loading runs no user code.
    """

    kind: Literal["exported"]
    path: str = Field(min_length=1)
    format: Literal["torch_export", "torchscript"]


TeacherSpec = Annotated[
    Union[TrainedTeacher, CheckpointTeacher, ExportedTeacher], Field(discriminator="kind")
]


class StudentSpec(Strict):
    model: ModelSpec
    epochs: int = Field(10, gt=0, description="dense distillation epochs before pruning")
    lr: float = Field(1e-3, gt=0.0)
    batch_size: int = Field(64, gt=0, description="per worker")
    weight_decay: float = Field(0.0, ge=0.0)
    grad_clip: float = Field(1.0, ge=0.0, description="0 turns clipping off")


# ------------------------------------------------------------------------------- distillation


class FeatureMap(Strict):
    """One intermediate-layer pair for feature distillation (see trainers/features.py)."""

    student: str = Field(min_length=1, description="student module, as in `named_modules()`")
    teacher: str = Field(min_length=1, description="teacher module whose output it learns")
    weight: float = Field(1.0, gt=0.0, description="weight of this pair's MSE in the loss")


class HintonKD(Strict):
    """alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y), plus
    sum(weight * MSE(projection(student feature), teacher feature)) over `features`."""

    kind: Literal["hinton"]
    temperature: float = Field(4.0, gt=0.0)
    alpha: float = Field(0.9, ge=0.0, le=1.0)
    features: list[FeatureMap] = Field(
        default_factory=list, description="intermediate layers to distil (needs `logits.mode: "
        "online` and a registry teacher: `train` or `checkpoint`)"
    )


# hinton for image classifiers; forward_kl / reverse_kl / jsd per token for language models
DistillationSpec = Annotated[
    Union[HintonKD, ForwardKL, ReverseKL, GeneralizedJSD], Field(discriminator="kind")
]
TOKEN_LOSSES = (ForwardKL, ReverseKL, GeneralizedJSD)


class LogitsSpec(Strict):
    """Where the student's teacher logits come from.

    `online`: the teacher pool answers every step. `cached`: before the student trains, a
    distributed batch job (Ray Data, teacher replicas as an actor pool) writes the teacher's
    logits for the whole training set to a cache on disk, keyed by the teacher's weights, the
    dataset and its preprocessing; later epochs and later jobs with the same key read it.
    `topk`: the same cache, keeping only the `top_k` largest logits per sample and the
    log-sum-exp at the distillation temperature (see trainers/logit_cache.py for the
    approximation).

    Language models (`data.kind: text`) keep the teacher's top-k per token, as `tokens` says:
    `online`, the teacher replicas take the top-k before they answer, so (batch, seq, k)
    crosses the wire instead of (batch, seq, vocab); `topk`, the top-k token cache
    (trainers/token_cache.py), filled once by the teacher replicas, shard by shard, resumable.
    `tokens.k` at least the vocabulary size keeps the whole distribution (full-logit
    distillation). `cached` (a full vocabulary per token) is not offered for them.
    """

    mode: Literal["online", "cached", "topk"] = "online"
    cache_unaugmented: bool = Field(
        False, description="`online` only: the student's phases that train on the images as "
        "stored (no `augment`, e.g. pruning rounds under `pruning.augment: {}`) read the "
        "teacher's logits from the cache, filled once before the student starts (one teacher "
        "pass over the training set); augmented phases still ask the replicas every step",
    )
    top_k: int = Field(5, ge=1, description="image classifiers: logits kept per sample (`topk`)")
    cache_dir: str | None = Field(None, description="default: <run_dir>/../logit-cache")
    shard_size: int = Field(8192, ge=1, description="samples per cache shard")
    max_shards_in_memory: int = Field(16, ge=1, description="shards a reader keeps mapped")
    tokens: TokenCacheSpec = Field(
        default_factory=TokenCacheSpec, description="language models: the teacher's top-k per "
        "token, on the wire (online) and in the token cache (topk); its `cache_dir`, "
        "`shard_size` and `max_shards_in_memory` replace the ones above",
    )


# ------------------------------------------------------------------------------------ pruning


class OneShotSchedule(Strict):
    """Prune straight to the target in the single round."""

    kind: Literal["oneshot"]


class GeometricSchedule(Strict):
    """Keep a fixed fraction of the remaining weights each round; the last round lands on target.

    Without `keep_fraction` it is chosen so that `rounds` rounds reach the target exactly.
    """

    kind: Literal["geometric"]
    keep_fraction: float | None = Field(None, gt=0.0, lt=1.0)


class AGPSchedule(Strict):
    """Zhu & Gupta (2017) cubic: s_r = s_f + (s_i - s_f) * (1 - r / n)^3."""

    kind: Literal["agp"]
    initial_sparsity: float = Field(0.0, ge=0.0, lt=1.0)


class ExplicitSchedule(Strict):
    """The sparsity after each round, listed; the last entry must equal `target_sparsity`."""

    kind: Literal["explicit"]
    sparsities: list[Annotated[float, Field(gt=0.0, lt=1.0)]] = Field(min_length=1)


ScheduleSpec = Annotated[
    Union[OneShotSchedule, GeometricSchedule, AGPSchedule, ExplicitSchedule],
    Field(discriminator="kind"),
]


class LayerSelection(Strict):
    """Layers by module name (`model.named_modules()`), with glob patterns: `layer1.*`,
    `*.conv2`. A pattern that matches no Linear/Conv layer is an error."""

    include: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=lambda: ["*"],
                                                               min_length=1)
    exclude: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list)


# One number for every round, or a list with one per round. Tagged by the value's own type so
# that a bad value gets the one error of the form it was written in, not one per form.
RoundEpochs = Annotated[
    Union[
        Annotated[Annotated[int, Field(ge=0)], Tag("int")],
        Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1), Tag("list")],
    ],
    Discriminator(lambda v: "list" if isinstance(v, list) else "int"),
]


class PruningSpec(Strict):
    """Iterative global magnitude pruning: one threshold across all prunable weights."""

    enabled: bool = True
    target_sparsity: float = Field(0.9, gt=0.0, lt=1.0, description="final share of zero weights")
    rounds: int = Field(3, ge=1, le=100)
    finetune_epochs: RoundEpochs = Field(
        2, description="distillation epochs after each prune: one number for every round, or a "
        "list with one per round (e.g. longer fine-tuning for the last, sparsest rounds)"
    )
    schedule: ScheduleSpec = Field(default_factory=lambda: GeometricSchedule(kind="geometric"))
    layers: (Literal["all"]
             | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)]
             | LayerSelection) = Field(
        "all", description="which Linear/Conv layers are pruned: `all`, a list of module names "
        "or glob patterns (as in `model.named_modules()`), or `{include: [...], exclude: [...]}`"
    )
    include_bias: bool = Field(False, description="also prune biases")
    embeddings: bool = Field(
        False, description="language models (`hf`): also prune the input token embeddings "
        "(by default only the attention and MLP projections of the blocks are pruned; norms "
        "never are)",
    )
    lm_head: bool = Field(
        False, description="language models: also prune the LM head (when it is not tied to "
        "the embeddings)",
    )
    granularity: Literal["weight", "channel"] = Field(
        "weight",
        description="`weight`: single weights by magnitude; `channel`: whole output channels "
        "(conv filters, hidden units) by their weights' norm, removed from the exported model; "
        "for a language model, MLP neurons (`target_sparsity` of each block's) and attention "
        "groups (`heads`), cut out of the exported Hugging Face model and its config",
    )
    heads: float = Field(
        0.0, ge=0.0, lt=1.0,
        description="language models, `granularity: channel`: the share of each block's "
        "attention groups (a key/value head with the query heads that read it) removed by the "
        "last round, rounded down to a head count the config accepts; the rounds before remove "
        "the same fraction of it as of `target_sparsity`",
    )
    norm: Literal["l1", "l2"] = Field(
        "l1", description="channel score: the L1 or L2 norm of its weights over their fan-in"
    )
    augment: Augmentation | None = Field(
        None, description="training augmentation of the phases after the dense distillation "
        "(each round's fine-tuning, and the quantization fine-tuning after the last round), "
        "instead of `data.augment` (the default): e.g. `{}` to fine-tune the pruned student on "
        "the images as stored after a dense student learnt on shifted ones"
    )
    scope: Literal["global", "layer"] = Field(
        "layer", description="channel pruning: each layer to the target, or one threshold across "
        "layers (which can strip one layer to a single channel: scores compare across layers "
        "only roughly)"
    )

    def round_epochs(self, round_index: int) -> int:
        """Fine-tuning epochs after round `round_index` (1-based)."""
        if isinstance(self.finetune_epochs, int):
            return self.finetune_epochs
        return self.finetune_epochs[round_index - 1]

    @property
    def selection(self) -> LayerSelection:
        """`layers` as include and exclude patterns."""
        if self.layers == "all":
            return LayerSelection()
        if isinstance(self.layers, list):
            return LayerSelection(include=list(self.layers))
        return self.layers

    @model_validator(mode="after")
    def _schedule_fits_rounds(self) -> "PruningSpec":
        if isinstance(self.schedule, OneShotSchedule) and self.rounds != 1:
            raise ValueError("`schedule.kind` oneshot prunes in one round: set `rounds: 1`")
        if isinstance(self.schedule, GeometricSchedule) and self.schedule.keep_fraction is not None:
            reached = 1.0 - self.schedule.keep_fraction**self.rounds
            if reached + 1e-9 < self.target_sparsity:
                raise ValueError(
                    f"`schedule.keep_fraction` {self.schedule.keep_fraction} over `rounds` "
                    f"{self.rounds} reaches sparsity {reached:.4f}, below `target_sparsity` "
                    f"{self.target_sparsity}: raise `rounds` or lower `keep_fraction`"
                )
        if isinstance(self.finetune_epochs, list) and len(self.finetune_epochs) != self.rounds:
            raise ValueError(
                f"`finetune_epochs` lists {len(self.finetune_epochs)} rounds but `rounds` is "
                f"{self.rounds}"
            )
        if isinstance(self.schedule, ExplicitSchedule):
            s = self.schedule.sparsities
            if len(s) != self.rounds:
                raise ValueError(
                    f"`schedule.sparsities` lists {len(s)} rounds but `rounds` is {self.rounds}"
                )
            if any(b <= a for a, b in zip(s, s[1:])):
                raise ValueError("`schedule.sparsities` must increase from round to round")
            if abs(s[-1] - self.target_sparsity) > 1e-12:
                raise ValueError(
                    f"`schedule.sparsities` ends at {s[-1]}, not `target_sparsity` "
                    f"{self.target_sparsity}"
                )
        if self.heads and self.granularity != "channel":
            raise ValueError("`heads` removes whole attention groups: it needs "
                             "`granularity: channel`")
        if isinstance(self.schedule, AGPSchedule):
            if self.schedule.initial_sparsity >= self.target_sparsity:
                raise ValueError(
                    "`schedule.initial_sparsity` must be below `target_sparsity`"
                )
        return self


# ------------------------------------------------------------------------------- quantization


class KMeansBits(Strict):
    """Bits per layer type for `kmeans` weight sharing: a layer's kept weights share at most
    2^bits values (Deep Compression used 5 for fully connected and 8 for conv layers)."""

    linear: int = Field(5, ge=1, le=8, description="Linear layers")
    conv: int = Field(8, ge=1, le=8, description="Conv2d layers")


class QuantizationSpec(Strict):
    """What happens to the student's weights after pruning (see trainers/quantize.py).

    `dynamic`: post-training int8 weights (per output channel) with activations quantized on the
    fly (Linear layers run torch's int8 kernels; conv weights are stored int8 and run in fp32).
    `static`: post-training int8 weights and activations, activation ranges calibrated on
    `calibration_samples` training images (torch.ao FX graph mode, Linear and Conv).
    `qat`: `finetune_epochs` more epochs of distillation with fake-quantized int8 weights
    (straight-through estimator), then the `dynamic` conversion.
    `binary` / `ternary`: the same fine-tuning with 1-bit sign (or 2-bit -1/0/+1) weights times a
    per-channel scale; the first and last layers stay int8.
    `kmeans`: weight sharing (Deep Compression): each layer's kept weights are clustered by
    k-means into at most 2^bits shared values (`bits` per layer type), fine-tuned for
    `finetune_epochs` with a fixed assignment; stored as a codebook plus b-bit codes, run as fp32.
    `int8_weights` (language models): post-training int8 weights, symmetric, one scale per
    output channel, activations in float, written in the compressed-tensors format (the one vLLM
    loads) beside the float Hugging Face directory (see trainers/hf_models.py).
    """

    method: Literal["none", "dynamic", "static", "qat", "binary", "ternary", "kmeans",
                    "int8_weights"] = "none"
    finetune_epochs: int = Field(
        3, ge=1,
        description="qat / binary / ternary / kmeans: distillation epochs on quantized weights",
    )
    bits: KMeansBits = Field(
        default_factory=KMeansBits, description="kmeans: bits per layer type, 1 to 8"
    )
    calibration_samples: int = Field(512, ge=1, description="static: training images to calibrate")
    lr_scale: float = Field(
        0.3, gt=0.0, le=1.0, description="fine-tuning learning rate as a share of the student's"
    )

    @property
    def trains(self) -> bool:
        return self.method in ("qat", "binary", "ternary", "kmeans")


class ExportSpec(Strict):
    """The compact model file a job ends with (see trainers/export.py)."""

    latency_batches: list[Annotated[int, Field(gt=0)]] = Field(
        default_factory=lambda: [1, 256], description="batch sizes the CPU latency is timed at"
    )
    latency_threads: int = Field(1, ge=1, description="torch threads while timing")
    entropy_coding: bool = Field(
        True, description="deflate (LZ77 + Huffman) the int8 codes and sparse indices when smaller"
    )


# ---------------------------------------------------------------------- engine and resources


class DeepSpeedSpec(Strict):
    zero_stage: int = Field(
        1, ge=0, le=3, description="ZeRO stage: 0 none, 1 partitions the optimizer state across "
        "workers, 2 also the gradients, 3 also the parameters (pruning thresholds are then "
        "computed from the shards, never from a gathered model)",
    )
    offload_optimizer: Literal["none", "cpu"] = Field(
        "none", description="stages 1-3: `cpu` keeps the optimizer state and the fp32 master "
        "weights in host memory (DeepSpeed ZeRO-Offload), for students whose optimizer state "
        "does not fit on the GPU",
    )
    param_persistence_threshold: int = Field(
        100_000, ge=0, description="stage 3: parameters with fewer elements stay whole on every "
        "worker between steps (DeepSpeed's `stage3_param_persistence_threshold`); 0 partitions "
        "every parameter",
    )
    max_nonfinite_steps: int = Field(
        10, ge=0, description="steps with a NaN/inf loss skipped before the job fails"
    )

    @model_validator(mode="after")
    def _offload_needs_zero(self) -> "DeepSpeedSpec":
        if self.offload_optimizer != "none" and self.zero_stage == 0:
            raise ValueError(
                f"`offload_optimizer` {self.offload_optimizer} needs ZeRO: set `zero_stage` 1, 2 "
                "or 3"
            )
        return self


class ResourcesSpec(Strict):
    teacher_replicas: int = Field(2, ge=1)
    teacher_cpus: float = Field(0.5, gt=0.0, description="CPUs per teacher replica")
    teacher_max_restarts: int = Field(3, ge=0, description="restarts of a dead replica")
    student_workers: int = Field(2, ge=1)
    student_cpus: float = Field(0.5, gt=0.0, description="CPUs per student worker")
    teacher_training_cpus: float | None = Field(
        None, gt=0.0, description="CPUs per worker while the job trains its own teacher "
        "(`teacher.kind: train`, on the student's workers); default `student_cpus`. That stage "
        "ends before the teacher replicas start, so it may take their CPUs too",
    )
    student_gpus: float = Field(
        0.0, ge=0.0, le=1.0, description="GPUs per student worker: 0 trains on CPU (gloo), 1 on "
        "its own GPU (NCCL, DeepSpeed's CUDA accelerator); a fraction lets a single worker share "
        "its GPU with teacher replicas (one-GPU machines). The teacher-training stage uses the "
        "same workers",
    )
    teacher_gpus: float = Field(
        0.0, ge=0.0, le=1.0, description="GPUs per teacher replica, a fraction to share one: "
        "0.25 puts four replicas on a GPU; 0 runs the teacher on CPU",
    )
    worker_max_failures: int = Field(1, ge=0, description="Ray Train worker-group restarts")
    prefetch_batches: int = Field(
        4, ge=1, le=64, description="teacher requests each worker keeps in flight"
    )
    teacher_request_rows: int = Field(
        512, ge=1, description="rows a worker asks the teacher for per request: consecutive "
        "batches share one request until it has this many (fewer round trips per row)",
    )
    teacher_max_batch: int = Field(
        2048, ge=1, description="rows a replica gathers from all students into one forward"
    )
    shared_pool: str | None = Field(
        None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.]{0,47}$",
        description="name of a teacher pool that outlives the job and that later jobs with the "
        "same teacher join (on a long-lived cluster)",
    )
    teacher_max_wait_ms: float = Field(
        2.0, ge=0.0, description="how long a request waits for others to join its batch"
    )
    placement_timeout_s: float = Field(
        60.0, gt=0.0, description="how long to wait for CPUs before failing"
    )
    teacher_labels: dict[str, str] = Field(
        default_factory=dict,
        description="node labels teacher replicas must run on, e.g. {stillhouse-role: teacher}",
    )
    student_labels: dict[str, str] = Field(
        default_factory=dict, description="node labels student workers must run on"
    )

    @property
    def teacher_total_cpus(self) -> float:
        return self.teacher_replicas * self.teacher_cpus

    @property
    def student_total_cpus(self) -> float:
        return self.student_workers * self.student_cpus

    def worker_cpus(self, stage: str) -> float:
        """CPUs per worker of a stage's worker group: `teacher` (the job training its teacher)
        or `student`. They set the worker's torch threads too."""
        if stage == "teacher" and self.teacher_training_cpus is not None:
            return self.teacher_training_cpus
        return self.student_cpus

    @model_validator(mode="after")
    def _shared_gpu_has_one_worker(self) -> "ResourcesSpec":
        if 0 < self.student_gpus < 1 and self.student_workers > 1:
            raise ValueError(
                f"`student_gpus` {self.student_gpus:g} shares a GPU, which only one worker may "
                f"do (NCCL needs a GPU per rank): set `student_workers: 1` (given "
                f"{self.student_workers}) or `student_gpus: 1`"
            )
        return self

    @staticmethod
    def gpus_filled(shares: list[float]) -> int:
        """Whole GPUs that actors asking for these GPU shares fill: none spans two GPUs, so
        they are packed first fit, largest first (3 replicas of 0.4 need 2 GPUs)."""
        free: list[float] = []  # what is left on each GPU filled so far
        for share in sorted((s for s in shares if s > 0), reverse=True):
            for i, room in enumerate(free):
                if share <= room + 1e-9:
                    free[i] = room - share
                    break
            else:
                free.append(1.0 - share)
        return len(free)

    @property
    def teacher_gpu_shares(self) -> list[float]:
        return [self.teacher_gpus] * self.teacher_replicas

    @property
    def student_gpu_shares(self) -> list[float]:
        return [self.student_gpus] * self.student_workers

    @property
    def teacher_total_gpus(self) -> int:
        return self.gpus_filled(self.teacher_gpu_shares)

    @property
    def student_total_gpus(self) -> int:
        return self.gpus_filled(self.student_gpu_shares)


class WandbSpec(Strict):
    mode: Literal["auto", "online", "offline", "disabled"] = Field(
        "auto", description="auto: online when WANDB_API_KEY is set, else offline"
    )
    project: str = "stillhouse"
    entity: str | None = None
    group: str | None = Field(None, description="defaults to the job name")
    log_every_steps: int = Field(10, ge=1)
    init_timeout_s: float = Field(
        20.0, gt=0.0, description="how long an online run waits for the server before the job "
        "falls back to offline logging"
    )


# ------------------------------------------------------------------------------ recurrence


CRON_FIELD = r"^[0-9A-Za-z*/,?-]+$"


class RecurringSpec(Strict):
    """How `stillhouse scheduler` runs this job again and again.

    Overlap: a slot that comes while the previous run is still going is `skip`ped (recorded), or
    `queue`d (submitted when the previous run ends; at most one waits). Missed slots: a slot the
    scheduler was down for runs late if the scheduler is back within `misfire_grace_s`, several
    such slots coalescing into one run; an older one is recorded as missed and not run.
    """

    cron: str | None = Field(
        None, description="crontab (5 fields) or with a leading seconds field (6 fields)"
    )
    overlap: Literal["skip", "queue"] = "skip"
    misfire_grace_s: int = Field(300, ge=1)

    @model_validator(mode="after")
    def _cron_shape(self) -> "RecurringSpec":
        if self.cron is not None:
            fields = self.cron.split()
            if len(fields) not in (5, 6) or not all(re.match(CRON_FIELD, f) for f in fields):
                raise ValueError(
                    f"`cron` {self.cron!r} is not a crontab expression: 5 fields (minute hour "
                    "day month weekday) or 6 with a leading seconds field"
                )
        return self


# ----------------------------------------------------------------------------------- sweeps


class SweepSpec(Strict):
    """A grid of settings: one job per combination, compared in one table and plot.

    Keys are dotted paths into this spec (`pruning.target_sparsity`, `distillation.temperature`);
    every point is validated as a spec of its own.
    """

    grid: dict[str, list[Any]] = Field(min_length=1)
    share_teacher: bool = Field(
        True, description="train the teacher once and load it in the other points"
    )

    @model_validator(mode="after")
    def _non_empty(self) -> "SweepSpec":
        empty = [k for k, v in self.grid.items() if not v]
        if empty:
            raise ValueError(f"`grid` keys with no values: {empty}")
        return self


# ------------------------------------------------------------------------------------ the job


class JobSpec(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    seed: int = Field(0, ge=0, lt=2**32, description="every random choice: splits, initial "
                      "weights, data order, augmentation (0 <= seed < 2^32)")
    deterministic: bool = Field(
        True, description="the same spec and seed give the same figures on the same machine "
        "(same CPU kind and thread counts): teacher replicas answer each request in its own "
        "forward instead of batching requests of several workers together, and torch uses its "
        "deterministic algorithms. Off: slightly faster online distillation, figures that move "
        "in their last digits from run to run"
    )
    run_dir: str | None = Field(None, description="`--run-dir` overrides; default runs/<name>")
    data: DataSpec
    teacher: TeacherSpec
    student: StudentSpec
    distillation: DistillationSpec = Field(
        default_factory=lambda: HintonKD(kind="hinton"),
        description="default: `hinton` for images; `forward_kl` (its own defaults) for "
        "`data.kind: text`",
    )
    pruning: PruningSpec = Field(default_factory=PruningSpec)
    quantization: QuantizationSpec = Field(default_factory=QuantizationSpec)
    export: ExportSpec = Field(default_factory=ExportSpec)
    logits: LogitsSpec = Field(default_factory=LogitsSpec)
    precision: Literal["fp32", "bf16", "bf16_autocast", "fp16"] = Field(
        "fp32",
        description="fp32; bf16: DeepSpeed bf16 (bf16 weights, an fp32 master copy in the "
        "optimizer); bf16_autocast: fp32 weights and optimizer, forward matmuls in bf16 under "
        "torch.autocast (DeepSpeed's torch_autocast), fewer copies per step; fp16 (GPU workers "
        "only): fp16 weights, an fp32 master copy and DeepSpeed's dynamic loss scaling, whose "
        "overflow steps are skipped and counted. The teacher answers in bf16 under any of the "
        "mixed modes",
    )
    deepspeed: DeepSpeedSpec = Field(default_factory=DeepSpeedSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    wandb: WandbSpec = Field(default_factory=WandbSpec)
    recurring: RecurringSpec = Field(default_factory=RecurringSpec)
    sweep: SweepSpec | None = None

    def augmentation(self, stage: str, phase_kind: str = "dense") -> Augmentation:
        """The training augmentation of a stage (`teacher` or `student`) and phase kind
        (`trainers.plan.Phase.kind`): `data.augment`, or the trained teacher's own `augment` for
        the teacher's training, or `pruning.augment` for the student's phases after the dense
        one (pruning rounds, quantization fine-tuning) when pruning is on; each when given."""
        if stage == "teacher" and isinstance(self.teacher, TrainedTeacher):
            if self.teacher.augment is not None:
                return self.teacher.augment
        if stage == "student" and phase_kind in ("prune", "quantize"):
            if self.pruning.enabled and self.pruning.augment is not None:
                return self.pruning.augment
        return self.data.augment

    @property
    def student_augmentations(self) -> list[Augmentation]:
        """The augmentations the student's phases train with: the dense phase's, then the one
        of the phases after it (rounds and quantization share theirs); they may be equal."""
        return [self.augmentation("student", kind) for kind in ("dense", "prune")]

    @property
    def student_uses_teacher(self) -> bool:
        """Whether the student's loss needs the teacher at all. With `distillation.alpha` 0 and
        no feature pairs it is cross-entropy alone (a student trained alone, as a baseline): the
        teacher is still trained or loaded and scored, but the workers never ask it anything."""
        if self.language_model:  # a language-model job keeps its replicas (orchestrator/lm_job.py)
            return True
        return self.distillation.alpha > 0 or bool(self.distillation.features)

    @property
    def replicas_beside_workers(self) -> bool:
        """Whether the teacher replicas hold their CPUs while the workers train. Online they
        serve the workers; with cached logits they fill the cache and answer the test set first,
        and are gone before the workers start (unless they are a shared pool, which stays); a
        student that does not use the teacher lets them go after the test set too."""
        if self.resources.shared_pool:
            return True
        return self.logits.mode == "online" and self.student_uses_teacher

    @property
    def total_cpus(self) -> float:
        """CPUs the job holds at once: the most any stage holds (the teacher's training comes
        before its replicas start)."""
        r = self.resources
        if self.replicas_beside_workers:
            held = r.teacher_total_cpus + r.student_total_cpus
        else:
            held = max(r.teacher_total_cpus, r.student_total_cpus)
        if self.trains_teacher:
            held = max(held, r.student_workers * r.worker_cpus("teacher"))
        return held

    @property
    def most_worker_cpus(self) -> float:
        """CPUs per worker in the stage that asks for most: what a worker's node must have."""
        stages = ("teacher", "student") if self.trains_teacher else ("student",)
        return max(self.resources.worker_cpus(s) for s in stages)

    @property
    def trains_teacher(self) -> bool:
        """Whether the job trains its own teacher (`teacher.kind: train`)."""
        return isinstance(self.teacher, TrainedTeacher)

    @property
    def logit_cache_mode(self) -> str | None:
        """What the logit cache holds for this job: `cached` (whole logits) or `topk`, or None
        when the student reads no cache: online without `logits.cache_unaugmented`, a student
        that does not use the teacher, or one whose every phase is augmented."""
        if not self.student_uses_teacher or self.language_model:
            return None
        if self.logits.mode != "online":
            return self.logits.mode
        if self.logits.cache_unaugmented and not all(
                a.enabled for a in self.student_augmentations):
            return "cached"
        return None

    @property
    def teacher_precision(self) -> str:
        """The precision the teacher answers in: bf16 under either bf16 mode (the same logits,
        so the same teacher pool and logit cache serve both)."""
        return "fp32" if self.precision == "fp32" else "bf16"

    @model_validator(mode="before")
    @classmethod
    def _token_loss_by_default_for_text(cls, values: Any) -> Any:
        """The default loss follows the data: per-token forward KL for text."""
        if (isinstance(values, dict) and "distillation" not in values
                and isinstance(values.get("data"), dict) and values["data"].get("kind") == "text"):
            return {**values, "distillation": {"kind": "forward_kl"}}
        return values

    @property
    def language_model(self) -> bool:
        """A language-model job: text data, Hugging Face causal LMs, token-level losses."""
        return isinstance(self.data, TextData)

    @model_validator(mode="after")
    def _cross_checks(self) -> "JobSpec":
        if self.language_model:
            self._language_model_checks()
        else:
            self._image_checks()
        if self.precision == "fp16" and self.resources.student_gpus == 0:
            raise ValueError(
                "`precision` fp16 needs GPU workers: set `resources.student_gpus: 1`, or use "
                "`precision` bf16 or bf16_autocast on CPU (DeepSpeed's fp16 loss scaling is a "
                "GPU path; CPUs have no fast fp16 matmul)"
            )
        if self.precision == "fp16" and self.deepspeed.zero_stage == 0:
            raise ValueError(
                "`precision` fp16 needs `deepspeed.zero_stage` 1, 2 or 3: DeepSpeed 0.19's "
                "engine does not scale the loss for its stage-0 fp16 optimizers, which still "
                "divide the gradients by the loss scale"
            )
        if isinstance(self.data, DigitsData) and self.data.image_size is None:
            for section, model in (("teacher", self.teacher_model), ("student", self.student.model)):
                if isinstance(model, LeNet5Model) and model.padding < 2:
                    raise ValueError(
                        f"`{section}.model` lenet5 on 8x8 `digits` needs `padding: 2` (or "
                        "`data.image_size` of at least [28, 28])"
                    )
        if self.quantization.method == "kmeans" and self.deepspeed.zero_stage == 3:
            raise ValueError(
                "`quantization.method` kmeans with `deepspeed.zero_stage` 3: weight sharing snaps "
                "each cluster to its mean over whole weights, which ZeRO 3 keeps in slices on "
                "every rank; use zero_stage 0-2 for the quantized fine-tuning"
            )
        return self

    def _image_checks(self) -> None:
        """Image classifiers: registry models, the `hinton` loss, the image-only settings."""
        for section, model in (("teacher.model", self.teacher_model),
                               ("student.model", self.student.model)):
            if isinstance(model, HFModel):
                raise ValueError(
                    f"`{section}` kind hf is a language model: it needs `data.kind: text` (given "
                    f"{self.data.kind})")
        if not isinstance(self.distillation, HintonKD):
            raise ValueError(
                f"`distillation.kind` {self.distillation.kind} is a token-level loss for "
                "language models (`data.kind: text`); image classifiers use `hinton`")
        if self.pruning.heads:
            raise ValueError("`pruning.heads` removes attention groups of a language model "
                             "(`data.kind: text`); an image classifier has none")
        if self.distillation.features:
            if isinstance(self.teacher, ExportedTeacher):
                raise ValueError(
                    "`distillation.features` needs the teacher's modules by name: use a `train` "
                    "or `checkpoint` teacher, not `exported`"
                )
            if self.logits.mode != "online" or self.logits.cache_unaugmented:
                raise ValueError(
                    "`distillation.features` needs the teacher pool every step: set "
                    "`logits.mode: online` without `logits.cache_unaugmented` (the logit cache "
                    "holds logits only)"
                )
        # settings compared with their defaults, not looked up in `model_fields_set`: a spec
        # that went through JSON (to the workers, into the run dir) has every field set
        if self.logits.tokens != TokenCacheSpec():
            raise ValueError("`logits.tokens` is the top-k per token of language models "
                             "(`data.kind: text`); image classifiers use `logits.top_k`")
        if self.quantization.method == "int8_weights":
            raise ValueError("`quantization.method` int8_weights (compressed-tensors) is for "
                             "language models; image classifiers use dynamic, static or qat")
        if self.pruning.embeddings or self.pruning.lm_head:
            raise ValueError("`pruning.embeddings` and `pruning.lm_head` are for language "
                             "models (`data.kind: text`)")
        if self.logits.cache_unaugmented and self.logits.mode != "online":
            raise ValueError(
                f"`logits.cache_unaugmented` mixes the cache into `logits.mode: online`; with "
                f"`{self.logits.mode}` every phase reads the cache already")
        if self.logits.mode != "online" and any(a.enabled for a in self.student_augmentations):
            where = "`data.augment`" if self.data.augment.enabled else "`pruning.augment`"
            raise ValueError(
                f"`logits.mode: {self.logits.mode}` with {where}: a cache holds the "
                "teacher's logits for the images as stored, not for this epoch's random crops "
                "and flips; use `logits.mode: online` (the teacher then sees each augmented batch)"
            )

    def _language_model_checks(self) -> None:
        """Text data: Hugging Face causal LMs, a token-level loss, top-k teacher logits."""
        if self.pruning.augment is not None:
            raise ValueError("`pruning.augment` shifts and flips images; a language model's "
                             "rounds fine-tune on the text as it is")
        if isinstance(self.teacher, ExportedTeacher):
            raise ValueError("`data.kind: text` needs an hf teacher (`teacher.kind: train` or "
                             "`checkpoint` with `model.kind: hf`), not an exported program")
        # (so `student.model.init.from_teacher` always has an hf teacher to copy from)
        for section, model in (("teacher.model", self.teacher_model),
                               ("student.model", self.student.model)):
            if not isinstance(model, HFModel):
                raise ValueError(f"`data.kind: text` needs Hugging Face models: `{section}` is "
                                 f"kind {model.kind}, use `kind: hf`")
            if model.task != "causal_lm":
                raise ValueError(
                    f"`{section}.task` {model.task}: a job on text data distils causal LMs "
                    "(next-token logits per position); use `task: causal_lm`")
        if self.teacher.model.init.from_teacher:
            raise ValueError("`teacher.model.init.from_teacher`: only the student is initialised "
                             "from the teacher")
        if not isinstance(self.distillation, TOKEN_LOSSES):
            raise ValueError("`data.kind: text` needs a token-level loss: `distillation.kind` "
                             "forward_kl, reverse_kl or jsd (not hinton)")
        if self.logits.mode == "cached":
            raise ValueError(
                "`logits.mode: cached` stores the whole vocabulary per token, which does not "
                "fit on disk for a language model: use `topk` (the top-k token cache, "
                "`logits.tokens`) or `online`")
        image_only = sorted(name for name in ("top_k", "cache_dir", "shard_size",
                                              "max_shards_in_memory", "cache_unaugmented")
                            if getattr(self.logits, name) != LogitsSpec.model_fields[name].default)
        if image_only:
            raise ValueError(f"`logits` {image_only} are the image classifiers' cache settings: "
                             "a language model's are in `logits.tokens` (`k`, `cache_dir`, "
                             "`shard_size`, `max_shards_in_memory`)")
        validate_topk_loss(self.distillation, self.logits.tokens)
        if self.quantization.method not in ("none", "int8_weights"):
            raise ValueError(
                f"`quantization.method` {self.quantization.method} is for image classifiers; "
                "a language model is exported as a Hugging Face directory (`none`) and also "
                "with int8 weights in the compressed-tensors format (`int8_weights`)")
        if self.pruning.enabled and self.pruning.granularity == "channel":
            pruning = self.pruning
            if pruning.layers != "all" or pruning.embeddings or pruning.lm_head:
                raise ValueError(
                    "`pruning.granularity: channel` of a language model removes MLP neurons and "
                    "attention groups from every block alike (one config holds their counts): "
                    "leave `pruning.layers` at `all`, `embeddings` and `lm_head` off")
            if pruning.scope != "layer":
                raise ValueError(
                    "`pruning.scope: global` cannot hold for a language model: every block "
                    "keeps as many neurons and groups as the others (`scope: layer`)")
            if self.deepspeed.zero_stage == 3:
                raise ValueError(
                    "`pruning.granularity: channel` of a language model scores whole neurons "
                    "and heads from the gathered weights: not with `deepspeed.zero_stage: 3`")
        if self.pruning.include_bias:
            raise ValueError("`pruning.include_bias` is for image classifiers: a language "
                             "model's projections are pruned by their weights only")

    @property
    def teacher_model(self) -> ModelSpec | None:
        """The teacher's model section (None for an exported program, which carries its own)."""
        return None if isinstance(self.teacher, ExportedTeacher) else self.teacher.model

    def model_specs(self) -> list[tuple[str, ModelSpec]]:
        """(YAML path, model spec) of every model the job builds from the spec."""
        found = [("student.model", self.student.model)]
        if self.teacher_model is not None:
            found.insert(0, ("teacher.model", self.teacher_model))
        return found

