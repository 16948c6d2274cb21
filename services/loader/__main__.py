"""The loader service: `python -m services.loader`.

In this version it starts, registers as a nats.micro service (answers $SRV PING/INFO/STATS)
and waits to be stopped; its algorithms arrive with their own issues.
"""

from shared.runtime import registration_only, run_service
from shared.subjects import SERVICE_LOADER

DESCRIPTION = (
    "Loads model checkpoints through the storage tiers (registration only in this version)"
)

if __name__ == "__main__":
    run_service(SERVICE_LOADER, registration_only(DESCRIPTION))
