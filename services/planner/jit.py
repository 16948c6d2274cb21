"""Just-in-time arrangement of the requests of a dying instance (docs/design.md, "Just-in-time
arrangement (grace period)").

With deadline T, an instance may keep decoding for::

    steps = floor((T - now - t_migrate - t_prefill_margin) / t_decode)

iterations and still hand its KV caches over before it is gone. A request that needs at most
``steps`` more tokens finishes in place ("finish", decode_steps = the tokens it still needs);
otherwise it decodes ``steps`` tokens and its cache moves ("migrate", decode_steps = steps);
when there is no time to move a cache at all (T - now - t_migrate - t_prefill_margin < 0, a
grace period of 0 included) it restarts from its committed tokens on the new configuration
("recompute", decode_steps 0). The finish test uses ``steps`` too (it leaves t_migrate of
slack): a misestimate then still leaves time to move the cache.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from shared.messages import JitDecision


@dataclass(frozen=True)
class InFlightRequest:
    """A request being served under the previous plan."""

    request_id: str
    replica: int  # its replica under the previous plan
    generated_tokens: int
    max_tokens: int
    kv_bytes: int  # its whole KV cache now: every layer, every tensor slice

    @property
    def remaining_tokens(self) -> int:
        return max(0, self.max_tokens - self.generated_tokens)


def decode_budget(
    deadline: float, now: float, t_migrate: float, t_prefill_margin: float, t_decode: float
) -> int | None:
    """Iterations an instance may still decode before its caches must move; None when there is
    no time to move them at all."""
    if t_decode <= 0:
        raise ValueError(f"t_decode must be positive, not {t_decode}")
    spare = deadline - now - t_migrate - t_prefill_margin
    if spare < 0:
        return None
    return math.floor(spare / t_decode)


def migrate_seconds(kv_bytes: int, bandwidth_bytes_s: float, overhead_s: float = 0.0) -> float:
    """Time to ship ``kv_bytes`` of caches off an instance."""
    return overhead_s + kv_bytes / bandwidth_bytes_s


def arrange(
    requests: Sequence[tuple[InFlightRequest, str]],
    deadlines: Mapping[str, float],
    now: float,
    t_decode: float,
    t_migrate: float | Mapping[str, float],
    t_prefill_margin: float = 0.0,
) -> list[JitDecision]:
    """A decision for each (request, dying instance it depends on); ``deadlines`` by instance
    (an instance already gone has deadline <= now), ``t_migrate`` one figure or per instance."""
    decisions = []
    for request, instance_id in requests:
        migrate = t_migrate if isinstance(t_migrate, float | int) else t_migrate[instance_id]
        steps = decode_budget(
            deadlines[instance_id], now, float(migrate), t_prefill_margin, t_decode
        )
        if steps is None:
            action, decode_steps = "recompute", 0
        elif request.remaining_tokens <= steps:
            action, decode_steps = "finish", request.remaining_tokens
        else:
            action, decode_steps = "migrate", steps
        decisions.append(
            JitDecision(
                request_id=request.request_id,
                instance_id=instance_id,
                action=action,
                decode_steps=decode_steps,
                move_by=deadlines[instance_id] - float(migrate),
            )
        )
    return decisions
