"""The registry that picks a solver by name.

Solvers register under their name (`register`); the built-in ones are registered when this
module is imported. It sits at the top of the package (it imports every solver module, and no
solver imports it), and the solvers import their third-party backends (OR-Tools, HiGHS, Gurobi)
only when asked whether they are available or to solve, so importing `moirai.placement` stays
cheap and no default is chosen at import time: `auto` decides at solve time from what is
available (Gurobi's pip package may be installed without a usable licence).
"""

from __future__ import annotations

from moirai.errors import SolverError
from moirai.placement import auto, cpsat, heuristics, milp
from moirai.placement.contract import Solver

_REGISTRY: dict[str, Solver] = {
    solver.name: solver for module in (heuristics, milp, cpsat, auto) for solver in module.SOLVERS
}


def register(solver: Solver) -> None:
    _REGISTRY[solver.name] = solver


def solvers() -> list[Solver]:
    """Every registered solver, available or not."""
    return list(_REGISTRY.values())


def get_solver(name: str) -> Solver:
    """The solver registered under `name`; `SolverError` if unknown or unavailable here."""
    solver = _REGISTRY.get(name)
    if solver is None:
        raise SolverError(f"unknown solver {name!r}: use one of {', '.join(_REGISTRY)}")
    ok, reason = solver.available()
    if not ok:
        raise SolverError(f"solver {name!r} is not available: {reason}")
    return solver
