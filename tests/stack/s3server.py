"""An S3-compatible server (moto's S3 REST API) that can *crash* mid-transfer and come back with its data.

Like a real object store whose front end goes down while its storage survives: the HTTP server is torn down
(listening socket closed, every open connection cut, in-flight uploads included) while moto's in-process
backend keeps the objects it had completed, and `start()` serves them again on the same port. This is not a
mock: clients (DVC, s3fs, boto3) talk HTTP to it exactly as to the stack's moto process.
"""

from __future__ import annotations

import hashlib
import socket
import threading
from pathlib import PurePosixPath

from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import make_server

from flows.stack import free_port


class CrashableS3:
    def __init__(self, host: str = "127.0.0.1", port: int | None = None):
        self.host = host
        self.port = port or free_port(host)
        self.crash_on_put: int | None = None  # crash when this many object PUTs have arrived
        self.puts = 0
        self.crash_on_get: int | None = None  # crash when this many GETs of paths containing get_path arrived
        self.get_path = ""
        self.gets: list[str] = []  # PATH_INFO of every counted GET (the crashing one included)
        self.throttle_gets = 0  # answer this many counted GETs with 503 SlowDown, as a throttling S3 does
        self.crashed = threading.Event()
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._server = None
        self._thread: threading.Thread | None = None
        self._app = DomainDispatcherApplication(create_backend_app)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _wsgi(self, environ, start_response):
        if environ.get("REQUEST_METHOD") == "PUT" and "/files/md5/" in environ.get("PATH_INFO", ""):
            with self._lock:
                self.puts += 1
                hit = self.crash_on_put is not None and self.puts == self.crash_on_put
            if hit:
                # Die while this upload's body is still unread: its connection is cut with the others.
                self.crash()
                start_response("500 Internal Server Error", [("Content-Length", "0")])
                return [b""]
        if environ.get("REQUEST_METHOD") == "GET" and self.get_path and self.get_path in environ.get("PATH_INFO", ""):
            with self._lock:
                self.gets.append(environ["PATH_INFO"])
                hit = self.crash_on_get is not None and len(self.gets) == self.crash_on_get
                throttle = self.throttle_gets > 0
                self.throttle_gets -= int(throttle)
            if hit:
                self.crash()
                start_response("503 Service Unavailable", [("Content-Length", "0")])
                return [b""]
            if throttle:
                body = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
                        b"<Message>Please reduce your request rate.</Message></Error>")
                start_response("503 Slow Down", [("Content-Type", "application/xml"),
                                                 ("Content-Length", str(len(body)))])
                return [body]
        return self._app(environ, start_response)

    def start(self) -> CrashableS3:
        outer = self

        class Handler(MotoRequestHandler):
            def setup(self):
                super().setup()
                with outer._lock:
                    outer._conns.add(self.connection)

            def finish(self):
                with outer._lock:
                    outer._conns.discard(self.connection)
                try:
                    super().finish()
                except OSError:
                    pass

            def log_request(self, *args, **kwargs):  # quiet
                pass

        self.crashed.clear()
        self._server = make_server(self.host, self.port, self._wsgi, threaded=True, request_handler=Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def crash(self) -> None:
        """Stop accepting (socket closed: connection refused) and cut every open connection."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()  # the accept loop ends (this runs on a request thread, not the serving one)
        server.server_close()  # listening socket closed: new connections are refused
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.crashed.set()

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()

    # -- what the store holds, read from the backend (works while the front end is down) -----------------
    @staticmethod
    def objects(bucket: str) -> dict[str, bytes]:
        from moto.core import DEFAULT_ACCOUNT_ID
        from moto.s3.models import s3_backends

        backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
        return {key.name: key.value for key in backend.get_bucket(bucket).keys.values()}

    @staticmethod
    def incomplete_objects(objects: dict[str, bytes]) -> list[str]:
        """Content-addressed objects whose bytes do not hash to their own key (a half-written object)."""
        bad = []
        for key, data in objects.items():
            parts = PurePosixPath(key).parts
            if "md5" not in parts:
                continue
            expected = (parts[-2] + parts[-1]).removesuffix(".dir")
            if hashlib.md5(data).hexdigest() != expected:
                bad.append(key)
        return bad
