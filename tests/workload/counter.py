"""The network tests' server that says who it is: `serve PORT NAME` answers each request line N of a connection with
`NAME N SEEN` (SEEN: the requests that connection brought so far)."""

from __future__ import annotations

import socketserver
import sys


def serve(port: int, name: str) -> None:
    class Counter(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            for seen, line in enumerate(self.rfile, 1):
                self.wfile.write(f"{name} {int(line)} {seen}\n".encode())

    socketserver.ThreadingTCPServer.allow_reuse_address = True
    with socketserver.ThreadingTCPServer(("0.0.0.0", port), Counter) as server:
        server.serve_forever()


if __name__ == "__main__":
    serve(int(sys.argv[2]), sys.argv[3])
