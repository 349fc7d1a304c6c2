"""One typed object describes a run; DAG params, CLI flags and the trainer pod all build it.

``RunConfig`` holds what a user chooses per run (the trigger form). ``Settings`` holds what a
deployment fixes (artifact root, execution backend, connections), read from the environment or
Airflow Variables. Both validate on construction and fail with one line naming the bad field.
"""

from __future__ import annotations

import math
import os
import re
from functools import cache
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tasks.errors import PersoncarError

CONFIG_DIR = Path(__file__).with_name("configs")
PRODUCTION_SOURCE = "s3://evp-ml-data/ml-interview/openimages-personcar/trainval.tar.gz"
DEFAULT_MODEL = "ssd_resnet152_v1_fpn_640x640"
# 50/101/152 are the zoo's SSD backbones; 26 (ResNet V1) and 18/34 (Model Garden's ResNet) exist for fast
# CPU smoke runs and learning checks. Which depths a model takes depends on its backbone type.
BACKBONES = ("resnet18", "resnet26", "resnet34", "resnet50", "resnet101", "resnet152")
MAX_LEVEL_STRIDE = 128  # FPN level 7: the input side must be a multiple of 2**7
CLASSES = {1: "person", 2: "car"}
START_PRETRAINED, START_SCRATCH = "pretrained", "scratch"
MODULE_SETS = ("backbone", "backbone,decoder", "all")

Backbone = Literal["resnet18", "resnet26", "resnet34", "resnet50", "resnet101", "resnet152"]


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
        default=PRODUCTION_SOURCE,
        description="Archive to download: s3://bucket/key, https://..., file://... or a local path.",
    )
    dataset_sha256: str | None = Field(default=None, description="Expected sha256 of the archive.")
    model: str = Field(default=DEFAULT_MODEL, description="Model config name (tasks/configs).")
    backbone: Backbone | None = Field(default=None, description="Override the model's ResNet depth.")
    epochs: float | None = Field(default=None, gt=0, le=10_000,
                                 description="Training length in passes over the training images.")
    steps: int | None = Field(default=None, ge=1, le=1_000_000, description="Training steps (overrides epochs).")
    batch_size: int | None = Field(default=None, ge=1, le=1024,
                                   description="Images per GPU (per replica); the global batch is this x GPUs.")
    image_size: int | None = Field(default=None, ge=128, le=1536, description="Square input side.")
    learning_rate: float | None = Field(default=None, gt=0, le=10, description="Base (peak) LR.")
    init_checkpoint: str = Field(
        default=START_PRETRAINED,
        description="Where training starts: 'pretrained' (the model's published checkpoint, or scratch when it "
                    "has none), 'scratch', or a checkpoint: a path, s3://, gs:// or https:// (a .tar.gz is unpacked).")
    init_checkpoint_modules: Literal["backbone", "backbone,decoder", "all"] | None = Field(
        default=None, description="Which parts to load from init_checkpoint; empty: all that the checkpoint has.")
    warm_start: Literal["promoted", "none"] = Field(
        default="promoted",
        description="'promoted': continue from the model the quality gate last promoted (same model config), "
                    "else start from init_checkpoint; 'none': always init_checkpoint.")
    validate_every: int | None = Field(
        default=None, ge=0, le=1_000_000,
        description="Steps between validations on the val split (COCO mAP, best checkpoint); 0: never; "
                    "empty: the model's interval in epochs.")
    augment: bool = Field(default=True, description="Random flip and scale jitter of training images.")
    val_fraction: float = Field(default=0.1, ge=0.0, le=1.0)
    num_shards: int | None = Field(default=None, ge=1, le=1024)
    seed: int = Field(default=42, ge=0)
    max_quarantine_fraction: float = Field(default=0.01, ge=0.0, le=1.0)
    publish_dest: str | None = Field(default=None, description="s3://bucket/prefix or file://...")
    promotion_margin: float = Field(default=0.0, ge=0.0, le=1.0)

    @field_validator("dataset_sha256")
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

    @field_validator("image_size")
    @classmethod
    def _size(cls, v: int | None) -> int | None:
        if v is not None and v % MAX_LEVEL_STRIDE:
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
            raise ValueError("dataset_source must not be empty")
        return self

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> RunConfig:
        """Build from DAG params / CLI options; unknown keys and bad values give one clear line."""
        known = {k: v for k, v in params.items() if v is not None}  # None: use the default
        try:
            return cls(**known)
        except ValidationError as exc:
            raise PersoncarError(format_validation_error(exc)) from None

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
        field = ".".join(str(p) for p in err["loc"]) or "config"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown parameter"
        parts.append(f"{field}: {msg} (got {err.get('input')!r})")
    return "invalid run configuration: " + "; ".join(parts)


class Settings(BaseModel):
    """Deployment settings: environment variables, overridable by Airflow Variables in the DAG."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    artifact_root: str = Field(default_factory=lambda: str(Path.home() / "personcar-artifacts"))
    backend: Literal["local", "kubernetes"] = "local"
    aws_conn_id: str = "aws_default"
    s3_endpoint_url: str | None = None

    ENV: ClassVar[dict[str, str]] = {
        "artifact_root": "PERSONCAR_ARTIFACT_ROOT",
        "backend": "PERSONCAR_EXECUTION_BACKEND",
        "aws_conn_id": "PERSONCAR_AWS_CONN_ID",
        "s3_endpoint_url": "PERSONCAR_S3_ENDPOINT_URL",
    }

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: Any) -> Settings:
        env = os.environ if environ is None else environ
        values = {k: env[v] for k, v in cls.ENV.items() if env.get(v)}
        values.update({k: v for k, v in overrides.items() if v not in (None, "")})
        try:
            return cls(**values)
        except ValidationError as exc:
            raise PersoncarError(format_validation_error(exc).replace("run configuration", "settings")) from None

    def default_publish_dest(self) -> str:
        root = self.artifact_root.rstrip("/")
        return f"{root}/published"
