from __future__ import annotations

import hashlib

from fastapi.testclient import TestClient

from core.textstats import TextCounter, text_stats
from store.settings import Settings
from tests.api.conftest import CORPUS, upload


def stored_files(settings: Settings) -> list[str]:
    """Every file under the storage's ``datasets/`` (temporary ones included)."""
    folder = settings.storage_dir / "datasets"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_upload_returns_201_with_location_counts_and_sha256(client: TestClient) -> None:
    r = upload(client, CORPUS, name="fox")
    assert r.status_code == 201, r.text
    body = r.json()
    assert r.headers["location"] == f"/v1/datasets/{body['id']}"
    assert body["id"].startswith("ds_") and len(body["id"]) == 35
    assert body["name"] == "fox"
    assert body["bytes"] == len(CORPUS.encode())
    assert body["sha256"] == hashlib.sha256(CORPUS.encode()).hexdigest()
    assert (body["num_chars"], body["num_lines"], body["num_words"]) == (3520, 80, 720)
    assert client.get(f"/v1/datasets/{body['id']}").json() == body


def test_uploaded_bytes_are_stored_under_the_storage_dir(
    client: TestClient, settings: Settings
) -> None:
    text = "héllo wörld ✓\nzweite Zeile"
    ds = upload(client, text).json()
    stored = settings.storage_dir / "datasets" / f"{ds['id']}.txt"
    assert stored.read_bytes() == text.encode()
    assert (ds["num_chars"], ds["num_lines"], ds["num_words"]) == (len(text), 2, 5)


def test_upload_name_defaults_to_the_file_name(client: TestClient) -> None:
    assert upload(client, "abc", name=None).json()["name"] == "corpus.txt"


def test_upload_over_the_size_cap_is_413_naming_the_limit(
    client: TestClient, settings: Settings
) -> None:
    r = upload(client, "x" * (settings.max_upload_bytes + 1))
    assert r.status_code == 413
    err = r.json()["error"]
    assert err["code"] == "payload_too_large"
    assert str(settings.max_upload_bytes) in err["message"]
    assert err["details"] == [{"limit_bytes": settings.max_upload_bytes}]
    assert stored_files(settings) == []  # nothing stored, no temporary file left
    assert client.get("/v1/datasets").json()["data"] == []


def test_upload_of_non_utf8_bytes_is_422_and_stores_nothing(
    client: TestClient, settings: Settings
) -> None:
    r = upload(client, b"abc\xff\xfe def")
    assert r.status_code == 422
    err = r.json()["error"]
    assert err["field"] == "file"
    assert "byte offset 3" in err["message"]
    assert stored_files(settings) == []


def test_upload_without_a_file_field_is_422(client: TestClient) -> None:
    r = client.post("/v1/datasets", data={"name": "x"}, files={"other": ("a", b"abc")})
    assert r.status_code == 422
    assert r.json()["error"]["field"] == "file"


def test_upload_of_an_empty_file_is_422(client: TestClient) -> None:
    r = upload(client, b"")
    assert r.status_code == 422
    assert r.json()["error"]["message"] == "the file is empty"


def test_unknown_dataset_is_404(client: TestClient) -> None:
    r = client.get("/v1/datasets/ds_nope")
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "not_found"


def test_list_datasets_newest_first_with_cursor(client: TestClient) -> None:
    ids = [upload(client, f"text {i}").json()["id"] for i in range(3)]
    page = client.get("/v1/datasets", params={"limit": 2}).json()
    assert [d["id"] for d in page["data"]] == [ids[2], ids[1]]
    assert page["has_more"] is True and page["next_after"] == ids[1]
    rest = client.get("/v1/datasets", params={"limit": 2, "after": ids[1]}).json()
    assert [d["id"] for d in rest["data"]] == [ids[0]]
    assert rest["has_more"] is False and rest["next_after"] is None


def test_text_counter_handles_characters_and_words_split_across_chunks() -> None:
    data = "naïve café\nsecond line words\n\nlast".encode()
    counter = TextCounter()
    for i in range(0, len(data), 3):  # splits the 2-byte "ï"/"é" and every word
        counter.feed(data[i : i + 3])
    assert counter.finish() == text_stats(data.decode())
    assert text_stats(data.decode()).num_words == 6
    assert text_stats(data.decode()).num_lines == 4
