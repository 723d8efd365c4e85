"""Move weights between Hugging Face safetensors and a live (sharded) Megatron model.

Two directions, both driven by the one mapping in :mod:`oapl_megatron.models.mapping`:

* :func:`load_hf_weights` — every rank copies the HF tensors its own shard needs into its model chunks. No
  collectives: each rank opens the safetensors files (single ``model.safetensors`` or sharded with
  ``model.safetensors.index.json``) with ``safetensors.safe_open`` and reads only the tensors of its layers.
* :func:`iter_hf_weights` — a generator that yields ``(hf_name, full tensor)`` on one destination rank, layer by
  layer, for the weight sync to vLLM and for writing HF checkpoints. Peak extra memory on any rank is one merged
  parameter (plus its TP shards on the gathering rank); nothing is buffered. :func:`gather_hf_weights` gives the
  same stream plus every tensor's name, dtype and shape up front (from the architecture), so a weight sync can plan
  its buckets before the first tensor is gathered.

Use::

    chunks = build_policy(arch, model_cfg, ctx)
    load_hf_weights(chunks, ctx, arch, "/models/Qwen3-0.6B")
    for name, tensor in iter_hf_weights(chunks, ctx, arch, dst_rank=0):   # every rank of dst's replica iterates
        ...                                                                 # only rank 0 gets items

``chunks`` is the list of model chunks of this rank (one per virtual pipeline stage, in chunk order); wrappers
with a ``.module`` attribute (megatron DDP, Float16Module) are unwrapped, so names carry no ``module.`` prefix.
The layer spec (local or Transformer Engine) is detected from the parameter names.

Process groups and devices come from ``ctx`` (:class:`~oapl_megatron.parallel.bootstrap.ParallelContext`): every
tensor handed to a collective lives on ``ctx.device`` (cuda with NCCL, cpu with gloo).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
import torch.distributed as dist

from oapl_megatron.models import mapping as M

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class CheckpointFileError(RuntimeError):
    """A safetensors checkpoint is missing a file or tensor, or a file is unreadable; the message names both."""


# ----------------------------------------------------------------------------------------------------------------
# Reading HF safetensors lazily
# ----------------------------------------------------------------------------------------------------------------


class SafetensorsSource(Mapping):
    """A read-only ``{hf_name: tensor}`` view of an HF directory; tensors are read from disk on access.

    The weight map comes from ``model.safetensors.index.json`` when present, else from the headers of every
    ``*.safetensors`` file in the directory. Files are opened lazily and kept open (``safe_open`` memory-maps
    them, so an open handle costs address space, not RSS). A tensor read returns a fresh CPU tensor.
    """

    def __init__(self, hf_dir: str | os.PathLike):
        self.dir = Path(hf_dir)
        if not self.dir.is_dir():
            raise CheckpointFileError(f"{self.dir}: not a directory with Hugging Face safetensors weights")
        self._handles: dict[str, object] = {}
        index = self.dir / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CheckpointFileError(f"{index}: not a safetensors index (needs a 'weight_map' object): {exc}")
            self.weight_map: dict[str, str] = dict(weight_map)
            missing = sorted({f for f in self.weight_map.values() if not (self.dir / f).is_file()})
            if missing:
                example = next(n for n, f in self.weight_map.items() if f == missing[0])
                raise CheckpointFileError(
                    f"{index} lists shard file(s) {missing} that are not in {self.dir} (e.g. tensor {example!r}); "
                    "the download or copy is incomplete"
                )
        else:
            files = sorted(p.name for p in self.dir.glob("*.safetensors"))
            if not files:
                raise CheckpointFileError(f"{self.dir}: no {SINGLE_FILE}, no {INDEX_FILE}, no *.safetensors files")
            self.weight_map = {}
            for f in files:
                for name in self.open_file(f).keys():
                    self.weight_map[name] = f

    def open_file(self, file: str):
        handle = self._handles.get(file)
        if handle is None:
            from safetensors import safe_open

            path = self.dir / file
            try:
                handle = safe_open(str(path), framework="pt", device="cpu")
            except Exception as exc:  # safetensors raises its own SafetensorError for truncated/corrupt headers
                raise CheckpointFileError(f"{path}: unreadable safetensors file (truncated or corrupt?): {exc}") \
                    from None
            self._handles[file] = handle
        return handle

    def __getitem__(self, name: str) -> torch.Tensor:
        file = self.weight_map.get(name)
        if file is None:
            raise KeyError(name)
        try:
            return self.open_file(file).get_tensor(name)
        except CheckpointFileError:
            raise
        except Exception as exc:
            raise CheckpointFileError(f"{self.dir / file}: cannot read tensor {name!r} (truncated file?): {exc}") \
                from None

    def file_of(self, name: str) -> str:
        return str(self.dir / self.weight_map.get(name, "?"))

    def __iter__(self):
        return iter(self.weight_map)

    def __len__(self) -> int:
        return len(self.weight_map)


# ----------------------------------------------------------------------------------------------------------------
# Model chunks
# ----------------------------------------------------------------------------------------------------------------


def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """Strip megatron DDP / Float16Module wrappers (anything with a ``.module``)."""
    while hasattr(chunk, "module") and isinstance(chunk.module, torch.nn.Module):
        chunk = chunk.module
    return chunk


def detect_spec(chunks) -> M.SpecName:
    """``"te"`` when the layer norms are fused into TE linears, else ``"local"``."""
    for chunk in chunks:
        for name, _ in unwrap(chunk).named_parameters():
            if name.endswith("linear_qkv.layer_norm_weight"):
                return "te"
    return "local"


def _placement(ctx, arch) -> M.LayerPlacement:
    return M.layer_placement(arch.num_layers, ctx.pp, ctx.vpp)


def canonical_params(chunks, ctx, arch) -> dict[str, tuple[torch.nn.Parameter, int]]:
    """``{canonical megatron name: (parameter, chunk index)}`` for this rank; checks the chunks fit the layout."""
    if len(chunks) != (ctx.vpp or 1):
        raise ValueError(f"got {len(chunks)} model chunks, expected vpp={ctx.vpp or 1}")
    placement = _placement(ctx, arch)
    spec = detect_spec(chunks)
    out: dict[str, tuple[torch.nn.Parameter, int]] = {}
    for c, chunk in enumerate(chunks):
        for local, param in unwrap(chunk).named_parameters():
            try:
                name = placement.to_global_name(local, ctx.pp_rank, c)
            except ValueError as exc:
                raise M.MappingError(f"parameter {local} of chunk {c} on pp stage {ctx.pp_rank}: {exc}") from None
            M.find_rule(arch, name, spec)  # raises for a parameter the mapping does not know
            out[name] = (param, c)
    # Every parameter the layout puts on this rank must be there (a missing one would silently keep its init).
    for c in range(ctx.vpp or 1):
        for name in _names_of_chunk(arch, spec, placement, ctx.pp_rank, c):
            if name not in out and not _optional_on_stage(arch, name, placement, ctx.pp_rank, c):
                raise M.MappingError(f"model chunk {c} on pp stage {ctx.pp_rank} has no parameter {name}; "
                                     "the model does not match the arch / tp / pp / vpp it was given")
    return out


def _owner(name: str, placement: M.LayerPlacement) -> tuple[int, int]:
    """(pp_rank, chunk) holding canonical ``name``."""
    layer, _ = M.split_layer_name(name)
    if layer is not None:
        pp_rank, chunk, _ = placement.locate(layer)
        return pp_rank, chunk
    if name.startswith("embedding."):
        return 0, 0
    return placement.pp - 1, placement.vpp - 1


def _names_of_chunk(arch, spec, placement, pp_rank, chunk) -> list[str]:
    return [n for n in M.megatron_names_in_order(arch, spec) if _owner(n, placement) == (pp_rank, chunk)]


def _optional_on_stage(arch, name, placement, pp_rank, chunk) -> bool:
    # A tied output layer exists as its own parameter only when the last stage does not hold the embedding.
    return name == "output_layer.weight" and arch.tie_word_embeddings and placement.is_first(pp_rank, chunk)


# ----------------------------------------------------------------------------------------------------------------
# HF → Megatron
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def load_hf_weights(chunks, ctx, arch, source: str | os.PathLike | Mapping[str, torch.Tensor],
                    progress=None) -> int:
    """Copy HF weights into this rank's model chunks; returns the number of parameters written.

    ``source``: an HF directory (safetensors, single or sharded) or a ``{hf_name: tensor}`` mapping (e.g. a
    transformers ``state_dict()``). Per rank and without collectives: each rank reads only the tensors behind its
    own parameters, one Megatron parameter at a time (peak extra memory: the HF tensors of one parameter).
    Shapes are checked against ``arch``; errors name the tensor and, for a directory, the file.
    ``progress``: optional callable ``(done, total)`` called after each parameter.
    """
    hf = SafetensorsSource(source) if isinstance(source, (str, os.PathLike)) else source
    spec = detect_spec(chunks)
    params = canonical_params(chunks, ctx, arch)
    for i, (name, (param, _)) in enumerate(params.items()):
        rule, layer = M.find_rule(arch, name, spec)
        files = (", ".join(sorted({hf.file_of(n) for n in rule.hf_names(layer)}))
                 if isinstance(hf, SafetensorsSource) else "the given state dict")
        padded = param.shape[0] * ctx.tp if rule.kind is M.Kind.VOCAB else 0
        try:
            shard = M.hf_to_megatron_shard(arch, hf, name, ctx.tp_rank, ctx.tp, padded, spec)
        except M.MappingError as exc:
            raise M.MappingError(f"{exc} (in {files})") from None
        if shard.shape != param.shape:
            raise M.MappingError(f"{name}: HF tensors from {files} give a shard of shape {tuple(shard.shape)}, "
                                 f"the model parameter has {tuple(param.shape)} (tp={ctx.tp}, rank {ctx.tp_rank})")
        param.data.copy_(shard)
        if progress is not None:
            progress(i + 1, len(params))
    return len(params)


# ----------------------------------------------------------------------------------------------------------------
# Megatron → HF (gather)
# ----------------------------------------------------------------------------------------------------------------


def _groups(ctx):
    """(tp_group, pp_group, mp_group) of this rank, from the context; a context without them has no live world."""
    if ctx.mp_group is None:
        raise ValueError("iter_hf_weights needs a ParallelContext from init_distributed/set_model_parallel "
                         "(this one carries no process groups)")
    return ctx.tp_group, ctx.pp_group, ctx.mp_group


def _param_data(name: str, param: torch.nn.Parameter) -> torch.Tensor:
    return param.detach()


def _dtype_table(params, tensor_of, mp_group, n_ranks: int) -> dict[str, torch.dtype]:
    """dtype of every Megatron tensor template (``decoder.layers.{i}.…`` or a plain name) across the replica.

    dst sizes its receive buffers from it. Templates, not names: megatron keeps e.g. torch-norm weights in fp32
    while the linears are bf16, but every layer has the same dtypes. Collective over ``mp_group`` (one
    ``all_gather_object``) when the replica has more than one rank.
    """
    local: dict[str, set[str]] = {}
    for n, (p, _) in params.items():
        local.setdefault(M.split_layer_name(n)[1], set()).add(str(tensor_of(n, p).dtype))
    tables = [local]
    if n_ranks > 1:
        tables = [None] * n_ranks
        dist.all_gather_object(tables, local, group=mp_group)
    merged: dict[str, set[str]] = {}
    for table in tables:
        for key, dtypes in table.items():
            merged.setdefault(key, set()).update(dtypes)
    mixed = {k: sorted(v) for k, v in merged.items() if len(v) > 1}
    if mixed:
        raise TypeError(f"iter_hf_weights: tensors of one kind differ in dtype across layers or stages: {mixed}")
    return {k: getattr(torch, v.pop().removeprefix("torch.")) for k, v in merged.items()}


def iter_hf_weights(chunks, ctx, arch, dst_rank: int = 0, *, include_tied_lm_head: bool = True,
                    tensor_of: Callable[[str, torch.nn.Parameter], torch.Tensor] | None = None
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, full tensor)`` on global rank ``dst_rank``, in HF layer order; nothing elsewhere.

    ``tensor_of(canonical_megatron_name, param)`` picks what is gathered per parameter (default: the parameter's
    data); e.g. ``lambda n, p: p.main_grad`` gathers megatron DDP gradients under HF names. Its results must have
    the parameter's shape, and one dtype per kind of tensor (the same for every layer).

    Collective contract:

    * Every rank of the model-parallel group (TP × PP of one data-parallel replica) that contains ``dst_rank``
      must iterate the generator to exhaustion, in step (they block on each other). Ranks of other replicas may
      call it too; it returns at once for them without communicating.
    * At the start, one ``all_gather_object`` over the model-parallel group exchanges the dtype of each kind of
      tensor (dst sizes its receive buffers with it).
    * Per Megatron parameter: the TP ranks of the owning pipeline stage ``gather`` their shards (over the TP
      group) to the stage's *leader* — the rank of that stage with dst's TP rank, so dst itself when it owns the
      stage. The leader merges the shards into HF tensors (fused QKV and gate/up split, vocab padding stripped) and,
      if it is not dst, ``send``s each to dst over the default group; dst ``recv``s into a buffer of the shape the
      architecture dictates. All participants walk the same global order, so sends and receives pair up; a
      blocking send bounds memory to one parameter in flight.
    * Every blocking call waits at most the process-group timeout (``parallel.timeout_s`` at init); a failure is
      re-raised naming the tensor and the peer rank.
    * ``lm_head.weight`` is emitted (the embedding tensor again, right after ``model.embed_tokens.weight``) when the
      embeddings are tied and ``include_tied_lm_head`` is true, since vLLM loads the output head from it.

    On dst a yielded tensor may alias the model's own parameter (replicated tensors, TP=1): copy it if it must
    outlive the next optimizer step. Memory on dst is bounded by what the caller keeps.
    """
    _, tensors = gather_hf_weights(chunks, ctx, arch, dst_rank, include_tied_lm_head=include_tied_lm_head,
                                   tensor_of=tensor_of)
    yield from tensors


def gather_hf_weights(chunks, ctx, arch, dst_rank: int = 0, *, include_tied_lm_head: bool = True,
                      tensor_of: Callable[[str, torch.nn.Parameter], torch.Tensor] | None = None
                      ) -> tuple[list[tuple[str, torch.dtype, tuple[int, ...]]], Iterator[tuple[str, torch.Tensor]]]:
    """:func:`iter_hf_weights` with the metadata up front: ``(metas, tensors)``.

    ``metas`` lists ``(hf_name, dtype, shape)`` of every tensor ``tensors`` will yield on ``dst_rank``, in order,
    derived from the architecture and the dtype table without materialising any tensor: a weight sync can plan
    its buckets and stream the gather into the broadcast (rank 0 then holds a few buckets, not the model).
    ``metas`` is the same on every rank of dst's replica, empty elsewhere.

    Collective: the dtype-table ``all_gather_object`` over the model-parallel group runs in this call (every rank
    of dst's replica calls it); the rest of the :func:`iter_hf_weights` contract applies to iterating ``tensors``.
    """
    tp_group, pp_group, mp_group = _groups(ctx)
    if dst_rank not in ctx.mp_ranks:
        return [], iter(())
    spec = detect_spec(chunks)
    params = canonical_params(chunks, ctx, arch)
    tensor_of = tensor_of or _param_data
    dtypes = _dtype_table(params, tensor_of, mp_group, len(ctx.mp_ranks))
    metas = []
    for name in M.megatron_names_in_order(arch, spec):
        rule, layer = M.find_rule(arch, name, spec)
        if rule.load_only:
            continue
        for hf_name in rule.hf_names(layer):
            dtype, shape = dtypes[M.split_layer_name(name)[1]], M.expected_hf_shape(arch, hf_name)
            metas.append((hf_name, dtype, shape))
            if hf_name == "model.embed_tokens.weight" and arch.tie_word_embeddings and include_tied_lm_head:
                metas.append(("lm_head.weight", dtype, shape))
    return metas, _gather(chunks, ctx, arch, dst_rank, include_tied_lm_head, tensor_of, spec, params, dtypes,
                          tp_group)


def _gather(chunks, ctx, arch, dst_rank, include_tied_lm_head, tensor_of, spec, params, dtypes, tp_group):
    mp_ranks = list(ctx.mp_ranks)
    me = ctx.rank
    placement = _placement(ctx, arch)
    pp_ranks = list(ctx.pp_ranks)
    # Megatron lays a replica's ranks out TP-fastest, so dst's TP rank is its index in the model-parallel group
    # modulo tp. The stage leaders are the ranks with dst's TP rank: exactly dst's pipeline group.
    dst_tp = mp_ranks.index(dst_rank) % ctx.tp
    if me == dst_rank and dst_rank not in pp_ranks:
        raise AssertionError(f"rank {me} is not in its own pipeline group {pp_ranks}")

    for name in M.megatron_names_in_order(arch, spec):
        rule, layer = M.find_rule(arch, name, spec)
        if rule.load_only:  # the tied output layer: its HF twin is the embedding
            continue
        owner_pp, _ = _owner(name, placement)
        if owner_pp != ctx.pp_rank:
            if me == dst_rank:  # another stage owns it: receive its HF tensors from that stage's leader
                leader = pp_ranks[owner_pp]
                for hf_name in rule.hf_names(layer):
                    dtype = dtypes[M.split_layer_name(name)[1]]
                    # on the group's device: the default group is NCCL on GPU, which cannot receive into CPU memory
                    buf = torch.empty(M.expected_hf_shape(arch, hf_name), dtype=dtype, device=ctx.device)
                    _p2p(dist.recv, buf, leader, hf_name, f"receiving from pp stage {owner_pp}")
                    yield from _emit(hf_name, buf, arch, include_tied_lm_head)
            continue
        local = tensor_of(name, params[name][0]).detach()
        if local.shape != params[name][0].shape:
            raise ValueError(f"tensor_of({name}) has shape {tuple(local.shape)}, the parameter "
                             f"{tuple(params[name][0].shape)}")
        is_leader = ctx.tp_rank == dst_tp
        if ctx.tp > 1:
            shards = [torch.empty_like(local) for _ in range(ctx.tp)] if is_leader else None
            try:
                dist.gather(local.contiguous(), shards, group=tp_group, group_dst=dst_tp)
            except RuntimeError as exc:
                raise RuntimeError(f"iter_hf_weights: TP gather of {name} on pp stage {ctx.pp_rank} to tp rank "
                                   f"{dst_tp} failed: {exc}") from exc
        else:
            shards = [local]
        if not is_leader:
            continue
        padded = local.shape[0] * ctx.tp if rule.kind is M.Kind.VOCAB else 0
        for hf_name, full in M.megatron_shards_to_hf(arch, name, shards, padded, spec).items():
            if me == dst_rank:
                yield from _emit(hf_name, full.contiguous(), arch, include_tied_lm_head)
            else:
                _p2p(dist.send, full.contiguous(), dst_rank, hf_name, "sending to the destination")


def _emit(hf_name, tensor, arch, include_tied_lm_head):
    yield hf_name, tensor
    if hf_name == "model.embed_tokens.weight" and arch.tie_word_embeddings and include_tied_lm_head:
        yield "lm_head.weight", tensor


def _p2p(op, tensor, peer: int, hf_name: str, what: str) -> None:
    try:
        op(tensor, peer)
    except RuntimeError as exc:
        raise RuntimeError(f"iter_hf_weights: {what} (global rank {peer}) for {hf_name} failed: {exc}") from exc
