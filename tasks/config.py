"""One typed object describes a run; DAG params, CLI flags and the trainer pod all build it.

``RunConfig`` holds what a user chooses per run (the trigger form). ``Settings`` holds what a
deployment fixes (artifact root, execution backend, connections), read from the environment or
Airflow Variables. Both validate on construction and fail with one line naming the bad field.
"""

from __future__ import annotations

import math
import re
from functools import cache
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from tasks.errors import PersoncarError

CONFIG_DIR = Path(__file__).with_name("configs")
PRODUCTION_SOURCE = "s3://evp-ml-data/ml-interview/openimages-personcar/trainval.tar.gz"
DEFAULT_MODEL = "ssd_resnet152_v1_fpn_640x640"
MAX_LEVEL_STRIDE = 128  # FPN level 7: the input side must be a multiple of 2**7
CLASSES = {1: "person", 2: "car"}
START_PRETRAINED, START_SCRATCH = "pretrained", "scratch"

# 50/101/152 are the zoo's SSD backbones; 26 (ResNet V1) and 18/34 (Model Garden's ResNet) exist for fast
# CPU smoke runs and learning checks. Which depths a model takes depends on its backbone type.
Backbone = Literal["resnet18", "resnet26", "resnet34", "resnet50", "resnet101", "resnet152"]
DEPTHS = {"resnet_v1": (26, 50, 101, 152), "resnet": (18, 34, 50, 101, 152, 200)}  # by backbone type


def available_models() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@cache
def load_model_config(name: str) -> dict[str, Any]:
    """The model's YAML with its ``base`` chain resolved: {zoo_name, experiment, defaults, override}."""
    path = CONFIG_DIR / f"{name}.yaml"
    if not path.is_file():
        raise PersoncarError(f"unknown model {name!r}: expected one of {', '.join(available_models())}")
    doc = yaml.safe_load(path.read_text()) or {}
    base = doc.pop("base", None)
    return _merge(load_model_config(base), doc) if base else doc


class RunConfig(BaseModel):
    """What one run trains and how; every field is a DAG param and a CLI flag."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dataset_source: str = Field(
        default=PRODUCTION_SOURCE, min_length=1, title="Dataset archive",
        description="trainval.tar.gz to download: s3://bucket/key, https://..., file://... or a path.",
        json_schema_extra={"section": "Data"})
    dataset_sha256: str | None = Field(
        default=None, pattern="^[0-9a-fA-F]{64}$", title="Archive sha256",
        description="Expected sha256 of the archive; the run fails when it differs.",
        json_schema_extra={"section": "Data"})
    max_quarantine_fraction: float = Field(
        default=0.01, ge=0.0, le=1.0, title="Max quarantined boxes",
        description="Fail validation when more than this fraction of boxes is quarantined (zero-size, out of "
                    "image, duplicates, EXIF-rotated images).", json_schema_extra={"section": "Data"})
    val_fraction: float = Field(
        default=0.1, ge=0.0, le=1.0, title="Validation fraction",
        description="Share of images held out for evaluation (stable hash of the file name).",
        json_schema_extra={"section": "Data"})
    num_shards: int | None = Field(
        default=None, ge=1, le=1024, title="Shards per split",
        description="TFRecord shards per split; empty: ~150 MB a shard.", json_schema_extra={"section": "Data"})
    model: str = Field(
        default=DEFAULT_MODEL, title="Model",
        description="Detector config: the TF2 zoo's SSD ResNet V1 FPN (built from TF Model Garden components), "
                    "Model Garden's own RetinaNet-50, or the tiny ResNet-26 variant for CPU smoke runs.",
        json_schema_extra={"section": "Training", "enum": available_models()})
    backbone: Backbone | None = Field(
        default=None, title="Backbone override", description="ResNet depth; empty: the model's own.",
        json_schema_extra={"section": "Training", "values_display": {
            "null": "the model's own", "resnet18": "ResNet-18 (Model Garden ResNet only)",
            "resnet26": "ResNet-26 (ResNet V1 only; CPU smoke runs)", "resnet34": "ResNet-34 (Model Garden ResNet only)",
            "resnet50": "ResNet-50", "resnet101": "ResNet-101", "resnet152": "ResNet-152"}})
    init_checkpoint: str = Field(
        default=START_PRETRAINED, min_length=1, title="Start from",
        description="pretrained: the model's published COCO checkpoint (the TF2 zoo's, converted); scratch; or a "
                    "checkpoint path, s3://, gs:// or https:// (.tar.gz unpacked).",
        json_schema_extra={"section": "Training"})
    init_checkpoint_modules: Literal["backbone", "backbone,decoder", "all"] | None = Field(
        default=None, title="Load from it", description="Which parts of the start checkpoint to load.",
        json_schema_extra={"section": "Training", "values_display": {
            "null": "all it holds", "backbone": "backbone", "backbone,decoder": "backbone and FPN",
            "all": "the whole detector"}})
    warm_start: Literal["promoted", "none"] = Field(
        default="promoted", title="Continue from",
        description="promoted: fine-tune the model the quality gate last promoted (same model config); a new "
                    "week of data costs a fine-tune, not a full training.",
        json_schema_extra={"section": "Training", "values_display": {
            "promoted": "the last promoted model", "none": "no (use Start from)"}})
    epochs: float | None = Field(
        default=None, gt=0, le=10_000, title="Epochs",
        description="Passes over the training images; empty: the model's (24 for fine-tuning).",
        json_schema_extra={"section": "Training"})
    steps: int | None = Field(
        default=None, ge=1, le=1_000_000, title="Training steps",
        description="Overrides epochs; empty: epochs x training images / global batch.",
        json_schema_extra={"section": "Training"})
    batch_size: int | None = Field(
        default=None, ge=1, le=1024, title="Batch size per GPU",
        description="Images per GPU (8 fits 24 GB at 640 px); the global batch is this x GPUs and the learning "
                    "rate scales with it.", json_schema_extra={"section": "Training"})
    image_size: int | None = Field(
        default=None, ge=128, le=1536, multiple_of=MAX_LEVEL_STRIDE, title="Image size",
        description="Square input side in pixels; empty: 640.", json_schema_extra={"section": "Training"})
    learning_rate: float | None = Field(
        default=None, gt=0, le=10, title="Learning rate",
        description="Peak (base) learning rate; empty: 0.04 x global batch / 64.",
        json_schema_extra={"section": "Training"})
    validate_every: int | None = Field(
        default=None, ge=0, le=1_000_000, title="Validate every",
        description="Steps between COCO evaluations of the val split (the best checkpoint is exported); 0: never; "
                    "empty: every 2 epochs.", json_schema_extra={"section": "Training"})
    augment: bool = Field(
        default=True, title="Augmentation",
        description="Random horizontal flip and 0.8-1.2x scale jitter of training images; off to check that the "
                    "model can memorise its training set.", json_schema_extra={"section": "Training"})
    seed: int = Field(default=42, ge=0, title="Seed", json_schema_extra={"section": "Training"})
    publish_dest: str | None = Field(
        default=None, title="Publish to", description="s3://bucket/prefix or file://...; empty: <artifact root>/published.",
        json_schema_extra={"section": "Report"})
    promotion_margin: float = Field(
        default=0.0, ge=0.0, le=1.0, title="Promotion margin",
        description="Promote only when mAP@.50IOU beats the last promoted run by more than this.",
        json_schema_extra={"section": "Report"})

    @field_validator("dataset_sha256", mode="before")
    @classmethod
    def _sha(cls, v: str | None) -> str | None:
        if v in (None, ""):
            return None
        v = v.strip().lower()
        if not re.fullmatch(r"[0-9a-f]{64}", v):
            raise ValueError("must be 64 hexadecimal characters")
        return v

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        if v not in available_models():
            raise ValueError(f"unknown model {v!r}; expected one of {', '.join(available_models())}")
        return v

    @field_validator("image_size", mode="before")
    @classmethod
    def _size(cls, v: Any) -> Any:
        if isinstance(v, int) and v % MAX_LEVEL_STRIDE:
            raise ValueError(f"must be a multiple of {MAX_LEVEL_STRIDE} (FPN level 7)")
        return v

    @field_validator("publish_dest")
    @classmethod
    def _blank_is_none(cls, v: str | None) -> str | None:
        return v or None

    @field_validator("init_checkpoint", mode="before")
    @classmethod
    def _start(cls, v: Any) -> Any:
        if v is None or (isinstance(v, str) and v.strip().lower() in ("", START_PRETRAINED)):
            return START_PRETRAINED
        if isinstance(v, str) and v.strip().lower() in (START_SCRATCH, "none"):
            return START_SCRATCH
        return v.strip() if isinstance(v, str) else v

    @model_validator(mode="after")
    def _source(self) -> RunConfig:
        if not self.dataset_source.strip():
            raise ValueError("dataset_source: must not be empty")
        return self

    @model_validator(mode="after")
    def _backbone_depth(self) -> RunConfig:
        """A backbone override must be a depth the model's backbone type comes in (known before any work)."""
        kind = self.backbone_type() if self.backbone else None
        if kind in DEPTHS and int(self.backbone.removeprefix("resnet")) not in DEPTHS[kind]:
            raise ValueError(f"backbone: {self.model}'s {kind} backbone comes in depths "
                             f"{', '.join(map(str, DEPTHS[kind]))}, not {self.backbone}")
        return self

    def backbone_type(self) -> str:
        """The model's backbone type: ``resnet_v1`` (the zoo's SSD) or ``resnet`` (Model Garden's)."""
        model = load_model_config(self.model).get("override", {}).get("task", {}).get("model", {})
        return str(model.get("backbone", {}).get("type", ""))

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> RunConfig:
        """Build from DAG params / CLI options; unknown keys and bad values give one clear line."""
        known = {k: v for k, v in params.items() if v is not None}  # None: use the default
        try:
            return cls(**known)
        except ValidationError as exc:
            raise PersoncarError(format_validation_error(exc)) from exc

    # -- resolved training settings ---------------------------------------------------------
    def model_defaults(self) -> dict[str, Any]:
        return dict(load_model_config(self.model).get("defaults", {}))

    def resolved(self, *, train_images: int | None = None, gpus: int = 0) -> dict[str, Any]:
        """Training hyper-parameters after applying the model's defaults.

        The global batch is ``batch_size`` (per replica) x replicas (the GPUs, or 1 on CPU). With
        ``train_images`` known, an epoch-based schedule (``epochs``, the model's ``epochs``) becomes
        steps: ceil(epochs x train images / global batch); an explicit ``steps`` always wins.
        """
        d = self.model_defaults()
        replicas = max(1, gpus)
        per_replica = self.batch_size or d["batch_size"]
        global_batch = per_replica * replicas
        steps_per_epoch = math.ceil(train_images / global_batch) if train_images else None
        epochs = self.epochs if self.epochs is not None else d.get("epochs")
        if self.steps:
            steps = self.steps
        elif epochs and steps_per_epoch:
            steps = max(1, math.ceil(epochs * steps_per_epoch))
        else:
            steps = d["steps"]
        if steps_per_epoch and not self.steps and epochs and d.get("warmup_epochs"):
            warmup = min(math.ceil(d["warmup_epochs"] * steps_per_epoch), steps // 10)
        else:
            warmup = min(d["warmup_steps"], steps // 10)
        epochs = steps / steps_per_epoch if steps_per_epoch else (epochs if not self.steps else None)
        if self.validate_every is not None:
            validate_every = self.validate_every
        elif d.get("validate_every_epochs") and steps_per_epoch:
            validate_every = max(1, math.ceil(d["validate_every_epochs"] * steps_per_epoch))
        else:
            validate_every = 0
        # linear scaling rule: the zoo's LR is for its batch size
        reference = d.get("reference_batch_size", d["batch_size"])
        lr = self.learning_rate or d["learning_rate"] * global_batch / reference
        return {
            "model": self.model,
            "backbone": self.backbone,
            "steps": steps,
            "epochs": round(epochs, 3) if epochs else None,
            "steps_per_epoch": steps_per_epoch,
            "train_images": train_images,
            "batch_size": per_replica,
            "replicas": replicas,
            "global_batch_size": global_batch,
            "image_size": self.image_size or d["image_size"],
            "learning_rate": lr,
            # keep the zoo's warmup start as the same fraction of the peak LR
            "warmup_learning_rate": lr * d["warmup_learning_rate"] / d["learning_rate"],
            "warmup_steps": warmup,
            "validate_every": min(validate_every, steps) if validate_every else 0,
            "init_checkpoint": self.init_checkpoint,
            "init_checkpoint_modules": self.init_checkpoint_modules,
            "warm_start": self.warm_start,
            "augment": self.augment,
            "seed": self.seed,
        }


def format_validation_error(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown parameter"
        if not err["loc"]:  # a rule across fields: its message names them, the input is the whole config
            parts.append(msg)
            continue
        parts.append(f"{'.'.join(str(p) for p in err['loc'])}: {msg} (got {err.get('input')!r})")
    return "invalid run configuration: " + "; ".join(parts)


class AirflowVariables(PydanticBaseSettingsSource):
    """Airflow Variables ``personcar_<field>`` as a settings source (inside a task; nothing elsewhere)."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ reads all variables at once

    def __call__(self) -> dict[str, Any]:
        try:
            from airflow.sdk import Variable
        except ImportError:
            return {}
        out = {}
        for name in self.settings_cls.model_fields:
            try:
                value = Variable.get(f"personcar_{name}", default=None)
            except Exception:  # no Airflow context (the CLI, a trainer pod, unit tests): no Variables
                return {}
            if value:
                out[name] = value
        return out


class Settings(BaseSettings):
    """Deployment settings: ``PERSONCAR_*`` environment variables, overridden by Airflow Variables
    ``personcar_<field>`` inside Airflow tasks, overridden by explicit arguments."""

    model_config = SettingsConfigDict(env_prefix="PERSONCAR_", env_ignore_empty=True, extra="ignore", frozen=True)

    artifact_root: str = Field(default_factory=lambda: str(Path.home() / "personcar-artifacts"))
    execution_backend: Literal["local", "kubernetes"] = "local"
    aws_conn_id: str = "aws_default"
    s3_endpoint_url: str | None = None

    @property
    def backend(self) -> str:
        return self.execution_backend

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: Any, env_settings: Any,
                                   dotenv_settings: Any, file_secret_settings: Any) -> tuple[Any, ...]:
        return init_settings, AirflowVariables(settings_cls), env_settings

    @classmethod
    def load(cls, **overrides: Any) -> Settings:
        """The settings, or one line naming the bad one."""
        try:
            return cls(**{k: v for k, v in overrides.items() if v not in (None, "")})
        except ValidationError as exc:
            raise PersoncarError(format_validation_error(exc).replace("run configuration", "settings")) from exc

    @classmethod
    def env_names(cls) -> dict[str, str]:
        """Field -> the environment variable that sets it."""
        return {name: f"{cls.model_config['env_prefix']}{name.upper()}" for name in cls.model_fields}

    @classmethod
    def from_environ(cls, environ: dict[str, str]) -> Settings:
        """The settings a process with this environment gets (deployment checks of Helm values)."""
        return cls.load(**{k: environ.get(v) for k, v in cls.env_names().items()})

    def default_publish_dest(self) -> str:
        root = self.artifact_root.rstrip("/")
        return f"{root}/published"
