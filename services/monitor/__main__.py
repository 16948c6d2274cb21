"""The monitor service: `python -m services.monitor`.

In this version it starts, registers as a nats.micro service (answers $SRV PING/INFO/STATS)
and waits to be stopped; its algorithms arrive with their own issues.
"""

from shared.runtime import registration_only, run_service
from shared.subjects import SERVICE_MONITOR

DESCRIPTION = "Watches the fleet for preemption notices (registration only in this version)"

if __name__ == "__main__":
    run_service(SERVICE_MONITOR, registration_only(DESCRIPTION))
