"""The planner service: `python -m services.planner`.

In this version it starts, registers as a nats.micro service (answers $SRV PING/INFO/STATS)
and waits to be stopped; its algorithms arrive with their own issues.
"""

from shared.runtime import registration_only, run_service
from shared.subjects import SERVICE_PLANNER

DESCRIPTION = (
    "Picks parallel configurations and migration plans (registration only in this version)"
)

if __name__ == "__main__":
    run_service(SERVICE_PLANNER, registration_only(DESCRIPTION))
