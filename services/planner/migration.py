"""Migration plan: the bytes each device of the new configuration must receive, where from, and
in which order (docs/design.md, "Migration plan").

Pieces. A "tensor" is a weights layer (-1 embeddings, 0..L-1, L final norm + head) or the KV
cache of one request at one layer; a device holds a slice [lo, hi) of it over a common
denominator (layout.py). For every new role, each slice it needs and does not already hold is
cut at the boundaries of the old holders' slices; each cut piece comes from a holder: a surviving
device if any holds it (the least loaded so far, by bytes sent), else a device of a dying
instance (still inside its grace period), else the loader (``source_instance`` None). Adjacent
pieces from the same source merge into one transfer. Devices of instances that are gone (lost,
left, past their deadline) hold nothing.

Order. Transfers run in batches, ``order`` 0, 1, ...; one batch is one tensor layer ("unit":
embeddings, layer 0, ..., layer L-1, head; a request's KV at layer l belongs to unit l). All
transfers off dying instances come first (unit by unit), then the rest (unit by unit), so a stage
can start computing layer i as soon as it has landed (progressive migration).

Memory model (per device, ``memory_budget`` bytes). A surviving device starts with everything
its old role held (weights and KV). What it will not need under its new role ("extra") is freed
as soon as no pending transfer reads it: at once if nobody does, else when its last reader's
batch has landed. A batch adds its bytes to each destination. Before running a batch the planner
checks every destination stays within its budget; if not, it runs the next pending batch that
fits instead (a later layer); if none fits, the overflowing devices drop extra pieces early
(those read latest first): their pending readers switch to another alive device that keeps the
piece, else to the loader; a KV piece (the loader has none) that no other device keeps is
offloaded to its device's host memory and sent from there (executors already swap KV caches to
host memory). That always ends within budget when the new role itself fits (a device then holds
at most its new role's bytes plus the batch's incoming ones that are part of it). Narrowing a
kept slice (old [0, 1/2) -> new [0, 1/4)) frees the rest at once, as if the kept part were copied
out in place. Devices without a new role keep what they hold until every transfer has run.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from math import gcd

from services.planner.layout import (
    Interval,
    common_den,
    group_sizes,
    overlap,
    rank_interval,
    role_device,
    subtract,
    weight_bytes,
    weight_interval,
    weight_keys,
)
from shared.messages import DeviceRole, Transfer
from shared.model.profile import ParallelProfile

Device = tuple[str, int]
# ("weights", layer, None) or ("kv", layer, request_id)
Key = tuple[str, int, str | None]


@dataclass(frozen=True)
class KvMove:
    """A request whose KV cache follows it from an old replica to a new one."""

    request_id: str
    old_replica: int
    new_replica: int
    kv_bytes: int  # the whole cache: every layer, every tensor slice


@dataclass(frozen=True)
class MigrationPlan:
    transfers: list[Transfer]
    # Highest bytes held by each destination device at any point of the simulated order.
    peak_bytes: dict[Device, int]
    # Old pieces dropped early to stay within the budget (their readers use another holder or
    # the loader), and KV pieces offloaded to host memory for the same reason.
    dropped: int = 0
    offloaded: int = 0

    @property
    def peer_bytes(self) -> int:
        return sum(t.nbytes for t in self.transfers if t.source_instance is not None)

    @property
    def loader_bytes(self) -> int:
        return sum(t.nbytes for t in self.transfers if t.source_instance is None)


@dataclass
class _Move:
    dest: Device
    key: Key
    piece: Interval
    source: Device | None
    dying: bool
    nbytes: int
    order: int = -1


@dataclass
class _Holding:
    interval: Interval
    kept: Interval | None  # the part its new role needs too (alive devices only)
    extra_bytes: int
    readers: list[_Move] = field(default_factory=list)
    pending: int = 0


def holdings(
    roles: Iterable[DeviceRole],
    sizes: Mapping[tuple[int, int], int],
    den: int,
    num_layers: int,
    kv_moves: Mapping[int, list[KvMove]],
) -> dict[Device, dict[Key, Interval]]:
    """What each device holds (or needs) under ``roles``: a slice of every tensor of its role.
    ``kv_moves`` maps a replica to the requests whose cache lives on it."""
    result: dict[Device, dict[Key, Interval]] = {}
    for role in roles:
        tensor = sizes[role.replica, role.stage]
        held: dict[Key, Interval] = {}
        for layer in weight_keys(role.first_layer, role.last_layer, num_layers):
            held["weights", layer, None] = weight_interval(layer, role.tp_rank, tensor, den)
        piece = rank_interval(role.tp_rank, tensor, den)
        for move in kv_moves.get(role.replica, ()):
            for layer in range(role.first_layer, role.last_layer + 1):
                held["kv", layer, move.request_id] = piece
        result[role_device(role)] = held
    return result


@dataclass(frozen=True)
class _KvCaches:
    """The KV caches that move: by replica before and after, each request's size and old
    replica."""

    old: dict[int, list[KvMove]]
    new: dict[int, list[KvMove]]
    size: dict[str, int]
    replica: dict[str, int]

    @classmethod
    def of(cls, kv_moves: Iterable[KvMove]) -> _KvCaches:
        caches = cls({}, {}, {}, {})
        for kv_move in kv_moves:
            caches.old.setdefault(kv_move.old_replica, []).append(kv_move)
            caches.new.setdefault(kv_move.new_replica, []).append(kv_move)
            caches.size[kv_move.request_id] = kv_move.kv_bytes
            caches.replica[kv_move.request_id] = kv_move.old_replica
        return caches


def _piece_bytes(
    profile: ParallelProfile, den: int, kv_size: Mapping[str, int]
) -> Callable[[Key, Interval], int]:
    """Bytes of a slice of a tensor (a weights layer, or one request's KV at one layer)."""
    layers = profile.num_layers

    def key_bytes(key: Key, piece: Interval) -> int:
        whole = weight_bytes(profile, key[1]) if key[2] is None else kv_size[key[2]] / layers
        return round(whole * (piece[1] - piece[0]) / den)

    return key_bytes


def plan_migration(
    previous: Sequence[DeviceRole] | None,
    roles: Sequence[DeviceRole],
    profile: ParallelProfile,
    *,
    alive: Iterable[str],
    dying: Iterable[str] = (),
    kv_moves: Sequence[KvMove] = (),
    memory_budget: Mapping[str, int] | None = None,
) -> MigrationPlan:
    """Transfers that take the devices from ``previous`` roles to ``roles``.

    ``alive``: instances that survive (every new role is on one); ``dying``: instances with a
    preemption notice whose deadline has not passed (sources only). Previous roles on any other
    instance are gone. ``memory_budget``: bytes per device by instance (None: no limit)."""
    previous = list(previous or [])
    alive_set, dying_set = set(alive), set(dying) - set(alive)
    old_sizes, new_sizes = group_sizes(previous), group_sizes(roles)
    den = common_den(old_sizes.values(), new_sizes.values())
    layers = profile.num_layers
    kv = _KvCaches.of(kv_moves)
    key_bytes = _piece_bytes(profile, den, kv.size)
    holders = sorted(
        (r for r in previous if r.instance_id in alive_set or r.instance_id in dying_set),
        key=role_device,
    )
    old_role = {role_device(r): r for r in holders if r.instance_id in alive_set}
    changed, peaks = _split_unchanged(roles, old_role, old_sizes, new_sizes, profile, kv)
    new = holdings(changed, new_sizes, den, layers, kv.new)
    own_roles = [old_role[d] for d in new if d in old_role]
    old = holdings(own_roles, old_sizes, den, layers, kv.old)
    index = _HolderIndex(holders, old_sizes, den, layers, kv.replica)
    state, memory = _initial_state(old, new, key_bytes)
    moves = _plan_moves(old, new, index, alive_set, key_bytes)
    _link_readers(moves, state)
    dropped, offloaded, simulated = _schedule(moves, state, memory, memory_budget, index, alive_set)
    peaks.update({d: simulated.get(d, 0) for d in new})
    transfers = [_transfer(m, den) for m in sorted(moves, key=_move_sort)]
    return MigrationPlan(transfers, peaks, dropped, offloaded)


def _split_unchanged(
    roles: Sequence[DeviceRole],
    old_role: Mapping[Device, DeviceRole],
    old_sizes: Mapping[tuple[int, int], int],
    new_sizes: Mapping[tuple[int, int], int],
    profile: ParallelProfile,
    kv: _KvCaches,
) -> tuple[list[DeviceRole], dict[Device, int]]:
    """The roles to plan, and the peak bytes of the devices that keep their role: same layers
    and slice, and already holding the KV caches their replica will serve (they need
    nothing)."""
    changed: list[DeviceRole] = []
    peaks: dict[Device, int] = {}
    for role in roles:
        device = role_device(role)
        before = old_role.get(device)
        if before is not None and (
            (before.first_layer, before.last_layer, before.tp_rank)
            == (role.first_layer, role.last_layer, role.tp_rank)
            and old_sizes[before.replica, before.stage] == new_sizes[role.replica, role.stage]
            and _request_ids(kv.new, role.replica) <= _request_ids(kv.old, before.replica)
        ):
            peaks[device] = _role_bytes(before, old_sizes, profile, kv.old)
        else:
            changed.append(role)
    return changed, peaks


def _request_ids(moves: Mapping[int, list[KvMove]], replica: int) -> set[str]:
    return {m.request_id for m in moves.get(replica, ())}


def _initial_state(
    old: Mapping[Device, dict[Key, Interval]],
    new: Mapping[Device, dict[Key, Interval]],
    key_bytes: Callable[[Key, Interval], int],
) -> tuple[dict[Device, dict[Key, _Holding]], dict[Device, int]]:
    """What every planned device holds at the start (and which part of it it keeps), and its
    bytes."""
    state: dict[Device, dict[Key, _Holding]] = {}
    memory: dict[Device, int] = {}
    for device, held_keys in old.items():
        needs = new[device]
        entries = {
            key: _holding(key, interval, needs.get(key), key_bytes)
            for key, interval in held_keys.items()
        }
        state[device] = entries
        memory[device] = sum(key_bytes(k, h.interval) for k, h in entries.items())
    for device in new:
        memory.setdefault(device, 0)
    return state, memory


def _holding(
    key: Key,
    interval: Interval,
    need: Interval | None,
    key_bytes: Callable[[Key, Interval], int],
) -> _Holding:
    """An old slice of one tensor: the part the new role needs too, and the bytes of the rest."""
    kept = None
    if need is not None and overlap(interval, need):
        kept = (max(interval[0], need[0]), min(interval[1], need[1]))
    parts = subtract(interval, kept) if kept else [interval]
    return _Holding(interval, kept, sum(key_bytes(key, p) for p in parts))


def _plan_moves(
    old: Mapping[Device, dict[Key, Interval]],
    new: Mapping[Device, dict[Key, Interval]],
    index: _HolderIndex,
    alive: set[str],
    key_bytes: Callable[[Key, Interval], int],
) -> list[_Move]:
    """The pieces each planned device needs and does not hold, each with its source."""
    load: dict[Device, int] = {}
    moves: list[_Move] = []
    for device in sorted(new):
        own = old.get(device, {})
        for key, need in new[device].items():
            held = own.get(key)
            missing = subtract(need, held) if held is not None else [need]
            for piece in missing:
                if piece[1] > piece[0]:
                    moves.extend(
                        _source(device, key, piece, index.get(key), alive, load, key_bytes)
                    )
    return moves


def _link_readers(moves: Iterable[_Move], state: Mapping[Device, dict[Key, _Holding]]) -> None:
    """Each old holding learns the moves that read it (it is freed after the last one)."""
    for move in moves:
        if move.source is not None and move.source in state:
            holding = state[move.source][move.key]
            holding.readers.append(move)
            holding.pending += 1


def _role_bytes(
    role: DeviceRole,
    sizes: Mapping[tuple[int, int], int],
    profile: ParallelProfile,
    kv: Mapping[int, list[KvMove]],
) -> int:
    """Bytes a device holds under a role (weights and the KV caches of its replica)."""
    tensor = sizes[role.replica, role.stage]
    count = role.last_layer - role.first_layer + 1
    total = count * profile.layer_bytes / tensor
    if role.first_layer == 0:
        total += profile.embed_bytes
    if role.last_layer == profile.num_layers - 1:
        total += profile.head_bytes / tensor
    cache = sum(m.kv_bytes for m in kv.get(role.replica, ()))
    return round(total + cache * count / profile.num_layers / tensor)


class _HolderIndex:
    """Old holders of each tensor, built on first use: (device, slice) in device order."""

    def __init__(
        self,
        holders: list[DeviceRole],
        sizes: Mapping[tuple[int, int], int],
        den: int,
        layers: int,
        kv_replica: Mapping[str, int],
    ) -> None:
        self._sizes, self._den, self._layers, self._kv_replica = sizes, den, layers, kv_replica
        self._weights: dict[int, list[tuple[Device, Interval]]] = {}
        self._by_replica: dict[int, list[DeviceRole]] = {}
        for role in holders:
            tensor = sizes[role.replica, role.stage]
            for layer in weight_keys(role.first_layer, role.last_layer, layers):
                self._weights.setdefault(layer, []).append(
                    (role_device(role), weight_interval(layer, role.tp_rank, tensor, den))
                )
            self._by_replica.setdefault(role.replica, []).append(role)
        self._kv: dict[Key, list[tuple[Device, Interval]]] = {}

    def get(self, key: Key) -> list[tuple[Device, Interval]]:
        _, layer, request_id = key
        if request_id is None:
            return self._weights.get(layer, [])
        found = self._kv.get(key)
        if found is None:
            replica = self._kv_replica[request_id]
            found = [
                (role_device(r), rank_interval(r.tp_rank, self._sizes[r.replica, r.stage],
                                               self._den))
                for r in self._by_replica.get(replica, ())
                if r.first_layer <= layer <= r.last_layer
            ]  # fmt: skip
            self._kv[key] = found
        return found


def _source(
    dest: Device,
    key: Key,
    piece: Interval,
    holders: list[tuple[Device, Interval]],
    alive: set[str],
    load: dict[Device, int],
    key_bytes: Callable[[Key, Interval], int],
) -> list[_Move]:
    """Cover ``piece`` with holders' slices: surviving holders first, least loaded first, then
    dying ones, then the loader; adjacent pieces from one source merge."""
    if not holders:
        return [_Move(dest, key, piece, None, False, key_bytes(key, piece))]
    cuts = {piece[0], piece[1]}
    for _, interval in holders:
        for x in interval:
            if piece[0] < x < piece[1]:
                cuts.add(x)
    points = sorted(cuts)
    result: list[_Move] = []
    for lo, hi in itertools.pairwise(points):
        covering = [d for d, i in holders if i[0] <= lo and hi <= i[1] and d != dest]
        survivors = [d for d in covering if d[0] in alive]
        pool = survivors or covering
        source = min(pool, key=lambda d: (load.get(d, 0), d)) if pool else None
        nbytes = key_bytes(key, (lo, hi))
        if source is not None:
            load[source] = load.get(source, 0) + nbytes
        last = result[-1] if result else None
        if last is not None and last.source == source and last.piece[1] == lo:
            last.piece = (last.piece[0], hi)
            last.nbytes = key_bytes(key, last.piece)
        else:
            dying = source is not None and source[0] not in alive
            result.append(_Move(dest, key, (lo, hi), source, dying, nbytes))
    return result


def _unit(move: _Move) -> int:
    return move.key[1]


def _schedule(
    moves: list[_Move],
    state: dict[Device, dict[Key, _Holding]],
    memory: dict[Device, int],
    budget: Mapping[str, int] | None,
    index: _HolderIndex,
    alive: set[str],
) -> tuple[int, int, dict[Device, int]]:
    """Assign ``order`` to every move (see the module doc); returns how many pieces were
    dropped early, how many KV pieces were offloaded, and each device's peak bytes."""
    batches: dict[tuple[int, int], list[_Move]] = {}
    for move in moves:
        batches.setdefault((0 if move.dying else 1, _unit(move)), []).append(move)
    pending = sorted(batches)
    peaks = dict(memory)
    for device, entries in state.items():  # free what nobody reads and nobody needs
        for holding in entries.values():
            if holding.pending == 0 and holding.extra_bytes:
                memory[device] -= holding.extra_bytes
                holding.extra_bytes = 0

    def incoming(batch: list[_Move]) -> dict[Device, int]:
        result: dict[Device, int] = {}
        for move in batch:
            result[move.dest] = result.get(move.dest, 0) + move.nbytes
        return result

    def over(inc: dict[Device, int]) -> list[Device]:
        if budget is None:
            return []
        return [d for d, n in inc.items() if d[0] in budget and memory[d] + n > budget[d[0]]]

    dropped = offloaded = 0
    step = 0
    while pending:
        chosen = None
        for candidate in pending:
            inc = incoming(batches[candidate])
            if not over(inc):
                chosen = candidate
                break
        if chosen is None:
            chosen = pending[0]
            inc = incoming(batches[chosen])
            # over() names devices that have a budget only.
            assert budget is not None
            for device in over(inc):
                d, o = _drop(device, state, memory, inc[device], budget[device[0]], index, alive)
                dropped, offloaded = dropped + d, offloaded + o
        pending.remove(chosen)
        inc = incoming(batches[chosen])
        for device, nbytes in inc.items():
            memory[device] += nbytes
            peaks[device] = max(peaks.get(device, 0), memory[device])
        for move in batches[chosen]:
            move.order = step
            if move.source is not None and move.source in state:
                holding = state[move.source][move.key]
                holding.pending -= 1
                if holding.pending == 0 and holding.extra_bytes:
                    memory[move.source] -= holding.extra_bytes
                    holding.extra_bytes = 0
        step += 1
    return dropped, offloaded, peaks


def _drop(
    device: Device,
    state: dict[Device, dict[Key, _Holding]],
    memory: dict[Device, int],
    incoming: int,
    limit: int,
    index: _HolderIndex,
    alive: set[str],
) -> tuple[int, int]:
    """Free ``device``'s extra pieces that still have readers, those read latest first, until
    the incoming batch fits. Their readers (outside the kept part) switch to another alive
    holder that keeps the piece, else the loader (weights); a KV piece that no one else keeps
    is offloaded to the device's host memory and still sent from there. Returns (dropped,
    offloaded)."""
    candidates = [
        (key, h) for key, h in state.get(device, {}).items() if h.extra_bytes and h.pending
    ]
    candidates.sort(key=lambda kh: max(_unit(m) for m in kh[1].readers if m.order < 0),
                    reverse=True)  # fmt: skip
    dropped = offloaded = 0
    for key, holding in candidates:
        if memory[device] + incoming <= limit:
            break
        kept = holding.kept
        readers = [
            m for m in holding.readers
            if m.order < 0 and not (kept and kept[0] <= m.piece[0] and m.piece[1] <= kept[1])
        ]  # fmt: skip
        sources = [_keeper(m, index, state, alive, device) for m in readers]
        memory[device] -= holding.extra_bytes
        holding.extra_bytes = 0
        if key[0] == "kv" and any(s is None for s in sources):
            offloaded += 1  # the readers stay: the executor sends it from host memory
            continue
        dropped += 1
        for move, source in zip(readers, sources, strict=True):
            # Off an alive device onto an alive device or the loader: the batch stays.
            move.source = source
            holding.pending -= 1
            if source is not None and source in state:
                other = state[source][key]
                other.readers.append(move)
                other.pending += 1
    return dropped, offloaded


def _keeper(
    move: _Move,
    index: _HolderIndex,
    state: dict[Device, dict[Key, _Holding]],
    alive: set[str],
    exclude: Device,
) -> Device | None:
    """An alive device other than ``exclude`` that holds ``move``'s piece for good: one whose
    role does not change, or that keeps the piece under its new role."""
    lo, hi = move.piece
    for device, interval in index.get(move.key):
        if device in (exclude, move.dest) or device[0] not in alive:
            continue
        if not (interval[0] <= lo and hi <= interval[1]):
            continue
        if device in state:
            kept = state[device][move.key].kept
            if kept is None or not (kept[0] <= lo and hi <= kept[1]):
                continue
        return device
    return None


def _move_sort(move: _Move) -> tuple[int, Device, str, int, str, Interval]:
    return (move.order, move.dest, move.key[0], move.key[1], move.key[2] or "", move.piece)


def _transfer(move: _Move, den: int) -> Transfer:
    lo, hi = move.piece
    divisor = gcd(gcd(lo, hi), den)
    source = move.source
    return Transfer(
        kind=move.key[0],
        instance_id=move.dest[0],
        device=move.dest[1],
        layer=move.key[1],
        den=den // divisor,
        lo=lo // divisor,
        hi=hi // divisor,
        request_id=move.key[2],
        source_instance=source[0] if source else None,
        source_device=source[1] if source else None,
        nbytes=move.nbytes,
        order=move.order,
    )
