"""The planner service: `python -m services.planner`."""

from services.planner.service import serve
from shared.runtime import run_service
from shared.subjects import SERVICE_PLANNER

if __name__ == "__main__":
    run_service(SERVICE_PLANNER, serve)
