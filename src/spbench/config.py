"""Load, validate and expand the workflow configuration.

Validation happens in two layers, both before any job starts: the JSON schema
(``schemas/config.schema.yaml``: types, ranges, unknown keys) and the semantic checks below
(names that must exist in a registry or elsewhere in the config, files that must exist).
Every error names the offending key, e.g. ``grid.penalties.l2_spp``.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterator, Mapping

import jsonschema
import yaml

__all__ = [
    "ConfigError",
    "RunSpec",
    "DEFAULTS",
    "load_schema",
    "load_config",
    "validate_config",
    "expand_runs",
    "fmt_num",
    "derive_seed",
]


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key."""


#: Values used where the config is silent. Documented in config.yaml.
DEFAULTS: dict[str, Any] = {
    "tracking": {"timeout_s": 60},
    "fisher": {"samples": 1, "split": "train", "batch_size": 64, "seed": 0},
    "finetune": {
        "lr_schedule": "cosine",
        "lr_milestones": [],
        "bn_mode": "train",
        "sp_scope": "all",
        "nonsmooth": "smooth",
        "epsilon": 1e-3,
        "eval_batch_size": 512,
        "threads": 1,
    },
    "grid": {"freeze": [0]},
}


def _merge(defaults: Mapping, config: Mapping) -> dict:
    out = copy.deepcopy(dict(config))
    for key, value in defaults.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(value, out[key])
        elif key not in out:
            out[key] = copy.deepcopy(value)
    return out


def load_schema() -> dict:
    text = resources.files("spbench").joinpath("schemas/config.schema.yaml").read_text()
    return yaml.safe_load(text)


def _key_path(error: jsonschema.ValidationError) -> str:
    parts = [str(p) for p in error.absolute_path]
    if error.validator == "additionalProperties" and isinstance(error.instance, Mapping):
        allowed = set(error.schema.get("properties", {}))
        extra = sorted(k for k in error.instance if k not in allowed)
        if extra:
            parts.append(extra[0])
    return ".".join(parts) or "<top level>"


@dataclass(frozen=True)
class RunSpec:
    """The identity of one fine-tune run: everything its output path spells."""

    source: str
    target: str
    penalty: str
    alpha: float
    beta: float
    freeze: int
    replicate: int

    @property
    def key(self) -> str:
        """Relative path of the run's folder; also its MLflow run name."""
        return (
            f"{self.source}/{self.target}/{self.penalty}/"
            f"a{fmt_num(self.alpha)}_b{fmt_num(self.beta)}/freeze{self.freeze}/rep{self.replicate}"
        )

    @property
    def seed(self) -> int:
        """RNG seed of the run (head initialisation, batch order).

        Derived from (source, target, replicate) only: runs that differ in penalty, α, β or
        freeze depth but share a replicate see the same head initialisation and data order,
        so differences across penalties are paired comparisons.
        """
        return derive_seed("finetune", self.source, self.target, self.replicate)


def fmt_num(x: float) -> str:
    """Canonical text of a hyper-parameter in paths: ``0.01``, ``1e-05``, ``0.0``."""
    return repr(float(x))


def derive_seed(*parts: Any) -> int:
    digest = hashlib.sha256("|".join(str(p) for p in parts).encode()).hexdigest()
    return int(digest[:8], 16) % (2**31 - 1)


def load_config(path: str | Path) -> dict:
    with open(path) as fh:
        config = yaml.safe_load(fh)
    return validate_config(config, base_dir=Path(path).parent)


def validate_config(config: Mapping, base_dir: str | Path = ".") -> dict:
    """Check ``config`` against the schema and its semantics; return it with defaults filled."""
    if not isinstance(config, Mapping):
        raise ConfigError("<top level>: the configuration must be a mapping")
    validator = jsonschema.Draft202012Validator(load_schema())
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        err = errors[0]
        raise ConfigError(f"config key '{_key_path(err)}': {err.message}")
    config = _merge(DEFAULTS, config)
    _check_semantics(config, Path(base_dir))
    return config


def _check_semantics(config: dict, base_dir: Path) -> None:
    # Imported here: the registries pull in torch, which a schema check need not pay for.
    from .data import TASK_BUILDERS
    from .models import ARCHITECTURES, freeze_depth_count
    from .penalties import PENALTIES

    for name, task in config["tasks"].items():
        builder = TASK_BUILDERS.get(task["builder"])
        if builder is None:
            raise ConfigError(
                f"config key 'tasks.{name}.builder': unknown builder {task['builder']!r} "
                f"(known: {sorted(TASK_BUILDERS)})"
            )
        params = {k: v for k, v in task.items() if k != "builder"}
        try:
            inspect.signature(builder).bind(**params)
        except TypeError as err:
            raise ConfigError(f"config key 'tasks.{name}': {err}") from None

    for name, src in config["sources"].items():
        if src["task"] not in config["tasks"]:
            raise ConfigError(f"config key 'sources.{name}.task': no task named {src['task']!r}")
        if src["arch"] not in ARCHITECTURES:
            raise ConfigError(
                f"config key 'sources.{name}.arch': unknown architecture {src['arch']!r} "
                f"(known: {sorted(ARCHITECTURES)})"
            )
        if src["weights"] == "file":
            if "path" not in src:
                raise ConfigError(f"config key 'sources.{name}.path': required when weights is 'file'")
            path = Path(src["path"])
            if not path.is_absolute():
                path = base_dir / path
            if not path.is_file():
                raise ConfigError(f"config key 'sources.{name}.path': no such file: {path}")

    from .datasets import check_inputs  # downloads named by tasks and sources exist and agree

    check_inputs(config, ConfigError)

    grid = config["grid"]
    for i, source in enumerate(grid["sources"]):
        if source not in config["sources"]:
            raise ConfigError(f"config key 'grid.sources[{i}]': no source named {source!r}")
    for i, target in enumerate(grid["targets"]):
        if target not in config["tasks"]:
            raise ConfigError(f"config key 'grid.targets[{i}]': no task named {target!r}")
    for name, setting in grid["penalties"].items():
        if name not in PENALTIES:
            raise ConfigError(
                f"config key 'grid.penalties.{name}': unknown penalty (known: {sorted(PENALTIES)})"
            )
        if name == "none":
            if any(v != 0 for key in ("alpha", "beta") for v in setting.get(key, [0])):
                raise ConfigError("config key 'grid.penalties.none': the 'none' penalty takes no alpha or beta")
        else:
            for key in ("alpha", "beta"):
                if key not in setting:
                    raise ConfigError(f"config key 'grid.penalties.{name}.{key}': required (a list of values)")
    for source in grid["sources"]:
        arch = config["sources"][source]["arch"]
        limit = freeze_depth_count(arch)
        for depth in grid["freeze"]:
            if depth > limit:
                raise ConfigError(
                    f"config key 'grid.freeze': depth {depth} exceeds the {limit} freezable units of {arch!r}"
                )


def expand_runs(config: Mapping) -> Iterator[RunSpec]:
    """Every run of the grid, in a stable order."""
    grid = config["grid"]
    for source in grid["sources"]:
        for target in grid["targets"]:
            for penalty, setting in grid["penalties"].items():
                alphas = setting.get("alpha", [0.0]) if penalty != "none" else [0.0]
                betas = setting.get("beta", [0.0]) if penalty != "none" else [0.0]
                for alpha in alphas:
                    for beta in betas:
                        for freeze in grid["freeze"]:
                            for rep in range(grid["replicates"]):
                                yield RunSpec(source, target, penalty, float(alpha), float(beta), int(freeze), rep)
