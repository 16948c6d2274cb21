"""`python -m services.scheduler`: iteration-level batching and token streaming."""

from services.scheduler.service import serve
from shared.runtime import run_service
from shared.subjects import SERVICE_SCHEDULER

if __name__ == "__main__":
    run_service(SERVICE_SCHEDULER, serve)
