"""`python -m services.loader`: the node's checkpoint tiers (remote store and local disk)."""

from services.loader.service import serve
from shared.runtime import run_service
from shared.subjects import SERVICE_LOADER

if __name__ == "__main__":
    run_service(SERVICE_LOADER, serve)
