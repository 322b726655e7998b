"""A study file: which recipes, seeds and search spaces, on one data set, at one budget.

.. code-block:: yaml

    name: my-photos
    seeds: [0, 1, 2]
    epochs: 12                     # every recipe's schedule scaled to 12 epochs
    set:                           # every trial: the data, a validation split to select on
      data.root: my-photos
      data.val_per_class: 20
    entries:
      - name: ce
        recipe: configs/folder/ce-resnet50.yaml
      - name: hybrid-sc
        recipe: configs/folder/hybrid-sc-resnet50.yaml
        seeds: [0, 1, 2, 3, 4]     # this entry's own seeds (else the study's)
        search:                    # 8 trials over these options, pruned on validation top-1
          trials: 8
          space:
            method.temperature: {low: 0.05, high: 0.3, log: true}
            optim.lr: {low: 3.0e-4, high: 3.0e-3, log: true}

Every entry runs once per seed (its own ``seeds``, else the study's) with its recipe as
written (plus ``set``); an entry with ``search`` also runs ``trials`` trials at its first
seed, each with options drawn by the study's sampler. Trials are trained seed by seed: every
entry's first seed before any entry's second, so a study stopped early has the whole table
at its first seed. Trials are selected and pruned on the validation split, never the test set.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from longtail.build import carried_options, scale_epochs, validate
from longtail.config import (
    Config,
    config_from_dict,
    deep_merge,
    format_validation_error,
    load_config,
    load_yaml,
    nested,
)
from longtail.errors import UsageError, shown

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Param(_Strict):
    """One searched option: a float (or int) in [low, high], or one of ``choices``."""

    low: float | None = None
    high: float | None = None
    log: bool = False  # drawn uniformly in log space
    int: bool = False  # whole numbers
    choices: list[Any] | None = None

    @model_validator(mode="after")
    def _range_or_choices(self) -> Param:
        if self.choices is not None:
            if self.low is not None or self.high is not None or not self.choices:
                raise ValueError("give either choices (a non-empty list) or low and high")
        elif self.low is None or self.high is None or not self.low < self.high:
            raise ValueError("give low < high (or choices)")
        elif self.log and self.low <= 0:
            raise ValueError("a log-scaled range needs low > 0")
        return self


class Search(_Strict):
    """A search over an entry's options: ``trials`` trials drawn by the study's sampler."""

    trials: int = Field(ge=1)
    space: dict[str, Param] = Field(min_length=1)  # dotted config keys, as --set takes them


class Entry(_Strict):
    """A recipe under a name, with its own overrides and an optional search."""

    name: str
    recipe: str
    set: dict[str, Any] = Field(default_factory=dict)
    seeds: list[int] | None = Field(None, min_length=1)  # else the study's seeds
    search: Search | None = None


class StudySpec(_Strict):
    """The study file (see the module docstring)."""

    name: str
    entries: list[Entry] = Field(min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    epochs: int | None = Field(None, ge=1)  # the budget: each recipe's schedule scaled to it
    batch_size: int | None = Field(None, ge=1)  # every trial's batch; lr scaled linearly
    set: dict[str, Any] = Field(default_factory=dict)  # overrides of every trial
    sampler: Literal["tpe", "random"] = "tpe"
    pruner: Literal["median", "none"] = "median"
    prune_after: int = Field(1, ge=0)  # epochs a search trial trains before it can be pruned
    sampler_seed: int = 0
    heartbeat_s: float = Field(10, gt=0)  # a worker writes its trial's heartbeat this often
    grace_s: float = Field(60, gt=0)  # a trial silent this long: its worker died; retried

    @model_validator(mode="after")
    def _names(self) -> StudySpec:
        for name in [self.name, *(e.name for e in self.entries)]:
            if not NAME.match(name):
                raise ValueError(f"name {name!r}: use letters, digits, '.', '_' and '-'")
        names = [e.name for e in self.entries]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"entry names must differ; given twice: {', '.join(twice)}")
        for where, seeds in [("seeds", self.seeds)] + [
            (f"entry {e.name!r}: seeds", e.seeds) for e in self.entries if e.seeds
        ]:
            if len(set(seeds)) < len(seeds):
                raise ValueError(f"{where} {seeds}: each seed once")
        return self

    def seeds_of(self, entry: Entry) -> list[int]:
        """The seeds ``entry`` runs at: its own, else the study's."""
        return entry.seeds if entry.seeds is not None else self.seeds

    def entry(self, name: str) -> Entry:
        for e in self.entries:
            if e.name == name:
                return e
        raise UsageError(f"the study has no entry {name!r}")


def load_study(path: str | Path) -> tuple[StudySpec, Path]:
    """The study file at ``path``, checked, and the folder its recipe paths are relative to
    (where a recipe is not found from the current folder)."""
    path = Path(path)
    try:
        raw = load_yaml(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(
            f"no study file {shown(path)}; give the path of a study's YAML file (README: "
            "Which method for my data?)"
        ) from None
    except yaml.YAMLError as e:
        raise UsageError(f"{shown(path)} is not valid YAML: {str(e).splitlines()[0]}") from None
    try:
        spec = StudySpec.model_validate(raw or {})
    except ValidationError as e:
        raise UsageError(f"study file {shown(path)}: {format_validation_error(e)}") from None
    for entry in spec.entries:  # every trial's config, checked before anything runs
        trial_config(spec, entry, spec.seeds_of(entry)[0], _midpoints(entry), path.parent)
    return spec, path.parent


def _midpoints(entry: Entry) -> dict[str, Any]:
    """A value of each searched option (for checking the configs a search will build)."""
    if entry.search is None:
        return {}
    out: dict[str, Any] = {}
    for key, p in entry.search.space.items():
        if p.choices is not None:
            out[key] = p.choices[0]
        else:
            assert p.low is not None
            out[key] = int(p.low) if p.int else p.low
    return out


def recipe_path(recipe: str, base: Path) -> Path:
    """A recipe path as given (from the current folder), else relative to the study file."""
    given = Path(recipe)
    if given.is_file() or given.is_absolute():
        return given
    return base / given


def trial_config(
    spec: StudySpec, entry: Entry, seed: int, params: dict[str, Any], base: Path
) -> Config:
    """The config one trial trains: the entry's recipe, the study's and the entry's
    overrides, the searched ``params``, the seed; the schedule scaled to the study's epochs
    and the lr to its batch size.

    Raises:
        UsageError: Naming the entry, when the recipe or an override is invalid, or when the
            trial would have no validation split to be selected on.
    """
    where = f"study entry {entry.name!r}"
    try:
        cfg = load_config(recipe_path(entry.recipe, base))
        raw = cfg.model_dump(mode="json")
        given: dict[str, Any] = {}
        for overrides in (spec.set, entry.set, params):
            given = deep_merge(given, nested(overrides))
        name = given.get("method", {}).get("name")
        if name is not None and name != raw["method"]["name"]:  # another method on the recipe
            raw["method"] = {**carried_options(raw["method"], name), "name": name}
        raw = deep_merge(raw, given)
        raw["seed"], raw["name"] = seed, f"{spec.name}-{entry.name}"
        if spec.batch_size is not None:
            raw["optim"]["lr"] *= spec.batch_size / raw["train"]["batch_size"]
            raw["train"]["batch_size"] = spec.batch_size
        cfg = validate(config_from_dict(raw))
        if spec.epochs is not None:
            cfg, _ = scale_epochs(cfg, spec.epochs)
    except UsageError as e:
        raise UsageError(f"{where}: {e}") from None
    except (ValueError, OSError) as e:  # a config error the loader words itself
        raise UsageError(f"{where}: {' '.join(str(e).split())}") from None
    if cfg.data.val_split is None and cfg.data.val_per_class is None:
        raise UsageError(
            f"{where}: a study selects and prunes on a validation split, never the test set; "
            "set data.val_per_class: N (N images per class held out of the training set) or "
            "data.val_split in the study's set"
        )
    return cfg
