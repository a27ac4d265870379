"""The policies that choose a worker for each connection the master accepts, one module each.

They all have the shape of ``base.Policy``. Only the master-accepting
distribution (``dispatcher.master_accepts``) uses them; when workers accept for
themselves (``dispatcher.workers_accept``) nothing is chosen.
"""

from __future__ import annotations

from dispatcher.policies.base import Policy
from dispatcher.policies.round_robin import RoundRobin

__all__ = ["Policy", "RoundRobin"]
