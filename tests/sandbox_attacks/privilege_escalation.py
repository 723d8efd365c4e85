# Attack: become root (setuid(0), setresuid, setuid binaries such as su/passwd/mount) or ptrace the parent, then
# prove it by reading /etc/shadow or writing into /etc. Contained: unprivileged uid + PR_SET_NO_NEW_PRIVS.
import ctypes
import os
import subprocess

for attempt in (lambda: os.setuid(0), lambda: os.setresuid(0, 0, 0), lambda: os.setgid(0)):
    try:
        attempt()
    except OSError:
        pass
libc = ctypes.CDLL(None, use_errno=True)
attached = libc.ptrace(16, os.getppid(), None, None) == 0  # PTRACE_ATTACH
for cmd in (["su", "-c", "cat /etc/shadow"], ["mount", "-t", "tmpfs", "x", "/mnt"]):
    try:
        subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=2)
    except Exception:
        pass
proof = []
try:
    with open("/etc/shadow", "rb") as f:
        proof.append(f.read(1))
except OSError:
    pass
try:
    with open("/etc/oapl_attack_marker", "w") as f:
        f.write("x")
    proof.append("etc")
except OSError:
    pass
print("PWNED" if proof or attached else "blocked")
