"""Corpora of any size: the token cache's preparation time and the worker's peak memory against
corpus size, next to the tokenizer library alone and to the old all-in-memory path.

    nice .venv/bin/python bench/prepare_memory.py [--sizes-mb 10 100 1000] \\
        [--kinds char bpe word] [--old-max-mb 100] [--new-ref COMMIT] \\
        [--out bench/results/prepare_memory.json]

For each size, a synthetic corpus is written under a temporary directory this script creates
(and removes by its own handle): tinyshakespeare's lines (``data/tinyshakespeare/input.txt``)
shuffled in blocks with a fixed seed, every third block with ``e`` -> ``é`` (two UTF-8 bytes)
and every other with two vowels swapped, so the text is neither one repeated block nor ASCII
only. Then, for each tokenizer kind:

- **new**: a fresh worker-like child process (torch + the engine, nothing else) streams the
  corpus file into an empty token cache (``worker.engine.tokencache.prepare_corpus``, the path
  ``worker.runner`` takes) and trains a tiny model on the memory-mapped token files
  (embed 32, hidden 64, one LSTM layer, 20 Adam steps of 128 x 64 tokens on one thread, then
  the validation split (``val_fraction`` 0.01: the last 1%, so that evaluating 1 GB of BPE
  tokens does not take half an hour on 2 CPUs) and the fresh-state check; ``bpe`` 2000
  entries, ``word`` at most 2000); it reports its peak RSS (``VmHWM`` of
  ``/proc/self/status``), the peaks of its anonymous and file-backed parts (sampled every
  10 ms), its RSS after the imports, after preparing and after training, and the
  preparation's passes.
  **warm**: the same child again on the filled cache (reuse: the ``.bin`` files' sha256 check,
  no tokenising).
- **old** (up to ``--old-max-mb``): the same child running the engine of ``--old-ref`` (the
  commit before the token cache, extracted with ``git archive`` into the temporary directory):
  the whole file read into one string, as the old runner did, then ``train(spec, texts)``.
- **library alone**, in this process, on the same text read in the same ~1 MiB chunks of whole
  lines: ``char``: today's ``CharTokenizer.encode`` (a Python pass) and a numpy lookup-table
  pass; ``word``: ``WordTokenizer.encode`` and its training count (a ``Counter`` of the words
  of the first 99%, the training split); ``bpe``: Hugging Face ``tokenizers``
  ``encode_batch`` and ``encode_batch_fast`` (no offsets; what the token cache calls) of each
  chunk's lines (with the trained tokenizer), and ``train_from_iterator`` on the first 99% of
  the lines (the training split).

Throughputs are corpus MB (10^6 bytes of UTF-8) per second. Results: JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
OLD_REF = "96982af"  # the engine before the token cache
MB = 10**6


# -- the worker-like child -----------------------------------------------------------------------


def _status_kb() -> dict[str, int]:
    out = {}
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0])
    return out


class _PeakSampler(threading.Thread):
    """Samples ``/proc/self/status`` every 10 ms: the peaks of anonymous and file-backed RSS
    (``VmHWM`` has only their sum's)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = {"RssAnon": 0, "RssFile": 0}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.01):
            now = _status_kb()
            for k in self.peak:
                self.peak[k] = max(self.peak[k], now[k])


class _NullHooks:
    def on_metrics(self, rows: Any) -> None:
        pass

    def on_checkpoint(self, checkpoint: Any) -> None:
        pass

    def should_stop(self) -> bool:
        return False


def child(args: dict[str, Any]) -> dict[str, Any]:
    """Run in a fresh interpreter: prepare (new) or read the whole text (old), train, report."""
    rss: dict[str, Any] = {"start": _status_kb()}
    sampler = _PeakSampler()
    sampler.start()
    t_start = time.perf_counter()
    import torch

    from core.spec import JobSpec
    from worker.engine import trainer

    rss["imported"] = _status_kb()
    spec = JobSpec.model_validate({
        "dataset": {"path": args["path"]},
        "tokenizer": {"kind": args["kind"], "vocab_size": 2000, "max_vocab": 2000},
        "model": {"embed_dim": 32, "hidden_dim": 64, "num_layers": 1},
        "training": {"batch_size": 128, "seq_len": 64, "max_steps": 20, "eval_interval": 1000,
                     "log_interval": 10, "num_threads": 1, "device": "cpu"},
        "val_fraction": 0.01,
    })
    out: dict[str, Any] = {"engine": trainer.__file__, "torch": torch.__version__}
    t0 = time.perf_counter()
    if args["mode"] == "old":
        from core.contract import CorpusTexts

        text = Path(args["path"]).read_bytes().decode("utf-8")  # as the old runner read it
        result = trainer.train(spec, CorpusTexts(train=text), _NullHooks())
    else:
        from core.sources import CorpusSources, TextSource
        from worker.engine.tokencache import prepare_corpus

        source = TextSource.from_path(Path(args["path"]), universal_newlines=False)
        prepared = prepare_corpus(spec, CorpusSources(source), Path(args["cache_dir"]))
        out["prepare_s"] = time.perf_counter() - t0
        out["reused"] = prepared.reused
        out["passes_s"] = prepared.meta.get("seconds") if not prepared.reused else None
        out["token_bytes"] = prepared.nbytes
        out["tokens"] = prepared.token_counts()
        out["dtype"] = prepared.meta["dtype"]
        rss["prepared"] = _status_kb()
        t1 = time.perf_counter()
        result = trainer.train_prepared(spec, prepared, _NullHooks())
        out["train_s"] = time.perf_counter() - t1
    rss["trained"] = _status_kb()
    sampler.done.set()
    sampler.join()
    out.update(peak_anon_mb=sampler.peak["RssAnon"] / 1024,
               peak_file_mb=sampler.peak["RssFile"] / 1024)
    out.update(total_s=time.perf_counter() - t_start, run_s=time.perf_counter() - t0, rss_kb=rss,
               peak_rss_mb=rss["trained"]["VmHWM"] / 1024, num_params=result.num_params,
               vocab_size=result.vocab_size, steps=result.steps,
               final_val_loss=result.final_val_loss,
               # weights, gradients and Adam's two moments: 4 float32 copies of the parameters
               model_state_mb=16 * result.num_params / MB)
    return out


def run_child(mode: str, kind: str, path: Path, cache_dir: Path | None,
              pythonpath: Path) -> dict[str, Any]:
    args = {"mode": mode, "kind": kind, "path": str(path),
            "cache_dir": None if cache_dir is None else str(cache_dir)}
    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(args)], env=env,
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {"error": proc.stderr[-3000:], "returncode": proc.returncode}
    res: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return res


# -- the corpus ---------------------------------------------------------------------------------


def write_corpus(path: Path, size_bytes: int, seed: int = 0) -> int:
    """Write about ``size_bytes`` of perturbed tinyshakespeare lines; returns the bytes."""
    import numpy as np

    lines = (REPO / "data/tinyshakespeare/input.txt").read_text(encoding="utf-8").splitlines(
        keepends=True)
    rng = np.random.default_rng(seed)
    swaps = [str.maketrans("ae", "ea"), str.maketrans("ou", "uo"), str.maketrans("e", "é")]
    written, block = 0, 0
    with open(path, "wb") as fh:
        while written < size_bytes:
            text = "".join(lines[i] for i in rng.permutation(len(lines)))
            if block % 2:
                text = text.translate(swaps[(block // 2) % 3])
            data = text.encode("utf-8")
            if written + len(data) > size_bytes:  # end on a whole line
                data = data[: data.rfind(b"\n", 0, size_bytes - written) + 1]
                if not data:
                    break
            fh.write(data)
            written += len(data)
            block += 1
    return path.stat().st_size


# -- the tokenizer library alone ------------------------------------------------------------------


def _line_chunks(path: Path, limit_chars: int | None = None) -> Any:
    """~1 MiB chunks of whole lines (the text exactly: no newline translation)."""
    seen = 0
    with open(path, encoding="utf-8", newline="") as fh:
        while lines := fh.readlines(1 << 20):
            yield lines
            seen += sum(map(len, lines))
            if limit_chars is not None and seen >= limit_chars:
                return


def library_alone(kind: str, path: Path, tokenizer_json: str, n_chars: int) -> dict[str, float]:
    import numpy as np

    from worker.engine.textstream import code_points
    from worker.engine.tokenizers import tokenizer_from_json

    tok: Any = tokenizer_from_json(tokenizer_json)
    out: dict[str, float] = {}
    t0 = time.perf_counter()
    if kind == "char":
        for lines in _line_chunks(path):
            tok.encode("".join(lines))
        out["python_encode_s"] = time.perf_counter() - t0
        lut = np.zeros(0x110000, dtype=np.uint16)
        for i, c in enumerate(tok.itos[1:], start=1):
            lut[ord(c)] = i
        t0 = time.perf_counter()
        for lines in _line_chunks(path):
            lut[code_points("".join(lines))]
        out["numpy_encode_s"] = time.perf_counter() - t0
    elif kind == "word":
        for lines in _line_chunks(path):
            tok.encode("".join(lines))
        out["python_encode_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        counts: Counter[str] = Counter()
        for lines in _line_chunks(path, int(n_chars * 0.99)):
            counts.update("".join(lines).split())
        out["python_count_s"] = time.perf_counter() - t0
    else:
        out.update(_library_bpe(tok, path, n_chars))
    return out


def _library_bpe(tok: Any, path: Path, n_chars: int) -> dict[str, float]:
    from worker.engine.tokenizers import BPETokenizer

    out: dict[str, float] = {}
    t0 = time.perf_counter()
    for lines in _line_chunks(path):
        tok.hf.encode_batch(lines, add_special_tokens=False)
    out["hf_encode_batch_s"] = time.perf_counter() - t0
    if hasattr(tok.hf, "encode_batch_fast"):  # tokenizers >= 0.20
        t0 = time.perf_counter()
        for lines in _line_chunks(path):
            tok.hf.encode_batch_fast(lines, add_special_tokens=False)
        out["hf_encode_batch_fast_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    BPETokenizer.train_from_batches(_line_chunks(path, int(n_chars * 0.99)), tok.vocab_size)
    out["hf_train_s"] = time.perf_counter() - t0
    return out


# -- the run --------------------------------------------------------------------------------------


def extract_old(ref: str, dest: Path) -> Path:  # any ref: also --new-ref
    """The ``core`` and ``worker`` packages of ``ref`` under ``dest`` (git archive)."""
    dest.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref, "core", "worker"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def bench_size(size_mb: int, kinds: list[str], old_max_mb: int, work: Path,
               old_tree: Path | None, new_tree: Path) -> dict[str, Any]:
    corpus = work / f"corpus-{size_mb}mb.txt"
    t0 = time.perf_counter()
    n_bytes = write_corpus(corpus, size_mb * MB)
    with open(corpus, encoding="utf-8", newline="") as fh:
        n_chars = sum(len(chunk) for chunk in iter(lambda: fh.read(1 << 22), ""))
    row: dict[str, Any] = {"size_mb": size_mb, "bytes": n_bytes, "chars": n_chars,
                           "generate_s": time.perf_counter() - t0, "kinds": {}}
    print(f"{size_mb} MB: {n_bytes} bytes, {n_chars} chars", flush=True)
    for kind in kinds:
        cache = work / f"cache-{size_mb}-{kind}"
        res: dict[str, Any] = {"new": run_child("new", kind, corpus, cache, new_tree)}
        print(f"  {kind} new: {_brief(res['new'])}", flush=True)
        res["warm"] = run_child("new", kind, corpus, cache, new_tree)
        print(f"  {kind} warm: {_brief(res['warm'])}", flush=True)
        if old_tree is not None and size_mb <= old_max_mb:
            res["old"] = run_child("old", kind, corpus, None, old_tree)
            print(f"  {kind} old: {_brief(res['old'])}", flush=True)
        metas = list(cache.glob("*/meta.json"))
        if metas:
            meta = json.loads(metas[0].read_text(encoding="utf-8"))
            res["library"] = library_alone(kind, corpus, meta["tokenizer"], n_chars)
            print(f"  {kind} library alone: {res['library']}", flush=True)
        shutil.rmtree(cache)
        row["kinds"][kind] = res
    corpus.unlink()
    return row


def _brief(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"ERROR {r['error'][-500:]}"
    return (f"peak {r['peak_rss_mb']:.0f} MB (anon {r['peak_anon_mb']:.0f}, file "
            f"{r['peak_file_mb']:.0f}), prepare {r.get('prepare_s', float('nan')):.1f} s"
            f", run {r['run_s']:.1f} s, tokens {r.get('token_bytes', 0) / MB:.1f} MB")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes-mb", type=int, nargs="+", default=[10, 100, 1000])
    p.add_argument("--kinds", nargs="+", default=["char", "bpe", "word"])
    p.add_argument("--old-max-mb", type=int, default=100)
    p.add_argument("--old-ref", default=OLD_REF)
    p.add_argument("--new-ref", help="run the engine of this commit (git archive) rather than "
                   "the working tree's, which others may be editing during a long run")
    p.add_argument("--out", default=str(REPO / "bench/results/prepare_memory.json"))
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(json.loads(a.child))))
        return 0
    sys.path.insert(0, str(REPO))
    with tempfile.TemporaryDirectory(prefix="lmforge-prepare-bench-") as tmp:
        work = Path(tmp)
        old_tree = extract_old(a.old_ref, work / "old") if a.old_max_mb > 0 else None
        new_tree = REPO if a.new_ref is None else extract_old(a.new_ref, work / "new")
        out = {"machine": {"platform": platform.platform(), "python": platform.python_version(),
                           "cpus": os.cpu_count(), "processor": _cpu_model()},
               "command": " ".join([Path(sys.executable).name, *sys.argv]),
               "old_ref": a.old_ref, "new_ref": a.new_ref, "rows": []}
        for size in a.sizes_mb:  # written after each size: a long run keeps what it measured
            out["rows"].append(bench_size(size, a.kinds, a.old_max_mb, work, old_tree,
                                          new_tree))
            Path(a.out).write_text(json.dumps(out, indent=1), encoding="utf-8")
    print(f"wrote {a.out}")
    return 0


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="ascii").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
