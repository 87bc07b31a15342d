"""push_to_hub against a local stand-in for the Hub's HTTP API (loopback only, never the real Hub).

The stand-in implements the endpoints huggingface_hub 2.4 calls for ``create_repo`` + ``upload_folder``
of small files: ``POST /api/repos/create``, ``POST /api/validate-yaml`` (the model card's front matter),
``POST /api/models/{id}/preupload/{rev}`` (answering "regular" for every file, so no LFS/Xet transfer)
and ``POST /api/models/{id}/commit/{rev}`` (NDJSON, contents base64-encoded). Anything else is
answered 404 and recorded, so an unexpected call fails the test.
"""

from __future__ import annotations

import argparse
import base64
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import yaml
from helpers import tiny_llama
from huggingface_hub import constants

from llmprune.cli import push as push_cli
from llmprune.errors import ConfigError
from llmprune.io.hub import HubError, check_repo_id, push_to_hub
from llmprune.io.save import save_pruned


class FakeHub(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, status_for_create: int = 200) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.status_for_create = status_for_create
        self.created: list[dict] = []
        self.commits: list[dict] = []  # {"repo", "header", "files": {path: bytes}}
        self.preuploads: list[list[str]] = []
        self.unexpected: list[str] = []
        self.validated: list[str] = []
        self.auth: list[str | None] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: FakeHub

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def _reply(self, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def do_GET(self) -> None:
        if self.path.startswith("/api/whoami-v2") and self.server.status_for_create == 200:
            self.server.auth.append(self.headers.get("Authorization"))
            return self._reply(200, {"name": "me", "type": "user"})
        self.server.unexpected.append(f"GET {self.path}")
        self._reply(self.server.status_for_create if self.server.status_for_create != 200 else 404, {})

    def do_POST(self) -> None:
        hub = self.server
        hub.auth.append(self.headers.get("Authorization"))
        body = self._body()
        parts = self.path.split("?")[0].strip("/").split("/")
        if parts == ["api", "repos", "create"]:
            if hub.status_for_create != 200:
                return self._reply(hub.status_for_create, {"error": "Invalid credentials"})
            payload = json.loads(body)
            hub.created.append(payload)
            return self._reply(200, {"url": f"{hub.url}/{payload['organization']}/{payload['name']}"})
        if parts == ["api", "validate-yaml"]:  # README.md front matter, checked before any upload
            content = json.loads(body)["content"]
            hub.validated.append(content)
            try:
                meta = yaml.safe_load(content.split("---")[1])
            except (yaml.YAMLError, IndexError) as exc:
                return self._reply(400, {"errors": [{"message": str(exc)}]})
            return self._reply(200 if isinstance(meta, dict) else 400, {"errors": [], "warnings": []})
        if len(parts) == 6 and parts[:2] == ["api", "models"] and parts[4] == "preupload":
            files = json.loads(body)["files"]
            hub.preuploads.append([f["path"] for f in files])
            answer = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
            return self._reply(200, {"files": answer})
        if len(parts) == 6 and parts[:2] == ["api", "models"] and parts[4] == "commit":
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            files = {
                item["value"]["path"]: base64.b64decode(item["value"]["content"])
                for item in lines
                if item["key"] == "file"
            }
            other = [item["key"] for item in lines if item["key"] not in ("header", "file")]
            hub.commits.append(
                {"repo": "/".join(parts[2:4]), "header": lines[0], "files": files, "other": other}
            )
            oid = "a" * 40
            return self._reply(
                200, {"commitUrl": f"{hub.url}/{parts[2]}/{parts[3]}/commit/{oid}", "commitOid": oid}
            )
        hub.unexpected.append(f"POST {self.path}")
        return self._reply(404, {"error": "not found"})


@pytest.fixture
def hub(monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the suite runs with HF_HUB_OFFLINE=1
    server = FakeHub()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    model = tiny_llama()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".layers." in name and p.ndim == 2:
                p.masked_fill_(p.abs() < p.abs().median(), 0.0)
    out = tmp_path_factory.mktemp("push") / "tiny-pruned"
    save_pruned(model, None, out, metrics={"perplexity": {"dense": 10.0, "pruned": 11.0}})
    (out / ".scratch").write_text("hidden files are not uploaded")
    return out


def _visible_files(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    }


def test_push_uploads_every_file_of_the_folder(hub, saved):
    url = push_to_hub(saved, "me/tiny-pruned", private=True, token="hf_local_test_token", endpoint=hub.url)
    assert url == f"{hub.url}/me/tiny-pruned"
    assert hub.created == [{"name": "tiny-pruned", "organization": "me", "visibility": "private"}]
    assert len(hub.commits) == 1 and hub.commits[0]["repo"] == "me/tiny-pruned"
    assert hub.commits[0]["header"]["value"]["summary"] == "Upload pruned model (llmprune)"
    expected = _visible_files(saved)
    wanted = {
        "config.json",
        "model.safetensors",
        "README.md",
        "sparsity.json",
        "run_info.json",
        "masks.safetensors",
    }
    assert wanted <= set(expected)
    assert hub.commits[0]["files"] == expected  # same names, byte-identical contents, no hidden file
    assert hub.commits[0]["other"] == []
    assert hub.validated == [expected["README.md"].decode()]
    assert set(hub.auth) == {"Bearer hf_local_test_token"}
    assert hub.unexpected == []


def test_cli_push_uses_hf_endpoint(hub, saved, monkeypatch, capsys):
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)  # what HF_ENDPOINT sets at import time
    parser = argparse.ArgumentParser()
    push_cli.register(parser.add_subparsers())
    args = parser.parse_args(["push", str(saved), "--hub_model_id", "me/cli-model", "--token", "hf_x"])
    assert args.func(args) == 0
    assert hub.created[0]["name"] == "cli-model" and "visibility" not in hub.created[0]  # public by default
    assert set(hub.commits[0]["files"]) == set(_visible_files(saved))
    assert f"{hub.url}/me/cli-model" in capsys.readouterr().out


def test_save_pruned_can_push_in_the_same_call(hub, tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    model = tiny_llama()
    out = save_pruned(model, None, tmp_path / "m", push_to_hub=True, hub_model_id="me/m", token="hf_x")
    assert set(hub.commits[0]["files"]) == set(_visible_files(out))


def test_push_needs_a_repo_id_before_writing_anything(tmp_path):
    model = tiny_llama()
    with pytest.raises(ConfigError, match="hub_model_id"):
        save_pruned(model, None, tmp_path / "m", push_to_hub=True)
    assert not (tmp_path / "m").exists()
    for bad in ("", "a/b/c", "me/../x", "me/has space"):
        with pytest.raises(ConfigError, match="repository id"):
            check_repo_id(bad)


def test_unreachable_endpoint_fails_fast_with_the_fix(saved, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.perf_counter()
    with pytest.raises(HubError, match="could not reach the Hub") as err:
        push_to_hub(saved, "me/x", token="hf_x", endpoint=f"http://127.0.0.1:{port}")
    assert time.perf_counter() - start < 10
    assert f"127.0.0.1:{port}" in str(err.value) and "llmprune push" in str(err.value)


def test_rejected_token_names_the_login_fix(saved, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    server = FakeHub(status_for_create=401)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(HubError, match="hf auth login"):
            push_to_hub(saved, "me/x", token="hf_bad", endpoint=server.url)
        assert server.commits == []
    finally:
        server.shutdown()
        server.server_close()


def test_offline_mode_is_reported_not_hidden(saved, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubError, match="HF_HUB_OFFLINE"):
        push_to_hub(saved, "me/x", token="hf_x", endpoint="http://127.0.0.1:9")


def test_push_refuses_a_folder_that_is_not_a_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(ConfigError, match="config.json"):
        push_to_hub(tmp_path, "me/x", endpoint="http://127.0.0.1:9")


def test_a_server_that_never_answers_gives_a_bounded_error(saved, monkeypatch):
    """Before: no HTTP timeout, so push waited forever on a server that accepts and never replies."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # connections are accepted by the kernel, and never answered
    outcome: dict = {}

    def push() -> None:
        try:
            push_to_hub(saved, "me/x", token="hf_x", endpoint=f"http://127.0.0.1:{silent.getsockname()[1]}",
                        timeout=0.5, retries=1)
        except HubError as exc:
            outcome["error"] = exc

    worker = threading.Thread(target=push, daemon=True)
    worker.start()
    worker.join(60)
    silent.close()
    assert not worker.is_alive(), "push_to_hub still waiting on a silent server"
    assert "could not reach the Hub" in str(outcome["error"]) and "llmprune push" in str(outcome["error"])


def test_no_token_fails_before_any_request(saved, monkeypatch, hub):
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(HubError, match="hf auth login"):
        push_to_hub(saved, "me/x", endpoint=hub.url)
    assert hub.auth == [] and hub.unexpected == []
