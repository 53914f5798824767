"""How much an upload's processing costs, old and new (docs/datasets.md "Statistics").

Times, in process and without HTTP, on ``--mb`` MB of tinyshakespeare repeated:
- ``stream``: what an upload cost before issue 9: the bytes streamed to storage and counted
  (``core.textstats.TextCounter``);
- ``store_upload``: ``app.datasets.store_upload`` now: formats and line ends
  (``core.ingest``), the counts, and the statistics per tokenizer kind
  (``core.datasetstats``); and its parts.

Prints one JSON line (median of ``--repeat`` runs, seconds).

    .venv/bin/python bench/dataset_upload.py --mb 10
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import core.datasetstats as ds
from app.datasets import store_upload
from core.corpora import builtin_corpus, find_corpus
from core.ingest import IngestOptions, RawFile, ingest
from core.textstats import TextCounter
from store.storage import LocalStorage


def _median(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return round(statistics.median(times), 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=10.0)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    path = find_corpus("tinyshakespeare/input.txt")
    base = path.read_bytes() if path is not None else builtin_corpus("python-docs").encode()
    size = int(args.mb * 1_000_000)
    data = (base * (size // len(base) + 1))[:size]
    data = data[: data.rfind(b"\n") + 1]
    with tempfile.TemporaryDirectory() as root:
        storage = LocalStorage(Path(root))

        def stream() -> None:
            counter = TextCounter()
            with storage.writer("datasets/old.txt") as w:
                for i in range(0, len(data), 1 << 16):
                    w.write(data[i : i + (1 << 16)])
                    counter.feed(data[i : i + (1 << 16)])
            counter.finish()

        def raw() -> RawFile:
            fh = tempfile.TemporaryFile()
            fh.write(data)
            fh.seek(0)
            return RawFile("bench.txt", fh)

        def new() -> None:
            f = raw()
            store_upload(storage, "datasets/new.txt", [f], IngestOptions(), 1 << 40)
            f.fh.close()

        parts: dict[str, float] = {}
        f = raw()
        counter, tokens = TextCounter(), ds.TokenCounter()
        t = time.perf_counter()
        with storage.writer("datasets/parts.txt") as w:
            ingest([f], IngestOptions(), w, 1 << 40, counter.feed_text)
        parts["ingest_and_count_s"] = round(time.perf_counter() - t, 3)
        text = data.decode()
        t = time.perf_counter()
        for i in range(0, len(text), 1 << 20):
            tokens.feed(text[i : i + (1 << 20)])
        stats = counter.finish()
        ds.word_stats(stats, tokens)
        parts["chars_and_words_s"] = round(time.perf_counter() - t, 3)
        t = time.perf_counter()
        with storage.open("datasets/parts.txt") as fh:
            ds.bpe_estimate(ds.sample_lines(fh, len(data), labelled=False), stats.num_bytes)
        parts["bpe_sample_s"] = round(time.perf_counter() - t, 3)
        f.fh.close()
        print(json.dumps({"bytes": len(data), "stream_s": _median(stream, args.repeat),
                          "store_upload_s": _median(new, args.repeat), **parts}))


if __name__ == "__main__":
    main()
