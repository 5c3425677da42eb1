"""The scenarios, in the order a full run executes them (each against direct, pgmux and PgBouncer)."""

from __future__ import annotations

from benchmarks.scenarios.common import RunConfig, Scenario
from benchmarks.scenarios.edge import Edge
from benchmarks.scenarios.idle import IdleFleet
from benchmarks.scenarios.latency import Latency
from benchmarks.scenarios.serverless import Serverless, ServerlessTrust
from benchmarks.scenarios.steady import (
    ConnectPerTransaction, ConnectPerTransactionTls, ConnectPerTransactionTrust, ConnectPerTransactionWorkers, Steady,
)
from benchmarks.scenarios.storm import Storm

SCENARIOS: dict[str, Scenario] = {
    scenario.name: scenario
    for scenario in (Serverless(), ServerlessTrust(), Steady(), ConnectPerTransaction(), ConnectPerTransactionTrust(),
                     ConnectPerTransactionTls(), ConnectPerTransactionWorkers(), Latency(), Edge(), Storm(), IdleFleet())
}

__all__ = ["SCENARIOS", "RunConfig", "Scenario"]
