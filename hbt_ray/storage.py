"""Where the bytes that cross nodes live: one storage location, a URI or a path every node sees.

A *location* is a string: a URI (``s3://bucket/prefix``, ``gs://…``, any filesystem pyarrow resolves
from a URI) or a local path. On one machine a local path works as it always has. On a cluster the
driver, the training workers, the evaluation actors and the Tune trials run on different machines,
so whatever one of them writes and another reads (pair shards, checkpoints, rank 0's run files, the
exported model, sweep results) must live at a URI, or under a mount the cluster declares shared: an
NFS/EFS mount listed in ``HBT_SHARED_STORAGE`` (``os.pathsep``-separated), set on every node.

S3-compatible stores other than AWS (MinIO, moto, Ceph): set ``AWS_ENDPOINT_URL`` (pyarrow, boto3 and
the AWS CLI all read it); the drivers pass it on to Ray's workers (:func:`worker_env`).

Models and shard files are read where they are: pyarrow streams Parquet from the URI, and a model
directory is downloaded once into a node-local cache keyed by its location and content
(:func:`local_copy`)::

    >>> import tempfile
    >>> root = tempfile.mkdtemp()
    >>> run = join(root, "runs", "demo")
    >>> write_text(join(run, "mix.json"), "{}")
    >>> exists(join(run, "mix.json")), read_text(join(run, "mix.json")), listdir(run)
    (True, '{}', ['mix.json'])
    >>> is_uri("s3://bucket/runs"), is_uri(root), join("s3://bucket/runs/", "demo", "model")
    (True, False, 's3://bucket/runs/demo/model')
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from hbt_ray.config import ConfigError

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
#: Written last into a directory uploaded by :func:`publish_dir`: what files it holds (sha256 each), so
#: a reader knows the directory is complete and a cache can be keyed by its content.
CONTENT_FILE = ".hbt_content.json"
#: The environment variable that declares local paths shared by every node (NFS/EFS mounts).
SHARED_ENV = "HBT_SHARED_STORAGE"
#: Environment variables a Ray worker needs to reach the same storage as the driver (no secrets: nodes
#: get credentials from their own instance role or environment).
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", SHARED_ENV)


class StorageError(OSError):
    """A storage location that cannot be read or written; the message names it."""


def is_uri(location: str | os.PathLike) -> bool:
    """A URI with a scheme other than ``file``: the bytes are on a remote filesystem."""
    match = _SCHEME.match(str(location))
    return bool(match) and match.group(1).lower() != "file"


def resolve(location: str | os.PathLike) -> str:
    """A URI as given (no trailing slash); a local path (or ``file://`` URI) made absolute against this
    process's working directory — so it means the same thing once handed to another process."""
    text = str(location)
    if is_uri(text):
        return text.rstrip("/")
    if text.lower().startswith("file://"):
        text = text[len("file://") :]
    return str(Path(text).expanduser().resolve())


def join(location: str | os.PathLike, *parts: str) -> str:
    """``location/part/…`` for a URI or a path."""
    text = str(location)
    if is_uri(text):
        return "/".join([text.rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(text, *parts))


def filesystem(location: str | os.PathLike) -> tuple[Any, str]:
    """``(pyarrow filesystem, path on it)`` for a location."""
    import pyarrow.fs as pafs

    if is_uri(location):
        try:
            return pafs.FileSystem.from_uri(str(location))
        except (OSError, ValueError, TypeError) as err:  # unknown scheme, bad bucket name, no S3 support
            raise StorageError(f"{location}: {_short(err)}") from None
    return pafs.LocalFileSystem(), resolve(location)


def _short(err: BaseException) -> str:
    return " ".join(str(err).split())[:300]


def _info(location: str | os.PathLike) -> Any:
    fs, path = filesystem(location)
    try:
        return fs.get_file_info(path)
    except OSError as err:
        raise StorageError(f"{location}: {_short(err)}") from None


def exists(location: str | os.PathLike) -> bool:
    import pyarrow.fs as pafs

    return _info(location).type != pafs.FileType.NotFound


def is_dir(location: str | os.PathLike) -> bool:
    import pyarrow.fs as pafs

    return _info(location).type == pafs.FileType.Directory


def read_bytes(location: str | os.PathLike) -> bytes:
    if not is_uri(location):
        return Path(resolve(location)).read_bytes()
    fs, path = filesystem(location)
    try:
        with fs.open_input_stream(path) as fh:
            return fh.read()
    except FileNotFoundError:
        raise
    except OSError as err:
        if "not found" in str(err).lower() or "does not exist" in str(err).lower():
            raise FileNotFoundError(str(location)) from None
        raise StorageError(f"{location}: {_short(err)}") from None


def read_text(location: str | os.PathLike) -> str:
    return read_bytes(location).decode("utf-8")


def write_bytes(location: str | os.PathLike, data: bytes) -> None:
    """Write a whole file: atomically on a local disk (temp file + rename), one PUT on object stores."""
    if not is_uri(location):
        path = Path(resolve(location))
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return
    fs, path = filesystem(location)
    try:
        with fs.open_output_stream(path) as fh:
            fh.write(data)
    except OSError as err:
        raise StorageError(f"{location}: {_short(err)}") from None


def write_text(location: str | os.PathLike, text: str) -> None:
    write_bytes(location, text.encode("utf-8"))


def listdir(location: str | os.PathLike) -> list[str]:
    """The names directly under a directory (sorted); [] when it does not exist."""
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except OSError as err:
        raise StorageError(f"{location}: {_short(err)}") from None
    return sorted(info.base_name for info in infos)


def remove(location: str | os.PathLike) -> None:
    """Delete a file or a directory tree; nothing if it is not there."""
    import pyarrow.fs as pafs

    if not is_uri(location):
        path = Path(resolve(location))
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        return
    fs, path = filesystem(location)
    info = fs.get_file_info(path)
    try:
        if info.type == pafs.FileType.Directory:
            fs.delete_dir(path)
        elif info.type == pafs.FileType.File:
            fs.delete_file(path)
    except OSError as err:
        raise StorageError(f"{location}: {_short(err)}") from None


def content_manifest(directory: Path) -> dict[str, Any]:
    """``{"files": {relative path: [size, sha256]}}`` of a local directory (without CONTENT_FILE)."""
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != CONTENT_FILE):
        h = hashlib.sha256()
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        files[path.relative_to(directory).as_posix()] = [path.stat().st_size, h.hexdigest()]
    return {"files": files}


def publish_dir(local_dir: str | os.PathLike, location: str | os.PathLike) -> str:
    """Put a complete local directory at ``location``, replacing what was there; → the location.

    Local target: moved into place (same disk) or copied, then renamed, so a reader never sees half
    of it. URI: the old one deleted, every file uploaded, :data:`CONTENT_FILE` last — a directory
    without it is incomplete and :func:`local_copy` refuses it."""
    import pyarrow.fs as pafs

    src = Path(local_dir)
    (src / CONTENT_FILE).write_text(json.dumps(content_manifest(src), sort_keys=True))
    if not is_uri(location):
        dest = Path(resolve(location))
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = dest.parent / f".{dest.name}.staging-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            os.replace(src, staging)
        except OSError:  # another disk
            shutil.copytree(src, staging)
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(staging, dest)
        return str(dest)
    remove(location)
    fs, path = filesystem(location)
    content = src / CONTENT_FILE
    tmp = Path(tempfile.mkdtemp(prefix="hbt_publish_"))
    try:
        os.replace(content, tmp / CONTENT_FILE)  # uploaded last
        pafs.copy_files(str(src), path, destination_filesystem=fs, use_threads=True)
        pafs.copy_files(str(tmp / CONTENT_FILE), f"{path}/{CONTENT_FILE}", destination_filesystem=fs)
        os.replace(tmp / CONTENT_FILE, content)
    except OSError as err:
        raise StorageError(f"{location}: upload failed: {_short(err)}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return resolve(location)


def copy_dir(src: str | os.PathLike, dest: str | os.PathLike) -> str:
    """Copy a published directory from one location to another (replacing ``dest``); → ``dest``."""
    if not is_uri(src) and not is_uri(dest):
        target = Path(resolve(dest))
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(resolve(src), target)
        return str(target)
    with tempfile.TemporaryDirectory(prefix="hbt_copy_") as tmp:
        local = Path(tmp) / "dir"
        shutil.copytree(local_copy(src), local)
        (local / CONTENT_FILE).unlink(missing_ok=True)
        return publish_dir(local, dest)


def cache_root() -> Path:
    """This node's cache folder: ``$HBT_CACHE_DIR`` or ``~/.cache/hbt_ray`` (never shared)."""
    return Path(os.environ.get("HBT_CACHE_DIR") or Path.home() / ".cache" / "hbt_ray")


def publish_files(local_dir: Path, location: str, names: list[str]) -> None:
    """Files written in ``local_dir`` made available at ``location``: uploaded when it is a URI; nothing
    to do when it is that local folder itself."""
    if is_uri(location):
        for name in names:
            write_bytes(join(location, name), (local_dir / name).read_bytes())


def content_digest(location: str | os.PathLike) -> str:
    """A hash of a published directory's content list (its :data:`CONTENT_FILE`)."""
    try:
        return hashlib.sha256(read_bytes(join(location, CONTENT_FILE))).hexdigest()[:16]
    except FileNotFoundError:
        raise StorageError(f"{location}: no {CONTENT_FILE}: not a complete published directory") from None


def local_copy(location: str | os.PathLike) -> Path:
    """A local directory with the content of ``location``: the path itself when it is local, else a
    copy in this node's cache keyed by the location and its content (downloaded once, checked against
    the content list, then reused by every process of the node)."""
    if not is_uri(location):
        return Path(resolve(location))
    import pyarrow.fs as pafs

    digest = content_digest(location)
    key = hashlib.sha256(resolve(location).encode()).hexdigest()[:16]
    target = cache_root() / "storage" / f"{key}-{digest}"
    if (target / CONTENT_FILE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        fs, path = filesystem(location)
        pafs.copy_files(path, str(staging), source_filesystem=fs, use_threads=True)
        want = json.loads((staging / CONTENT_FILE).read_text())["files"]
        got = content_manifest(staging)["files"]
        if got != want:
            raise StorageError(f"{location}: content differs from its {CONTENT_FILE} (changed while read?)")
        try:
            os.replace(staging, target)
        except OSError:  # another process of this node finished first
            if not (target / CONTENT_FILE).is_file():
                raise
    except OSError as err:
        if isinstance(err, StorageError):
            raise
        raise StorageError(f"{location}: download failed: {_short(err)}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


# ------------------------------------------------------------------------------ the cluster's view
def shared_mounts() -> list[Path]:
    """The local folders this cluster declares shared by every node (``$HBT_SHARED_STORAGE``)."""
    raw = os.environ.get(SHARED_ENV, "")
    return [Path(p).expanduser().resolve() for p in raw.split(os.pathsep) if p.strip()]


def cluster_visible(location: str | os.PathLike) -> bool:
    """Whether every node sees ``location``: a URI, or a path under a declared shared mount.

    >>> cluster_visible("s3://bucket/runs"), cluster_visible("/nowhere/runs")
    (True, False)
    """
    if is_uri(location):
        return True
    path = Path(resolve(location))
    return any(path == mount or mount in path.parents for mount in shared_mounts())


def check_reachable(location: str, key: str) -> None:
    """For a URI: write, read back and delete a small probe file under it, so a missing bucket, missing
    credentials or a wrong endpoint fail in one line naming ``key``, before anything trains. A local
    path: that it can be made and written."""
    probe = join(location, f".hbt_probe_{os.getpid()}")
    try:
        write_text(probe, "probe")
        read_text(probe)
        remove(probe)
    except (OSError, StorageError) as err:
        hint = " (credentials, bucket and AWS_ENDPOINT_URL?)" if is_uri(location) else ""
        raise ConfigError(f"{key}: cannot write to {location}{hint}: {_short(err)}") from None


def check_writable(location: str | os.PathLike, key: str) -> None:
    """Whether results can be written to ``location``, checked before any work whose result would be
    lost: a URI as :func:`check_reachable`; a local path by a probe file in the folder itself or, when
    it does not exist yet, in the deepest folder above it that does (folders made there are ours to
    write), so nothing is created here. ConfigError names ``key``."""
    if is_uri(location):
        return check_reachable(str(location), key)
    path = Path(location).expanduser().absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        where = "exists and is not a directory" if existing == path else f"{existing} is a file, not a directory"
        raise ConfigError(f"{key}: cannot write to {location}: {where}")
    probe = existing / f".hbt_probe_{os.getpid()}"
    try:
        probe.write_bytes(b"probe")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"{key}: cannot write to {location}: {err.strerror or err} in {existing}") from None


def cluster_shape() -> tuple[int, bool]:
    """``(alive nodes, whether this driver's node has CPUs for workers)`` of the connected Ray cluster."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    me = ray.get_runtime_context().get_node_id()
    mine = [n for n in nodes if n.get("NodeID") == me]
    has_cpus = bool(mine) and mine[0].get("Resources", {}).get("CPU", 0) > 0
    return len(nodes), has_cpus


def check_cluster_storage(locations: dict[str, str]) -> None:
    """Refuse, in one line naming the key, a location that only this machine sees when the work will
    run on other machines: a Ray cluster of several nodes, or a driver node without CPUs for workers.
    Call it once Ray is connected, before any worker starts."""
    local = {key: loc for key, loc in locations.items() if loc and not cluster_visible(loc)}
    if not local:
        return
    nodes, has_cpus = cluster_shape()
    if nodes <= 1 and has_cpus:
        return
    key, loc = next(iter(local.items()))
    where = f"a {nodes}-node Ray cluster" if nodes > 1 else "a Ray cluster whose driver node has no CPUs"
    raise ConfigError(
        f"{key}: {loc} is a local path on the driver's machine, which the other nodes of {where} cannot "
        f"read: give a URI (s3://bucket/prefix) or a mount every node shares, declared in {SHARED_ENV}"
    )


def worker_env() -> dict[str, str]:
    """The storage settings of this process that Ray workers need to reach the same storage."""
    return {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
