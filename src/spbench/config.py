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
import re
from dataclasses import KW_ONLY, dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

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
    "candidates",
    "needs_selection",
    "selection_runs",
    "main_runs",
    "figure_runs",
    "final_settings",
    "EXPERIMENTS",
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
        "device": "auto",
        "checkpoint_every": 0,
    },
    "cluster": {
        "partition": "",
        "account": "",
        "gpus": 0,
        "cpus_per_task": 1,
        "mem_mb": 2000,
        "runtime": 30,
    },
    "grid": {"freeze": [0]},
}

#: Defaults inside optional sections, applied only when the section is present.
SECTION_DEFAULTS: dict[str, Any] = {
    "selection": {"folds": 5, "use_folds": 1, "replicates": 1},
    "figures": {
        "alpha_beta": {"penalty": "l2_sp", "replicates": 1},
        "freeze": {"penalties": ["l2", "l2_sp"], "replicates": 1},
        "activations": {"penalties": ["l2", "l2_sp", "l2_sp_fisher"], "max_images": 512},
        "overhead": {"batch_size": 32, "repeats": 20},
    },
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
    """The identity of one fine-tune run: everything its output path spells.

    ``experiment``: which part of the study asked for the run: ``main`` (Tables 2-3, Fig. 2),
    ``select`` (model selection), ``alpha_beta`` (Fig. 1), ``freeze`` (Fig. 3).
    ``evaluation``: ``test`` (train on the training set, score on the test set) or ``val{f}``
    (train on the training set less fold f, score on fold f).
    """

    source: str
    target: str
    penalty: str
    alpha: float
    beta: float
    freeze: int
    replicate: int
    _: KW_ONLY
    lr: float
    evaluation: str = "test"
    experiment: str = "main"

    def __post_init__(self):
        if self.experiment not in EXPERIMENTS:
            raise ValueError(f"unknown experiment {self.experiment!r} (known: {EXPERIMENTS})")
        if self.evaluation != "test" and not re.fullmatch(r"val\d+", self.evaluation):
            raise ValueError(f"evaluation must be 'test' or 'val<fold>', not {self.evaluation!r}")

    @property
    def key(self) -> str:
        """Relative path of the run's folder; also its MLflow run name."""
        return (
            f"{self.experiment}/{self.source}/{self.target}/{self.penalty}/"
            f"a{fmt_num(self.alpha)}_b{fmt_num(self.beta)}_lr{fmt_num(self.lr)}/"
            f"freeze{self.freeze}/{self.evaluation}/rep{self.replicate}"
        )

    @property
    def fold(self) -> int | None:
        """The validation fold, or None for a test-set run."""
        return None if self.evaluation == "test" else int(self.evaluation[3:])

    @property
    def seed(self) -> int:
        """RNG seed of the run (head initialisation, batch order).

        Derived from (source, target, evaluation, replicate) only: runs that differ in
        experiment, penalty, α, β, learning rate or freeze depth but share a replicate see the
        same head initialisation and data order, so differences across penalties are paired
        comparisons (and a run asked for by two experiments gives the same result in both).
        """
        return derive_seed("finetune", self.source, self.target, self.evaluation, self.replicate)


EXPERIMENTS = ("main", "select", "alpha_beta", "freeze")


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
    if "selection" in config:
        config["selection"] = _merge(SECTION_DEFAULTS["selection"], config["selection"])
        config["selection"].setdefault("lr", [config["finetune"]["lr"]])
    for name, fig in config.get("figures", {}).items():
        config["figures"][name] = _merge(SECTION_DEFAULTS["figures"][name], fig)
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
    figures = config.get("figures", {})
    for name, fig in figures.items():
        targets = fig.get("targets", [fig["target"]] if "target" in fig else [])
        for target in targets:
            if target not in config["tasks"]:
                raise ConfigError(f"config key 'figures.{name}': no task named {target!r}")
        for penalty in fig.get("penalties", [fig["penalty"]] if "penalty" in fig else []):
            if penalty not in PENALTIES:
                raise ConfigError(f"config key 'figures.{name}': unknown penalty {penalty!r}")
            if name in ("freeze", "activations") and penalty not in grid["penalties"]:
                raise ConfigError(f"config key 'figures.{name}': penalty {penalty!r} is not in grid.penalties")
    if "activations" in figures and figures["activations"]["target"] not in grid["targets"]:
        raise ConfigError("config key 'figures.activations.target': must be one of grid.targets (it reuses their runs)")
    if "selection" in config:
        sel = config["selection"]
        if sel["use_folds"] > sel["folds"]:
            raise ConfigError("config key 'selection.use_folds': more than selection.folds")
    for name, fig in figures.items():
        for i, source in enumerate(fig.get("sources", [])):
            if source not in grid["sources"]:
                raise ConfigError(f"config key 'figures.{name}.sources[{i}]': {source!r} is not in grid.sources")
    freeze_fig = figures.get("freeze", {})
    for source in grid["sources"]:
        depths = list(grid["freeze"])
        if source in freeze_fig.get("sources", grid["sources"]):
            depths += freeze_fig.get("depths", [])
        arch = config["sources"][source]["arch"]
        limit = freeze_depth_count(arch)
        for depth in depths:
            if depth > limit:
                raise ConfigError(
                    f"config key 'grid.freeze': depth {depth} exceeds the {limit} freezable units of {arch!r}"
                )


Setting = tuple[float, float, float]  # (alpha, beta, lr)


def candidates(config: Mapping, penalty: str) -> list[Setting]:
    """The (α, β, lr) settings the grid lists for ``penalty``; lr from ``selection.lr`` when
    model selection is configured, else ``finetune.lr``."""
    spec = config["grid"]["penalties"][penalty]
    alphas = [0.0] if penalty == "none" else spec["alpha"]
    betas = [0.0] if penalty == "none" else spec["beta"]
    lrs = config["selection"]["lr"] if "selection" in config else [config["finetune"]["lr"]]
    return [(float(a), float(b), float(lr)) for a in alphas for b in betas for lr in lrs]


def needs_selection(config: Mapping, penalty: str) -> bool:
    """Whether the penalty's setting is chosen on validation folds (several candidates)."""
    return "selection" in config and len(candidates(config, penalty)) > 1


def selection_runs(config: Mapping) -> list[RunSpec]:
    """Model-selection runs: every candidate setting of every penalty that needs selection,
    trained on the training set less fold f and scored on fold f."""
    if "selection" not in config:
        return []
    sel, grid = config["selection"], config["grid"]
    runs = []
    for source in grid["sources"]:
        for target in grid["targets"]:
            for penalty in grid["penalties"]:
                if not needs_selection(config, penalty):
                    continue
                for alpha, beta, lr in candidates(config, penalty):
                    for fold in range(sel["use_folds"]):
                        for rep in range(sel["replicates"]):
                            runs.append(RunSpec(source, target, penalty, alpha, beta, 0, rep, lr=lr,
                                                evaluation=f"val{fold}", experiment="select"))
    return runs


def _chosen(config: Mapping, choose, source: str, target: str, penalty: str) -> Setting | None:
    if not needs_selection(config, penalty):
        return None
    if choose is None:
        raise ValueError(f"the setting of {penalty!r} is chosen by model selection; pass `choose`")
    return choose(source, target, penalty)


def final_settings(config: Mapping, penalty: str, chosen: Setting | None) -> list[Setting]:
    """The settings the test-set runs use: the chosen one when the penalty needs selection
    (``chosen`` must then be given), else every candidate."""
    if needs_selection(config, penalty):
        if chosen is None:
            raise ValueError(f"the setting of {penalty!r} is chosen by model selection; none given")
        return [chosen]
    return candidates(config, penalty)


def _tuned_runs(config, choose, sources, targets, penalties, depths, replicates, experiment) -> list[RunSpec]:
    """Test-set runs at each penalty's final setting(s): source × target × penalty × setting ×
    freeze depth × replicate, in that order."""
    runs = []
    for source in sources:
        for target in targets:
            for penalty in penalties:
                chosen = _chosen(config, choose, source, target, penalty)
                for alpha, beta, lr in final_settings(config, penalty, chosen):
                    for depth in depths:
                        for rep in range(replicates):
                            runs.append(RunSpec(source, target, penalty, alpha, beta, depth, rep, lr=lr,
                                                experiment=experiment))
    return runs


def main_runs(config: Mapping, choose=None) -> list[RunSpec]:
    """Test-set runs of the grid (Tables 2-3, Fig. 2). ``choose(source, target, penalty)``
    returns the selected (α, β, lr) for penalties that need selection."""
    grid = config["grid"]
    return _tuned_runs(config, choose, grid["sources"], grid["targets"], grid["penalties"], grid["freeze"],
                       grid["replicates"], "main")


def figure_runs(config: Mapping, choose=None) -> list[RunSpec]:
    """Test-set runs of Fig. 1 (α × β grid) and Fig. 3 (freeze depths, at the main setting)."""
    figures = config.get("figures", {})
    grid = config["grid"]
    runs = []
    if "alpha_beta" in figures:
        fig = figures["alpha_beta"]
        for source in fig.get("sources", grid["sources"]):
            for alpha in fig["alpha"]:
                for beta in fig["beta"]:
                    for rep in range(fig["replicates"]):
                        runs.append(RunSpec(source, fig["target"], fig["penalty"], float(alpha), float(beta), 0, rep,
                                            lr=float(config["finetune"]["lr"]), experiment="alpha_beta"))
    if "freeze" in figures:
        fig = figures["freeze"]
        runs += _tuned_runs(config, choose, fig.get("sources", grid["sources"]), fig["targets"], fig["penalties"],
                            fig["depths"], fig["replicates"], "freeze")
    return runs


def expand_runs(config: Mapping, choose=None) -> list[RunSpec]:
    """Every run of the study, in a stable order: selection, main grid, figures."""
    return selection_runs(config) + main_runs(config, choose) + figure_runs(config, choose)
