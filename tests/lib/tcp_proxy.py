#!/usr/bin/env python3
"""A TCP forwarder on 127.0.0.1 whose link a test can cut: tcp_proxy.py LISTEN_PORT TARGET_PORT.

SIGUSR1 cuts it silently, as a failed switch would: nothing is forwarded either way any more and
new connections are accepted but never answered (no reset, no FIN: the peers notice only by
their own timeouts). SIGUSR2 heals it for new connections. SIGTERM ends it.
"""
import signal
import socket
import sys
import threading

cut = threading.Event()


def pump(src, dst):
    try:
        while not cut.is_set():
            data = src.recv(65536)
            if not data or cut.is_set():
                break
            dst.sendall(data)
    except OSError:
        pass
    if not cut.is_set():
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def main():
    listen, target = int(sys.argv[1]), int(sys.argv[2])
    signal.signal(signal.SIGUSR1, lambda *_: cut.set())
    signal.signal(signal.SIGUSR2, lambda *_: cut.clear())
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", listen))
    srv.listen(64)
    held = []
    while True:
        conn, _ = srv.accept()
        if cut.is_set():
            held.append(conn)  # accepted, never answered
            continue
        try:
            up = socket.create_connection(("127.0.0.1", target), timeout=5)
            up.settimeout(None)
        except OSError:
            conn.close()
            continue
        for a, b in ((conn, up), (up, conn)):
            threading.Thread(target=pump, args=(a, b), daemon=True).start()


if __name__ == "__main__":
    main()
