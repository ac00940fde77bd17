"""pipeline.push against a local stand-in for the Hub, never the internet.

``LocalHub`` is a small HTTP server answering the endpoints huggingface_hub's ``create_repo``,
``create_commit`` (README metadata check, preupload, then commit) and ``create_tag`` call,
with the Hub's JSON shapes; every file is declared a regular (non-LFS) upload, so a commit carries the
files' bytes. The real client code runs unchanged: only its endpoint points here.
"""

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from huggingface_hub import constants
from safetensors.torch import save_file

from pipeline.push import PushError, main, push_folder


class LocalHub(ThreadingHTTPServer):
    def __init__(self):
        super().__init__(("127.0.0.1", 0), _HubHandler)
        self.repos = {}  # repo id -> {"private", "commits": [{path: bytes}], "tags": {tag: commit index}}
        self.writes = []  # (endpoint kind, repo id) of every request
        self.refuse_commits = False

    @property
    def endpoint(self):
        return f"http://127.0.0.1:{self.server_address[1]}"


class _HubHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _reply(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        hub = self.server
        body = self.rfile.read(int(self.headers["Content-Length"]))
        parts = self.path.split("?")[0].strip("/").split("/")  # api/models/<owner>/<name>/<kind>/<rev>
        if parts[:3] == ["api", "repos", "create"]:
            request = json.loads(body)
            repo_id = f"{request['organization']}/{request['name']}"
            hub.writes.append(("create", repo_id))
            if repo_id in hub.repos:
                return self._reply(409, {"error": "You already created this model repo",
                                         "url": f"{hub.endpoint}/{repo_id}"})
            private = request.get("visibility") == "private"
            hub.repos[repo_id] = {"private": private, "commits": [], "tags": {}}
            return self._reply(200, {"url": f"{hub.endpoint}/{repo_id}"})
        if parts == ["api", "validate-yaml"]:  # the model card's metadata, checked before a commit
            return self._reply(200, {"errors": [], "warnings": []})
        repo_id, kind = "/".join(parts[2:4]), parts[4]
        hub.writes.append((kind, repo_id))
        repo = hub.repos[repo_id]
        if kind == "preupload":
            files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                     for f in json.loads(body)["files"]]
            return self._reply(200, {"files": files})
        if kind == "commit":
            if hub.refuse_commits:
                return self._reply(400, {"error": "Bad request: simulated failure"})
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            files = {line["value"]["path"]: base64.b64decode(line["value"]["content"])
                     for line in lines if line["key"] == "file"}
            repo["commits"].append(files)
            oid = f"{len(repo['commits']):040x}"
            return self._reply(200, {"commitUrl": f"{hub.endpoint}/{repo_id}/commit/{oid}",
                                     "commitOid": oid, "pullRequestUrl": None})
        if kind == "tag":
            repo["tags"][json.loads(body)["tag"]] = int(parts[5], 16) - 1
            return self._reply(200, {})
        return self._reply(404, {"error": f"unknown endpoint {self.path}"})


@pytest.fixture
def hub(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_local_test_token")
    server = LocalHub()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def export(tmp_path):
    """A folder shaped like an export (the push does not look inside the files)."""
    folder = tmp_path / "export"
    folder.mkdir()
    save_file({"w": torch.arange(6.0).view(2, 3)}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"mask_token_id": 5}))
    (folder / "README.md").write_text("# card\n")
    return folder


def test_push_creates_the_repo_and_uploads_every_file_in_one_commit(hub, export):
    url = push_folder(export, "me/tiny", private=True, tag="step-3", endpoint=hub.endpoint)
    repo = hub.repos["me/tiny"]
    assert repo["private"] is True
    assert len(repo["commits"]) == 1
    assert repo["commits"][0] == {p.name: p.read_bytes() for p in export.iterdir()}
    assert repo["tags"] == {"step-3": 0}
    assert url.startswith(hub.endpoint + "/me/tiny/commit/")

    push_folder(export, "me/tiny", endpoint=hub.endpoint)  # an existing repo: a second commit
    assert len(repo["commits"]) == 2


def test_a_failed_upload_commits_nothing(hub, export):
    hub.refuse_commits = True
    with pytest.raises(PushError) as err:
        push_folder(export, "me/tiny", endpoint=hub.endpoint)
    assert "\n" not in str(err.value) and "refused" in str(err.value)
    # One commit request carried every file; refused, it left the repository empty.
    assert [kind for kind, _ in hub.writes] == ["create", "preupload", "commit"]
    assert hub.repos["me/tiny"]["commits"] == []


def test_no_token_is_a_one_line_error(monkeypatch, tmp_path, export, capsys):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    assert main(["--folder", str(export), "--repo", "me/tiny"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no Hugging Face token" in err


def test_no_network_is_a_one_line_error(monkeypatch, export):
    monkeypatch.setenv("HF_TOKEN", "hf_local_test_token")
    closed = LocalHub()  # bound, then closed: nothing listens on its port
    endpoint = closed.endpoint
    closed.server_close()
    with pytest.raises(PushError) as err:
        push_folder(export, "me/tiny", endpoint=endpoint)
    assert "\n" not in str(err.value) and "cannot reach" in str(err.value)
