"""The monitor service: ``python -m services.monitor``; the per-node cloud agent:
``python -m services.monitor agent --provider aws|gcp|azure --instance ID [--url URL]``."""

from __future__ import annotations

import argparse
import sys

from services.monitor.agent import serve_agent
from services.monitor.cloud import PROVIDERS
from services.monitor.service import serve
from shared.config import Settings
from shared.runtime import run_service
from shared.subjects import SERVICE_MONITOR

AGENT_NAME = f"{SERVICE_MONITOR}-agent"


def main(argv: list[str]) -> None:
    if not argv:
        run_service(SERVICE_MONITOR, serve)
        return
    parser = argparse.ArgumentParser(prog="python -m services.monitor")
    commands = parser.add_subparsers(dest="command", required=True)
    agent = commands.add_parser(
        "agent", help="Poll the cloud's metadata endpoint and forward preemption notices."
    )
    agent.add_argument("--provider", choices=PROVIDERS, help="default: monitor.agent_provider")
    agent.add_argument("--instance", help="instance id (default: executor.instance_id)")
    agent.add_argument("--url", help="metadata base URL (default: the cloud's link-local one)")
    agent.add_argument("--vm-name", help="Azure: only events for this VM")
    agent.add_argument("--poll-s", type=float, help="seconds between polls")
    args = parser.parse_args(argv)
    settings = Settings()
    overrides = {
        "agent_provider": args.provider,
        "agent_instance_id": args.instance,
        "agent_url": args.url,
        "agent_vm_name": args.vm_name,
        "agent_poll_s": args.poll_s,
    }
    monitor = settings.monitor.model_copy(
        update={key: value for key, value in overrides.items() if value is not None}
    )
    run_service(AGENT_NAME, serve_agent, settings.model_copy(update={"monitor": monitor}))


if __name__ == "__main__":
    main(sys.argv[1:])
