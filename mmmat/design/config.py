"""Typed configuration of a design run: dataclasses read from YAML, an unknown key is an error.

A config names the reference data (known phases and the surrogate's training labels), the objectives, the
proposal sources, the screen, the acquisition strategy, the oracle and the guards. Units: energies in eV/atom,
densities in g/cm³, distances in Å, strains as fractions.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STRATEGIES = ("random", "greedy", "ucb", "qei")


class ConfigError(ValueError):
    """A design config that cannot be used; the message names the key."""


@dataclass
class DataConfig:
    """Reference data.

    Attributes:
        source: ``mp20`` (the mp20p split of a folder like ../shared/data/mp_20) or ``builtin`` (the AFLOW
            prototypes shipped with pymatgen; for tests).
        root: Folder of the source (``mp20`` only).
        train_splits: Splits whose labels train the surrogate (never ``test``).
        known_splits: Splits whose crystals are the known phases (hull, novelty, templates).
        template_splits: Splits whose crystals serve as templates (default: ``train_splits``).
        limit: At most this many rows per split (None: all).
        cache: Folder for the parsed structures (arrays keyed by the source files; parsing every CIF of
            mp20p takes minutes on a busy CPU), or None.
    """

    source: str = "builtin"
    root: str | None = None
    train_splits: list[str] = field(default_factory=lambda: ["train"])
    known_splits: list[str] = field(default_factory=lambda: ["train", "val", "test"])
    template_splits: list[str] | None = None
    limit: int | None = None
    cache: str | None = None


@dataclass
class Objective:
    """One objective: a property kept inside ``[min, max]``.

    Attributes:
        name: Name in reports (``e_hull`` is the oracle's energy above the hull, eV/atom).
        surrogate: Surrogate target that predicts it (None: no prediction before the oracle).
        oracle: Oracle quantity that verifies it: ``e_hull`` (every method must satisfy the window), or the
            name of a property the oracle returns; None: only the surrogate judges it (stated in the report).
        min: Lower bound (None: open).
        max: Upper bound (None: open).
        scale: Scale of a violation (units of the property) in the acquisition score.
    """

    name: str
    surrogate: str | None = None
    oracle: str | None = None
    min: float | None = None
    max: float | None = None
    scale: float = 1.0


@dataclass
class ChemistryConfig:
    """Chemical systems the proposals may reach.

    Attributes:
        allowed: Elements allowed (empty: every element of the known phases except noble gases).
        required: Elements every candidate must contain.
        required_any: Groups of elements; each candidate contains at least one of each group
            (``[[Sc, Ti, ..., Zn]]``: a transition metal).
        max_elements: Most distinct elements per candidate.
        max_atoms: Most atoms per cell.
    """

    allowed: list[str] = field(default_factory=list)
    required: list[str] = field(default_factory=list)
    required_any: list[list[str]] = field(default_factory=list)
    max_elements: int = 5
    max_atoms: int = 20


@dataclass
class GeneratorSource:
    """The conditional flow generator as a proposal source.

    Attributes:
        path: Generator folder (``train.py fit`` with configs/generate/); None: not used.
        n: Samples per round.
        targets: Property conditions ``{name: value}`` (the generator's property columns).
        guidance: Classifier-free guidance scale (0: unconditional).
        steps: Integration steps.
        reweight: Move the conditions toward the hits' surrogate predictions after each round (0: never;
            1: replace them by the hits' mean).
        device: Torch device (None: CUDA when available).
    """

    path: str | None = None
    n: int = 0
    targets: dict[str, float] = field(default_factory=dict)
    guidance: float = 2.0
    steps: int = 50
    reweight: float = 0.0
    device: str | None = None


@dataclass
class ProposeConfig:
    """Proposal sources per round.

    Attributes:
        generator: The flow generator (see :class:`GeneratorSource`).
        templates: Template substitutions per round (a known crystal with its elements replaced by chemically
            similar ones, volume rescaled by atomic radii).
        mutations: Mutations of the best candidates so far per round.
        parents: How many of the best candidates are mutated.
        max_strain: Largest lattice strain component of a strain mutation (fraction).
        strain_share: Share of mutations that strain the lattice (the rest substitute an element).
        similarity_width: Width of the similarity kernel exp(-|ΔM|/w) over Pettifor's Mendeleev numbers.
    """

    generator: GeneratorSource = field(default_factory=GeneratorSource)
    templates: int = 100
    mutations: int = 50
    parents: int = 10
    max_strain: float = 0.04
    strain_share: float = 0.3
    similarity_width: float = 4.0


@dataclass
class SurrogateConfig:
    """Property surrogate with an uncertainty.

    Attributes:
        kind: ``ensemble`` (a deep ensemble of MLPs on Magpie composition statistics plus volume and density
            per atom; trains in seconds on CPU) or ``property_model`` (saved PropertyModel folders: one folder
            uses the heads' own variance, several form an ensemble).
        targets: Label columns of the reference data the surrogate predicts (units of the columns).
        paths: PropertyModel folders (``property_model`` only).
        members: Ensemble members.
        hidden: Hidden width.
        epochs: Training epochs.
        finetune_epochs: Epochs of each fine-tuning on oracle labels.
        max_train: At most this many labelled reference rows (random subset; None: all).
    """

    kind: str = "ensemble"
    targets: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    members: int = 5
    hidden: int = 64
    epochs: int = 60
    finetune_epochs: int = 20
    max_train: int | None = None


@dataclass
class SelectConfig:
    """Acquisition under a budget of oracle calls.

    Attributes:
        strategy: ``random``, ``greedy`` (best predicted mean), ``ucb`` (optimistic by ``kappa`` standard
            deviations), ``qei`` (batch log expected improvement, botorch, a GP over candidate embeddings).
        per_round: Oracle calls per round.
        kappa: UCB optimism in standard deviations.
        max_choices: Most candidates passed to the GP acquisition (the best by UCB).
    """

    strategy: str = "ucb"
    per_round: int = 20
    kappa: float = 1.0
    max_choices: int = 1000


@dataclass
class OracleConfig:
    """The verifying oracle.

    Attributes:
        kind: ``mlip`` (relaxation + hull with each of ``methods``), ``stand_in`` (a cheap analytic energy for
            tests only; its numbers are not physics), or ``module:Class`` of a user :class:`Oracle`.
        methods: MLIPs: ``chgnet``, ``sevennet`` (SevenNet-0).
        steps: Most relaxation steps (FIRE, positions and cell).
        fmax: Force threshold, eV/Å.
        device: Torch device (None: CUDA when available).
        workers: Processes that relax at once on a CPU (each holds its own models); ignored on a GPU.
        batch: Structures per oracle call (None: the oracle's choice, a whole round on a GPU, 2 per worker
            process on a CPU, else 1; 0: a whole round). The ledger is written after each call: a run killed
            during a call evaluates that call's structures again on ``--resume``, never a finished call's.
        cache: Folder of the known phases' energy cache (None: ``<out>/../hull_cache``).
        relax_methods: Methods that relax (None: all); the others take a single point of the structure the
            first of these relaxed (cheaper where one MLIP is slow; the report says which relaxed).
        options: Extra keyword arguments of a user oracle or the stand-in.
    """

    kind: str = "mlip"
    methods: list[str] = field(default_factory=lambda: ["chgnet", "sevennet"])
    steps: int = 200
    fmax: float = 0.1
    device: str | None = None
    workers: int = 1
    batch: int | None = None
    cache: str | None = None
    relax_methods: list[str] | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class GuardConfig:
    """Guards against surrogate exploitation and reward hacking.

    Attributes:
        min_distance: Smallest interatomic distance (Å) a screened candidate may have.
        method_tolerance: Largest difference (eV/atom) between the methods' E_hull for a hit.
        density_range: Plausible density, g/cm³.
        max_rmsd: Largest relaxation displacement (pymatgen RMS normalised by (V/n)^(1/3)); a relaxation
            the matcher cannot map back also counts as moved far.
        ood_quantile: A pick is out of distribution when its latent distance to the nearest training crystal
            exceeds this quantile of the training crystals' own nearest-neighbour distances.
        ood_action: ``flag`` (count only), ``penalize`` (subtract ``ood_penalty`` from the acquisition score;
            with ``qei``, whose GP takes no penalty, out-of-distribution candidates leave the choice set while
            enough remain) or ``exclude``.
        ood_penalty: Penalty in acquisition-score units.
        min_e_hull: A candidate that any method places deeper than this below the hull (eV/atom, negative) is
            flagged ``far_below_hull`` and is no hit: far below the known hull, a gap in the hull (a missing known
            phase) is likelier than a discovery.
        min_known_phases: Hits whose chemical system holds fewer known phases are counted as sparse-hull; they
            stay hits unless ``sparse_hull_blocks``.
        sparse_hull_blocks: A sparse-hull candidate is no hit.
    """

    min_distance: float = 0.5
    method_tolerance: float = 0.1
    density_range: list[float] = field(default_factory=lambda: [0.5, 25.0])
    max_rmsd: float = 0.5
    ood_quantile: float = 0.99
    ood_action: str = "flag"
    ood_penalty: float = 1.0
    min_e_hull: float = -0.2
    min_known_phases: int = 1
    sparse_hull_blocks: bool = False


@dataclass
class DesignConfig:
    """A whole design run.

    Attributes:
        name: Run name.
        out: Run folder (ledger.sqlite, report.json, report.md, PNGs, hits/).
        seed: Seed of every random choice.
        rounds: Rounds at most.
        budget: Oracle calls in all (the loop stops when it is spent).
    """

    name: str = "design"
    out: str = "runs/design"
    seed: int = 0
    rounds: int = 5
    budget: int = 100
    data: DataConfig = field(default_factory=DataConfig)
    objectives: list[Objective] = field(default_factory=list)
    chemistry: ChemistryConfig = field(default_factory=ChemistryConfig)
    propose: ProposeConfig = field(default_factory=ProposeConfig)
    surrogate: SurrogateConfig = field(default_factory=SurrogateConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    oracle: OracleConfig = field(default_factory=OracleConfig)
    guards: GuardConfig = field(default_factory=GuardConfig)

    def validate(self) -> DesignConfig:
        """Check values that types do not; raise :class:`ConfigError` naming the key."""
        if self.select.strategy not in STRATEGIES:
            raise ConfigError(f"select.strategy must be one of {STRATEGIES}, got {self.select.strategy!r}")
        if "test" in self.data.train_splits:
            raise ConfigError("data.train_splits must not hold 'test': the surrogate never trains on it")
        if self.surrogate.kind not in ("ensemble", "property_model"):
            raise ConfigError(f"surrogate.kind must be ensemble or property_model, got {self.surrogate.kind!r}")
        if self.surrogate.kind == "property_model" and not self.surrogate.paths:
            raise ConfigError("surrogate.kind property_model needs surrogate.paths")
        if self.guards.ood_action not in ("flag", "penalize", "exclude"):
            raise ConfigError(f"guards.ood_action must be flag, penalize or exclude, got {self.guards.ood_action!r}")
        if self.budget < 1 or self.rounds < 1 or self.select.per_round < 1:
            raise ConfigError("budget, rounds and select.per_round must be at least 1")
        if not self.objectives:
            raise ConfigError("objectives: name at least one objective")
        for o in self.objectives:
            if o.surrogate and o.surrogate not in self.surrogate.targets:
                raise ConfigError(f"objective {o.name!r}: surrogate target {o.surrogate!r} not in surrogate.targets")
        if self.oracle.batch is not None and self.oracle.batch < 0:
            raise ConfigError(f"oracle.batch must be 0 (a whole round at once) or more, got {self.oracle.batch}")
        for m in self.oracle.methods:
            if self.oracle.kind == "mlip" and m not in ("chgnet", "sevennet"):
                raise ConfigError(f"oracle.methods: unknown MLIP {m!r} (chgnet, sevennet)")
        return self

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return dataclasses.asdict(self)


def _build(cls: type, data: Any, where: str) -> Any:
    """An instance of dataclass ``cls`` from a mapping; unknown keys raise :class:`ConfigError`."""
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where or 'config'}: unknown key(s) {unknown}; known: {sorted(names)}")
    kw = {}
    for k, v in data.items():
        kw[k] = _convert(hints[k], v, f"{where}.{k}" if where else k)
    try:
        return cls(**kw)
    except TypeError as exc:
        raise ConfigError(f"{where or 'config'}: {exc}") from None


def _convert(tp: Any, v: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if v is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], v, where)
    if dataclasses.is_dataclass(tp):
        return _build(tp, v, where)
    if origin is list:
        if not isinstance(v, list):
            raise ConfigError(f"{where}: expected a list, got {v!r}")
        return [_convert(args[0], x, f"{where}[{i}]") for i, x in enumerate(v)] if args else v
    if origin is dict:
        if not isinstance(v, dict):
            raise ConfigError(f"{where}: expected a mapping, got {v!r}")
        return {k: _convert(args[1], x, f"{where}.{k}") for k, x in v.items()} if args else v
    if tp is float:
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ConfigError(f"{where}: expected a number, got {v!r}")
        return float(v)
    if tp is int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"{where}: expected an integer, got {v!r}")
        return v
    if tp is bool:
        if not isinstance(v, bool):
            raise ConfigError(f"{where}: expected true or false, got {v!r}")
        return v
    if tp is str:
        if not isinstance(v, str):
            raise ConfigError(f"{where}: expected a string, got {v!r}")
        return v
    return v


def load_config(config: str | Path | dict[str, Any] | DesignConfig, **overrides: Any) -> DesignConfig:
    """A validated :class:`DesignConfig` from a YAML file, a dict or a config (``overrides``: top-level keys)."""
    if isinstance(config, DesignConfig):
        cfg = dataclasses.replace(config, **overrides) if overrides else config
        return cfg.validate()
    if isinstance(config, str | Path):
        import yaml

        path = Path(config)
        if not path.is_file():
            raise ConfigError(f"design config {path} not found")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    else:
        data = dict(config)
    data.update(overrides)
    return _build(DesignConfig, data, "").validate()
