"""Device placement: which GPUs of a node the trainer ranks use and which each engine server gets.

The rule (pure, no torch): on a node with K GPUs and T trainer ranks, trainer local rank r uses GPU r (torchrun's
LOCAL_RANK → ``cuda:r``, see :mod:`oapl_megatron.parallel.bootstrap`), and the engines take the rest in order,
``engine_tp`` GPUs each. ``rollout.devices`` can name the engines' GPUs explicitly instead. Overlap, too few GPUs,
or a TP group that would span nodes is a :class:`~oapl_megatron.config.loader.ConfigError` naming the fields —
not a crash at the first weight sync. On a CPU node (K = 0) the same code assigns nothing: every engine gets an
empty device tuple and no ``CUDA_VISIBLE_DEVICES``.

    p = place_node(gpus=8, trainer_ranks=4, engines=2, engine_tp=2)
    p.trainer_gpus            # (0, 1, 2, 3)
    p.engine_gpus             # ((4, 5), (6, 7))
    p.engine_env(1)           # {"CUDA_VISIBLE_DEVICES": "6,7"}
    print(p.describe())
"""

from __future__ import annotations

from dataclasses import dataclass

from oapl_megatron.config.loader import ConfigError


@dataclass(frozen=True)
class NodePlacement:
    """One node's GPU assignment. ``visible`` maps GPU indices to the ids the node's CUDA_VISIBLE_DEVICES shows."""

    gpus: int
    trainer_gpus: tuple[int, ...]
    engine_gpus: tuple[tuple[int, ...], ...]
    first_engine_id: int = 0
    visible: tuple[str, ...] | None = None

    def engine_env(self, i: int) -> dict[str, str]:
        """Environment of local engine ``i``: its CUDA_VISIBLE_DEVICES (nothing on CPU)."""
        if not self.gpus:
            return {}
        ids = [self.visible[g] if self.visible else str(g) for g in self.engine_gpus[i]]
        return {"CUDA_VISIBLE_DEVICES": ",".join(ids)}

    def describe(self) -> str:
        """One line a user can check before a long run starts."""
        if not self.gpus:
            parts = [f"{len(self.trainer_gpus) or 'no'} trainer GPUs"] if self.trainer_gpus else []
            return (f"placement: CPU node, {len(self.engine_gpus)} engine(s) without GPU assignment"
                    + (f", {parts[0]}" if parts else ""))
        out = [f"placement on a {self.gpus}-GPU node:"]
        if self.trainer_gpus:
            out.append(f"trainer local ranks 0-{len(self.trainer_gpus) - 1} → GPUs {_fmt(self.trainer_gpus)}")
        for i, g in enumerate(self.engine_gpus):
            out.append(f"engine {self.first_engine_id + i} → GPUs {_fmt(g)}")
        free = sorted(set(range(self.gpus)) - set(self.trainer_gpus) - {x for g in self.engine_gpus for x in g})
        if free:
            out.append(f"idle GPUs {_fmt(free)}")
        return " | ".join(out)


def _fmt(gpus) -> str:
    return ",".join(str(g) for g in gpus)


def check_trainer_grid(ranks_per_node: int, nodes: int, tp: int, pp: int, gpus: int,
                       ranks_field: str = "launch.trainer_ranks_per_node") -> None:
    """The trainer's ranks must fill the (tp, pp, dp) grid, and a TP group must stay inside one node (megatron
    puts consecutive ranks in one TP group; across nodes its all-reduces would cross the slow network)."""
    world = ranks_per_node * nodes
    if world % (tp * pp):
        raise ConfigError(f"{world} trainer ranks ({ranks_field}={ranks_per_node} × {nodes} node(s)) are not "
                          f"divisible by parallel.tp × parallel.pp = {tp} × {pp}; change parallel.tp/pp or the "
                          "number of trainer ranks")
    if gpus and ranks_per_node % tp:
        raise ConfigError(f"parallel.tp={tp} does not divide the {ranks_per_node} trainer ranks per node "
                          f"({ranks_field}): a tensor-parallel group would span two nodes; use a tp that divides it")
    if gpus and ranks_per_node > gpus:
        raise ConfigError(f"{ranks_field}={ranks_per_node} trainer ranks on a node with {gpus} GPUs "
                          "(launch.gpus_per_node): one GPU per rank")


def place_node(gpus: int, trainer_ranks: int, engines: int, engine_tp: int,
               devices: list[int] | None = None, first_engine_id: int = 0,
               visible: tuple[str, ...] | None = None,
               ranks_field: str = "launch.trainer_ranks_per_node") -> NodePlacement:
    """Assign GPUs on one node: trainer ranks on GPUs ``0..trainer_ranks-1``, engines on the rest (or on
    ``devices``, ``engine_tp`` consecutive entries per engine). ``gpus=0``: a CPU node, nothing is assigned."""
    if not gpus:
        if devices:
            raise ConfigError(f"rollout.devices={devices} but the node has no GPU; remove rollout.devices on CPU")
        return NodePlacement(0, (), tuple(() for _ in range(engines)), first_engine_id, visible)
    if trainer_ranks > gpus:
        raise ConfigError(f"{trainer_ranks} trainer ranks ({ranks_field}) on a node with {gpus} GPUs: one GPU per rank")
    if engine_tp > gpus:
        raise ConfigError(f"rollout.engine_tp={engine_tp} exceeds the node's {gpus} GPUs; an engine lives on one "
                          "node")
    trainer = tuple(range(trainer_ranks))
    need = engines * engine_tp
    if devices is None:
        free = gpus - trainer_ranks
        if need > free:
            raise ConfigError(
                f"rollout.engines={engines} × rollout.engine_tp={engine_tp} = {need} GPUs needed for engines, but "
                f"only {free} of the node's {gpus} GPUs are left after {trainer_ranks} trainer ranks "
                f"({ranks_field}): lower rollout.engines or the trainer ranks, or put the engines on their own nodes")
        flat = list(range(trainer_ranks, trainer_ranks + need))
    else:
        flat = list(devices)
        if len(flat) != need:
            raise ConfigError(f"rollout.devices has {len(flat)} GPU ids, rollout.engines × rollout.engine_tp = "
                              f"{engines} × {engine_tp} = {need} are needed (engine_tp consecutive ids per engine)")
        bad = [d for d in flat if not 0 <= d < gpus]
        if bad:
            raise ConfigError(f"rollout.devices: GPU ids {bad} do not exist on a {gpus}-GPU node (0..{gpus - 1})")
        dup = sorted({d for d in flat if flat.count(d) > 1})
        if dup:
            raise ConfigError(f"rollout.devices lists GPUs {dup} more than once: each engine needs its own GPUs")
        clash = sorted(set(flat) & set(trainer))
        if clash:
            raise ConfigError(f"rollout.devices={flat} overlaps the trainer's GPUs {_fmt(trainer)} ({trainer_ranks} "
                              f"trainer ranks, {ranks_field}) on GPUs {clash}: vLLM refuses to start next to a "
                              "trainer rank and NCCL rejects two ranks on one GPU; pick other GPUs")
    groups = tuple(tuple(flat[i * engine_tp:(i + 1) * engine_tp]) for i in range(engines))
    return NodePlacement(gpus, trainer, groups, first_engine_id, visible)


@dataclass(frozen=True)
class ClusterPlacement:
    """A heterogeneous job: identical trainer nodes (component 0) and identical engine nodes (component 1)."""

    trainer_nodes: int
    trainer_ranks_per_node: int
    trainer: NodePlacement          # every trainer node looks like this
    engine_nodes: int
    engines_per_node: int
    engine: NodePlacement           # every engine node looks like this (engine ids offset per node)

    def engine_node(self, node_index: int) -> NodePlacement:
        """The placement of engine node ``node_index`` with its global engine ids."""
        return NodePlacement(self.engine.gpus, (), self.engine.engine_gpus,
                             node_index * self.engines_per_node, self.engine.visible)

    def describe(self) -> str:
        gpus = self.trainer.gpus
        kind = f"{gpus} GPUs" if gpus else "CPU"
        return (f"trainer: {self.trainer_nodes} node(s) × {self.trainer_ranks_per_node} ranks ({kind}/node); "
                f"engines: {self.engine_nodes} node(s) × {self.engines_per_node} engine server(s)"
                + (f", GPUs per engine {[list(g) for g in self.engine.engine_gpus]}" if gpus else ""))


def trainer_ranks_per_node(cfg) -> int:
    """``launch.trainer_ranks_per_node``, else one per GPU, else (CPU) one model replica: tp × pp."""
    lc = cfg.launch
    if lc.trainer_ranks_per_node is not None:
        return lc.trainer_ranks_per_node
    return lc.gpus_per_node or cfg.parallel.tp * cfg.parallel.pp


def place_cluster(cfg) -> ClusterPlacement:
    """The layout of ``cfg`` (a RunConfig) as a heterogeneous job; ConfigError names the fields that disagree."""
    lc, ro = cfg.launch, cfg.rollout
    gpus = lc.gpus_per_node
    ranks = trainer_ranks_per_node(cfg)
    check_trainer_grid(ranks, lc.trainer_nodes, cfg.parallel.tp, cfg.parallel.pp, gpus)
    trainer = place_node(gpus, ranks, 0, 1)
    if lc.engine_nodes < 1:
        raise ConfigError("launch.engine_nodes=0: a Slurm job puts the engines on their own nodes; set "
                          "launch.engine_nodes >= 1 (or run `oapl-launch local` inside an allocation)")
    if ro.devices is not None:
        raise ConfigError("rollout.devices is for engines spawned next to the trainer (rollout.mode=local); on "
                          "engine nodes every GPU belongs to the engines: remove rollout.devices")
    per_node = lc.engines_per_node or (gpus // ro.engine_tp if gpus else 1)
    if per_node < 1:
        raise ConfigError(f"rollout.engine_tp={ro.engine_tp} exceeds launch.gpus_per_node={gpus}")
    if per_node * lc.engine_nodes != ro.engines:
        raise ConfigError(f"rollout.engines={ro.engines} but launch.engine_nodes={lc.engine_nodes} × "
                          f"{per_node} engine(s) per node (launch.engines_per_node, default gpus_per_node // "
                          f"rollout.engine_tp) = {per_node * lc.engine_nodes}; make them agree")
    engine = place_node(gpus, 0, per_node, ro.engine_tp, ranks_field="(engine node)")
    return ClusterPlacement(lc.trainer_nodes, ranks, trainer, lc.engine_nodes, per_node, engine)


def parse_visible(value: str | None) -> tuple[str, ...] | None:
    """CUDA_VISIBLE_DEVICES of the trainer as a tuple (None when unset): engine GPU ``i`` is ``visible[i]``."""
    if value is None or not value.strip():
        return None
    return tuple(v.strip() for v in value.split(",") if v.strip())
