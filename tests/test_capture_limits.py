"""Captured step output is bounded: the last 1 MB is kept, with a marker for what was dropped."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from pathlib import Path

from flowcore import _capture
from flowcore._capture import DEFAULT_LOG_LIMIT, CaptureBuffer

REPO = Path(__file__).resolve().parent.parent


def test_buffer_keeps_the_end_and_says_how_much_was_dropped() -> None:
    """Past the limit only the last `limit` characters are kept, after a marker line."""
    buf = CaptureBuffer(1000)
    for i in range(500):
        buf.append(f"line {i:04d}\n")  # 10 characters a line
    text = buf.text()
    assert text is not None
    marker, kept = text.split("\n", 1)
    assert marker == "[flowcore: 3.9 KB of earlier output dropped]"
    assert len(kept) == 1000 and kept.endswith("line 0499\n") and kept.startswith("line 0400")
    assert buf.dropped == 4000


def test_buffer_under_the_limit_is_the_text_as_written() -> None:
    """Below the limit the text comes back whole and without a marker; nothing is None."""
    buf = CaptureBuffer()
    assert buf.text() is None
    buf.append("hello\n")
    buf.append("world\n")
    assert buf.text() == "hello\nworld\n" and buf.dropped == 0
    assert DEFAULT_LOG_LIMIT == 1024 * 1024


def test_one_huge_write_is_cut_at_once() -> None:
    """A single write longer than the limit is cut to its end when written, not held whole."""
    buf = CaptureBuffer(10)
    buf.append("x" * 1_000_000 + "0123456789")
    assert buf.text() == "[flowcore: 976.6 KB of earlier output dropped]\n0123456789"


def test_printing_from_threads_into_a_captured_context() -> None:
    """Real prints through the installed tee from four threads land in the buffer, bounded."""
    buf = CaptureBuffer(4096)
    _capture.install()
    try:
        def talk(n: int) -> None:
            token = _capture.set_buffer(buf)
            try:
                for i in range(2000):
                    print(f"thread {n} line {i}")
            finally:
                _capture.reset_buffer(token)

        threads = [threading.Thread(target=talk, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        _capture.uninstall()
    text = buf.text()
    assert text is not None and text.startswith("[flowcore: ")
    assert len(text.split("\n", 1)[1]) == 4096


def test_a_step_printing_100_mb_keeps_1_mb_and_little_memory(tmp_path: Path) -> None:
    """On Stack.local, a step printing 100 MB (1 MB at a time) stores about 1 MB of logs plus
    the marker, and the process grows by far less than 300 MB."""
    code = textwrap.dedent(f"""
        import asyncio, resource
        from flowcore import Client, Stack, pipeline, set_active_stack, step

        @step(enable_cache=False)
        def shout(n: int) -> int:
            chunk = ("x" * 1023 + "\\n") * 1024
            for _ in range(n):
                print(chunk, end="")
            print("the end")
            return n

        @pipeline
        def loud(n: int) -> None:
            shout(n)

        set_active_stack(Stack.local({str(tmp_path / "stack")!r}))
        asyncio.run(loud.run(n=1))  # warm up: imports, the database, the threads
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        run = asyncio.run(loud.run(n=100))
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        logs = Client().get_step_logs(run.name, "shout")
        sizes = [len(logs)]
        last = logs
        with open({str(tmp_path / "result.txt")!r}, "w") as f:
            f.write(f"GROWTH_MB {{(after - before) / 1024}}\\n")
            f.write(f"STORED {{sizes[-1]}}\\n")
            f.write(f"HEAD {{last.splitlines()[0]}}\\n")
            f.write(f"TAIL {{last.splitlines()[-1]}}\\n")
    """)
    # The 100 MB goes through to the real stdout, as it would for a user: here /dev/null.
    subprocess.run([sys.executable, "-c", code], stdout=subprocess.DEVNULL, cwd=tmp_path,
                   timeout=300, check=True)
    lines = dict(line.split(" ", 1)
                 for line in (tmp_path / "result.txt").read_text().splitlines())
    assert float(lines["GROWTH_MB"]) < 150, lines
    stored = int(lines["STORED"])
    assert DEFAULT_LOG_LIMIT <= stored < DEFAULT_LOG_LIMIT + 200
    assert lines["HEAD"].startswith("[flowcore: 99.0 MB of earlier output dropped]")
    assert lines["TAIL"] == "the end"
