"""Load, validate and expand the workflow configuration.

Validation happens in two layers, both before any job starts: the JSON schema
(``schemas/config.schema.yaml``: types, ranges, unknown keys) and the semantic checks below
(names that must exist in a registry or elsewhere in the config, files that must exist).
Every error names the offending key, e.g. ``grid.methods.l2_spp``.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import inspect
import re
import itertools
import math
from dataclasses import KW_ONLY, dataclass
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, Literal, Mapping, get_args, get_origin, get_type_hints

import yaml

__all__ = [
    "ConfigError",
    "RunSpec",
    "Setting",
    "format_setting",
    "parse_setting",
    "DEFAULTS",
    "load_schema",
    "load_config",
    "validate_config",
    "expand_runs",
    "candidates",
    "needs_selection",
    "selection_runs",
    "halving_budgets",
    "rung_sizes",
    "first_survivors",
    "rung_runs",
    "TRAINING_KEYS",
    "run_groups",
    "group_members",
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
    "forkserver": True,
    "tracking": {"timeout_s": 60, "log_from": "jobs"},
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
        "precision": "auto",
        "channels_last": "auto",
        "compile": False,
        "clip_grad_norm": None,
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
        "alpha_beta": {"method": "l2_sp", "replicates": 1},
        "freeze": {"methods": ["l2", "l2_sp"], "replicates": 1},
        "activations": {"methods": ["l2", "l2_sp", "l2_sp_fisher"], "max_images": 512},
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


# JSON Schema counts 2.0 as an integer and NaN as a number; a config should do neither.
@functools.cache
def _validator_class():
    """The schema's validator: integers are not booleans, numbers are finite. jsonschema is
    imported on first use (a fine-tune job reads an already validated config)."""
    import jsonschema

    types = jsonschema.Draft202012Validator.TYPE_CHECKER.redefine_many({
        "integer": lambda checker, x: isinstance(x, int) and not isinstance(x, bool),
        "number": lambda checker, x: isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x),
    })
    return jsonschema.validators.extend(jsonschema.Draft202012Validator, type_checker=types)


def _key_path(error: jsonschema.ValidationError) -> str:
    """``grid.methods.l2.alpha[0]``: keys joined by dots, list positions in brackets."""
    parts: list[str] = []
    for p in error.absolute_path:
        if isinstance(p, int) and parts:
            parts[-1] += f"[{p}]"
        else:
            parts.append(str(p))
    if error.validator == "additionalProperties" and isinstance(error.instance, Mapping):
        allowed = set(error.schema.get("properties", {}))
        extra = sorted(k for k in error.instance if k not in allowed)
        if extra:
            parts.append(extra[0])
    return ".".join(parts) or "<top level>"


Setting = dict[str, float | int]  # a method's hyper-parameters, the learning rate "lr", maybe "steps"

#: The keys of a setting that are the training's, not the method's: the learning rate, and the
#: number of steps where a run trains for less than ``finetune.steps`` (a successive-halving
#: rung of model selection; absent means ``finetune.steps``).
TRAINING_KEYS = ("lr", "steps")


def format_setting(setting: Mapping[str, float | int]) -> str:
    """Canonical text of a setting, as run paths spell it: ``name=value`` pairs sorted by name
    and joined by underscores, floats in ``repr`` form (``alpha=0.01_beta=0.01_lr=0.05``). No
    value text contains an underscore, so names may (``lp_steps=100_lr=0.1``); no comma, which
    Snakemake's ``--target-jobs`` (how cluster jobs are addressed) splits on."""
    parts = []
    for name in sorted(setting):
        value = setting[name]
        text = str(int(value)) if isinstance(value, int) and not isinstance(value, bool) else repr(float(value))
        parts.append(f"{name}={text}")
    return "_".join(parts)


def parse_setting(text: str) -> Setting:
    """Inverse of :func:`format_setting`; ValueError for a text that is not canonical. Split on
    ``=``, each middle piece is ``value_nextname`` (a value holds no underscore)."""
    pieces = text.split("=")
    if len(pieces) < 2:
        raise ValueError(f"bad setting {text!r}: expected name=value pairs joined by underscores")
    names, values = [pieces[0]], []
    for piece in pieces[1:-1]:
        value, sep, name = piece.partition("_")
        if not sep:
            raise ValueError(f"bad setting {text!r}: expected name=value pairs joined by underscores")
        values.append(value)
        names.append(name)
    values.append(pieces[-1])
    out: Setting = {}
    for name, value in zip(names, values):
        if not name.isidentifier() or not value:
            raise ValueError(f"bad setting {text!r}: expected name=value pairs joined by underscores")
        try:
            out[name] = int(value) if re.fullmatch(r"-?\d+", value) else float(value)
        except ValueError:
            raise ValueError(f"bad setting {text!r}: {value!r} is not a number") from None
    if format_setting(out) != text:
        raise ValueError(f"setting {text!r} is not in canonical form ({format_setting(out)!r})")
    return out


@dataclass(frozen=True)
class RunSpec:
    """The identity of one fine-tune run: everything its output path spells, defined here
    once for the workflow (:attr:`PATTERN`, :attr:`WILDCARDS`), its scripts and the library.

    ``method``: a registered method (:mod:`spbench.methods`); ``setting``: its
    hyper-parameters, every declared one, and the learning rate ``lr`` (given as a mapping,
    kept as sorted pairs). ``experiment``: which part of the study asked for the run:
    ``main`` (Tables 2-3, Fig. 2), ``select`` (model selection), ``alpha_beta`` (Fig. 1),
    ``freeze`` (Fig. 3). ``evaluation``: ``test`` (train on the training set, score on the test
    set) or ``val{f}`` (train on the training set less fold f, score on fold f).
    """

    source: str
    target: str
    method: str
    setting: Any
    freeze: int
    replicate: int
    _: KW_ONLY
    evaluation: str = "test"
    experiment: str = "main"

    #: The run folder, relative to ``{results}/runs``, as a Snakemake wildcard pattern.
    PATTERN: ClassVar[str] = (
        "{experiment}/{source}/{target}/{method}/{setting}/freeze{freeze}/{evaluation}/rep{replicate}"
    )
    #: A run group's part of :attr:`PATTERN`: the runs that differ only in their evaluation and
    #: replicate, which one job trains one after the other (:func:`run_groups`).
    GROUP_PATTERN: ClassVar[str] = "{experiment}/{source}/{target}/{method}/{setting}/freeze{freeze}"
    #: The regular expression of each wildcard of :attr:`PATTERN`.
    WILDCARDS: ClassVar[dict[str, str]] = {
        "experiment": "|".join(("main", "select", "alpha_beta", "freeze")),
        "source": r"[A-Za-z0-9][A-Za-z0-9_-]*",
        "target": r"[A-Za-z0-9][A-Za-z0-9_-]*",
        "method": r"[a-z0-9_]+(\+[a-z0-9_]+)*",  # a registered method, or several composed
        "setting": r"[A-Za-z][A-Za-z0-9_]*=[^_/=]+(_[A-Za-z][A-Za-z0-9_]*=[^_/=]+)*",
        "freeze": r"\d+",
        "evaluation": r"test|val\d+",
        "replicate": r"\d+",
    }

    def __post_init__(self):
        if self.experiment not in EXPERIMENTS:
            raise ValueError(f"unknown experiment {self.experiment!r} (known: {EXPERIMENTS})")
        if self.evaluation != "test" and not re.fullmatch(r"val\d+", self.evaluation):
            raise ValueError(f"evaluation must be 'test' or 'val<fold>', not {self.evaluation!r}")
        setting = dict(self.setting)
        if "lr" not in setting:
            raise ValueError(f"the setting of a run must include its learning rate 'lr', got {setting}")
        object.__setattr__(self, "setting", tuple(sorted(setting.items())))

    @classmethod
    def from_wildcards(cls, w: Mapping[str, str]) -> "RunSpec":
        """The run a path's wildcards spell; ValueError when they are not canonical."""
        spec = cls(w["source"], w["target"], w["method"], parse_setting(w["setting"]), int(w["freeze"]),
                   int(w["replicate"]), evaluation=w["evaluation"], experiment=w["experiment"])
        if spec.setting_text != w["setting"]:
            raise ValueError(f"setting {w['setting']!r} is not canonical ({spec.setting_text!r})")
        return spec

    @classmethod
    def from_key(cls, key: str) -> "RunSpec":
        """The run whose :attr:`key` (its folder under ``runs/``) is ``key``; ValueError when
        the text is not a canonical run key."""
        pattern = re.escape(cls.PATTERN)
        for name, regex in cls.WILDCARDS.items():
            pattern = pattern.replace(re.escape("{" + name + "}"), f"(?P<{name}>{regex})")
        found = re.fullmatch(pattern, key)
        if not found:
            raise ValueError(f"{key!r} is not a run key ({cls.PATTERN})")
        return cls.from_wildcards(found.groupdict())

    @property
    def setting_text(self) -> str:
        return format_setting(dict(self.setting))

    @property
    def hparams(self) -> Setting:
        """The method's hyper-parameters (the setting without ``lr`` and ``steps``)."""
        return {k: v for k, v in self.setting if k not in TRAINING_KEYS}

    def steps(self, default: int) -> int:
        """How many steps the run trains: its setting's ``steps`` (a successive-halving rung),
        else ``default`` (``finetune.steps``)."""
        return int(dict(self.setting).get("steps", default))

    @property
    def lr(self) -> float:
        return float(dict(self.setting)["lr"])

    @property
    def wildcards(self) -> dict[str, str]:
        return {"experiment": self.experiment, "source": self.source, "target": self.target, "method": self.method,
                "setting": self.setting_text, "freeze": str(self.freeze), "evaluation": self.evaluation,
                "replicate": str(self.replicate)}

    @property
    def group(self) -> str:
        """The run's group (:attr:`GROUP_PATTERN`): the runs one job trains."""
        return self.GROUP_PATTERN.format(**self.wildcards)

    @property
    def key(self) -> str:
        """Relative path of the run's folder; also its MLflow run's key."""
        return self.PATTERN.format(**self.wildcards)

    @property
    def fold(self) -> int | None:
        """The validation fold, or None for a test-set run."""
        return None if self.evaluation == "test" else int(self.evaluation[3:])

    @property
    def seed(self) -> int:
        """RNG seed of the run (head initialisation, batch order).

        Derived from (source, target, evaluation, replicate) only: runs that differ in
        experiment, method, setting or freeze depth but share a replicate see the same head
        initialisation and data order, so differences across methods are paired comparisons
        (and a run asked for by two experiments gives the same result in both).
        """
        return derive_seed("finetune", self.source, self.target, self.evaluation, self.replicate)


EXPERIMENTS = ("main", "select", "alpha_beta", "freeze")


def fmt_num(x: float) -> str:
    """Canonical text of a float hyper-parameter: ``0.01``, ``1e-05``, ``0.0``."""
    return repr(float(x))


def derive_seed(*parts: Any) -> int:
    digest = hashlib.sha256("|".join(str(p) for p in parts).encode()).hexdigest()
    return int(digest[:8], 16) % (2**31 - 1)


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a mapping that repeats a key (plain YAML keeps the last)."""


def _strict_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ConfigError(f"config key '{key}': given twice (lines {seen[key] + 1} and {key_node.start_mark.line + 1} "
                              f"of {key_node.start_mark.name})")
        seen[key] = key_node.start_mark.line
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _strict_mapping)


def read_yaml(path: str | Path) -> Any:
    """A YAML config file; :class:`ConfigError` for a key given twice in one mapping."""
    with open(path) as fh:
        return yaml.load(fh, Loader=_StrictLoader)


def load_config(path: str | Path, *overlays: str | Path) -> dict:
    """Read, merge and validate config files: each of ``overlays`` merged over the ones before
    it, mappings key by key and anything else replaced, as ``snakemake --configfile A B``
    merges them; relative paths are resolved against the first file's folder."""
    merged = read_yaml(path)
    for overlay in overlays:
        merged = _merge(merged, read_yaml(overlay))
    return validate_config(merged, base_dir=Path(path).parent)


def validate_config(config: Mapping, base_dir: str | Path = ".") -> dict:
    """Check ``config`` against the schema and its semantics; return it with defaults filled."""
    if not isinstance(config, Mapping):
        raise ConfigError("<top level>: the configuration must be a mapping")
    renamed = {"penalties": "methods", "penalty": "method"}
    sections = [("grid", config.get("grid"))] + [(f"figures.{k}", v) for k, v in (config.get("figures") or {}).items()]
    for where, section in sections:
        for old, new in renamed.items():
            if isinstance(section, Mapping) and old in section:
                raise ConfigError(f"config key '{where}.{old}': renamed '{where}.{new}' (every method, penalties included)")
    validator = _validator_class()(load_schema())
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
        _check_builder_args(name, builder, params)

    _check_paths(config, base_dir)
    _check_tracking_uri(config["tracking"]["uri"])
    ft = config["finetune"]
    for i, milestone in enumerate(ft["lr_milestones"]):
        if milestone >= ft["steps"]:
            raise ConfigError(f"config key 'finetune.lr_milestones[{i}]': {milestone} is not before the last step "
                              f"(finetune.steps = {ft['steps']})")

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
    from .methods import method_class

    for name, listed in grid["methods"].items():
        try:
            cls = method_class(name)
        except ValueError as err:
            raise ConfigError(f"config key 'grid.methods.{name}': {err}") from None
        known = {h.name: h for h in cls.hparams}
        for key, values in (listed or {}).items():
            if key not in known:
                raise ConfigError(f"config key 'grid.methods.{name}.{key}': {name!r} has no such hyper-parameter "
                                  f"(known: {sorted(known)})")
            for i, value in enumerate(values):
                try:
                    known[key].check(value)
                except ValueError as err:
                    raise ConfigError(f"config key 'grid.methods.{name}.{key}[{i}]': {err}") from None
            if len(set(values)) != len(values):
                raise ConfigError(f"config key 'grid.methods.{name}.{key}': duplicate values {values}")
        if cls.needs.fisher and "fisher" not in config:
            raise ConfigError(f"config key 'fisher': required by method {name!r}")
        if cls.needs.taps and config["finetune"]["compile"]:
            raise ConfigError(f"config key 'finetune.compile': method {name!r} records the backbone's feature maps "
                              "by forward hooks added at each step, which a compiled backbone may not run "
                              "(set compile: false, or leave the method out)")
    for target, methods in config.get("published", {}).get("values", {}).items():
        if target not in grid["targets"]:
            raise ConfigError(f"config key 'published.values.{target}': not a target of grid.targets")
        for method in methods:
            if method not in grid["methods"]:
                raise ConfigError(f"config key 'published.values.{target}.{method}': not a method of grid.methods")
    figures = config.get("figures", {})
    for name, fig in figures.items():
        targets = fig.get("targets", [fig["target"]] if "target" in fig else [])
        for target in targets:
            if target not in config["tasks"]:
                raise ConfigError(f"config key 'figures.{name}': no task named {target!r}")
        for method in fig.get("methods", [fig["method"]] if "method" in fig else []):
            try:
                cls = method_class(method)
            except ValueError as err:
                raise ConfigError(f"config key 'figures.{name}': {err}") from None
            if name in ("freeze", "activations") and method not in grid["methods"]:
                raise ConfigError(f"config key 'figures.{name}': method {method!r} is not in grid.methods")
            if name == "alpha_beta" and not {"alpha", "beta"} <= {h.name for h in cls.hparams}:
                raise ConfigError(f"config key 'figures.alpha_beta.method': {method!r} has no alpha and beta")
    if "activations" in figures and figures["activations"]["target"] not in grid["targets"]:
        raise ConfigError("config key 'figures.activations.target': must be one of grid.targets (it reuses their runs)")
    if "selection" in config:
        sel = config["selection"]
        if sel["use_folds"] > sel["folds"]:
            raise ConfigError("config key 'selection.use_folds': more than selection.folds")
        budgets = halving_budgets(config)
        if budgets is not None and any(a >= b for a, b in zip(budgets, budgets[1:])):
            raise ConfigError(f"config key 'selection.halving': its rungs would train {budgets} steps; "
                              "each rung must train more than the one before (fewer rungs or a smaller eta)")
        for target in grid["targets"]:
            per_class = config["tasks"][target].get("per_class")
            if isinstance(per_class, int) and sel["folds"] > per_class:
                raise ConfigError(f"config key 'selection.folds': {sel['folds']} folds, but task {target!r} has "
                                  f"{per_class} training images per class (every fold needs one of each class)")
    for name, fig in figures.items():
        for i, source in enumerate(fig.get("sources", [])):
            if source not in grid["sources"]:
                raise ConfigError(f"config key 'figures.{name}.sources[{i}]': {source!r} is not in grid.sources")
    freeze_fig = figures.get("freeze", {})
    for source in grid["sources"]:
        depths = [("grid.freeze", d) for d in grid["freeze"]]
        if source in freeze_fig.get("sources", grid["sources"]):
            depths += [("figures.freeze.depths", d) for d in freeze_fig.get("depths", [])]
        arch = config["sources"][source]["arch"]
        limit = freeze_depth_count(arch)
        for key, depth in depths:
            if depth > limit:
                raise ConfigError(f"config key '{key}': depth {depth} exceeds the {limit} freezable units of {arch!r}")


def _check_builder_args(task: str, builder, params: Mapping[str, Any]) -> None:
    """A task builder's arguments against its annotations: integers are integers (seeds ≥ 0,
    counts and sizes ≥ 1, rates percentages in 1..100), numbers finite and positive (fractions
    below 1), strings not empty, a choice (``Literal[...]``) one of its values."""
    signature = inspect.signature(builder)
    try:
        hints = get_type_hints(builder)
    except (NameError, TypeError):  # a plugin's annotation that does not resolve: the names alone
        hints = {}
    for key, value in params.items():
        kind = str(signature.parameters[key].annotation)
        where = f"config key 'tasks.{task}.{key}'"
        hint = hints.get(key)
        if get_origin(hint) is Literal:
            if value not in get_args(hint):
                raise ConfigError(f"{where}: must be one of {list(get_args(hint))}, not {value!r}")
        elif kind == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{where}: must be an integer, not {value!r}")
            low = 0 if key.endswith("seed") else 1
            if value < low:
                raise ConfigError(f"{where}: must be at least {low}, not {value}")
            if key.endswith("_rate") and value > 100:
                raise ConfigError(f"{where}: a rate is a percentage, at most 100, not {value}")
        elif kind == "float":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"{where}: must be a positive number, not {value!r}")
            if "fraction" in key and value >= 1:
                raise ConfigError(f"{where}: a fraction must be below 1, not {value}")
        elif kind == "str" and (not isinstance(value, str) or not value):
            raise ConfigError(f"{where}: must be a non-empty string, not {value!r}")
        elif kind == "bool" and not isinstance(value, bool):
            raise ConfigError(f"{where}: must be true or false, not {value!r}")
        elif kind.startswith(("Sequence[int]", "list[int]")):
            if not isinstance(value, list) or not value or any(isinstance(v, bool) or not isinstance(v, int) or v < 0
                                                               for v in value):
                raise ConfigError(f"{where}: must be a non-empty list of non-negative integers, not {value!r}")
            if len(set(value)) != len(value):
                raise ConfigError(f"{where}: duplicate values {value}")


def _check_paths(config: Mapping, base_dir: Path) -> None:
    """The output folders stay inside the working directory unless ``allow_outside_workdir``."""
    if config.get("allow_outside_workdir", False):
        return
    for key in ("results", "data_dir", "reports"):
        path = Path(config[key])
        if path.is_absolute() or ".." in path.parts:
            raise ConfigError(f"config key '{key}': {config[key]!r} leaves the working directory; set "
                              "allow_outside_workdir: true to write there")


#: MLflow tracking URI schemes the suite accepts (a database store, a file store, a server).
TRACKING_SCHEMES = ("sqlite", "file", "http", "https", "postgresql", "mysql", "mssql")


def _check_tracking_uri(uri: str) -> None:
    from urllib.parse import urlparse

    parsed = urlparse(uri)
    scheme = parsed.scheme.split("+")[0]
    where = "config key 'tracking.uri'"
    if scheme not in TRACKING_SCHEMES:
        raise ConfigError(f"{where}: {uri!r} is not an MLflow store this suite can use (schemes: {list(TRACKING_SCHEMES)})")
    if scheme == "sqlite" and not (uri.startswith("sqlite:///") and len(uri) > len("sqlite:///")):
        raise ConfigError(f"{where}: a SQLite store is written sqlite:///relative/path.db or sqlite:////absolute/path.db, "
                          f"not {uri!r}")
    if scheme in ("http", "https") and not parsed.hostname:
        raise ConfigError(f"{where}: {uri!r} names no host")


def candidates(config: Mapping, method: str) -> list[Setting]:
    """The settings the grid lists for ``method``: every combination of the values listed
    for its hyper-parameters (a hyper-parameter not listed takes its default), in declaration
    order, times the learning rates (``selection.lr`` when model selection is configured, else
    ``finetune.lr``)."""
    from .methods import method_class

    listed = config["grid"]["methods"][method] or {}
    values = [[h.check(v) for v in listed.get(h.name, [h.default])] for h in method_class(method).hparams]
    names = [h.name for h in method_class(method).hparams]
    lrs = config["selection"]["lr"] if "selection" in config else [config["finetune"]["lr"]]
    return [{**dict(zip(names, combo)), "lr": float(lr)} for combo in itertools.product(*values) for lr in lrs]


def training_setting(method: str, setting: Mapping[str, float | int]) -> Setting:
    """``setting`` without the method's ``post_hoc`` hyper-parameters (those read only after
    training): what the training depends on."""
    from .methods import post_hoc_names

    drop = post_hoc_names(method)
    return {k: v for k, v in setting.items() if k not in drop}


def training_candidates(config: Mapping, method: str, settings=None) -> list[Setting]:
    """The distinct trainings among ``settings`` (default: the grid's candidates): each one's
    :func:`training_setting`, in first-seen order. Validation runs train these; each scores
    every candidate that shares it (:func:`post_hoc_variants`)."""
    out: list[Setting] = []
    for setting in candidates(config, method) if settings is None else settings:
        trained = training_setting(method, setting)
        if trained not in out:
            out.append(trained)
    return out


def post_hoc_variants(config: Mapping, spec: "RunSpec") -> list[Setting]:
    """The settings a validation run scores after its one training, when its method has
    ``post_hoc`` hyper-parameters and its setting leaves them out: every candidate of the grid
    that shares the run's training (with the run's ``steps``, at a successive-halving rung).
    Empty otherwise (the run scores its own setting only)."""
    from .methods import post_hoc_names

    names = post_hoc_names(spec.method)
    own = dict(spec.setting)
    if spec.fold is None or not names or any(n in own for n in names):
        return []
    steps = {"steps": own["steps"]} if "steps" in own else {}
    base = {k: v for k, v in own.items() if k != "steps"}
    return [{**c, **steps} for c in candidates(config, spec.method) if training_setting(spec.method, c) == base]


def needs_selection(config: Mapping, method: str) -> bool:
    """Whether the method's setting is chosen on validation folds (several candidates)."""
    return "selection" in config and len(candidates(config, method)) > 1


def halving_budgets(config: Mapping) -> list[int] | None:
    """The steps of each successive-halving rung of model selection (``selection.halving``),
    smallest first, the last being ``finetune.steps``; None when selection trains every
    candidate for the full steps."""
    halving = config.get("selection", {}).get("halving")
    if not halving:
        return None
    steps, eta, rungs = config["finetune"]["steps"], halving["eta"], halving["rungs"]
    return [max(1, round(steps / eta ** (rungs - 1 - r))) for r in range(rungs)]


def rung_sizes(n: int, eta: int, rungs: int) -> list[int]:
    """How many candidates each rung trains: all ``n`` at the first, then the best
    ceil(1/eta) of the previous rung's (at least one)."""
    sizes = [n]
    for _ in range(rungs - 1):
        sizes.append(max(1, math.ceil(sizes[-1] / eta)))
    return sizes


def first_survivors(config: Mapping):
    """A ``survivors`` for :func:`selection_runs` that keeps, at each rung, the first
    candidates in grid order: the right number of runs before any has been scored (the plan)."""
    def survivors(source: str, target: str, method: str, rung: int) -> list[Setting]:
        halving = config["selection"]["halving"]
        settings = candidates(config, method)
        return settings[: rung_sizes(len(settings), halving["eta"], halving["rungs"])[rung]]
    return survivors


def selection_runs(config: Mapping, survivors=None) -> list[RunSpec]:
    """Model-selection runs: every candidate setting of every method that needs selection,
    trained on the training set less fold f and scored on fold f.

    With ``selection.halving`` (successive halving), rung r trains its candidates for
    ``halving_budgets(config)[r]`` steps (their setting says ``steps``, but at the last rung, whose
    runs are those of a full selection): rung 0 all of them, rung r the settings that
    ``survivors(source, target, method, r)`` returns (the best of rung r - 1, decided by the
    workflow once rung r - 1 is scored; :func:`first_survivors` before)."""
    if "selection" not in config:
        return []
    grid = config["grid"]
    budgets = halving_budgets(config)
    if budgets is not None and survivors is None:
        raise ValueError("selection.halving: which candidates reach each rung is decided by the earlier rungs; "
                         "pass `survivors`")
    runs = []
    for source in grid["sources"]:
        for target in grid["targets"]:
            for method in grid["methods"]:
                if not needs_selection(config, method):
                    continue
                for rung in range(len(budgets or [None])):
                    settings = training_candidates(config, method) if rung == 0 else survivors(source, target, method, rung)
                    runs += rung_runs(config, source, target, method, rung, settings)
    return runs


def rung_runs(config: Mapping, source: str, target: str, method: str, rung: int, settings) -> list[RunSpec]:
    """The validation runs of ``settings`` at one rung of model selection (rung 0 without
    ``selection.halving``): each setting × used fold × replicate, for the rung's steps."""
    sel = config["selection"]
    budgets = halving_budgets(config)
    last = budgets is None or rung == len(budgets) - 1
    runs = []
    for setting in training_candidates(config, method, settings):  # one training serves its post-hoc values
        setting = dict(setting) if last else {**setting, "steps": budgets[rung]}
        for fold in range(sel["use_folds"]):
            for rep in range(sel["replicates"]):
                runs.append(RunSpec(source, target, method, setting, 0, rep, evaluation=f"val{fold}", experiment="select"))
    return runs


def _chosen(config: Mapping, choose, source: str, target: str, method: str) -> Setting | None:
    if not needs_selection(config, method):
        return None
    if choose is None:
        raise ValueError(f"the setting of {method!r} is chosen by model selection; pass `choose`")
    return choose(source, target, method)


def final_settings(config: Mapping, method: str, chosen: Setting | None) -> list[Setting]:
    """The settings the test-set runs use: the chosen one when the method needs selection
    (``chosen`` must then be given), else every candidate."""
    if needs_selection(config, method):
        if chosen is None:
            raise ValueError(f"the setting of {method!r} is chosen by model selection; none given")
        return [dict(chosen)]
    return candidates(config, method)


def _tuned_runs(config, choose, sources, targets, methods, depths, replicates, experiment) -> list[RunSpec]:
    """Test-set runs at each method's final setting(s): source × target × method × setting ×
    freeze depth × replicate, in that order."""
    runs = []
    for source in sources:
        for target in targets:
            for method in methods:
                chosen = _chosen(config, choose, source, target, method)
                for setting in final_settings(config, method, chosen):
                    for depth in depths:
                        for rep in range(replicates):
                            runs.append(RunSpec(source, target, method, setting, depth, rep, experiment=experiment))
    return runs


def main_runs(config: Mapping, choose=None) -> list[RunSpec]:
    """Test-set runs of the grid (Tables 2-3, Fig. 2). ``choose(source, target, method)``
    returns the selected setting for methods that need selection."""
    grid = config["grid"]
    return _tuned_runs(config, choose, grid["sources"], grid["targets"], grid["methods"], grid["freeze"],
                       grid["replicates"], "main")


def figure_runs(config: Mapping, choose=None) -> list[RunSpec]:
    """Test-set runs of Fig. 1 (α × β grid; the method's other hyper-parameters at their first
    listed value) and Fig. 3 (freeze depths, at the main setting)."""
    from .methods import method_class

    figures = config.get("figures", {})
    grid = config["grid"]
    runs = []
    if "alpha_beta" in figures:
        fig = figures["alpha_beta"]
        method = fig["method"]
        listed = (grid["methods"].get(method) or {})
        base = {h.name: h.check(listed.get(h.name, [h.default])[0]) for h in method_class(method).hparams}
        for source in fig.get("sources", grid["sources"]):
            for alpha in fig["alpha"]:
                for beta in fig["beta"]:
                    setting = {**base, "alpha": float(alpha), "beta": float(beta), "lr": float(config["finetune"]["lr"])}
                    for rep in range(fig["replicates"]):
                        runs.append(RunSpec(source, fig["target"], method, setting, 0, rep, experiment="alpha_beta"))
    if "freeze" in figures:
        fig = figures["freeze"]
        runs += _tuned_runs(config, choose, fig.get("sources", grid["sources"]), fig["targets"], fig["methods"],
                            fig["depths"], fig["replicates"], "freeze")
    return runs


def run_groups(config: Mapping) -> dict[str, tuple[list[str], int]]:
    """The run groups of each experiment the config runs: its evaluations and its number of
    replicates. A group is every run of one (experiment, source, target, method, setting,
    freeze depth) over these evaluations × replicates; one job trains a group, its runs one
    after the other in one process (the per-job cost of starting Python and importing torch is
    paid once), each run still its own record, log, seed and checkpoint."""
    grid, figures = config["grid"], config.get("figures", {})
    groups: dict[str, tuple[list[str], int]] = {"main": (["test"], grid["replicates"])}
    if "selection" in config:
        sel = config["selection"]
        groups["select"] = ([f"val{f}" for f in range(sel["use_folds"])], sel["replicates"])
    for experiment in ("alpha_beta", "freeze"):
        if experiment in figures:
            groups[experiment] = (["test"], figures[experiment]["replicates"])
    return groups


def group_members(config: Mapping, experiment: str, source: str, target: str, method: str, setting: Setting,
                  freeze: int) -> list[RunSpec]:
    """The runs of one run group (:func:`run_groups`), evaluation by evaluation, replicate by
    replicate."""
    evaluations, replicates = run_groups(config)[experiment]
    return [RunSpec(source, target, method, setting, freeze, rep, evaluation=evaluation, experiment=experiment)
            for evaluation in evaluations for rep in range(replicates)]


def expand_runs(config: Mapping, choose=None, survivors=None) -> list[RunSpec]:
    """Every run of the study, in a stable order: selection (``survivors``: see
    :func:`selection_runs`), main grid, figures."""
    return selection_runs(config, survivors) + main_runs(config, choose) + figure_runs(config, choose)
