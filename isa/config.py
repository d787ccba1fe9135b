"""Configuration: frozen dataclasses, YAML loading and dotted ``key=value`` overrides.

Every stage reads one :class:`Config`. A YAML file holds any subset of the sections below; command-line
overrides such as ``train.lr=1e-4`` or ``teacher.pretrained=none`` are applied on top. Unknown sections or
keys and values of the wrong type fail at once with a :class:`ConfigError` that names the key and the
valid choices, before any work starts.

Builders elsewhere turn these sections into plain constructor arguments: no model class receives a
config object.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from isa import names
from isa.errors import IsaError


class ConfigError(IsaError):
    """A configuration value or key is invalid; the message names the key and what is allowed."""


def _require(condition: bool, key: str, rule: str) -> None:
    if not condition:
        raise ConfigError(f"config key '{key}' {rule}")


def looks_like_tag(weights: str) -> bool:
    """Whether a ``teacher.pretrained`` value is a pretrained tag rather than a weights file (a path or URI)."""
    return not ("/" in weights or "\\" in weights or "." in weights or Path(weights).exists())


NO_WEIGHTS = frozenset({"", "none", "null", "random"})  # teacher.pretrained values that mean random init


@dataclass(frozen=True)
class TeacherConfig:
    """The frozen open_clip teacher (docs/method.md §2)."""

    name: str = "ViT-L-14"  # open_clip model name, as in open_clip.list_models()
    pretrained: str = "openai"  # open_clip pretrained tag, a local weights file, or "none" (random init)
    cache_dir: str | None = None  # where open_clip keeps downloaded weights (None: its default)

    def __post_init__(self) -> None:
        if self.name.startswith(names.SCHEMA_PREFIXES):
            return  # hf-hub:ORG/REPO or local-dir:PATH, resolved by open_clip when the model is loaded
        model = names.teacher_model_config(self.name)
        if model is None:
            raise ConfigError(
                f"config key 'teacher.name': {self.name!r} is not an open_clip model or a project model config"
                f"{names.close_matches(self.name, names.teacher_names())}; see open_clip.list_models() and "
                "isa/model_configs, or name hf-hub:ORG/REPO or local-dir:PATH"
            )
        text_tower = model.get("text_cfg", {}).get("hf_model_name")
        if text_tower:
            raise ConfigError(
                f"config key 'teacher.name': {self.name!r} has a Hugging Face text tower ({text_tower}), which is "
                "not supported: the image sentence goes into open_clip's own text transformer; choose another model"
            )
        weights = self.pretrained
        if names.is_project_config(self.name) and weights.lower() not in NO_WEIGHTS and looks_like_tag(weights):
            raise ConfigError(
                f"config key 'teacher.pretrained': {weights!r}: {self.name} is a project model config without "
                "pretrained tags; use teacher.pretrained=none (random init) or a weights file"
            )


@dataclass(frozen=True)
class StudentConfig:
    """The light query-side image encoder (docs/method.md §2)."""

    backbone: str = "efficientnet_b0"  # student registry name: a timm backbone, or "symmetric"
    mapper: Literal["atl", "mlp"] = "atl"  # adaptive token learner or Pic2Word-style MLP mapper
    pretrained: bool = False  # load timm ImageNet weights for the backbone (needs them downloaded)
    image_size: int = 224  # student input resolution (square)

    def __post_init__(self) -> None:
        known = names.student_names()
        if self.backbone not in known:
            raise ConfigError(
                f"config key 'student.backbone': {self.backbone!r} is not a registered student; "
                f"choose one of: {', '.join(known)}"
            )
        _require(
            self.backbone != names.SYMMETRIC or self.mapper == "atl",
            "student.mapper",
            f"must be 'atl' with student.backbone={names.SYMMETRIC} (the symmetric student has no MLP mapper)",
        )
        _require(self.image_size >= 1, "student.image_size", "must be >= 1")


@dataclass(frozen=True)
class TokenLearnerConfig:
    """The adaptive token learner (docs/method.md §2.1)."""

    num_tokens: int = 4  # M, words in the image sentence (the MLP mapper always makes 1)
    dim: int = 512  # d, internal width
    depth: int = 2  # L, refinement blocks
    heads: int = 8  # attention heads in the refinement blocks
    dropout: float = 0.1  # dropout in the refinement blocks

    def __post_init__(self) -> None:
        _require(self.num_tokens >= 1, "token_learner.num_tokens", "must be >= 1")
        _require(self.dim % self.heads == 0, "token_learner.dim", f"must be divisible by heads ({self.heads})")
        _require(0 <= self.dropout < 1, "token_learner.dropout", "must be in [0, 1)")


@dataclass(frozen=True)
class PromptConfig:
    """Prompt composition (docs/method.md §3)."""

    placeholder: str = "*"  # a word the teacher's tokenizer maps to exactly one token
    train_template: str = "a photo of {S}"  # {S}: the image sentence
    query_template: str = "a photo of {S} that {c}"  # {c}: the user's modifier text
    fashioniq_template: str = "a photo of {S} that {c1} and {c2}"  # both caption orders are averaged
    short_context: bool = True  # run only the positions a causal text tower needs


@dataclass(frozen=True)
class LossConfig:
    """Training objective (docs/method.md §4)."""

    lar_weight: float = 0.3  # lambda, local alignment regularization
    rel_weight: float = 0.0  # beta, relational KL term
    word_weight: float = 0.0  # gamma, word-manifold term
    init_temperature: float = 0.07  # initial GCD temperature tau
    learn_temperature: bool = True  # tau is a learnable parameter
    min_temperature: float = 0.01  # tau is clamped to [min, max]
    max_temperature: float = 1.0
    lar_temperature: float = 0.07  # fixed temperature of the LAR InfoNCE
    lar_tokens_per_image: int = 1  # tokens per image drawn for LAR at each step, 1..M
    rel_teacher_temperature: float = 0.07  # tau_t of the teacher's similarity distribution

    def __post_init__(self) -> None:
        for key in ("init_temperature", "min_temperature", "lar_temperature", "rel_teacher_temperature"):
            _require(getattr(self, key) > 0, f"loss.{key}", "must be > 0")
        _require(
            self.min_temperature <= self.init_temperature <= self.max_temperature,
            "loss.init_temperature",
            "must lie in [loss.min_temperature, loss.max_temperature]",
        )
        _require(self.lar_tokens_per_image >= 1, "loss.lar_tokens_per_image", "must be >= 1")
        for key in ("lar_weight", "rel_weight", "word_weight"):
            _require(getattr(self, key) >= 0, f"loss.{key}", "must be >= 0")


@dataclass(frozen=True)
class CacheConfig:
    """The teacher-embedding cache written by ``isa embed`` (docs/cache.md)."""

    image_size: int = 256  # short side of the student-ready JPEG kept in the cache
    store_images: bool = True  # False: gallery-only cache without the image column
    local_grid: int = 4  # g of the LAR g x g local grid; 0 = no local features
    dtype: Literal["float16", "float32"] = "float16"  # embedding storage type
    # the image tower's weights: float32 (under bf16 autocast on a GPU) or bfloat16 (weights and activations:
    # the tower's fastest setting on a GPU, its embeddings further from the float32 model's)
    tower_dtype: Literal["float32", "bfloat16"] = "float32"
    batch_size: int = 256  # images per teacher forward
    # where the tower runs: "actors" (a pool of num_actors), "driver" (the isa embed process itself, all its cores:
    # no actor to start, the model built once) or "auto": the driver when the Ray cluster is one node, the
    # driver's, and the tower runs on its CPU (a laptop or one box), actors otherwise
    tower_in: Literal["auto", "driver", "actors"] = "auto"
    # how a run executes: "ray" (Ray Data, on the cluster joined or a local instance), "local" (this process and
    # decode helpers, no Ray: a local folder or .txt list into a local cache, the tower on this machine's CPU) or
    # "auto": local when nothing calls for Ray (no cluster or instance joined, no GPU, a cache of at most
    # ledger_rows rows), ray otherwise; both write the same cache
    runner: Literal["auto", "ray", "local"] = "auto"
    num_actors: int = 1  # teacher actors in the pool
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: one GPU per actor when the cluster has GPUs
    actor_cpus: float = 1.0  # logical CPUs reserved per teacher actor (torch threads: rounded up)
    decode_cpus: float = 1.0  # logical CPUs reserved per decode task (below 1 packs more tasks per core)
    decode_batch_size: int = 64  # images per decode call; each call's crops go on to the tower as one block
    rows_per_shard: int = 2048  # rows per Parquet shard
    fast_decode: bool = False  # reduced-size JPEG decoding (DCT scaling); pixels differ slightly
    max_image_pixels: int = 89_478_485  # larger images are rejected as decompression bombs
    # the longest one input may take to be read and decoded; longer (a read that never ends: a hung network mount,
    # a FIFO nobody writes) and it is rejected, the run going on
    input_timeout_s: float = 300.0
    jpeg_quality: int = 90  # quality of the cached student JPEG
    input_format: Literal["auto", "folder", "list", "tar", "parquet"] = "auto"  # how to read the input URI
    bytes_column: str = "image"  # Parquet input: column with the image bytes
    uri_column: str = "uri"  # Parquet or CSV list input: column naming each image
    # rows of the cache (URIs and content ids) per ledger shard, the actors that tell new inputs from those the
    # cache accounts for: a run starts one per this many rows, so no process grows with the cache (2M rows: ~240 MB)
    ledger_rows: int = 2_000_000

    def __post_init__(self) -> None:
        _require(self.local_grid >= 0, "cache.local_grid", "must be >= 0 (0 = no local features)")
        for key in (
            "image_size",
            "batch_size",
            "num_actors",
            "decode_batch_size",
            "rows_per_shard",
            "max_image_pixels",
            "ledger_rows",
        ):
            _require(getattr(self, key) >= 1, f"cache.{key}", "must be >= 1")
        _require(1 <= self.jpeg_quality <= 100, "cache.jpeg_quality", "must be in [1, 100]")
        _require(self.actor_cpus > 0 and self.decode_cpus > 0, "cache.actor_cpus", "and cache.decode_cpus must be > 0")
        _require(self.input_timeout_s > 0, "cache.input_timeout_s", "must be > 0")


@dataclass(frozen=True)
class TrainConfig:
    """Distillation run (docs/method.md §4 recipe)."""

    cache: str = ""  # teacher cache URI (local path or fsspec URI)
    output: str = "isa-output/train"  # run directory URI
    global_batch_size: int = 512  # across all workers
    epochs: int = 10  # passes over the training split
    max_steps: int = 0  # stop after this many steps; 0 = derive from epochs
    lr: float = 3e-4  # token learner / heads
    backbone_lr: float = 1e-4  # pretrained backbone (random init uses lr)
    weight_decay: float = 0.05
    warmup_fraction: float = 0.05  # of the total steps, linear warm-up before cosine decay
    grad_clip: float = 1.0  # max gradient norm; 0 = off
    num_workers: int = 1  # Ray Train workers
    use_gpu: bool = False  # one GPU per worker
    worker_cpus: float = 1.0  # logical CPUs reserved per worker (the data tasks need at least one more)
    torch_threads: int = 0  # CPU training: torch threads per worker; 0 = Ray's default (the worker's CPUs)
    checkpoint_every: int = 500  # steps
    log_every: int = 10  # steps between metric records (MLflow) and printed step lines
    num_to_keep: int = 3  # checkpoints kept
    max_failures: int = 3  # worker-failure restarts
    seed: int = 0
    val_fraction: float = 0.05  # held out by id hash
    val_images: int = 1000  # held-out images used for the validation metrics (kept in memory on rank 0)
    crop_scale_min: float = 0.6  # random resized crop scale range (min, 1)
    hflip: bool = True  # random horizontal flip
    tracking_uri: str | None = None  # MLflow; None = MLFLOW_TRACKING_URI, else mlflow.db in the output's parent folder
    experiment: str = "isa"  # MLflow experiment name
    tracking_wait_s: float = 60.0  # at the end, the longest wait for MLflow to take the run's records (then kept)
    register_model: str | None = None  # register the final checkpoint under this MLflow model name
    model_alias: str = "candidate"  # alias given to the registered version ("latest" is MLflow's own)

    def __post_init__(self) -> None:
        for key in ("global_batch_size", "num_workers", "checkpoint_every", "log_every", "num_to_keep"):
            _require(getattr(self, key) >= 1, f"train.{key}", "must be >= 1")
        _require(0 <= self.val_fraction < 1, "train.val_fraction", "must be in [0, 1)")
        _require(0 <= self.warmup_fraction < 1, "train.warmup_fraction", "must be in [0, 1)")
        _require(0 < self.crop_scale_min <= 1, "train.crop_scale_min", "must be in (0, 1]")
        _require(self.torch_threads >= 0, "train.torch_threads", "must be >= 0 (0 = the worker's CPUs)")
        _require(self.tracking_wait_s >= 0, "train.tracking_wait_s", "must be >= 0")


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation (docs/method.md §5)."""

    benchmark: Literal["cirr", "fashioniq", "circo", "images"] = "cirr"
    dataset_root: str = ""  # dataset root URI in the official layout
    split: str = "val"  # dataset split
    checkpoints: tuple[str, ...] = ()  # student checkpoints (ISA, MLP, symmetric ...); empty = baselines only
    baselines: bool = True  # also rank with teacher text only, image only, image + text
    gallery_cache: str | None = None  # gallery cache to create or reuse; None = OUTPUT/gallery-BENCHMARK-SPLIT
    output: str = "isa-output/eval"  # where metrics.json, report.html and submission files go
    batch_size: int = 256  # queries per forward
    report_queries: int = 8  # sample queries shown in report.html
    latency_runs: int = 20  # batch-1 CPU forwards timed per model for the cost table (0 = skip the cost table)
    latency_threads: int = 2  # CPU threads while the cost table is timed (fixed, so tables compare)
    distractors: str | None = None  # cache of distractor images for gallery scaling
    distractor_counts: tuple[int, ...] = ()  # e.g. 1000,10000
    tracking_uri: str | None = None  # MLflow; None = MLFLOW_TRACKING_URI, else the checkpoint's training store or OUT
    run_id: str | None = None  # log into this MLflow run (e.g. the training run); None = a new run
    experiment: str = "isa-eval"  # MLflow experiment of new runs
    tracking_wait_s: float = 60.0  # at the end, the longest wait for MLflow to take the records (then kept)

    def __post_init__(self) -> None:
        _require(self.batch_size >= 1, "eval.batch_size", "must be >= 1")
        _require(
            self.report_queries >= 0 and self.latency_runs >= 0, "eval.report_queries", "and latency_runs must be >= 0"
        )
        _require(self.latency_threads >= 1, "eval.latency_threads", "must be >= 1")
        _require(self.tracking_wait_s >= 0, "eval.tracking_wait_s", "must be >= 0")
        _require(all(n >= 1 for n in self.distractor_counts), "eval.distractor_counts", "must be >= 1 each")
        _require(
            not self.distractor_counts or bool(self.distractors), "eval.distractors", "is needed with distractor_counts"
        )


@dataclass(frozen=True)
class TuneConfig:
    """Sweeps (``isa tune``) and ablation suites (``isa ablate``): Ray Tune over the train stage (docs/method.md §6)."""

    metric: str = "val_image_R1"  # what a sweep optimizes: a metric the train stage reports at each checkpoint
    mode: Literal["max", "min"] = "max"  # whether a higher or a lower metric is better
    num_samples: int = 1  # samples drawn from the space (search=grid: repeats of the whole grid)
    search: Literal["grid", "random", "optuna"] = "grid"  # grid: every {grid: [...]} value; random/optuna: sample all
    scheduler: Literal["asha", "none"] = "asha"  # ASHA early stopping on the metric, or every trial to its end
    max_t: int = 100  # ASHA: reports (one per train.checkpoint_every steps) its rungs span; trials end on their own
    grace_period: int = 1  # ASHA: reports a trial makes before it can be stopped
    reduction_factor: float = 2.0  # ASHA: the best 1/reduction_factor of the trials at a rung go on
    cpus_per_trial: float | None = None  # CPUs of one trial's training workers; None: num_workers x worker_cpus
    gpus_per_trial: int | None = None  # GPUs of one trial, one per worker (sets train.num_workers); None: train.*
    max_concurrent_trials: int = 0  # trials running at once; 0: as many as the cluster's CPUs and GPUs hold
    storage: str = "isa-output/tune"  # folder (local path or fsspec URI) that holds the sweep folders
    name: str = ""  # sweep folder under storage; "": "sweep" for isa tune, "ablation-SUITE" for isa ablate
    seed: int = 0  # seed of the random and Optuna searchers

    def __post_init__(self) -> None:
        for key in ("num_samples", "max_t", "grace_period"):
            _require(getattr(self, key) >= 1, f"tune.{key}", "must be >= 1")
        _require(self.grace_period <= self.max_t, "tune.grace_period", f"must be <= tune.max_t ({self.max_t})")
        _require(self.reduction_factor > 1, "tune.reduction_factor", "must be > 1")
        _require(self.cpus_per_trial is None or self.cpus_per_trial > 0, "tune.cpus_per_trial", "must be > 0")
        _require(self.gpus_per_trial is None or self.gpus_per_trial >= 0, "tune.gpus_per_trial", "must be >= 0")
        _require(self.max_concurrent_trials >= 0, "tune.max_concurrent_trials", "must be >= 0 (0 = automatic)")
        _require("/" not in self.name and self.name not in (".", ".."), "tune.name", "must be a plain folder name")


@dataclass(frozen=True)
class Config:
    """Everything a stage needs; each section is a frozen dataclass."""

    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    token_learner: TokenLearnerConfig = field(default_factory=TokenLearnerConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_NONE = {"none", "null", "~"}


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert ``value`` (from YAML or a command-line string) to type ``tp`` or raise ConfigError."""
    origin = typing.get_origin(tp)
    from_text = isinstance(value, str)
    bad = ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if type(None) in options and (value is None or (from_text and value.lower() in _NONE)):
            return None
        for option in (o for o in options if o is not type(None)):
            try:
                return _coerce(key, value, option)
            except ConfigError:
                pass
        raise bad
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"config key '{key}': {value!r} is not valid; choose one of {list(choices)}")
        return value
    if origin is tuple:
        items = [v for v in value.split(",") if v.strip()] if from_text else value
        if not isinstance(items, Sequence) or isinstance(items, str):
            raise bad
        return tuple(_coerce(key, item, typing.get_args(tp)[0]) for item in items)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if from_text and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise bad
    if tp in (int, float):
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int) or (tp is float and isinstance(value, float)):
            return tp(value)
        if from_text:
            try:
                return int(value.strip()) if tp is int else float(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    raise TypeError(f"unsupported config field type {tp!r} for '{key}'")


def _section_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


# keys no longer used that saved configs (checkpoints, run folders) may still hold: read and ignored, so those
# configs load
RETIRED_KEYS = frozenset({"prompt.domain_template"})


def _build_section(name: str, cls: type, values: Mapping[str, Any], base: Any) -> Any:
    hints = _section_types(cls)
    changes = {}
    for key, value in values.items():
        if f"{name}.{key}" in RETIRED_KEYS:
            continue
        if key not in hints:
            raise ConfigError(f"unknown config key '{name}.{key}'; valid keys of '{name}': {sorted(hints)}")
        changes[key] = _coerce(f"{name}.{key}", value, hints[key])
    return dataclasses.replace(base, **changes)


def from_dict(data: Mapping[str, Any] | None, base: Config | None = None) -> Config:
    """Build a Config from nested mappings ``{section: {key: value}}`` on top of ``base`` (or defaults)."""
    config = base or Config()
    sections = _section_types(Config)
    for name, values in (data or {}).items():
        if name not in sections:
            raise ConfigError(f"unknown config section '{name}'; valid sections: {sorted(sections)}")
        if values is None:
            continue
        if not isinstance(values, Mapping):
            raise ConfigError(f"config section '{name}' must be a mapping of keys, got {values!r}")
        section = _build_section(name, sections[name], values, getattr(config, name))
        config = dataclasses.replace(config, **{name: section})
    return config


def parse_overrides(overrides: Sequence[str]) -> dict[str, dict[str, str]]:
    """Turn ``["train.lr=1e-4", ...]`` into ``{"train": {"lr": "1e-4"}}``; values stay text."""
    nested: dict[str, dict[str, str]] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not section or not name:
            raise ConfigError(f"override {item!r} is not of the form section.key=value (e.g. train.lr=1e-4)")
        nested.setdefault(section, {})[name] = value
    return nested


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Load a YAML file (optional) and apply dotted ``key=value`` overrides.

    Args:
        path: YAML file with any subset of the sections; None for the defaults.
        overrides: strings such as ``"train.lr=1e-4"``; applied after the file.

    Raises:
        ConfigError: unknown section or key, a value of the wrong type, a malformed override or file.
    """
    data = dict(_read_file(path) or {})
    for section, values in parse_overrides(overrides).items():  # on the file's, then checked together: a file's
        if isinstance(data.get(section) or {}, Mapping):  # value may only hold with an override's beside it
            data[section] = {**(data.get(section) or {}), **values}
    return from_dict(data)


def given_keys(path: str | Path | None = None, overrides: Sequence[str] = ()) -> frozenset[str]:
    """The dotted keys (``"teacher.name"``, ...) that a config file and overrides set, whatever their values.

    What the user chose, as against the defaults: a stage that can take a setting from saved work (the teacher
    of a cache or checkpoint) takes it only where the user gave none. Call it after :func:`load_config`, which
    refuses a bad file or override first.
    """
    keys = set()
    for data in (_read_file(path), parse_overrides(overrides)):
        for section, values in (data or {}).items():
            keys.update(f"{section}.{key}" for key in (values or {}))
    return frozenset(keys)


def _read_file(path: str | Path | None) -> Mapping[str, Any] | None:
    """A YAML config file's sections (None: no file, or an empty one)."""
    if path is None:
        return None
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path} is not valid YAML: {error}") from None
    if data is not None and not isinstance(data, Mapping):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def to_dict(config: Config) -> dict[str, dict[str, Any]]:
    """Nested plain-Python form (tuples become lists): for JSON files and checkpoints."""
    return {
        name: {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(section).items()}
        for name, section in ((f.name, getattr(config, f.name)) for f in dataclasses.fields(config))
    }


def saved_dict(config: Config) -> dict[str, dict[str, Any]]:
    """:func:`to_dict` as files, checkpoints and records keep it: the secret of any URI in it hidden
    (:func:`isa.storage.redact_uri`)."""
    from isa.storage import redact_strings

    return redact_strings(to_dict(config))


def flatten(config: Config) -> dict[str, Any]:
    """``{"train.lr": 3e-4, ...}``: the flattened resolved config, e.g. for MLflow parameters (as
    :func:`saved_dict`, so it compares with a saved config)."""
    saved = saved_dict(config)
    return {f"{section}.{key}": value for section, values in saved.items() for key, value in values.items()}
