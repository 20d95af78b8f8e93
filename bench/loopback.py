"""Loopback measuring tools for bench.transport: a raw TCP baseline and a server memory probe.

``RawPeer`` is what a transport is compared with: the same bytes over a plain loopback socket,
received by another process (as the server is one) that writes them to disk and fsyncs, or only
into memory. ``ServerProbe`` watches another process's resident memory during one transfer, and
optionally when a file in a folder reaches a size (how the end of an upload is seen from outside
the server). Neither imports torch, so the receiver process starts quickly.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import socket
import struct
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path

import psutil

SAMPLE_S = 0.005  # memory
FILE_S = 0.001  # the upload file, for the end of an upload's transfer


def _status_bytes(pid: int, key: str) -> int:
    """A ``kB`` field of /proc/PID/status in bytes (0 where there is no such file: not Linux)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            return next((int(line.split()[1]) * 1024 for line in status if line.startswith(key + ":")), 0)
    except OSError:
        return 0


def file_tail(path: str | Path, length: int) -> bytes:
    """The last ``length`` bytes of a file (fewer when it is shorter)."""
    with open(path, "rb") as file:
        size = file.seek(0, os.SEEK_END)
        file.seek(max(0, size - length))
        return file.read()


def _ends_with(path: str, tail: bytes) -> bool:
    """Whether the file at ``path`` ends with ``tail`` (bytes of space allocated ahead read as zeros)."""
    return file_tail(path, len(tail)) == tail


class ServerProbe:
    """Watches the server during one transfer: RSS every ~5 ms, its exact peak, the upload file (~1 ms).

    Sampling from a thread can miss a short spike; the kernel's high-water mark (reset on entry)
    cannot, so the peak is the larger of the two. For an upload, ``received_at`` is when the
    server's temporary file first ended with ``tail``, the payload's last bytes: the end of the
    transfer proper, before fsync, validation and recording. (Not its size: the server allocates
    the file ahead of the bytes, so it has its full size before they arrive.)
    """

    def __init__(self, pid: int, upload_dir: Path | None = None, tail: bytes = b"") -> None:
        self._process, self._pid = psutil.Process(pid), pid
        self._upload_dir, self._tail = upload_dir, tail
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.received_at: float | None = None
        self.exact = False

    def __enter__(self) -> ServerProbe:
        with contextlib.suppress(OSError):
            Path(f"/proc/{self._pid}/clear_refs").write_text("5")  # Linux >= 4.0: VmHWM restarts from now
            self.exact = True
        self.before = self.peak = self._process.memory_info().rss
        self.anon_before = self.anon_peak = _status_bytes(self._pid, "RssAnon")
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        if self.exact:
            self.peak = max(self.peak, _status_bytes(self._pid, "VmHWM"))

    def _run(self) -> None:
        """Memory every SAMPLE_S; the upload file, while it is not yet complete, every FILE_S."""
        last = time.perf_counter()
        while not self._stop.wait(FILE_S if self._upload_dir and self.received_at is None else SAMPLE_S):
            self._watch_upload()
            if time.perf_counter() - last >= SAMPLE_S:
                self._sample()
                last = time.perf_counter()

    def _watch_upload(self) -> None:
        if self._upload_dir is not None and self.received_at is None:
            with contextlib.suppress(OSError):
                if any(_ends_with(e.path, self._tail) for e in os.scandir(self._upload_dir) if e.name.startswith("upload-")):
                    self.received_at = time.perf_counter()

    def _sample(self) -> None:
        self.peak = max(self.peak, self._process.memory_info().rss)
        self.anon_peak = max(self.anon_peak, _status_bytes(self._pid, "RssAnon"))

    def result(self) -> dict[str, int | bool]:
        """Bytes: RSS before and at its peak, growth, growth of the anonymous part."""
        return {"rss_before": self.before, "rss_peak": self.peak, "growth": self.peak - self.before,
                "anon_growth": self.anon_peak - self.anon_before, "peak_exact": self.exact}


def _drain(sock: socket.socket, size: int, chunk_size: int, path: Path | None) -> None:
    """Receive ``size`` bytes a chunk at a time; write each chunk to ``path`` and fsync, if given."""
    view = memoryview(bytearray(chunk_size))
    with open(path, "wb") if path else contextlib.nullcontext() as sink:
        for start in range(0, size, chunk_size):
            want = min(chunk_size, size - start)
            if sock.recv_into(view, want, socket.MSG_WAITALL) != want:
                raise ConnectionError("raw sender closed early")
            if sink is not None:
                sink.write(view[:want])
        if sink is not None:
            sink.flush()
            os.fsync(sink.fileno())


MEMORY, DISK, DELETE, QUIT = range(4)


def _raw_receiver(conn: Connection, folder: str, chunk_size: int) -> None:
    """Child process: serve requests (size, mode) until QUIT; ack each when done.

    DISK leaves its file in place, so that no delete of it runs behind a later timed transfer;
    DELETE removes it (and, being acked, is over before anything else starts).
    """
    target = Path(folder) / "raw.bin"
    with socket.create_server(("127.0.0.1", 0)) as server:
        conn.send(server.getsockname()[1])
        while True:
            peer, _ = server.accept()
            with peer:
                size, mode = struct.unpack("<QB", peer.recv(9, socket.MSG_WAITALL))
                if mode == QUIT:
                    return
                if mode == DELETE:
                    target.unlink(missing_ok=True)
                else:
                    _drain(peer, size, chunk_size, target if mode == DISK else None)
                peer.sendall(b"k")


class RawPeer:
    """The baseline: a receiver in its own process (as the server is), fed over loopback TCP."""

    def __init__(self, folder: Path, chunk_size: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._chunk = chunk_size
        self._process = ctx.Process(target=_raw_receiver, args=(child, str(folder), chunk_size), daemon=True)

    def __enter__(self) -> RawPeer:
        self._process.start()
        if not self._conn.poll(120):
            self._process.terminate()
            raise RuntimeError("the raw receiver process did not start")
        self._port = self._conn.recv()
        return self

    def __exit__(self, *exc_info: object) -> None:
        with contextlib.suppress(OSError):
            self._request(QUIT)
        self._process.join(10)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join()

    def send(self, path: Path, to_disk: bool) -> float:
        """Seconds to move the file's bytes until the receiver acked (connection set up untimed)."""
        return self._request(DISK if to_disk else MEMORY, path)

    def prime(self, path: Path) -> None:
        """Untimed: move the bytes to disk, then delete them, so that the next transfer of this
        size finds recently freed (warm) memory, whatever ran before it."""
        self._request(DISK, path)
        self._request(DELETE)

    def _request(self, mode: int, path: Path | None = None) -> float:
        with socket.create_connection(("127.0.0.1", self._port), timeout=600) as sock:
            size = path.stat().st_size if path else 0
            start = time.perf_counter()
            sock.sendall(struct.pack("<QB", size, mode))
            if path is not None:
                with open(path, "rb") as file:
                    while data := file.read(self._chunk):
                        sock.sendall(data)
            if mode != QUIT and sock.recv(1) != b"k":
                raise ConnectionError(f"the raw receiver did not ack request {mode}")
            return time.perf_counter() - start
