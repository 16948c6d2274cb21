"""`python -m services.executor`: one instance's model and KV cache."""

from services.executor.service import serve
from shared.runtime import run_service
from shared.subjects import SERVICE_EXECUTOR

if __name__ == "__main__":
    run_service(SERVICE_EXECUTOR, serve)
