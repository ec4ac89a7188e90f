"""The Hub side: the token (read only here, never written or logged), the last scan for
it before upload, the one upload call, `publish` (assemble, then upload) and
`resolve_dataset` for readers of a published dataset."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from pathlib import Path

from .assemble import assemble, default_folder
from .layout import STATE_FILE, UPLOAD_IGNORE, PublishError, PublishOptions, PublishResult

log = logging.getLogger("asteer_build.publish")
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


def check_no_secret(
    folder: str | Path, secret: str | None, paths: list[str] | None = None
) -> None:
    """Refuse to upload a folder that contains the token anywhere (a config or response
    that echoed it): the last guard before bytes leave the machine. `paths`: only these
    files of the folder (what one `follow` commit is about to send)."""
    if not secret or len(secret) < 8:
        return
    needle = secret.encode()
    files = (
        sorted(Path(folder).rglob("*")) if paths is None else [Path(folder) / r for r in paths]
    )
    for p in files:
        if not p.is_file() or p.name == STATE_FILE:
            continue
        tail = b""
        with open(p, "rb") as f:
            while block := f.read(8 << 20):
                if needle in tail + block:
                    raise PublishError(
                        f"{p.relative_to(folder)}: contains the Hub token; refusing to upload"
                    )
                tail = block[-(len(needle) - 1) :]


def hub_upload(
    folder: str, repo_id: str, *, private: bool, token: str, endpoint: str | None = None
) -> str:
    """The only network step: create the dataset repo if needed, then one resumable,
    multi-commit folder upload. Re-running it after an interruption skips what is there.

    `upload_large_folder` is that uploader up to huggingface_hub 1.x; from 2.0 it is gone
    and `upload_folder` itself streams, commits in parts and resumes (Xet)."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint, token=token)
    # private=None (not False) without --private: an organisation whose default is
    # private keeps it; the flag is ignored for a repo that already exists.
    url = api.create_repo(
        repo_id, repo_type="dataset", private=True if private else None, exist_ok=True
    )
    large = getattr(api, "upload_large_folder", None)
    if large is not None:
        large(
            repo_id=repo_id,
            folder_path=folder,
            repo_type="dataset",
            private=private,
            ignore_patterns=UPLOAD_IGNORE,
        )
    else:
        api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            repo_type="dataset",
            ignore_patterns=list(UPLOAD_IGNORE),
            commit_message="Publish ASTEER dataset",
        )
    return str(url)


def _hub_token() -> str | None:
    from huggingface_hub import get_token

    return os.environ.get("HF_TOKEN") or get_token()


def upload_token(repo: str | None, *, dry_run: bool) -> str | None:
    """Check `--repo` and find the token before the long part (assembling a folder,
    importing the authors' release): a typo or a missing login should not cost an hour of
    writing first. None with `dry_run`, which uploads nothing."""
    if not _REPO_ID.fullmatch(repo or ""):
        raise PublishError(f"--repo: expected ORG/NAME (got {repo!r})")
    if dry_run:
        return None
    token = _hub_token()
    if not token:
        raise PublishError(
            "no Hugging Face token: set HF_TOKEN or run `hf auth login` (or use --dry-run)"
        )
    return token


def publish(
    run_dir: str,
    repo: str,
    *,
    opts: PublishOptions | None = None,
    private: bool = False,
    dry_run: bool = False,
    upload: Callable[..., str] = hub_upload,
) -> PublishResult:
    """Assemble the folder, then (unless `dry_run`) upload it with `upload`."""
    token = upload_token(repo, dry_run=dry_run)
    opts = opts or PublishOptions()
    folder = opts.folder or default_folder(repo, run_dir)
    result = assemble(run_dir, folder, repo=repo, opts=opts)
    if dry_run:
        return result
    check_no_secret(folder, token)
    log.info("uploading %s to %s (%d files)", folder, repo, len(result.files))
    upload(folder, repo, private=private, token=token)
    result.uploaded = True
    return result


def resolve_dataset(source: str) -> str:
    """A published dataset as a local folder: an existing folder as is, an `ORG/NAME`
    Hub id downloaded (cached) with `snapshot_download`. For asteer-build readers of a
    published dataset; `train.data.resolve_source` is the trainer's equivalent."""
    if os.path.isdir(source):
        return source
    if not _REPO_ID.fullmatch(source):
        raise PublishError(f"{source!r} is neither a folder nor a Hub dataset id ORG/NAME")
    from huggingface_hub import snapshot_download

    return snapshot_download(repo_id=source, repo_type="dataset")
