"""Turn a location string into a local path: local files, ``s3://`` prefixes and Hugging Face hub repositories.

Every stage accepts the same kinds of locations for models, tokenizers and data, and calls :func:`resolve` to get
a local :class:`~pathlib.Path`:

* a local path is returned as is (an error names it when it does not exist);
* ``s3://bucket/prefix`` downloads every object under the prefix into ``{cache_dir}/s3/{bucket}/{prefix}``. The
  download goes to a temporary sibling directory that is renamed into place only once it is complete, and a
  completion marker records the listing (key, size, ETag) it was made from, so an identical later call returns
  the cached copy without downloading and a crash never leaves a half copy that looks complete. The endpoint comes
  from boto3's usual configuration, including ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3`` (MinIO, moto);
* ``org/name`` (or ``hf://org/name``) is fetched with ``huggingface_hub.snapshot_download`` into
  ``{cache_dir}/hf``.

:func:`upload_dir` is the reverse for S3; :func:`publish_dir` and :func:`publish_file` write to either kind of
location (an ``s3://`` prefix, or a directory, e.g. on a volume that other pods mount). Credentials are never
logged: only bucket, prefix and counts are.

Every S3 transfer reports its bytes through :class:`refine_core.progress.Progress` (done / total, rate, ETA; a bar
on a terminal, a log line every 30 s in a pod), fed by the transfer manager's progress callbacks, which boto3 calls
from its worker threads.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from refine_core.errors import RunFailed
from refine_core.progress import BYTES, Progress

logger = logging.getLogger(__name__)

# Written inside a downloaded directory once every object is there; its content is the listing it was made from.
COMPLETE_MARKER = ".refine-s3-complete.json"
# A hub repository id: exactly one slash, no path-like prefix (``./x/y`` or ``/x/y`` are local paths).
_HUB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
# Large objects go in parallel 64 MiB parts (boto3's transfer manager); small ones in one request.
_PART_BYTES = 64 * 1024 * 1024
# A temporary download directory untouched for this long is a leftover of a crash (see _clean_stale_tmp).
_STALE_TMP_S = 3600.0


def expand_cache_dir(cache_dir: str | os.PathLike[str]) -> Path:
    """``~`` and environment variables expanded; the directory is not created."""
    return Path(os.path.expandvars(os.path.expanduser(str(cache_dir))))


def is_s3_uri(uri: str) -> bool:
    return uri.startswith("s3://")


def is_hub_name(spec: str) -> bool:
    """True for ``org/name`` and ``hf://org/name`` that are not an existing local path."""
    name = spec[len("hf://") :] if spec.startswith("hf://") else spec
    return bool(_HUB_NAME.match(name)) and (spec.startswith("hf://") or not Path(spec).exists())


def split_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b/`` -> ``("bucket", "a/b")`` (no leading or trailing slash on the prefix)."""
    if not is_s3_uri(uri):
        raise ValueError(f"{uri!r} is not an s3:// URI; expected s3://bucket/prefix")
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    if not bucket:
        raise ValueError(f"{uri!r} has no bucket name; expected s3://bucket/prefix")
    return bucket, prefix.strip("/")


def resolve(uri: str | os.PathLike[str], cache_dir: str | os.PathLike[str] = "~/.cache/refine") -> Path:
    """A local path for ``uri``, downloading it into ``cache_dir`` first when it is remote.

    Args:
        uri: a local file or directory, ``s3://bucket/prefix``, or a hub repository ``org/name`` / ``hf://org/name``.
        cache_dir: root of the download cache (``~`` is expanded).

    Returns:
        The local path. For ``s3://`` this is the directory holding the objects under the prefix (keys relative to
        the prefix); when the URI names a single object, the path of that file inside such a directory.

    Raises:
        FileNotFoundError: a local path does not exist, or an S3 prefix holds no objects.
        ValueError: the location cannot be reached (the message says how to fix it).
    """
    spec = os.fspath(uri)
    if is_s3_uri(spec):
        return _resolve_s3(spec, expand_cache_dir(cache_dir))
    path = Path(os.path.expanduser(spec))
    if path.exists():
        return path
    if is_hub_name(spec):
        return _resolve_hub(spec[len("hf://") :] if spec.startswith("hf://") else spec, expand_cache_dir(cache_dir))
    raise FileNotFoundError(
        f"{spec!r} does not exist: it is not a local path (looked for {path.resolve()}), an s3://bucket/prefix "
        "URI or a hub repository name org/name. Fix the path or the URI."
    )


# ------------------------------------------------------------------------------------------------------------ S3


# The environment boto3 builds a client from; a client is reused while these (and the process) stay the same.
_CLIENT_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION",
               "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_CONFIG_FILE",
               "AWS_SHARED_CREDENTIALS_FILE", "AWS_EC2_METADATA_DISABLED", "AWS_WEB_IDENTITY_TOKEN_FILE",
               "AWS_ROLE_ARN")
_clients: dict[tuple[Any, ...], Any] = {}
_clients_lock = threading.Lock()


def s3_client() -> Any:
    """A boto3 S3 client from the environment (credentials, region and ``AWS_ENDPOINT_URL[_S3]`` as boto3 reads
    them).

    Clients are thread-safe and slow to build (boto3 loads its endpoint and service data each time, about 0.5 s), so
    one is kept per process and environment: a checkpoint upload makes several calls in a row.
    """
    key = (os.getpid(), *(os.environ.get(name) for name in _CLIENT_ENV))
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            import boto3
            from botocore.config import Config

            # Bounded waits and retries with exponential backoff ("standard" mode: throttling, 5xx, dropped
            # connections), so that a flaky endpoint is ridden out and a dead one is reported in about a minute.
            config = Config(retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=10, read_timeout=120)
            client = _clients[key] = boto3.session.Session().client("s3", config=config)
        return client


def _transfer_config() -> Any:
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=_PART_BYTES, multipart_chunksize=_PART_BYTES, max_concurrency=8)


def _byte_progress(progress: Progress) -> list[Any]:
    """The transfer-manager subscribers that add each chunk's bytes to ``progress`` (what ``Callback=`` of
    ``upload_file`` / ``download_file`` does; a retried part reports negative bytes, so the count stays right)."""
    from boto3.s3.transfer import ProgressCallbackInvoker

    return [ProgressCallbackInvoker(progress.update)]


def _list_objects(client: Any, bucket: str, prefix: str) -> dict[str, dict[str, Any]]:
    """``{key: {"size", "etag"}}`` for every object under ``prefix`` (folder placeholders skipped)."""
    objects: dict[str, dict[str, Any]] = {}
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=f"{prefix}/" if prefix else ""):
        for obj in page.get("Contents", []):
            if not obj["Key"].endswith("/"):
                objects[obj["Key"]] = {"size": int(obj["Size"]), "etag": str(obj.get("ETag", "")).strip('"')}
    return objects


def _relative_key(key: str, prefix: str) -> str:
    rel = key[len(prefix) + 1 :] if prefix else key
    parts = rel.split("/")
    if not rel or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"refusing to download S3 key {key!r}: it does not map to a safe relative path")
    return rel


def _read_marker(directory: Path) -> dict[str, Any] | None:
    try:
        return json.loads((directory / COMPLETE_MARKER).read_text())
    except (OSError, ValueError):
        return None


def _resolve_s3(uri: str, cache_dir: Path) -> Path:
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, prefix = split_s3_uri(uri)
    target = cache_dir / "s3" / bucket / prefix if prefix else cache_dir / "s3" / bucket
    marker = _read_marker(target)
    client = s3_client()
    try:
        objects = _list_objects(client, bucket, prefix)
        single = None
        if not objects and prefix:
            # The URI may name one object rather than a prefix.
            head = client.head_object(Bucket=bucket, Key=prefix)
            objects = {prefix: {"size": int(head["ContentLength"]), "etag": str(head.get("ETag", "")).strip('"')}}
            single = prefix.rsplit("/", 1)[-1]
        if not objects:
            raise FileNotFoundError(f"{uri} holds no objects; check the bucket and prefix.")
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("404", "NoSuchKey", "NotFound"):
            raise FileNotFoundError(f"{uri} holds no objects; check the bucket and prefix.") from exc
        if marker is not None:
            logger.warning("cannot list %s (%s); using the complete cached copy in %s", uri, code, target)
            return _single_or_dir(target, marker)
        raise ValueError(
            f"cannot list {uri} ({code or exc}); check the bucket name, the credentials (AWS_ACCESS_KEY_ID / "
            "AWS_SECRET_ACCESS_KEY or a role) and AWS_ENDPOINT_URL for non-AWS stores."
        ) from exc
    except BotoCoreError as exc:
        if marker is not None:
            logger.warning("cannot reach S3 for %s (%s); using the complete cached copy in %s", uri, exc, target)
            return _single_or_dir(target, marker)
        raise ValueError(
            f"cannot reach S3 for {uri}: {exc}. Check the network, the credentials and AWS_ENDPOINT_URL."
        ) from exc

    listing = {"uri": uri, "objects": objects, "single": single}
    if marker is not None and {k: marker.get(k) for k in listing} == listing:
        logger.info("%s: cached copy in %s is complete (%d objects)", uri, target, len(objects))
        return _single_or_dir(target, marker)

    _clean_stale_tmp(target)
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:12]}")
    tmp.mkdir(parents=True)
    total = sum(o["size"] for o in objects.values())
    logger.info("downloading %s: %d objects, %.1f MiB -> %s", uri, len(objects), total / 2**20, target)
    start = time.monotonic()
    try:
        from boto3.s3.transfer import create_transfer_manager

        with (
            Progress(f"download {uri}", total=total, unit=BYTES) as progress,
            create_transfer_manager(client, _transfer_config()) as manager,
        ):
            futures = []
            for key in sorted(objects):
                rel = single if single is not None else _relative_key(key, prefix)
                dest = tmp / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                futures.append(manager.download(bucket, key, str(dest), subscribers=_byte_progress(progress)))
            for future in futures:
                future.result()
        (tmp / COMPLETE_MARKER).write_text(json.dumps({**listing, "completed_at": time.time()}, indent=1))
        _swap_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("downloaded %s in %.1fs", uri, time.monotonic() - start)
    return _single_or_dir(target, listing)


def _single_or_dir(target: Path, marker: dict[str, Any]) -> Path:
    single = marker.get("single")
    return target / single if single else target


def _clean_stale_tmp(target: Path) -> None:
    """Remove temporary directories that an interrupted earlier download of ``target`` left behind.

    Only those untouched for ``_STALE_TMP_S``: a younger one may belong to a concurrent download into a shared cache.
    """
    if not target.parent.is_dir():
        return
    now = time.time()
    leftovers = [*target.parent.glob(f".{target.name}.tmp-*"), *target.parent.glob(f".{target.name}.old-*")]
    for stale in leftovers:
        try:
            newest = max([stale.stat().st_mtime, *(p.stat().st_mtime for p in stale.rglob("*"))])
        except OSError:  # removed meanwhile by its owner
            continue
        if now - newest > _STALE_TMP_S:
            logger.info("removing the incomplete download %s", stale)
            shutil.rmtree(stale, ignore_errors=True)


def _swap_into_place(new: Path, target: Path) -> None:
    """Rename the complete directory ``new`` to ``target``, replacing an outdated ``target``.

    The old copy is first renamed aside, so at every instant ``target`` is either absent or complete.
    """
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:12]}")
        target.rename(old)
    try:
        new.rename(target)
    except OSError:
        if _read_marker(target) is None:  # a real failure: put the old copy back
            if old is not None and not target.exists():
                old.rename(target)
            raise
        shutil.rmtree(new, ignore_errors=True)  # a concurrent download of the same prefix finished first
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _iter_files(local_dir: Path) -> Iterator[Path]:
    for path in sorted(local_dir.rglob("*")):
        if path.is_file() and path.name != COMPLETE_MARKER:
            yield path


def upload_dir(local_dir: str | os.PathLike[str], s3_uri: str) -> list[str]:
    """Upload every file under ``local_dir`` to ``s3_uri`` (keys ``{prefix}/{relative path}``).

    Args:
        local_dir: the directory to upload (a download's completion marker is skipped).
        s3_uri: ``s3://bucket/prefix``; existing objects with the same keys are overwritten.

    Returns:
        The ``s3://`` URIs written, in sorted order.
    """
    src = Path(local_dir)
    if not src.is_dir():
        raise FileNotFoundError(f"upload_dir: {src} is not a directory; pass the directory to upload.")
    bucket, prefix = split_s3_uri(s3_uri)
    files = list(_iter_files(src))
    keys = [f"{prefix}/{p.relative_to(src).as_posix()}" if prefix else p.relative_to(src).as_posix() for p in files]
    total = sum(p.stat().st_size for p in files)
    logger.info("uploading %d files (%.1f MiB) from %s to s3://%s/%s", len(files), total / 2**20, src, bucket, prefix)
    from boto3.s3.transfer import create_transfer_manager

    with (
        Progress(f"upload to s3://{bucket}/{prefix}", total=total, unit=BYTES) as progress,
        create_transfer_manager(s3_client(), _transfer_config()) as manager,
    ):
        futures = [manager.upload(str(path), bucket, key, subscribers=_byte_progress(progress))
                   for path, key in zip(files, keys, strict=True)]
        for future, key in zip(futures, keys, strict=True):
            try:
                future.result()
            except Exception as exc:  # noqa: BLE001  (botocore's many client, endpoint and transfer errors)
                raise UploadFailed(
                    f"uploading to s3://{bucket}/{key} failed after retries ({_s3_reason(exc)}); the local copy "
                    f"{src} is kept. Check the bucket, the endpoint (AWS_ENDPOINT_URL) and the credentials, then "
                    "run again"
                ) from exc
    return [f"s3://{bucket}/{key}" for key in keys]


class UploadFailed(RunFailed):
    """An upload to S3 failed after retries; the local files are kept."""


def _s3_reason(exc: BaseException) -> str:
    """The short reason of a botocore error (``NoSuchBucket: The specified bucket does not exist``)."""
    error = getattr(exc, "response", {}).get("Error", {}) if hasattr(exc, "response") else {}
    if error:
        return f"{error.get('Code')}: {error.get('Message')}"
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"


def publish_dir(local_dir: str | os.PathLike[str], uri: str) -> str:
    """Copy a directory to ``uri``: :func:`upload_dir` for ``s3://``, else an atomic local copy.

    A local target is written to a temporary sibling and renamed into place, so a reader never sees half of it;
    an existing target is replaced. Returns ``uri``.
    """
    src = Path(local_dir)
    if not src.is_dir():
        raise FileNotFoundError(f"publish_dir: {src} is not a directory; pass the directory to publish.")
    if is_s3_uri(uri):
        upload_dir(src, uri)
        return uri
    target = Path(os.path.expanduser(uri))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        shutil.copytree(src, tmp, ignore=shutil.ignore_patterns(COMPLETE_MARKER))
        _swap_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return uri


def publish_file(path: str | os.PathLike[str], uri: str) -> str:
    """Copy one file to ``uri`` (an ``s3://`` object key or a local path; a local copy is renamed into place)."""
    src = Path(path)
    if not src.is_file():
        raise FileNotFoundError(f"publish_file: {src} is not a file.")
    if is_s3_uri(uri):
        bucket, key = split_s3_uri(uri)
        if not key:
            raise ValueError(f"publish_file: {uri!r} names a bucket, not an object; add the object key.")
        with Progress(f"upload to {uri}", total=src.stat().st_size, unit=BYTES) as progress:
            s3_client().upload_file(str(src), bucket, key, Config=_transfer_config(), Callback=progress.update)
        return uri
    target = Path(os.path.expanduser(uri))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:12]}")
    shutil.copyfile(src, tmp)
    os.replace(tmp, target)
    return uri


def list_prefix(uri: str) -> dict[str, int]:
    """``{relative key: size}`` of every object under the ``s3://`` prefix ``uri`` (``{}`` when there is none)."""
    bucket, prefix = split_s3_uri(uri)
    objects = _list_objects(s3_client(), bucket, prefix)
    return {_relative_key(key, prefix): info["size"] for key, info in objects.items()}


def upload_files(files: Sequence[tuple[str | os.PathLike[str], str]]) -> None:
    """Upload local files to ``s3://`` object URIs, in parallel (multipart for large ones); all done on return.

    Raises:
        UploadFailed: an upload failed after boto3's retries (the message names the object; nothing is rolled back).
    """
    if not files:
        return
    pairs = [(Path(path), split_s3_uri(uri)) for path, uri in files]
    total = sum(path.stat().st_size for path, _ in pairs)
    from boto3.s3.transfer import create_transfer_manager

    with (
        Progress(f"upload {len(pairs)} files to s3://{pairs[0][1][0]}", total=total, unit=BYTES) as progress,
        create_transfer_manager(s3_client(), _transfer_config()) as manager,
    ):
        futures = [manager.upload(str(path), bucket, key, subscribers=_byte_progress(progress))
                   for path, (bucket, key) in pairs]
        for future, (_, (bucket, key)) in zip(futures, pairs, strict=True):
            try:
                future.result()
            except Exception as exc:  # noqa: BLE001  (botocore's many client, endpoint and transfer errors)
                raise UploadFailed(
                    f"uploading to s3://{bucket}/{key} failed after retries ({_s3_reason(exc)}). Check the bucket, "
                    "the endpoint (AWS_ENDPOINT_URL) and the credentials, then run again"
                ) from exc


def download_prefix(uri: str, dest: str | os.PathLike[str], exclude: Sequence[str] = ()) -> list[Path]:
    """Download every object under the ``s3://`` prefix ``uri`` into ``dest`` (keys relative to the prefix), except
    the relative keys in ``exclude``; returns the files written. Unlike :func:`resolve` there is no cache and no
    marker: the caller decides when the copy counts as complete."""
    bucket, prefix = split_s3_uri(uri)
    client = s3_client()
    objects = {_relative_key(key, prefix): info for key, info in _list_objects(client, bucket, prefix).items()}
    wanted = {rel: info for rel, info in objects.items() if rel not in exclude}
    out = Path(dest)
    written = []
    from boto3.s3.transfer import create_transfer_manager

    with (
        Progress(f"download {uri}", total=sum(i["size"] for i in wanted.values()), unit=BYTES) as progress,
        create_transfer_manager(client, _transfer_config()) as manager,
    ):
        futures = []
        for rel in sorted(wanted):
            target = out / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            key = f"{prefix}/{rel}" if prefix else rel
            futures.append(manager.download(bucket, key, str(target), subscribers=_byte_progress(progress)))
            written.append(target)
        for future in futures:
            future.result()
    return written


def delete_objects(uri: str, relative_keys: Sequence[str]) -> None:
    """Delete the objects ``{uri}/{key}`` (an ``s3://`` prefix and keys relative to it), in the order given, 1000
    per request (S3's limit); missing objects are no error."""
    bucket, prefix = split_s3_uri(uri)
    keys = [f"{prefix}/{rel}" if prefix else rel for rel in relative_keys]
    client = s3_client()
    for start in range(0, len(keys), 1000):
        batch = keys[start : start + 1000]
        response = client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in batch],
                                                                "Quiet": True})
        if response.get("Errors"):
            error = response["Errors"][0]
            raise ValueError(f"deleting s3://{bucket}/{error.get('Key')} failed: {error.get('Code')}: "
                             f"{error.get('Message')}; check that the credentials may delete under {uri}.")


def delete_uri(uri: str) -> int:
    """Delete everything under ``uri`` (an ``s3://`` prefix, or a local directory or file); returns how many
    objects or files were removed (0 when there was nothing)."""
    if is_s3_uri(uri):
        keys = sorted(list_prefix(uri))
        delete_objects(uri, keys)
        return len(keys)
    path = Path(os.path.expanduser(uri))
    if path.is_dir():
        count = sum(1 for p in path.rglob("*") if p.is_file())
        shutil.rmtree(path)
        return count
    if path.exists():
        path.unlink()
        return 1
    return 0


def join_uri(base: str, *parts: str) -> str:
    """``base`` with ``parts`` appended by ``/`` (an ``s3://`` URI or a local path; no doubled slashes)."""
    out = base.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


# ----------------------------------------------------------------------------------------------------------- hub


def _resolve_hub(repo_id: str, cache_dir: Path) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, cache_dir=str(cache_dir / "hf")))
    except Exception as exc:  # huggingface_hub raises many types (network, auth, offline, not found)
        raise ValueError(
            f"could not fetch hub repository {repo_id!r} into {cache_dir / 'hf'}: {type(exc).__name__}: {exc}. "
            "Without network access set HF_HUB_OFFLINE=1 to use an earlier download, or point the setting at a "
            "local directory (or an s3:// URI) holding the files."
        ) from exc

