"""Attack suite and basics of the code sandbox (oapl_megatron/tasks/sandbox/), with real child processes.

Every hostile program in tests/sandbox_attacks/ (each says what it attacks in its first line) is scored through
``code_reward`` against the expected output "PWNED": contained means reward 0 with a stated reason, the test
process alive, no process left behind, and the machine responsive afterwards. The attacks run two at a time.
Attacks whose containment needs an isolation layer this machine lacks are not run (skipped, naming the layer).
Run: ``.venv/bin/python -m pytest tests/test_sandbox.py -q`` (about 20-30 s on an idle 2-core machine).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

from oapl_megatron.config.sandbox import CodeRewardConfig, SandboxConfig
from oapl_megatron.tasks.code_reward import code_reward
from oapl_megatron.tasks.sandbox import SandboxUnavailable, isolation_report, run_many, run_sandboxed
from oapl_megatron.tasks.sandbox.resources import cgroup_v1_roots

ATTACK_DIR = Path(__file__).parent / "sandbox_attacks"
REPO = Path(__file__).resolve().parent.parent
LIMITS = SandboxConfig(
    wall_timeout_s=3.0, cpu_time_s=2, memory_bytes=256 * 2**20, max_file_bytes=4 * 2**20,
    max_stdout_bytes=2**20, max_processes=32,
)
CFG = CodeRewardConfig(num_workers=1, sandbox=LIMITS)
ISO = set(isolation_report(LIMITS))
ROOT = os.geteuid() == 0
# Who may not be signalled / read by the program: true with a pid namespace, or a separate uid.
SEPARATED = "pidns" in ISO or "uid" in ISO or not ROOT and "userns" in ISO

# name -> (reasons that count as contained, whether this machine's isolation can contain it, what it needs)
ATTACKS: dict[str, tuple[set[str], bool, str]] = {
    "fork_bomb": ({"timeout", "cpu_limit", "process_limit"}, "cgroup:pids" in ISO or "uid" in ISO,
                  "a pids cgroup or a sandbox uid (RLIMIT_NPROC)"),
    "memory_bomb": ({"memory_limit"}, True, ""),
    # OOM kills in a cgroup can take seconds on a loaded machine; running into the wall limit is contained too.
    "memory_bomb_procs": ({"memory_limit", "timeout"}, "cgroup:memory" in ISO, "a memory cgroup"),
    # On a loaded 2-core machine 2 s of CPU may not fit in 3 s of wall time; test_cpu_limit_fires checks SIGXCPU.
    "cpu_spin": ({"cpu_limit", "timeout"}, True, ""),
    "sleep_forever": ({"timeout"}, True, ""),
    "daemon_escape": ({"wrong_answer"}, bool(ISO & {"pidns", "cgroup:pids", "uid"}),
                      "a pid namespace, a pids cgroup or a sandbox uid"),
    "network_connect": ({"runtime_error"}, "netns" in ISO, "a network namespace"),
    "write_outside": ({"wrong_answer"}, "mountns" in ISO and ("uid" in ISO or not ROOT),
                      "a mount namespace and a non-root program"),
    "read_parent_env": ({"wrong_answer"}, SEPARATED, "a pid namespace or a sandbox uid"),
    "signal_parent": ({"runtime_error"}, SEPARATED, "a pid namespace or a sandbox uid"),
    "output_flood": ({"output_limit"}, True, ""),
    "deep_recursion": ({"cpu_limit", "memory_limit", "runtime_error", "killed:SIGSEGV", "timeout"}, True, ""),
    "huge_file": ({"file_size_limit"}, True, ""),
    "fd_exhaustion": ({"open_files_limit"}, True, ""),
    "thread_bomb": ({"process_limit", "memory_limit"}, True, ""),
    "kill_everything": ({"wrong_answer"}, SEPARATED, "a pid namespace or a sandbox uid"),
    "read_root_files": ({"wrong_answer"}, "uid" in ISO or not ROOT, "a non-root program"),
    "privilege_escalation": ({"wrong_answer"}, "uid" in ISO or not ROOT, "a non-root program"),
}
SECRET = "s3cr3t-" + uuid.uuid4().hex


@dataclasses.dataclass
class Outcome:
    reward: dict
    elapsed_s: float
    finished_at: float
    responsive_s: float  # a trivial subprocess started right after the attack: its wall time


@dataclasses.dataclass
class Env:
    token: str
    drop_dir: Path
    listener: socket.socket
    ctx: str
    workdirs_before: set[str]
    children_before: set[int]  # other test modules' session fixtures may own child processes


def _trivial_subprocess_s() -> float:
    t = time.monotonic()
    subprocess.run([sys.executable, "-I", "-S", "-c", "pass"], check=True, timeout=5)
    return time.monotonic() - t


def _sandbox_workdirs() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("oapl_sbx_*")}


def _sandbox_uid_procs() -> list[psutil.Process]:
    lo, hi = LIMITS.uid_base, LIMITS.uid_base + LIMITS.max_slots
    out = []
    for p in psutil.process_iter(["uids"]):
        uids = p.info["uids"]
        if uids is not None and lo <= uids.real < hi:
            out.append(p)
    return out


@pytest.fixture(scope="module")
def env():
    token = uuid.uuid4().hex[:12]
    # A host directory every uid may write, outside /tmp (which the sandbox replaces): the daemon's target.
    base = Path("/run") if os.access("/run", os.W_OK) else REPO
    drop_dir = base / f"oapl_sandbox_test_{token}"
    drop_dir.mkdir(mode=0o777)
    drop_dir.chmod(0o777)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.2)
    ctx = json.dumps({
        "token": token, "repo": str(REPO), "port": listener.getsockname()[1], "pytest_pid": os.getpid(),
        "drop_dir": str(drop_dir), "tmp_marker": f"/tmp/oapl_attack_{token}",
    })
    old = os.environ.get("OAPL_SECRET_TOKEN")
    os.environ["OAPL_SECRET_TOKEN"] = SECRET
    try:
        yield Env(token, drop_dir, listener, ctx, _sandbox_workdirs(),
                  {c.pid for c in psutil.Process().children(recursive=True)})
    finally:
        if old is None:
            os.environ.pop("OAPL_SECRET_TOKEN", None)
        else:
            os.environ["OAPL_SECRET_TOKEN"] = old
        listener.close()
        for p in drop_dir.iterdir():
            p.unlink()
        drop_dir.rmdir()
        for leftover in (Path(f"/tmp/oapl_attack_{token}"), REPO / f"oapl_attack_{token}",
                         Path(f"/oapl_attack_{token}"), Path("/etc/oapl_attack_marker")):
            leftover.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def outcomes(env):
    """Run every attack this machine can contain (plus the drop-dir control), two at a time."""
    names = [n for n, (_, runnable, _) in ATTACKS.items() if runnable] + ["drop_dir_writer"]

    def attack(name: str) -> Outcome:
        src = (ATTACK_DIR / f"{name}.py").read_text()
        t0 = time.monotonic()
        reward = code_reward(src, {"inputs": [env.ctx], "outputs": ["PWNED"]}, CFG)
        done = time.monotonic()
        return Outcome(reward, done - t0, done, _trivial_subprocess_s())

    with ThreadPoolExecutor(max_workers=2) as ex:
        return dict(zip(names, ex.map(attack, names)))


@pytest.mark.parametrize("name", list(ATTACKS))
def test_attack_is_contained(name, outcomes, env):
    allowed, runnable, needs = ATTACKS[name]
    if not runnable:
        pytest.skip(f"containing {name} needs {needs}; this machine's sandbox has {sorted(ISO)}")
    out = outcomes[name]
    r = out.reward
    detail = r["details"][0]
    assert r["reward"] == 0.0 and r["passed"] == 0 and r["failed"] == 1, r
    assert detail["reason"] in allowed, detail
    assert r["error"] == f"test 0: {detail['reason']}"
    assert "PWNED" not in detail["stdout_head"] and SECRET not in detail["stdout_head"] + detail["stderr_tail"]
    # The wall limit is 3 s; the kill, reaping and cgroup removal must not add more than a few seconds.
    assert out.elapsed_s < LIMITS.wall_timeout_s + 4.0, out.elapsed_s
    assert out.responsive_s < 2.0, f"a trivial subprocess took {out.responsive_s:.2f} s after {name}"
    assert psutil.pid_exists(os.getpid())


def test_control_program_passes_and_writes(outcomes, env):
    # The same channel the daemon would use works for a normal program: the daemon check below can fail.
    assert outcomes["drop_dir_writer"].reward["reward"] == 1.0
    assert (env.drop_dir / "control_marker").read_text() == "written from inside"


def test_daemon_does_not_outlive_the_sandbox(outcomes, env):
    if not ATTACKS["daemon_escape"][1]:
        pytest.skip("no pid namespace, pids cgroup or sandbox uid on this machine")
    # The daemon would write 1.0 s after its sandbox ended; wait past that.
    time.sleep(max(0.0, outcomes["daemon_escape"].finished_at + 2.0 - time.monotonic()))
    assert not (env.drop_dir / "daemon_marker").exists()


def test_network_listener_got_no_connection(outcomes, env):
    if not ATTACKS["network_connect"][1]:
        pytest.skip("no network namespace on this machine")
    with pytest.raises(socket.timeout):
        env.listener.accept()
    # Control: the listener does accept a connection from outside the sandbox.
    c = socket.create_connection(env.listener.getsockname(), timeout=2)
    conn, _ = env.listener.accept()
    conn.close()
    c.close()


def test_nothing_written_outside(outcomes, env):
    if not ATTACKS["write_outside"][1]:
        pytest.skip("no mount namespace or non-root program on this machine")
    name = f"oapl_attack_{env.token}"
    for p in (Path("/tmp", name), REPO / name, Path("/", name), Path("/etc/oapl_attack_marker")):
        assert not p.exists(), p


def test_no_process_or_directory_left_behind(outcomes, env):
    time.sleep(0.2)
    assert {c.pid for c in psutil.Process().children(recursive=True)} - env.children_before == set()
    assert _sandbox_uid_procs() == []
    assert _sandbox_workdirs() - env.workdirs_before == set()
    for _, root in cgroup_v1_roots(("pids", "memory")):
        assert list(Path(root).glob(f"oapl_sbx_{os.getpid()}_*")) == []


def test_clean_environment_and_private_home(env):
    prog = "import json, os, sys; print(json.dumps({'env': dict(os.environ), 'cwd': os.getcwd(), 'path': sys.path}))"
    res = run_sandboxed(prog, b"", LIMITS)
    assert res.exit_code == 0, res.stderr
    got = json.loads(res.stdout)
    assert "OAPL_SECRET_TOKEN" not in got["env"] and SECRET not in res.stdout.decode()
    assert set(got["env"]) == {"PATH", "LANG", "LC_ALL", "HOME", "TMPDIR", "PYTHONHASHSEED",
                               "PYTHONDONTWRITEBYTECODE", "PYTHONIOENCODING"}
    assert got["env"]["HOME"] == got["cwd"]
    assert not any("site-packages" in p or str(REPO) == p for p in got["path"]), got["path"]


def test_stdin_stdout_roundtrip_large_and_argv():
    data = os.urandom(3 * 2**20).hex().encode()  # 6 MiB in, 6 MiB out: both pipes must be pumped together
    prog = (
        "import sys\n"
        "d = sys.stdin.buffer.read()\n"
        "sys.stdout.buffer.write(d[::-1])\n"
        "print(sys.argv[1:], file=sys.stderr)\n"
    )
    res = run_sandboxed(prog, data, SandboxConfig(wall_timeout_s=20, max_stdout_bytes=8 * 2**20), ["a", "b c"])
    assert res.exit_code == 0 and res.limit_hit is None, res
    assert res.stdout == data[::-1]
    assert res.stderr.strip() == b"['a', 'b c']"


def test_exit_code_signal_and_stderr():
    res = run_sandboxed("import sys; sys.stderr.write('boom'); sys.exit(7)", b"", LIMITS)
    assert (res.exit_code, res.signal, res.stderr, res.limit_hit) == (7, None, b"boom", None)
    res = run_sandboxed("import os, signal; os.kill(os.getpid(), signal.SIGTERM)", b"", LIMITS)
    assert res.exit_code is None and res.signal == 15 and res.killed_reason == "signal:SIGTERM"


def test_run_many_keeps_order_and_runs_in_parallel():
    progs = [f"import time; time.sleep(0.6); print({i})" for i in range(4)]
    t = time.monotonic()
    res = run_many(progs, None, LIMITS, num_workers=2)
    elapsed = time.monotonic() - t
    assert [r.stdout for r in res] == [b"0\n", b"1\n", b"2\n", b"3\n"]
    assert 1.2 <= elapsed < 2.3, elapsed  # two waves of 0.6 s; serial would be >= 2.4 s
    with pytest.raises(ValueError, match="stdins has 1 entries for 4 programs"):
        run_many(progs, [b""], LIMITS)


def test_degraded_mode_warns_once_and_still_kills_daemons(caplog, env):
    weak = LIMITS.model_copy(update={"use_namespaces": False, "use_cgroups": False})
    marker = env.drop_dir / "daemon_marker_degraded"
    daemon = (ATTACK_DIR / "daemon_escape.py").read_text().replace('"daemon_marker"', '"daemon_marker_degraded"')
    with caplog.at_level(logging.WARNING, logger="oapl_megatron.tasks.sandbox"):
        # Without namespaces or cgroups only the per-slot uid (root machines) lets the sandbox find a daemon.
        has_uid = "uid" in isolation_report(weak)
        first = run_sandboxed(daemon if has_uid else "print(1)", env.ctx.encode(), weak)
        run_sandboxed("print(1)", b"", weak)
    warnings = [r for r in caplog.records if "degraded" in r.getMessage()]
    assert len(warnings) == 1 and "namespaces" in warnings[0].getMessage(), [r.getMessage() for r in warnings]
    assert first.exit_code == 0 and "netns" not in first.isolation
    if has_uid:
        time.sleep(2.0)
        assert not marker.exists()
        assert _sandbox_uid_procs() == []
    strict = weak.model_copy(update={"require_isolation": True})
    with pytest.raises(SandboxUnavailable, match="namespaces"):
        run_sandboxed("print(1)", b"", strict)


def test_cpu_limit_fires():
    # The wall limit is far away, so only RLIMIT_CPU (SIGXCPU at 1 s of CPU) can end the spin.
    lim = LIMITS.model_copy(update={"cpu_time_s": 1, "wall_timeout_s": 15.0})
    r = code_reward((ATTACK_DIR / "cpu_spin.py").read_text(), {"inputs": [""], "outputs": ["PWNED"]},
                    CFG.model_copy(update={"sandbox": lim}))
    d = r["details"][0]
    assert (r["reward"], d["reason"], d["killed_reason"]) == (0.0, "cpu_limit", "signal:SIGXCPU"), d
    assert 0.8 <= d["cpu_s"] < 3.0 and d["wall_s"] < 15.0  # rusage is tick-granular


def test_slots_are_exclusive_across_processes(tmp_path):
    """A slot (its uid) held by another process is never handed out here, and is free again once it exits."""
    from oapl_megatron.tasks.sandbox.resources import SlotPool

    base = 61000 + 7000  # a uid range no other test uses
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from oapl_megatron.tasks.sandbox.resources import SlotPool; "
         f"p = SlotPool(); print(p.acquire(2, {base})); sys.stdout.flush(); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "0"
        here = SlotPool()
        assert here.acquire(2, base) == 1  # slot 0 is locked by the other process
        with pytest.raises(TimeoutError, match="no free sandbox slot"):
            here.acquire(2, base, timeout_s=0.3)
        here.release(1)
    finally:
        holder.kill()
        holder.wait()
    assert SlotPool().acquire(2, base, timeout_s=5) == 0  # the kernel dropped the dead holder's lock
