# Attack: open a TCP connection to a port the test process listens on at 127.0.0.1; contained by the private
# network namespace (no interfaces up, so the connect fails).
import json
import socket
import sys

ctx = json.loads(sys.stdin.read())
s = socket.create_connection(("127.0.0.1", ctx["port"]), timeout=2)
s.sendall(b"exfiltrated")
print("PWNED")
