"""Publish an export on the Hugging Face Hub, all files in one commit.

    python -m pipeline.push --folder runs/tiny/export --repo you/difftron-tiny [--private]
    python -m pipeline.push --config runs/tiny/adapt/config.yaml \
        --checkpoints runs/tiny/adapt/checkpoints --repo you/difftron-tiny   # one tag per step

The repository is created when missing. Every file of a folder goes up in a single
``create_commit``, which the Hub applies all or nothing: a failed upload commits nothing.
With ``--checkpoints`` each complete checkpoint is exported and pushed in step order, tagged
``step-N`` (``from_pretrained(repo, revision="step-400")``), so ``main`` ends at the newest.
The token is huggingface_hub's usual one (``HF_TOKEN``, or ``hf auth login``); no token, no
network or a refusal by the Hub is one line on stderr.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import httpx2  # huggingface_hub's HTTP client: its network errors
from huggingface_hub import CommitOperationAdd, HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

from pipeline.config import RunConfig, load_config


class PushError(RuntimeError):
    """The upload did not happen; the message is one line saying why."""


def push_folder(
    folder: str | Path, repo_id: str, private: bool = False, tag: str | None = None,
    endpoint: str | None = None,
) -> str:
    """Upload every file under ``folder`` to ``repo_id`` in one commit; returns the commit URL."""
    folder = Path(folder)
    token = get_token()
    if token is None:
        raise PushError("no Hugging Face token: set HF_TOKEN or run `hf auth login`")
    files = sorted(path for path in folder.rglob("*") if path.is_file())
    if not files:
        raise PushError(f"{folder}: no files to push")
    api = HfApi(endpoint=endpoint, token=token)
    operations = [CommitOperationAdd(path_in_repo=path.relative_to(folder).as_posix(), path_or_fileobj=path)
                  for path in files]
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        message = f"Upload {tag or folder.name} (difftron)"
        commit = api.create_commit(repo_id, operations, commit_message=message)
        if tag is not None:
            api.create_tag(repo_id, tag=tag, revision=commit.oid)
    except (HfHubHTTPError, OfflineModeIsEnabled) as err:
        raise PushError(f"push to {repo_id}: the Hub refused: {str(err).splitlines()[0]}") from None
    except httpx2.TransportError as err:
        raise PushError(f"push to {repo_id}: cannot reach {api.endpoint} ({err})") from None
    return commit.commit_url


def push_checkpoints(cfg: RunConfig, root: str | Path, repo_id: str, private: bool = False,
                     endpoint: str | None = None) -> list[str]:
    """Export and push each complete checkpoint under ``root`` in step order, tagged ``step-N``;
    returns the commit URLs."""
    # Megatron is only needed on this path: a plain push stays light.
    from pipeline.checkpoint import read_manifest, verify_checkpoint
    from pipeline.export import export_to_hf

    found = sorted(Path(root).glob("iter_" + "[0-9]" * 7))
    checkpoints = [path for path in found if verify_checkpoint(path) is None]
    if not checkpoints:
        raise PushError(f"{root}: no complete checkpoint to push")
    urls = []
    for path in checkpoints:
        with tempfile.TemporaryDirectory() as tmp:
            export = export_to_hf(cfg, path, Path(tmp) / "export")
            tag = f"step-{read_manifest(path)['step']}"
            urls.append(push_folder(export, repo_id, private, tag, endpoint))
    return urls


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--folder", help="an export folder to push")
    source.add_argument("--checkpoints", help="a checkpoints root: push every step (needs --config)")
    parser.add_argument("--config", help="the recipe the checkpoints were trained with")
    parser.add_argument("--repo", required=True, help="owner/name on the Hub")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    parser.add_argument("--tag", help="also tag the commit (with --folder)")
    args = parser.parse_args(argv)
    try:
        if args.folder:
            urls = [push_folder(args.folder, args.repo, args.private, args.tag)]
        else:
            if not args.config:
                parser.error("--checkpoints needs --config")
            urls = push_checkpoints(load_config(args.config), args.checkpoints, args.repo, args.private)
    except PushError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print("\n".join(f"pushed {url}" for url in urls))
    return 0


if __name__ == "__main__":
    sys.exit(main())
