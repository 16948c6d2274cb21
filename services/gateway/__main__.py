"""`python -m services.gateway`: the OpenAI-compatible HTTP API."""

from services.gateway.service import serve
from shared.runtime import run_service
from shared.subjects import SERVICE_GATEWAY

if __name__ == "__main__":
    # The gateway uses no stream: its NATS user has no JetStream rights.
    run_service(SERVICE_GATEWAY, serve, jetstream=False)
