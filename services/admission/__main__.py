"""`python -m services.admission`: the public generate endpoint."""

from services.admission.service import serve
from shared.runtime import run_service
from shared.subjects import SERVICE_ADMISSION

if __name__ == "__main__":
    run_service(SERVICE_ADMISSION, serve)
