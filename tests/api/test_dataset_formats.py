"""Dataset uploads beyond one plain text file (issue 9, "Datasets"): compressed files (gzip and
Zstandard, told by their bytes), JSON Lines with a named text field, CSV/TSV, several files as
one dataset, labelled datasets, the byte-order mark, line ends counted one way by the upload,
the submission check and the tokenizers, statistics per tokenizer kind, bad input, and
``DELETE /v1/datasets/{id}`` (409 while a job uses it, the race with a submission).

Real app, real SQLite (and PostgreSQL where the test says so), real files; no mocks."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zstandard
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

import app.jobs
from app.auth import Principal
from app.datasets import delete_dataset
from app.deps import get_enqueuer
from app.main import create_app
from core.corpora import find_corpus
from core.errors import Conflict, ValidationFailed
from core.labelled import read_labelled
from core.sources import CorpusSources, TextSource
from core.spec import JobSpec
from core.textstats import text_stats
from store.db import session_scope
from store.settings import Settings
from tests.api.conftest import CORPUS, RecordingEnqueuer, authorize, bearer, small_spec
from worker.engine.tokencache import prepare_corpus
from worker.engine.tokenizers import BPETokenizer, CharTokenizer, WordTokenizer

LIMIT = 256 * 1024  # LMFORGE_MAX_UPLOAD_BYTES here


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(LMFORGE_HOME=tmp_path / "home", DATABASE_URL=f"sqlite:///{tmp_path / 'a.db'}",
                    LMFORGE_MAX_UPLOAD_BYTES=LIMIT)


def post(client: TestClient, *files: tuple[str, bytes], **params: str) -> Any:
    return client.post("/v1/datasets", params=params,
                       files=[("file", (name, data, "application/octet-stream"))
                              for name, data in files])


def created(client: TestClient, *files: tuple[str, bytes], **params: str) -> dict[str, Any]:
    r = post(client, *files, **params)
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    return body


def stored(settings: Settings, ds: dict[str, Any]) -> bytes:
    return (settings.storage_dir / "datasets" / f"{ds['id']}.txt").read_bytes()


def stored_files(settings: Settings) -> list[str]:
    folder = settings.storage_dir / "datasets"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def error(r: Any, status: int = 422) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err: dict[str, Any] = r.json()["error"]
    return err


# -- compressed files -------------------------------------------------------------------------


def test_gzip_and_zstd_uploads_store_the_decompressed_text(
    client: TestClient, settings: Settings
) -> None:
    plain = created(client, ("corpus.txt", CORPUS.encode()))
    gz = created(client, ("corpus.txt.gz", gzip.compress(CORPUS.encode())))
    zst = created(client, ("corpus.txt.zst", zstandard.ZstdCompressor().compress(CORPUS.encode())))
    for ds in (gz, zst):
        assert stored(settings, ds) == CORPUS.encode()
        assert ds["sha256"] == plain["sha256"] == hashlib.sha256(CORPUS.encode()).hexdigest()
        assert (ds["num_chars"], ds["num_lines"], ds["num_words"]) == (3520, 80, 720)
    assert (plain["compression"], gz["compression"], zst["compression"]) == (
        "none", "gzip", "zstd")


def test_compression_is_told_by_the_bytes_not_the_name(
    client: TestClient, settings: Settings
) -> None:
    zst = created(client, ("notes.txt", zstandard.ZstdCompressor().compress(b"hello\n")))
    assert (stored(settings, zst), zst["compression"]) == (b"hello\n", "zstd")
    # A ".gz" name on plain text (a client that already decompressed it) is plain text.
    plain = created(client, ("notes.txt.gz", b"hello\n"))
    assert (stored(settings, plain), plain["compression"]) == (b"hello\n", "none")
    # Several gzip members and several zstd frames are one text each.
    members = gzip.compress(b"one\n") + gzip.compress(b"two\n")
    assert stored(settings, created(client, ("m.gz", members))) == b"one\ntwo\n"
    c = zstandard.ZstdCompressor()
    frames = c.compress(b"one\n") + c.compress(b"two\n")
    assert stored(settings, created(client, ("f.zst", frames))) == b"one\ntwo\n"


def test_a_decompression_bomb_stops_at_the_upload_limit_with_413(
    client: TestClient, settings: Settings
) -> None:
    bomb = gzip.compress(b"a" * (4 * LIMIT))
    assert len(bomb) < LIMIT // 50
    err = error(post(client, ("bomb.gz", bomb)), 413)
    assert err["code"] == "payload_too_large"
    assert "bomb.gz" in err["message"] and "decompressed" in err["message"]
    assert err["details"] == [{"limit_bytes": LIMIT, "file": "bomb.gz"}]
    zbomb = zstandard.ZstdCompressor(level=19).compress(b"a" * (4 * LIMIT))
    assert error(post(client, ("bomb.zst", zbomb)), 413)["code"] == "payload_too_large"
    assert stored_files(settings) == []
    assert client.get("/v1/datasets").json()["data"] == []


def test_corrupt_or_unsupported_compressed_files_are_422_naming_the_file(
    client: TestClient, settings: Settings
) -> None:
    cut = gzip.compress(CORPUS.encode())[:-10]
    err = error(post(client, ("cut.gz", cut)))
    assert err["field"] == "file" and err["message"].startswith("cut.gz: is not valid gzip")
    err = error(post(client, ("bad.zst", b"\x28\xb5\x2f\xfd" + b"\x00" * 20)))
    assert err["message"].startswith("bad.zst: is not valid zstd")
    err = error(post(client, ("x.bz2", b"BZh91AY&SY")))
    assert "bzip2" in err["message"] and "gzip" in err["message"]
    # Not UTF-8 after decompression: the byte offset is the decompressed one.
    err = error(post(client, ("latin.gz", gzip.compress(b"ok\ncaf\xe9\n"))))
    assert err["details"][0] == {"file": "latin.gz", "line": 2, "byte_offset": 6,
                                 "reason": "invalid continuation byte"}
    assert stored_files(settings) == []


# -- byte-order mark and line ends ------------------------------------------------------------

# Every line end: \r\n, \r, U+2028, U+2029, U+0085 (NEL), \v, \f, \x1c, \x1d, \x1e, and \n; a
# \r\n split across the 1 MiB read is covered by the normaliser's own test below.
MIXED = ("one two\r\nthree\rfour five\u2028six\u2029seven\x85eight\x0bnine\x0cten\x1c"
         "eleven\x1dtwelve\x1ethirteen\n\nlast line")


def test_a_bom_is_dropped_and_every_line_end_is_stored_as_newline(
    client: TestClient, settings: Settings
) -> None:
    ds = created(client, ("mixed.txt", ("\ufeff" + MIXED).encode()))
    text = stored(settings, ds).decode()
    assert text == ("one two\nthree\nfour five\nsix\nseven\neight\nnine\nten\neleven\ntwelve\n"
                    "thirteen\n\nlast line")
    assert (ds["num_lines"], ds["num_words"], ds["num_chars"]) == (13, 15, len(text))
    assert ds["bytes"] == len(text.encode())
    # A BOM inside the text is a character like any other (U+FEFF, zero width no-break space).
    inner = created(client, ("inner.txt", "a\ufeffb".encode()))
    assert stored(settings, inner).decode() == "a\ufeffb"


def test_upload_statistics_submission_check_and_tokenizers_count_the_same_tokens(
    client: TestClient, settings: Settings, session_factory: sessionmaker[Session],
    tmp_path: Path,
) -> None:
    """One file mixing every line end: the upload's statistics, the submission check's token
    counts and the engine's tokenizers (in memory, streamed from the stored dataset, and from
    the original file as ``lmforge train --data path`` reads it) agree."""
    raw = "\ufeff" + (MIXED + "\r\n") * 40
    ds = created(client, ("mixed.txt", raw.encode()))
    path = tmp_path / "mixed.txt"
    path.write_bytes(raw.encode())
    # The submission check's statistics of the dataset (app.jobs, as POST /v1/jobs reads them).
    principal = Principal(id="tester", name="tester", is_admin=False)
    with session_scope(session_factory) as s:
        checked = app.jobs.validate_sources(s, principal, JobSpec.model_validate(
            small_spec(ds["id"])))["train"]
    assert (checked.num_chars, checked.num_lines, checked.num_words) == (
        ds["num_chars"], ds["num_lines"], ds["num_words"])
    expected = {"char": ds["num_chars"], "word": ds["num_words"] + ds["num_lines"]}
    assert expected == {k: checked.tokens(k) for k in ("char", "word")}
    assert expected == {k: ds["stats"][k]["tokens"] for k in ("char", "word")}
    text = stored(settings, ds).decode()
    assert set(text) & {"\r", "\u2028", "\u2029", "\x85", "\ufeff"} == set()
    # The tokenizers, in memory.
    assert len(CharTokenizer.train(text).encode(text)) == expected["char"]
    assert len(WordTokenizer.train(text, None, 1).encode(text)) == expected["word"]
    # Streamed by the token cache from the stored blob (as the worker reads a dataset) and
    # from the original file (as `lmforge train --data mixed.txt` reads it).
    blob = settings.storage_dir / "datasets" / f"{ds['id']}.txt"
    sources = {
        "stored": TextSource("stored", opener=lambda: open(blob, "rb"), sha256=ds["sha256"]),
        "path": TextSource.from_path(path),
    }
    for kind in ("char", "word", "bpe"):
        spec = JobSpec.model_validate({**small_spec(ds["id"]), "tokenizer": {"kind": kind}})
        counts = {}
        for name, source in sources.items():
            prepared = prepare_corpus(spec, CorpusSources(
                source, validation=TextSource.from_text("x\n")))
            counts[name] = prepared.splits["train"].size
        assert counts["stored"] == counts["path"], kind
        if kind != "bpe":
            assert counts["stored"] == expected[kind], kind
    # The counter counts lines as str.splitlines does even before normalising.
    assert text_stats(raw).num_lines == len(raw.splitlines())
    assert len(WordTokenizer.train(raw, None, 1).encode(raw)) == text_stats(raw).tokens("word")


# -- JSON Lines, CSV, TSV ---------------------------------------------------------------------


def test_jsonl_with_a_named_text_field_is_a_text_dataset_of_its_values(
    client: TestClient, settings: Settings
) -> None:
    lines = [{"body": "first doc\r\nspans two lines", "id": 1}, {"body": "second", "x": [1]}]
    data = "\n".join(json.dumps(x) for x in lines).encode() + b"\n\n  \n"
    ds = created(client, ("docs.jsonl", data), format="jsonl", text_field="body")
    assert stored(settings, ds) == b"first doc\nspans two lines\nsecond\n"
    assert (ds["kind"], ds["format"], ds["num_lines"]) == ("text", "jsonl", 3)


def test_csv_and_tsv_with_a_header_name_the_text_column(
    client: TestClient, settings: Settings
) -> None:
    csv_data = b'id,sentence\r\n1,"a, quoted ""x""\r\nacross lines"\r\n2,plain\r\n'
    ds = created(client, ("a.csv", csv_data), format="csv", text_field="sentence")
    assert stored(settings, ds) == b'a, quoted "x"\nacross lines\nplain\n'
    tsv = created(client, ("a.tsv", b'sentence\tid\n"quoted" as is\t1\n'), format="tsv",
                  text_field="sentence")
    assert stored(settings, tsv) == b'"quoted" as is\n'  # TSV has no quoting


@pytest.mark.parametrize(("data", "params", "where"), [
    (b'{"text": "a"}\n[1, 2]\n', {"format": "jsonl"},
     ("docs.jsonl, line 2: expected a JSON object, got an array", None)),
    (b'{"text": "a"}\n{"txt": "b"}\n', {"format": "jsonl"},
     ("docs.jsonl, line 2: the object has no field 'text'", "text")),
    (b'{"text": "a"}\n\n{"text": 3}\n', {"format": "jsonl"},
     ("docs.jsonl, line 3: field 'text' is a number, not a string", "text")),
    (b'{"text": "a"}\n{"text": "b",\n', {"format": "jsonl"},
     ("docs.jsonl, line 2: not valid JSON", None)),
    (b'{"text": "a", "label": null}\n', {"format": "jsonl", "label_field": "label"},
     ("docs.jsonl, line 1: field 'label' is null, not a string", "label")),
    (b'{"text": "  ", "label": "pos"}\n', {"format": "jsonl", "label_field": "label"},
     ("docs.jsonl, line 1: field 'text' is empty", "text")),
    (b"text,label\nok,1\nnot ok\n", {"format": "csv", "label_field": "label"},
     ("docs.jsonl, line 3: has 1 fields, expected 2", None)),
    (b'text,label\n"open,1\n', {"format": "csv", "label_field": "label"},
     ("docs.jsonl, line 2: not valid CSV", None)),
])
def test_bad_records_are_422_naming_the_file_line_and_field(
    client: TestClient, settings: Settings, data: bytes, params: dict[str, str],
    where: tuple[str, str | None],
) -> None:
    err = error(post(client, ("docs.jsonl", data), **params))
    message, fld = where
    assert err["message"].startswith(message), err
    # A record's named field: the parameter that names it (as CSV's missing column); else
    # the file. The file and line are in the message either way.
    assert err["field"] == {"text": "text_field", "label": "label_field"}.get(fld or "", "file")
    detail = {"file": "docs.jsonl", "line": int(message.split("line ")[1].split(":")[0])}
    if fld is not None:
        detail["field"] = fld
    assert err["details"] == [detail]
    assert stored_files(settings) == []


def test_a_missing_column_names_the_parameter_and_the_columns(client: TestClient) -> None:
    err = error(post(client, ("t.csv", b"sentence,stars\nhi,5\n"), format="csv"))
    assert err["field"] == "text_field"
    assert err["message"] == (
        "t.csv, line 1: the header has no column 'text' (its columns: 'sentence', 'stars'); "
        "name the column with text_field, or give the columns of a file without a header "
        "row with columns=")
    err = error(post(client, ("t.csv", b"sentence,stars\nhi,5\n"), format="csv",
                     text_field="sentence", label_field="label"))
    assert err["field"] == "label_field"


@pytest.mark.parametrize(("params", "field"), [
    ({"label_field": "label"}, "label_field"),  # a label needs fields: jsonl/csv/tsv
    ({"text_field": "sentence"}, "text_field"),  # format text has no fields either
    ({"format": "text", "text_field": "text"}, "text_field"),
    ({"format": "jsonl", "columns": "text,label"}, "columns"),
    ({"format": "xml"}, "format"),
    ({"format": "tsv", "columns": "a,b"}, "text_field"),  # text is not one of the columns
    ({"format": "tsv", "columns": "text,text"}, "columns"),
    ({"format": "csv", "label_field": "text"}, "label_field"),
])
def test_options_that_do_not_fit_are_422_naming_the_parameter(
    client: TestClient, settings: Settings, params: dict[str, str], field: str
) -> None:
    err = error(post(client, ("a.txt", b"text,label\nx,1\n"), **params))
    assert err["field"] == field, err
    assert stored_files(settings) == []


def test_empty_datasets_are_422(client: TestClient) -> None:
    assert error(post(client, ("a.txt", b"\xef\xbb\xbf")))["message"] == "the file is empty"
    assert error(post(client, ("a.txt", b""), ("b.txt", b"")))["message"] == (
        "the files are empty")
    assert "no records" in error(post(client, ("a.jsonl", b"\n \n"), format="jsonl"))["message"]
    assert "no examples" in error(post(client, ("a.tsv", b"text\tlabel\n"), format="tsv",
                                       label_field="label"))["message"]


# -- several files ----------------------------------------------------------------------------


def test_several_files_are_one_dataset_joined_in_order_each_on_its_own_lines(
    client: TestClient, settings: Settings
) -> None:
    ds = created(client, ("a.txt", b"\xef\xbb\xbfalpha"), ("b.txt.gz", gzip.compress(b"beta\n")),
                 ("empty.txt", b""), ("c.txt", b"\xef\xbb\xbfgamma\r\n"), ("d.txt", b"delta"))
    assert stored(settings, ds) == b"alpha\nbeta\ngamma\ndelta"
    assert (ds["num_files"], ds["compression"], ds["num_lines"]) == (5, "mixed", 4)
    assert ds["name"] == "a.txt"  # the first file's name unless a name is given


def test_the_error_names_the_file_of_several_that_is_bad(client: TestClient) -> None:
    err = error(post(client, ("good.txt", b"fine\n"), ("bad.txt", b"ok\nok\n\xff")))
    assert err["message"].startswith("bad.txt, line 3: not UTF-8 text")
    assert err["details"][0]["file"] == "bad.txt"


def test_the_upload_limit_applies_to_all_files_together(
    client: TestClient, settings: Settings
) -> None:
    half = b"x" * (LIMIT // 2 + 1)
    assert error(post(client, ("a.txt", half), ("b.txt", half)), 413)["details"] == [
        {"limit_bytes": LIMIT}]
    assert stored_files(settings) == []


# -- labelled datasets ------------------------------------------------------------------------


def test_a_headerless_sst2_style_tsv_is_a_labelled_dataset(
    client: TestClient, settings: Settings
) -> None:
    data = b"a stirring , funny film\t1\nthe plot is a mess\t0\nwarm and moving\t1\n"
    ds = created(client, ("train.tsv", data), format="tsv", columns="text,label",
                 label_field="label")
    assert (ds["kind"], ds["format"], ds["num_examples"], ds["labels"]) == (
        "labelled", "tsv", 3, {"0": 1, "1": 2})
    assert read_labelled(stored(settings, ds)) == [
        ("a stirring , funny film", "1"), ("the plot is a mess", "0"), ("warm and moving", "1")]
    # The text statistics count the examples' texts, one line each.
    assert (ds["num_lines"], ds["num_words"]) == (3, 13)


def test_the_real_sst2_dev_split_uploads_with_its_872_sentences(
    client: TestClient, settings: Settings
) -> None:
    path = find_corpus("sst2/dev.tsv")
    if path is None:
        pytest.skip("SST-2 is not in ../shared/data (core.corpora.find_corpus)")
    ds = created(client, ("dev.tsv.gz", gzip.compress(path.read_bytes())), format="tsv",
                 columns="text,label", label_field="label")
    assert ds["num_examples"] == 872 and set(ds["labels"]) == {"0", "1"}
    assert sum(ds["labels"].values()) == 872
    examples = read_labelled(stored(settings, ds))
    first = path.read_text(encoding="utf-8").splitlines()[0].split("\t")
    assert examples[0] == (first[0], first[1])


def test_jsonl_and_csv_labelled_datasets_normalise_text_and_labels(
    client: TestClient, settings: Settings
) -> None:
    jl = b'{"text": "good\\r\\nfilm", "label": 1}\n{"text": "bad", "label": " neg "}\n'
    ds = created(client, ("a.jsonl", jl), format="jsonl", label_field="label")
    assert read_labelled(stored(settings, ds)) == [("good\nfilm", "1"), ("bad", "neg")]
    csv_data = b'review,sentiment\n"great, really",pos\nmeh,neg\n'
    ds = created(client, ("r.csv", csv_data), format="csv", text_field="review",
                 label_field="sentiment")
    assert read_labelled(stored(settings, ds)) == [("great, really", "pos"), ("meh", "neg")]
    assert ds["labels"] == {"neg": 1, "pos": 1}


def test_an_uploaded_labelled_dataset_takes_a_classification_job_and_is_then_in_use(
    client: TestClient,
) -> None:
    rows = "".join(f"{'good' if i % 2 else 'bad'} film number {i}\t{i % 2}\n" for i in range(60))
    ds = created(client, ("train.tsv", rows.encode()), format="tsv", columns="text,label",
                 label_field="label")
    spec = {**small_spec(ds["id"]), "task": "classify", "test_fraction": 0.2}
    job = client.post("/v1/jobs", json=spec)
    assert job.status_code == 201, job.text
    err = error(client.delete(f"/v1/datasets/{ds['id']}"), 409)
    assert err["details"] == [{"job_ids": [job.json()["id"]], "other_jobs": 0}]
    # A text dataset is refused for classification (app.classify, by the row's kind).
    text = created(client, ("t.txt", CORPUS.encode()))
    r = client.post("/v1/jobs", json={**spec, "dataset_id": text["id"]})
    assert error(r)["code"] == "dataset_not_labelled"


def test_a_language_model_job_on_a_labelled_dataset_is_422(client: TestClient) -> None:
    ds = created(client, ("a.tsv", b"good film\t1\n" * 300), format="tsv",
                 columns="text,label", label_field="label")
    err = error(client.post("/v1/jobs", json=small_spec(ds["id"])))
    assert (err["code"], err["field"]) == ("dataset_not_text", "dataset_id")
    assert "label_field" in err["message"]


def test_a_column_with_too_many_labels_is_422(client: TestClient) -> None:
    data = "".join(f"text {i}\t{i}\n" for i in range(1001)).encode()
    err = error(post(client, ("t.tsv", data), format="tsv", columns="text,label",
                     label_field="label"))
    assert "more than 1000 distinct labels" in err["message"]
    assert err["details"] == [{"file": "t.tsv", "line": 1001, "field": "label"}]


# -- statistics per tokenizer kind ------------------------------------------------------------


def test_statistics_per_tokenizer_kind_match_the_engine_tokenizers(
    client: TestClient, settings: Settings
) -> None:
    text = ("the cat sat on the mat <unk> and the dog ran\n" * 30
            + "rare words appear once here\n")
    ds = created(client, ("t.txt", text.encode()))
    got = client.get(f"/v1/datasets/{ds['id']}").json()
    assert got["stats"] == ds["stats"]
    char, word, bpe = (got["stats"][k] for k in ("char", "word", "bpe"))
    assert char == {"tokens": len(text), "vocab": CharTokenizer.train(text).vocab_size,
                    "distinct_chars": len(set(text)), "coverage": 1.0}
    tok = WordTokenizer.train(text, None, 1)
    ids = tok.encode(text)
    assert (word["tokens"], word["vocab"]) == (len(ids), tok.vocab_size)
    assert word["coverage"] == round(1 - ids.count(0) / len(ids), 6)  # <unk> written 30 times
    assert word["singletons"] == 5 and word["distinct_words"] == 13
    assert word["coverage_at_max_vocab"] == {}  # the default vocabulary is smaller than 1000
    # BPE: the whole (small) text is the sample, so the estimate is the engine's exact count.
    engine = BPETokenizer.train(text, 2000)
    assert bpe["estimate"] is True and bpe["sample_bytes"] == len(text.encode())
    assert (bpe["tokens"], bpe["vocab"]) == (len(engine.encode(text)), engine.vocab_size)


def test_word_coverage_at_a_smaller_max_vocab(client: TestClient) -> None:
    words = [f"w{i}" for i in range(1200)]
    text = " ".join(words) + "\n" + " ".join(words[:10]) + "\n"
    stats = created(client, ("t.txt", text.encode()))["stats"]["word"]
    tok = WordTokenizer.train(text, 1000, 1)
    ids = tok.encode(text)
    assert stats["coverage_at_max_vocab"] == {"1000": round(1 - ids.count(0) / len(ids), 6)}


def test_labelled_statistics_count_the_texts(client: TestClient) -> None:
    ds = created(client, ("a.tsv", b"aa b\tx\nc\ty\n"), format="tsv", columns="text,label",
                 label_field="label")
    assert ds["stats"]["char"]["tokens"] == len("aa b\nc\n")
    assert ds["stats"]["word"]["tokens"] == 3 + 2


# -- idempotency ------------------------------------------------------------------------------


def test_a_retry_with_the_same_key_files_and_options_replays(client: TestClient) -> None:
    files = [("file", ("a.tsv", b"x\t1\n", "text/plain")),
             ("file", ("b.tsv", b"y\t0\n", "text/plain"))]
    params = {"format": "tsv", "columns": "text,label", "label_field": "label"}
    headers = {"Idempotency-Key": "k1"}
    first = client.post("/v1/datasets", params=params, files=files, headers=headers)
    again = client.post("/v1/datasets", params=params, files=files, headers=headers)
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json()["id"] == first.json()["id"]
    other = client.post("/v1/datasets", params={**params, "columns": "label,text"},
                        files=files, headers=headers)
    assert error(other, 409)["code"] == "idempotency_key_reused"


# -- delete -----------------------------------------------------------------------------------


def test_delete_removes_the_row_and_the_file(client: TestClient, settings: Settings) -> None:
    ds = created(client, ("a.txt", CORPUS.encode()))
    assert stored_files(settings) == [f"{ds['id']}.txt"]
    r = client.delete(f"/v1/datasets/{ds['id']}")
    assert (r.status_code, r.content) == (204, b"")
    assert stored_files(settings) == []
    assert error(client.get(f"/v1/datasets/{ds['id']}"), 404)["code"] == "not_found"
    assert error(client.delete(f"/v1/datasets/{ds['id']}"), 404)["code"] == "not_found"


def test_delete_of_another_principals_dataset_is_404_and_keeps_it(
    client: TestClient, settings: Settings
) -> None:
    ds = created(client, ("a.txt", CORPUS.encode()))
    own = client.headers["Authorization"]
    authorize(client, "bob")
    assert error(client.delete(f"/v1/datasets/{ds['id']}"), 404)["code"] == "not_found"
    client.headers["Authorization"] = own
    assert client.get(f"/v1/datasets/{ds['id']}").status_code == 200
    assert stored_files(settings) == [f"{ds['id']}.txt"]


def test_delete_is_409_while_a_queued_or_running_job_uses_it(
    client: TestClient, settings: Settings
) -> None:
    ds = created(client, ("a.txt", CORPUS.encode()))
    other = created(client, ("b.txt", CORPUS.encode()))
    # Used as validation data of a job whose training data is another dataset.
    job = client.post("/v1/jobs", json={**small_spec(other["id"]),
                                        "validation": {"id": ds["id"]}})
    assert job.status_code == 201, job.text
    job_id = job.json()["id"]
    for target in (ds, other):
        err = error(client.delete(f"/v1/datasets/{target['id']}"), 409)
        assert err["code"] == "dataset_in_use"
        assert job_id in err["message"]
        assert err["details"] == [{"job_ids": [job_id], "other_jobs": 0}]
    assert stored_files(settings) == sorted([f"{ds['id']}.txt", f"{other['id']}.txt"])
    # Once the job is cancelled (finished), the dataset can go; the job's record stays.
    assert client.post(f"/v1/jobs/{job_id}/cancel").status_code in (200, 202)
    assert client.delete(f"/v1/datasets/{ds['id']}").status_code == 204
    assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "cancelled"


def test_a_job_of_another_principal_is_counted_not_named(
    client: TestClient, make_key: Any
) -> None:
    ds = created(client, ("a.txt", CORPUS.encode()))
    admin = make_key("root", admin=True)
    job = client.post("/v1/jobs", json=small_spec(ds["id"]), headers=bearer(admin))
    assert job.status_code == 201, job.text
    err = error(client.delete(f"/v1/datasets/{ds['id']}"), 409)
    assert job.json()["id"] not in err["message"]
    assert err["details"] == [{"job_ids": [], "other_jobs": 1}]
    assert "1 job(s) of other principals" in err["message"]


def test_after_delete_an_idempotency_key_retry_makes_a_new_dataset(client: TestClient) -> None:
    files = {"file": ("a.txt", CORPUS.encode(), "text/plain")}
    first = client.post("/v1/datasets", files=files, headers={"Idempotency-Key": "k"}).json()
    assert client.delete(f"/v1/datasets/{first['id']}").status_code == 204
    again = client.post("/v1/datasets", files=files, headers={"Idempotency-Key": "k"})
    assert again.status_code == 201 and again.json()["id"] != first["id"]


# -- delete racing a submission (SQLite and PostgreSQL) ---------------------------------------


@pytest.fixture(params=["sqlite", "postgres"])
def any_client(request: pytest.FixtureRequest, tmp_path: Path,
               enqueuer: RecordingEnqueuer) -> Iterator[TestClient]:
    url = (f"sqlite:///{tmp_path / 'race.db'}" if request.param == "sqlite"
           else str(request.getfixturevalue("postgres_url")))
    app_ = create_app(Settings(LMFORGE_HOME=tmp_path / "home", DATABASE_URL=url,
                               LMFORGE_MAX_UPLOAD_BYTES=LIMIT))
    app_.dependency_overrides[get_enqueuer] = lambda: enqueuer
    with TestClient(app_, raise_server_exceptions=False) as c:
        authorize(c)
        yield c


TESTER = Principal(id="tester", name="tester", is_admin=False)


def test_a_delete_committed_between_the_checks_and_the_insert_fails_the_submission(
    any_client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The delete commits after the submission checked the dataset and before it wrote the
    job: the submission's second read sees it gone (422), and no job refers to it."""
    c = any_client
    ds = created(c, ("a.txt", CORPUS.encode()))
    factory: sessionmaker[Session] = c.app.state.session_factory  # type: ignore[attr-defined]
    storage = c.app.state.storage  # type: ignore[attr-defined]
    real_now = app.jobs.utcnow

    def delete_then_now() -> Any:  # called by create_job after its checks, before the insert
        with factory() as other:
            delete_dataset(other, storage, TESTER, ds["id"])
        return real_now()

    monkeypatch.setattr(app.jobs, "utcnow", delete_then_now)
    with factory() as s, pytest.raises(ValidationFailed, match="deleted while the job"):
        app.jobs.create_job(s, TESTER, JobSpec.model_validate(small_spec(ds["id"])))
    monkeypatch.undo()
    assert c.get("/v1/jobs").json()["data"] == []


def test_a_delete_while_a_submission_holds_its_job_uncommitted_sees_the_job(
    any_client: TestClient,
) -> None:
    """The job row is written (not committed) when the delete starts: the delete waits for
    the submission's lock and then finds the job (409), never a job without its dataset."""
    c = any_client
    ds = created(c, ("a.txt", CORPUS.encode()))
    factory: sessionmaker[Session] = c.app.state.session_factory  # type: ignore[attr-defined]
    storage = c.app.state.storage  # type: ignore[attr-defined]
    outcome: list[BaseException | None] = []

    def delete() -> None:
        with factory() as other:
            try:
                delete_dataset(other, storage, TESTER, ds["id"])
                outcome.append(None)
            except BaseException as exc:  # recorded for the assertion below
                outcome.append(exc)

    with factory() as s:
        job = app.jobs.create_job(s, TESTER, JobSpec.model_validate(small_spec(ds["id"])))
        deleter = threading.Thread(target=delete)
        deleter.start()
        deleter.join(0.5)  # not a threshold: the outcome below is the same if it ran sooner
        s.commit()
    deleter.join()
    assert len(outcome) == 1 and isinstance(outcome[0], Conflict), outcome
    assert outcome[0].code == "dataset_in_use" and job.id in outcome[0].message
    assert c.get(f"/v1/datasets/{ds['id']}").status_code == 200


def test_the_line_end_normaliser_joins_a_crlf_split_across_pieces() -> None:
    from core.textstats import LineEndNormaliser, normalise_line_ends

    text = "a\r\nb\rc\u2028d\r\n\r\ne\r"
    for cut in range(len(text) + 1):
        n = LineEndNormaliser()
        assert n.feed(text[:cut]) + n.feed(text[cut:]) == normalise_line_ends(text) == (
            "a\nb\nc\nd\n\ne\n"), cut


def test_sample_lines_of_a_large_blob_are_whole_lines() -> None:
    from core.datasetstats import SAMPLE_WINDOWS, WINDOW_BYTES, sample_lines

    data = b"".join(f"line number {i} of the text\n".encode() for i in range(40_000))
    lines = sample_lines(io.BytesIO(data), len(data), labelled=False)
    assert sum(len(x) for x in lines) <= SAMPLE_WINDOWS * WINDOW_BYTES
    assert all(x.startswith("line number ") and x.endswith(" of the text\n") for x in lines)
    assert len(lines) > SAMPLE_WINDOWS * 100


def test_word_counting_stops_adding_words_past_its_bound() -> None:
    from core.datasetstats import TokenCounter, word_stats

    counter = TokenCounter(max_distinct_words=3)
    text = "a b c d\ne a f a\n"
    for piece in (text[:8], text[8:]):  # the first piece's 4 words pass the bound of 3
        counter.feed(piece)
    stats = word_stats(text_stats(text), counter)
    assert counter.truncated and stats["truncated"] is True
    assert counter.words == {"a": 3, "b": 1, "c": 1, "d": 1}  # e and f were not added
    assert stats["tokens"] == 8 + 2 and stats["vocab"] == 2 + 4


def test_a_missing_field_names_the_parameter_in_jsonl_as_in_csv(client: TestClient) -> None:
    for name, data, fmt in (("a.jsonl", b'{"sentence": "hi", "stars": 5}\n', "jsonl"),
                            ("a.csv", b"sentence,stars\nhi,5\n", "csv")):
        err = error(post(client, (name, data), format=fmt, text_field="sentence",
                         label_field="label"))
        assert err["field"] == "label_field", err
        assert err["message"].startswith(f"{name}, line 1: "), err
        err = error(post(client, (name, data), format=fmt, text_field="body"))
        assert err["field"] == "text_field" and "'body'" in err["message"], err
