"""Ingest against hostile crawl rows and failing sources: one outcome per row, whatever it holds; outages end in a
failed (transient) stage that a rerun completes cheaply, never in a silently smaller dataset; no secret leaks."""

from __future__ import annotations

import http.server
import io
import json
import random
import socket
import threading
import time
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tasks.ingest import REASONS, run_ingest
from tasks.sources import SourceRejected, parse_source
from tasks.storage import StorageError, redact_url


def _png(seed: int, size=(40, 30)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _jpeg(seed: int, size=(48, 40)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------- a local server
class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves `files`; the first `fail_first` requests get 503; `/drip` trickles; `/huge` streams with no
    Content-Length; `/to-ftp` and `/loop` redirect badly. Every request path is recorded."""

    files: ClassVar[dict[str, bytes]] = {}
    requests: ClassVar[list[str]] = []
    fail_first: ClassVar[dict[str, int]] = {"n": 0}
    huge_sent: ClassVar[dict[str, int]] = {"n": 0}
    protocol_version = "HTTP/1.0"

    def do_GET(self):
        self.requests.append(self.path)
        if self.fail_first["n"] > 0:
            self.fail_first["n"] -= 1
            self.send_error(503)
            return
        if self.path == "/to-ftp":
            self.send_response(302)
            self.send_header("Location", "ftp://127.0.0.1/x.png")
            self.end_headers()
            return
        if self.path.startswith("/loop"):
            self.send_response(302)
            self.send_header("Location", f"/loop{len(self.path)}")
            self.end_headers()
            return
        if self.path == "/drip":
            self.send_response(200)
            self.end_headers()
            try:
                for _ in range(40):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.1)
            except OSError:
                pass
            return
        if self.path == "/huge":
            self.send_response(200)
            self.end_headers()
            try:
                for _ in range(800):  # 50 MB if read to the end
                    self.wfile.write(b"\0" * 65536)
                    self.huge_sent["n"] += 65536
            except OSError:
                pass
            return
        data = self.files.get(self.path.split("?")[0])
        if data is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


class _Server:
    def __init__(self, port: int = 0):
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), _Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    _Handler.files, _Handler.requests = {}, []
    _Handler.fail_first["n"], _Handler.huge_sent["n"] = 0, 0
    srv = _Server()
    yield srv
    srv.stop()


def _params(tmp_path, small_params_factory, urls, extra=()):
    crawl = tmp_path / "crawl"
    crawl.mkdir(exist_ok=True)
    pd.DataFrame({"url": urls}).to_csv(crawl / "manifest.csv", index=False)
    return small_params_factory(tmp_path, [f"ingest.manifest={crawl}/manifest.csv", f"ingest.out={tmp_path}/out",
                                           f"reports={tmp_path}/reports", f"ingest.resume_dir={tmp_path}/resume",
                                           *extra])


def _by_row(result) -> pd.DataFrame:
    q = result.quarantine.set_index("row")
    rows = sorted(set(result.manifest["row"]) | set(result.duplicates["row"]) | set(q.index))
    return pd.DataFrame({"reason": [q.at[r, "reason"] if r in q.index else "" for r in rows]}, index=rows)


# ------------------------------------------------------------------------------------------- parsing rows
@pytest.mark.parametrize("cell, reason", [
    ("", "empty_url"), ("   ", "empty_url"), (None, "empty_url"), (float("nan"), "empty_url"), (7, "bad_url"),
    ("ftp://example.com/a.jpg", "unsupported_scheme"), ("gs://bucket/a.jpg", "unsupported_scheme"),
    ("memory://a.png", "unsupported_scheme"), ("zip://a.png::s3://b/c.zip", "unsupported_scheme"),
    ("javascript:alert(1)", "unsupported_scheme"), ("data:image/png;base64,AAAA", "unsupported_scheme"),
    ("http://", "bad_url"), ("https:///a.png", "bad_url"), ("http://[::1/a.png", "bad_url"),
    ("http://example.com:99999/a.png", "bad_url"), ("http://example.com:0/a.png", "bad_url"),
    ("s3://bucket", "bad_url"), ("s3:///key.png", "bad_url"), ("s3://user:pw@bucket/k.png", "bad_url"),
    ("file://otherhost/etc/passwd", "bad_url"), ("a\x00b.png", "bad_url"), ("a\nb.png", "bad_url"),
    ("http://example.com/" + "a" * 5000, "bad_url"), ("../outside.png", "unsafe_path"),
    ("file:///etc/passwd", "unsafe_path"), ("/etc/passwd", "unsafe_path"),
])
def test_rows_refused_before_fetching(tmp_path, cell, reason):
    with pytest.raises(SourceRejected) as info:
        parse_source(cell, tmp_path, allow_outside_root=False, max_length=4096)
    assert info.value.reason == reason and "\n" not in info.value.message


@pytest.mark.parametrize("cell, scheme", [
    ("a.png", "local"), ("sub dir/a b.png", "local"), ("file:///ROOT/a.png", "file"),
    ("file://localhost/ROOT/a%20b.png", "file"), ("http://127.0.0.1:8000/a.png?x=1", "http"),
    ("HTTPS://Example.com/a.png", "https"), ("s3://bucket/key/a.png", "s3"),
])
def test_rows_that_are_fetched(tmp_path, cell, scheme):
    source = parse_source(cell.replace("/ROOT", str(tmp_path)), tmp_path, allow_outside_root=False, max_length=4096)
    assert source.scheme == scheme
    if scheme in ("local", "file"):
        assert Path(source.target).is_relative_to(tmp_path.resolve()) and "%" not in source.target


def test_redaction_of_credentials_and_signatures():
    url = ("https://user:hunter2@bucket.s3.amazonaws.com/a.png?X-Amz-Credential=AKIA123&X-Amz-Signature=deadbeef"
           "&X-Amz-Security-Token=tok&width=64")
    shown = redact_url(url)
    assert not any(s in shown for s in ("hunter2", "user:", "AKIA123", "deadbeef", "tok&"))
    assert "width=64" in shown and "bucket.s3.amazonaws.com/a.png" in shown
    assert redact_url("data/a.png?sig=1") == "data/a.png?sig=1"  # a local path has no query to redact


# ------------------------------------------------------------------------------------------- generated rows
def _adversarial_rows(rng: random.Random, base: str, crawl: Path) -> tuple[list[str], dict[str, bytes]]:
    """A few hundred hostile cells: odd schemes and malformed URLs, and local/HTTP sources of damaged bytes."""
    good = [_png(i) for i in range(4)] + [_jpeg(i) for i in range(4)]
    blobs: dict[str, bytes] = {}
    for i in range(120):
        src = rng.choice(good)
        kind = i % 6
        if kind == 0:
            data = src[: rng.randrange(0, len(src))]  # truncated anywhere, zero bytes included
        elif kind == 1:
            data = bytearray(src)
            for _ in range(rng.randrange(1, 20)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            data = bytes(data)  # bit rot
        elif kind == 2:
            data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 3000)))  # noise
        elif kind == 3:
            data = src[:8] + bytes(rng.randrange(256) for _ in range(200))  # a valid magic number, then noise
        elif kind == 4:
            data = rng.choice([b"<html><body>404</body></html>", b"GIF89a", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff"])
        else:
            data = src
        blobs[f"blob{i}.{rng.choice(['png', 'jpg', 'gif', 'bin'])}"] = data
    rows = []
    for name, data in blobs.items():
        (crawl / name).write_bytes(data)
        rows += [name, f"{base}/{name}"]
    schemes = ["ftp", "sftp", "ssh", "gs", "gcs", "az", "abfs", "hdfs", "memory", "zip", "tar", "github", "smb",
               "webdav", "git", "data", "javascript", "mailto", "ldap", "gopher", "dict", "jar", "blob", "ws"]
    pieces = ["", "/", "//", "..", "%00", "%2e%2e/", "?", "#", "@", ":", "[", "]", "\\", "~", "\t", "\u202e",
              "é", "😀", "::", "|", " "]
    for i in range(160):
        kind = i % 8
        if kind == 0:
            rows.append(f"{rng.choice(schemes)}://{rng.choice(['example.com', '127.0.0.1', ''])}/x{i}.png")
        elif kind == 1:
            rows.append("".join(rng.choice(pieces) for _ in range(rng.randrange(1, 8))))
        elif kind == 2:
            rows.append(f"http://{''.join(rng.choice(pieces) for _ in range(3))}/x.png")
        elif kind == 3:
            rows.append(f"{base}/" + "a" * rng.choice([5000, 10_000, 20_000]))
        elif kind == 4:
            rows.append(rng.choice(["file://evil.example/x.png", "file:", "file://", "s3://", "s3:///k", "http:x",
                                    "https:", "../" * 5 + "etc/passwd", "/dev/zero", "/proc/self/environ"]))
        elif kind == 5:
            rows.append(f"{base}/{rng.choice(['missing.png', 'to-ftp', 'loop', 'blob0.png?%zz'])}")
        elif kind == 6:
            rows.append(f"x{i}.png\x00.jpg" if i % 16 == 6 else f"{base}:{rng.choice(['0', '99999', 'abc'])}/a.png")
        else:
            rows.append(rng.choice(["", " ", "\n", "nan", "None", "0", "-1", "C:\\x.png", "sub/../../x.png"]))
    rng.shuffle(rows)
    return rows, blobs


def test_generated_hostile_rows_never_crash_and_reconcile(tmp_path, small_params_factory, server, monkeypatch):
    crawl = tmp_path / "crawl"
    crawl.mkdir()
    rows, blobs = _adversarial_rows(random.Random(0), server.url, crawl)
    _Handler.files = {f"/{name}": data for name, data in blobs.items()}
    connects: list[object] = []
    real_connect = socket.socket.connect

    def recording_connect(sock, address):
        connects.append(address)
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", recording_connect)
    params = _params(tmp_path, small_params_factory, rows,
                     ["ingest.http_retries=0", "ingest.max_transient_fraction=1.0", "ingest.max_bytes=100000"])
    result = run_ingest(params)

    m = result.metrics
    assert len(rows) >= 400 and m["input_rows"] == len(rows)
    assert m["reconciles"] and m["kept"] + m["exact_duplicates"] + m["quarantined"] == len(rows)
    assert set(result.quarantine["reason"]) <= set(REASONS)
    assert m["internal_errors"] == 0, result.quarantine[result.quarantine["reason"] == "internal_error"]
    assert {"unsupported_scheme", "bad_url", "empty_url", "unsafe_path"} <= set(result.quarantine["reason"])
    assert m["kept"] >= 8  # the undamaged blobs, once each
    # Nothing but the local test server was contacted: refused schemes never reached a socket.
    assert connects and all(a[:2] == ("127.0.0.1", server.port) for a in connects if isinstance(a, tuple))
    assert all("\n" not in msg for msg in result.quarantine["message"])


def test_an_unexpected_error_in_one_row_is_recorded_not_raised(tmp_path, small_params_factory, monkeypatch):
    from tasks import ingest

    crawl = tmp_path / "crawl"
    crawl.mkdir()
    for i in range(3):
        (crawl / f"{i}.png").write_bytes(_png(i))
    real = ingest.decode_and_normalise

    def flaky(data, p):
        if data == _png(1):
            raise ValueError("surprise\nsecond line")
        return real(data, p)

    monkeypatch.setattr(ingest, "decode_and_normalise", flaky)
    result = run_ingest(_params(tmp_path, small_params_factory, ["0.png", "1.png", "2.png"]))
    assert _by_row(result)["reason"].tolist() == ["", "internal_error", ""]
    assert result.quarantine["message"].iloc[0] == "ValueError: surprise"
    assert result.metrics["internal_errors"] == 1 and result.metrics["kept"] == 2


# ------------------------------------------------------------------------------------------- safe fetching
def test_streaming_limit_redirects_and_deadline(tmp_path, small_params_factory, server):
    _Handler.files = {"/a.png": _png(1)}
    urls = [f"{server.url}/huge", f"{server.url}/to-ftp", f"{server.url}/loop", f"{server.url}/drip",
            f"{server.url}/a.png"]
    result = run_ingest(_params(tmp_path, small_params_factory, urls,
                                ["ingest.max_bytes=200000", "ingest.http_retries=0", "ingest.http_deadline_s=1.0",
                                 "ingest.max_transient_fraction=1.0"]))
    assert _by_row(result)["reason"].tolist() == ["too_many_bytes", "fetch_error", "fetch_error", "fetch_transient",
                                                  ""]
    assert _Handler.huge_sent["n"] < 50 * 2**20  # refused while streaming: the server never sent it all
    q = result.quarantine.set_index("row")["message"]
    assert "redirect to a ftp:// URL refused" in q[1] and "deadline" in q[3]
    assert sum(p.startswith("/loop") for p in _Handler.requests) <= 6  # bounded redirects


# ------------------------------------------------------------------------------------------- outages
def test_http_outage_fails_the_stage_and_a_rerun_fetches_only_the_rest(tmp_path, small_params_factory, server):
    names = [f"/{i}.png" for i in range(12)]
    _Handler.files = {n: _png(100 + i) for i, n in enumerate(names)}
    urls = [f"{server.url}{n}" for n in names]
    params = _params(tmp_path, small_params_factory, urls, ["ingest.workers=1", "ingest.http_retries=1",
                                                            "ingest.max_transient_fraction=0.001"])
    port = server.port
    served = threading.Event()

    def stop_after(n):  # the server goes down mid-run, after n requests
        while len(_Handler.requests) < n:
            time.sleep(0.005)
        server.stop()
        served.set()

    threading.Thread(target=stop_after, args=(5,), daemon=True).start()
    with pytest.raises(StorageError) as info:
        run_ingest(params)
    assert info.value.transient and "max_transient_fraction" in str(info.value)
    assert not (tmp_path / "out" / "manifest.parquet").exists()  # no smaller dataset left behind
    served.wait(5)
    first = set(_Handler.requests)

    _Handler.requests = []
    back = _Server(port)  # the source comes back
    try:
        result = run_ingest(params)
    finally:
        back.stop()
    assert result.metrics["kept"] == 12 and result.metrics["quarantined"] == 0
    refetched = set(_Handler.requests)
    fetched_before = 12 - len(refetched)
    assert fetched_before >= 3 and result.metrics["resumed_from_interrupted_run"] == fetched_before
    assert refetched <= set(names) and len(first & refetched) <= 1  # at most the row cut mid-request
    assert not (tmp_path / "resume").exists()  # emptied once the outputs are complete


def test_transient_failures_below_the_gate_end_as_fetch_transient(tmp_path, small_params_factory, server):
    names = [f"/{i}.png" for i in range(4)]
    _Handler.files = {n: _png(200 + i) for i, n in enumerate(names)}
    _Handler.fail_first["n"] = 1  # one 503, then healthy: the retry absorbs it
    urls = [f"{server.url}{n}" for n in names] + ["http://127.0.0.1:9/refused.png"]
    result = run_ingest(_params(tmp_path, small_params_factory, urls,
                                ["ingest.workers=1", "ingest.http_retries=1", "ingest.max_transient_fraction=0.5"]))
    assert _by_row(result)["reason"].tolist() == ["", "", "", "", "fetch_transient"]
    assert result.metrics["transient_failures"] == 1


@pytest.fixture
def crawl_bucket(monkeypatch):
    """An S3-compatible server that can crash or throttle, a bucket 'crawl' and the env to reach it."""
    import boto3

    from tests.stack.s3server import CrashableS3

    s3 = CrashableS3().start()
    for var, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_ENDPOINT_URL": s3.url, "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(var, value)
    client = boto3.client("s3", endpoint_url=s3.url, region_name="us-east-1")
    client.create_bucket(Bucket="crawl")
    s3.get_path = "/img/"

    def put(n: int, seed: int) -> list[str]:
        keys = [f"img/{i}.png" for i in range(n)]
        for i, key in enumerate(keys):
            client.put_object(Bucket="crawl", Key=key, Body=_png(seed + i))
        return keys

    yield s3, put
    s3.stop()


def test_s3_outage_mid_ingest_then_rerun(tmp_path, small_params_factory, crawl_bucket):
    s3, put = crawl_bucket
    keys = put(6, 300)
    s3.crash_on_get = 4  # botocore's own retries make each refused row take ~3 s
    params = _params(tmp_path, small_params_factory, [f"s3://crawl/{k}" for k in keys],
                     ["ingest.workers=1", "ingest.http_retries=0"])
    with pytest.raises(StorageError) as info:
        run_ingest(params)
    assert info.value.transient and "rerun when the source is reachable" in str(info.value)
    first = {p.split("/img/")[1] for p in s3.gets}

    s3.gets, s3.crash_on_get = [], None
    s3.start()
    result = run_ingest(params)
    assert result.metrics["kept"] == 6 and result.metrics["quarantined"] == 0
    second = {p.split("/img/")[1] for p in s3.gets}
    assert result.metrics["resumed_from_interrupted_run"] == 6 - len(second) >= 3
    assert len(first & second) <= 1  # only the object cut mid-request is fetched twice


def test_s3_throttling_is_retried_not_dropped(tmp_path, small_params_factory, crawl_bucket):
    s3, put = crawl_bucket
    keys = put(3, 400)
    s3.throttle_gets = 4  # SlowDown on 4 GETs: absorbed by the retries
    result = run_ingest(_params(tmp_path, small_params_factory, [f"s3://crawl/{k}" for k in keys],
                               ["ingest.workers=1"]))
    assert result.metrics["kept"] == 3 and result.metrics["quarantined"] == 0
    assert len(s3.gets) >= 3 + 4 and s3.throttle_gets == 0

    s3.gets, s3.throttle_gets = [], 10_000  # throttled for good: a transient outcome, the stage fails
    (tmp_path / "again").mkdir()
    with pytest.raises(StorageError) as info:
        run_ingest(_params(tmp_path / "again", small_params_factory, [f"s3://crawl/{keys[0]}"],
                           ["ingest.http_retries=0"]))  # s3fs and botocore retry ~20 s on their own
    assert info.value.transient and "SlowDown" in str(info.value)


# ------------------------------------------------------------------------------------------- secrets
def test_no_secret_reaches_any_output(tmp_path, small_params_factory, server, caplog, capsys):
    secret = "Sup3rS3cretSignature"
    _Handler.files = {"/a.png": _png(1), "/b.png": _png(2)}
    urls = [f"{server.url}/a.png?X-Amz-Signature={secret}&w=1",
            f"http://user:{secret}@127.0.0.1:{server.port}/b.png",
            f"{server.url}/missing.png?token={secret}",
            f"http://127.0.0.1:9/refused.png?sig={secret}",
            f"ftp://user:{secret}@example.com/x.png"]
    caplog.set_level("DEBUG")
    result = run_ingest(_params(tmp_path, small_params_factory, urls, ["ingest.http_retries=0",
                                                                       "ingest.max_transient_fraction=1.0"]))
    assert result.metrics["kept"] == 2
    texts = [caplog.text, *capsys.readouterr()]
    for path in [*(tmp_path / "out").glob("*.parquet")]:
        texts.append(pd.read_parquet(path).to_csv())
    for path in (tmp_path / "reports").rglob("*"):
        if path.is_file():
            texts.append(path.read_bytes().decode("utf-8", "replace"))
    texts.append(json.dumps(result.metrics))
    assert not [t for t in texts if secret in t]
    assert any("X-Amz-Signature=REDACTED" in t for t in texts)


def test_outage_is_one_line_and_a_transient_exit_the_flow_retries(tmp_path, small_params_factory):
    from typer.testing import CliRunner

    from flows import pipeline
    from flows.cli import EXIT_TRANSIENT, STAGE_RUN_LOG_ENV, app

    crawl = tmp_path / "crawl"
    crawl.mkdir()
    pd.DataFrame({"url": [f"http://127.0.0.1:9/{i}.png" for i in range(3)]}).to_csv(crawl / "manifest.csv",
                                                                                  index=False)
    res = CliRunner().invoke(app, ["stage", "ingest", "--set", f"ingest.manifest={crawl}/manifest.csv",
                                   "--set", f"ingest.out={tmp_path}/out", "--set", f"reports={tmp_path}/r",
                                   "--set", "ingest.http_retries=0", "--set", f"ingest.resume_dir={tmp_path}/rs"],
                             env={STAGE_RUN_LOG_ENV: str(tmp_path / "runs.txt")})
    assert res.exit_code == EXIT_TRANSIENT and "Traceback" not in res.output
    assert pipeline.read_stage_runs(tmp_path / "runs.txt") == (["ingest"], {"ingest": EXIT_TRANSIENT})
    line = res.stderr.strip()
    assert "\n" not in line and "3 of 3 rows" in line and "max_transient_fraction" in line
    dvc = f"ERROR: failed to reproduce 'ingest': failed to run: dinov2-pipeline stage ingest, exited with {EXIT_TRANSIENT}"
    dvc_lines = [line, dvc]
    assert isinstance(pipeline.classify_stage_failure("ingest", 255, dvc_lines, stage_exit=EXIT_TRANSIENT),
                      pipeline.TransientStageError)
