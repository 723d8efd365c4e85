"""The launcher script: sets up a sandbox's isolation in the child and execs the program.

It runs as the caller's user (root here) in a new session. It is a string run with ``python -I -S -c`` so that
nothing of the project is imported in the child, and so that no Python code runs between fork and exec in the
(multi-threaded) caller. It reads one JSON spec from argv[1] (built by :func:`..execute.run_one`).
"""

# Linux clone(2) flags used by unshare(2).
CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

SETUP_ERROR = b"oapl-sandbox-setup-error:"  # launcher failures before exec start stderr with this marker

LAUNCHER = r"""
import ctypes, json, os, resource, signal, sys
spec = json.loads(sys.argv[1])
MARK = "oapl-sandbox-setup-error: "

def fail(what, err):
    os.write(2, (MARK + what + ": " + str(err) + "\n").encode())
    os._exit(125)

libc = ctypes.CDLL(None, use_errno=True)

def call(what, rc):
    if rc != 0:
        e = ctypes.get_errno()
        fail(what, os.strerror(e) + " (errno %d)" % e)

def write(path, text):
    with open(path, "w") as f:
        f.write(text)

resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
try:
    for p in spec["cgroup_procs"]:
        write(p, str(os.getpid()))
except OSError as e:
    fail("join cgroup", e)

flags = spec["unshare"]
if flags:
    call("unshare(0x%x)" % flags, libc.unshare(flags))
if spec["user_ns"]:
    # Map ns-root to the caller's uid/gid so files and mounts work; setgroups must be denied first.
    try:
        write("/proc/self/setgroups", "deny")
        write("/proc/self/uid_map", "0 %d 1" % spec["outer_uid"])
        write("/proc/self/gid_map", "0 %d 1" % spec["outer_gid"])
    except OSError as e:
        fail("user namespace id maps", e)
if spec["mount_ns"]:
    MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC, MS_PRIVATE = 2, 4, 8, 4096, 16384, 1 << 18
    call("make / private", libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None))
    call("bind workdir on /tmp", libc.mount(spec["workdir"].encode(), b"/tmp", None, MS_BIND, None))
    opts = ("size=%d,mode=1777" % spec["tmpfs_bytes"]).encode()
    for d in (b"/var/tmp", b"/dev/shm"):
        if os.path.isdir(d):
            call("tmpfs on " + d.decode(), libc.mount(b"tmpfs", d, b"tmpfs", MS_NOSUID | MS_NODEV, opts))

# Non-dumpable: the launcher and the pid-namespace init cannot be ptraced and their /proc files (environ, mem)
# belong to root, even for a program that is root inside a user namespace (exec makes the program dumpable
# again). Set after the id maps, which a non-dumpable process may not write.
call("PR_SET_DUMPABLE", libc.prctl(4, 0, 0, 0, 0))

def exec_program():
    try:
        os.chdir(spec["cwd"])
        for res, soft, hard in spec["rlimits"]:
            resource.setrlimit(res, (soft, hard))
        if spec["uid"] is not None:
            os.setgroups([])
            os.setresgid(spec["gid"], spec["gid"], spec["gid"])
            os.setresuid(spec["uid"], spec["uid"], spec["uid"])
        call("no_new_privs", libc.prctl(38, 1, 0, 0, 0))  # PR_SET_NO_NEW_PRIVS: setuid binaries gain nothing
        os.closerange(3, 1 << 16)
        for s in (signal.SIGPIPE, signal.SIGXFSZ):
            signal.signal(s, signal.SIG_DFL)  # CPython ignores these; exec keeps SIG_IGN, so reset them
        os.execve(spec["exe"], spec["argv"], dict(os.environ))
    except OSError as e:
        fail("exec program", e)

if not spec["pid_ns"]:
    exec_program()

# With a pid namespace the next child is its init (pid 1). init forks the program (so it is not pid 1 itself and
# signals behave normally), reaps orphans, and reports the program's wait status; when init exits the kernel
# kills every process left in the namespace.
r, w = os.pipe()
init = os.fork()
if init == 0:
    os.close(r)
    if spec["mount_ns"]:
        call("mount /proc", libc.mount(b"proc", b"/proc", b"proc", 2 | 4 | 8, None))
    prog = os.fork()
    if prog == 0:
        exec_program()
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            os._exit(0)
        if pid == prog:
            os.write(w, b"%d\n" % status)
            os._exit(0)
os.close(w)
os.waitpid(init, 0)
data = os.read(r, 64)
if not data:
    fail("pid namespace init", "exited without reporting the program's status")
status = int(data)
if os.WIFSIGNALED(status):
    sig = os.WTERMSIG(status)
    if sig not in (signal.SIGKILL, signal.SIGSTOP):
        signal.signal(sig, signal.SIG_DFL)
    os.kill(os.getpid(), sig)  # die of the same signal so the caller sees it (RLIMIT_CORE=0: no core file)
    os._exit(128 + sig)
os._exit(os.WEXITSTATUS(status))
"""
