"""The network tests' server and client: `serve PORT NAME` answers each request line N of a connection with
`NAME N SEEN` (SEEN: the requests that connection brought so far); `talk ADDR PORT STOPFILE` sends 1, 2, ...
every 100 ms over one connection, checks every answer (none lost, none twice, no new connection) and prints
`answer N` for each, then `done N` once STOPFILE exists; it exits 1 on the first wrong or missing answer."""

from __future__ import annotations

import os
import socket
import socketserver
import sys
import time


def serve(port: int, name: str) -> None:
    class Counter(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            for seen, line in enumerate(self.rfile, 1):
                self.wfile.write(f"{name} {int(line)} {seen}\n".encode())

    socketserver.ThreadingTCPServer.allow_reuse_address = True
    with socketserver.ThreadingTCPServer(("0.0.0.0", port), Counter) as server:
        server.serve_forever()


def talk(address: str, port: int, stop: str) -> int:
    deadline = time.monotonic() + 30
    while True:  # until the server listens; once connected, never again
        try:
            connection = socket.create_connection((address, port), timeout=120)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    stream = connection.makefile("rwb")
    sent = 0
    while not os.path.exists(stop):
        sent += 1
        stream.write(b"%d\n" % sent)
        stream.flush()
        answer = stream.readline().split()
        if len(answer) != 3 or int(answer[1]) != sent or int(answer[2]) != sent:
            print(f"request {sent}: wrong answer {answer!r}", flush=True)
            return 1
        print(f"answer {sent} from {answer[0].decode()}", flush=True)
        time.sleep(0.1)
    print(f"done {sent}", flush=True)
    return 0


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(int(sys.argv[2]), sys.argv[3])
    else:
        sys.exit(talk(sys.argv[2], int(sys.argv[3]), sys.argv[4]))
