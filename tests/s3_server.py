"""A real S3 server on 127.0.0.1 for the tests and the remote-store benchmark: moto's server mode
(`moto[server]`, in the test extra), which speaks the S3 protocol over HTTP.

    server = S3Server(latency_s=0.02).start()   # every request delayed by 20 ms (a TCP proxy in front)
    env = server.env()                          # AWS_ENDPOINT_URL, dummy keys, region: for mm subprocesses
    server.make_bucket("mmtokens")
    server.stop(); server.start()               # the same port and the same objects after a restart
    server.objects("mmtokens", "tokens.zarr/")  # {key: bytes}, read with boto3 (not through mm)

The proxy is plain sockets: each new connection, and each request on a kept-alive one, waits
`latency_s` before its bytes go on, which is how a distant object store looks to a client.
"""

from __future__ import annotations

import logging
import socket
import threading
import time

KEYS = {"AWS_ACCESS_KEY_ID": "mm-test-key", "AWS_SECRET_ACCESS_KEY": "mm-test-secret",
        "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    def __init__(self, latency_s: float = 0.0):
        self.latency_s = latency_s
        self.port = free_port()  # what clients connect to (the proxy's when there is latency)
        self.moto_port = free_port() if latency_s else self.port
        self.server = None
        self.proxy = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict:
        return {**KEYS, "AWS_ENDPOINT_URL": self.endpoint}

    def start(self) -> S3Server:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not a line per request in the test output
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.moto_port, verbose=False)
        self.server.start()
        if self.latency_s and self.proxy is None:
            self.proxy = _DelayProxy(self.port, self.moto_port, self.latency_s)
        return self

    def stop(self) -> None:
        self.server.stop()
        self.server = None

    def close(self) -> None:
        if self.server is not None:
            self.stop()
        if self.proxy is not None:
            self.proxy.close()

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=f"http://127.0.0.1:{self.moto_port}", region_name="us-east-1",
                            aws_access_key_id=KEYS["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=KEYS["AWS_SECRET_ACCESS_KEY"])

    def make_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def keys(self, bucket: str, prefix: str) -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def objects(self, bucket: str, prefix: str) -> dict[str, bytes]:
        c = self.client()
        return {k: c.get_object(Bucket=bucket, Key=k)["Body"].read() for k in self.keys(bucket, prefix)}


class _DelayProxy:
    """Forward 127.0.0.1:port to target, holding each client→server burst back by `delay` seconds."""

    def __init__(self, port: int, target: int, delay: float):
        self.target, self.delay = target, delay
        self.sock = socket.create_server(("127.0.0.1", port))
        self.requests = 0
        self.garble: str | None = None  # the next GET whose path holds this gets its body's first byte flipped
        self.garbled = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:  # the server is stopped: the client sees the connection close
                client.close()
                continue
            state = {"flip": False}  # shared by the two directions of one connection
            threading.Thread(target=self._pipe, args=(client, upstream, True, state), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False, state), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, delayed: bool, state: dict) -> None:
        try:
            while data := src.recv(1 << 16):
                if delayed and data[:4] in (b"GET ", b"PUT ", b"HEAD", b"POST", b"DELE"):
                    self.requests += 1
                    line = data.split(b"\r\n", 1)[0].decode("latin-1")
                    if self.garble and line.startswith("GET ") and self.garble in line:
                        self.garble, state["flip"] = None, True
                    time.sleep(self.delay)  # a new request: one round trip of latency
                elif not delayed and state["flip"]:
                    data = self._flip_body_byte(data, state)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def _flip_body_byte(self, data: bytes, state: dict) -> bytes:
        """The response's first body byte flipped (a transfer garbled in transit; the length stays)."""
        end = data.find(b"\r\n\r\n")
        at = 0 if state.get("in_body") else (end + 4 if end >= 0 else -1)
        if at < 0 or at >= len(data):
            state["in_body"] = end >= 0
            return data
        state["flip"] = state["in_body"] = False
        self.garbled += 1
        return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]

    def close(self) -> None:
        self.sock.close()

