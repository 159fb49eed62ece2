"""Closed-loop inverse design: propose, screen, select, verify, learn; a ledger, guards and a report.

``mmmat.design.run(config)`` runs a loop from a YAML file, a dict or a :class:`DesignConfig`.
"""

from mmmat.design.config import ConfigError, DesignConfig, load_config
from mmmat.design.loop import DesignError, DesignLoop, run
from mmmat.design.oracle import HullOracle, KnownPhases, MLIPOracle, Oracle, StandInOracle

__all__ = [
    "ConfigError",
    "DesignConfig",
    "DesignError",
    "DesignLoop",
    "HullOracle",
    "KnownPhases",
    "MLIPOracle",
    "Oracle",
    "StandInOracle",
    "load_config",
    "run",
]
