# Join latency including the history block: connect until the greeting (off)
# or until `--- end of history ---` (on), sequential joins, after the room
# said 2,000 lines. Usage: joinlat.py HOST:PORT HISTORY JOINS
import socket, sys, time
host, port = sys.argv[1].rsplit(":", 1)
history = int(sys.argv[2]); joins = int(sys.argv[3])
end = b"--- end of history ---\n" if history else b"\n"
samples = []
for _ in range(joins):
    t = time.perf_counter()
    s = socket.create_connection((host, int(port)))
    buf = b""
    while not buf.endswith(end) if history else b"\n" not in buf:
        chunk = s.recv(1 << 16)
        if not chunk:
            break
        buf += chunk
    samples.append((time.perf_counter() - t) * 1e6)
    s.shutdown(socket.SHUT_WR)
    while s.recv(1 << 16):
        pass
    s.close()
samples.sort()
print(f"p50={samples[len(samples)//2]:.0f}us p99={samples[int(len(samples)*0.99)]:.0f}us bytes={len(buf)}")
