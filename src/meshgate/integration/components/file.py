"""``file``: a folder polled for files (the ``from``) and written to (the ``to``), as Camel's.

``from: file:inbox`` polls the folder every ``delay`` and makes one exchange per file.
Delivery is at least once: a file is moved (to ``move``, default ``.done``) or deleted
only after its route completed or its dead letter channel took it; a failed file goes to
``move_failed`` (default ``.error``). While a route runs, ``<name>.meshgate-lock`` beside
the file marks it as taken and is touched every ``lock_timeout / 3``. A runtime killed
mid-route leaves the file and its lock: the lock is taken over at once when it names a
dead process of this host, else once untouched for ``lock_timeout``, and the file is
consumed again. A stale lock is taken over by renaming it aside: of consumers racing for
it, only one wins. With ``idempotent`` (``noop``'s default) a file's name is recorded in
the repository once its route completed or its dead letter channel took it, not before:
a runtime killed mid-route leaves it unrecorded, to be taken again. Hidden files and
folders (``.done``, ``.error``, temporary files) and symbolic links are never taken.

``to: file:outbox`` writes the body to a temporary file then renames it into place, so a
reader never sees half a file. All file I/O runs in worker threads, off the event loop.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import errno
import fnmatch
import json
import logging
import os
import shutil
import socket
import stat
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from meshgate.integration._component import Component, Consumer, Endpoint, Processor, Producer
from meshgate.integration._errors import EndpointError, ExpressionError, IntegrationError
from meshgate.integration._expressions import Template
from meshgate.integration._message import Exchange, ExchangePattern, Message
from meshgate.integration._state import IdempotentRepository
from meshgate.integration._uri import EndpointUri, Options
from meshgate.integration.components.core import PollingConsumer

if TYPE_CHECKING:
    from meshgate.integration._context import IntegrationContext

__all__ = ["FileComponent", "FileEndpoint"]

log = logging.getLogger("meshgate.integration.file")

LOCK_SUFFIX = ".meshgate-lock"
TEMP_SUFFIX = ".meshgate-tmp"
DEFAULT_MAX_SIZE = 64 * 1024 * 1024
_HOST = socket.gethostname()
#: The lock owner tokens of the consumers running in this process.
_LIVE_TOKENS: set[str] = set()


class FileComponent(Component):
    def create_endpoint(self, uri: EndpointUri, context: IntegrationContext) -> Endpoint:
        return FileEndpoint(uri, context)


def _folder(uri: EndpointUri) -> Path:
    path = uri.path
    if path.startswith("//"):
        path = path[2:] or "/"  # file://inbox and file:///data/inbox, as Camel reads them
    if not path:
        raise EndpointError(f"{uri.text}: give a folder, e.g. file:inbox or file:/data/inbox")
    if "\x00" in path:
        raise EndpointError(f"{uri.text}: the folder contains a NUL character")
    return Path(os.path.abspath(path))


def _patterns(options: Options, name: str) -> tuple[str, ...]:
    value = options.text(name)
    if value is None:
        return ()
    patterns = tuple(p.strip() for p in value.split(","))
    if not all(patterns):
        raise EndpointError(
            f"{options.uri.text}: option {name!r} must be glob patterns separated by commas,"
            " e.g. *.csv,*.txt"
        )
    return patterns


def _template(uri: EndpointUri, name: str, value: str | None) -> Template | None:
    if value is None or "{{" not in value and "{%" not in value:
        return None
    try:
        return Template(value)
    except ExpressionError as exc:
        raise EndpointError(f"{uri.text}: option {name!r}: {exc}") from None


def safe_relative(name: str) -> PurePosixPath:
    """A relative path that stays inside its folder; ``ValueError`` says why not."""
    if not name or not name.strip():
        raise ValueError("the file name is empty")
    if "\x00" in name:
        raise ValueError("the file name contains a NUL character")
    if name.startswith("/"):
        raise ValueError(f"the file name {name!r} is absolute")
    relative = PurePosixPath(name)
    if any(part == ".." for part in relative.parts):
        raise ValueError(f"the file name {name!r} leaves the folder ('..')")
    if name.endswith("/") or not relative.parts or relative.name in ("", "."):
        raise ValueError(f"the file name {name!r} names a folder")
    if relative.name.endswith((LOCK_SUFFIX, TEMP_SUFFIX)):
        raise ValueError(f"the file name {name!r} ends with a name meshgate reserves")
    return relative


class FileEndpoint(Endpoint):
    """A folder: ``file:PATH`` is relative to the working directory, ``file:/PATH`` absolute."""

    def __init__(self, uri: EndpointUri, context: IntegrationContext) -> None:
        super().__init__(uri, context)
        self.folder = _folder(uri)
        options = Options(uri)
        self.charset = options.text("charset")
        self.auto_create = options.boolean("auto_create", True)
        # consumer
        self.delay = options.duration("delay", 0.5)
        self.initial_delay = options.duration("initial_delay", 1.0)
        self.include = _patterns(options, "include")
        self.exclude = _patterns(options, "exclude")
        self.recursive = options.boolean("recursive", False)
        self.max_per_poll = options.integer("max_per_poll", 0)
        self.sort_by = options.choice("sort_by", ("name", "modified"), "name")
        self.read_lock = options.choice("read_lock", ("changed", "none"), "changed")
        self.read_lock_check_interval = options.duration("read_lock_check_interval", 1.0)
        self.lock_timeout = options.duration("lock_timeout", 30.0)
        self.noop = options.boolean("noop", False)
        self.delete = options.boolean("delete", False)
        self.move = options.text("move", ".done") or ""
        self.move_failed = options.text("move_failed", ".error") or ""
        self.idempotent = options.boolean("idempotent", self.noop)
        self.idempotent_repository = options.text("idempotent_repository", "memory") or "memory"
        self.max_size = options.integer("max_size", DEFAULT_MAX_SIZE, minimum=1, maximum=2**40)
        self.concurrent_consumers = options.integer("concurrent_consumers", 1, 1, 100)
        # producer
        file_name = options.text("file_name")
        self.file_exist = options.choice(
            "file_exist", ("override", "append", "fail", "ignore"), "override"
        )
        self.mkdirs = options.boolean("mkdirs", True)
        options.finish()
        if self.charset is not None:
            try:
                codecs.lookup(self.charset)
            except LookupError:
                raise EndpointError(
                    f"{uri.text}: option 'charset' names no known encoding: {self.charset!r}"
                ) from None
        if self.noop and self.delete:
            raise EndpointError(f"{uri.text}: options 'noop' and 'delete' exclude each other")
        if self.delay < 0.001:
            raise EndpointError(f"{uri.text}: option 'delay' must be at least 1ms")
        if self.lock_timeout < 1.0:
            raise EndpointError(f"{uri.text}: option 'lock_timeout' must be at least 1s")
        self.move_template = _template(uri, "move", self.move)
        self.move_failed_template = _template(uri, "move_failed", self.move_failed)
        self.file_name_template = _template(uri, "file_name", file_name)
        self.file_name = file_name
        if file_name is not None and self.file_name_template is None:
            try:
                safe_relative(file_name)
            except ValueError as exc:
                raise EndpointError(f"{uri.text}: option 'file_name': {exc}") from None

    def create_consumer(self, processor: Processor) -> Consumer:
        return _FileConsumer(self, processor)

    def create_producer(self) -> Producer:
        return _FileProducer(self)


@dataclass(frozen=True, slots=True)
class _Candidate:
    relative: str  # posix, relative to the folder
    path: str
    size: int
    mtime_ns: int


class _Refused(Exception):
    """A file that goes to the failed folder without a route: too large, unreadable."""


class _FileConsumer(PollingConsumer):
    endpoint: FileEndpoint

    def __init__(self, endpoint: Endpoint, processor: Processor) -> None:
        super().__init__(endpoint, processor)
        self._root = ""
        self._skip_folders: set[str] = set()
        self._stable: dict[str, tuple[int, int, float]] = {}
        self._in_flight: set[str] = set()
        self._given_up: set[tuple[str, int, int]] = set()
        self._repository: IdempotentRepository | None = None
        self._token = uuid.uuid4().hex

    async def start(self) -> None:
        endpoint = self.endpoint
        self._root = await asyncio.to_thread(self._prepare)
        if endpoint.idempotent:
            prefix = f"file:{self._root}"
            self._repository = endpoint.context.idempotent_repository(
                endpoint.idempotent_repository, prefix
            )
        self._stopping = False
        _LIVE_TOKENS.add(self._token)
        self._task = asyncio.create_task(self._poll(), name=f"file consumer {endpoint.uri.text}")

    def _prepare(self) -> str:
        endpoint = self.endpoint
        folder = endpoint.folder
        if not folder.exists() and endpoint.auto_create:
            folder.mkdir(parents=True, exist_ok=True)
        if not folder.is_dir():
            raise IntegrationError(
                f"{endpoint.uri.text}: the folder {folder} does not exist"
                " (auto_create=false) or is not a folder"
            )
        root = os.path.realpath(folder)
        for target in (endpoint.move, endpoint.move_failed):
            if target and endpoint.move_template is None:
                self._skip_folders.add(os.path.realpath(os.path.join(root, target)))
        return root

    async def _poll(self) -> None:
        endpoint = self.endpoint
        await asyncio.sleep(endpoint.initial_delay)
        problem = ""
        while not self._stopping:
            self._idle = True
            try:
                candidates = self._ready(await asyncio.to_thread(self._scan))
                problem = ""
            except OSError as exc:
                if str(exc) != problem:  # once, not at every poll
                    log.warning("%s: cannot list the folder (%s)", endpoint.uri.text, exc)
                problem, candidates = str(exc), []
            self._idle = False
            if candidates:
                try:
                    await self._process_all(candidates)
                except Exception:
                    log.exception("%s: polling failed", endpoint.uri.text)
            self._idle = True
            if not self._stopping:
                await asyncio.sleep(endpoint.delay)

    def _scan(self) -> dict[str, _Candidate]:
        """The files of the folder (in a worker thread); removes orphan locks of files gone."""
        found: dict[str, _Candidate] = {}
        locks: list[str] = []
        self._walk(found, locks)
        paths = {candidate.path for candidate in found.values()}
        for lock in locks:
            if lock[: -len(LOCK_SUFFIX)] not in paths:
                seen = self._orphan(lock)
                if seen is not None:
                    self._take_over(lock, seen)
        return found

    def _ready(self, found: dict[str, _Candidate]) -> list[_Candidate]:
        """The files to take now, in order; forgets what it knew of files gone."""
        endpoint = self.endpoint
        now = time.monotonic()
        ready: list[_Candidate] = []
        for relative, candidate in found.items():
            if relative in self._in_flight:
                continue
            if (relative, candidate.size, candidate.mtime_ns) in self._given_up:
                continue
            if endpoint.read_lock == "changed":
                seen = self._stable.get(relative)
                if seen is None or seen[:2] != (candidate.size, candidate.mtime_ns):
                    self._stable[relative] = (candidate.size, candidate.mtime_ns, now)
                    continue
                if now - seen[2] < endpoint.read_lock_check_interval:
                    continue
            ready.append(candidate)
        for relative in [r for r in self._stable if r not in found]:
            del self._stable[relative]
        self._given_up = {g for g in self._given_up if g[0] in found}
        if endpoint.sort_by == "modified":
            ready.sort(key=lambda c: (c.mtime_ns, c.relative))
        else:
            ready.sort(key=lambda c: c.relative)
        if endpoint.max_per_poll:
            ready = ready[: endpoint.max_per_poll]
        return ready

    def _walk(self, found: dict[str, _Candidate], locks: list[str]) -> None:
        endpoint = self.endpoint
        folders = [(self._root, "")]
        while folders:
            folder, prefix = folders.pop()
            try:
                entries = list(os.scandir(folder))
            except OSError:
                if folder == self._root:
                    raise
                continue  # a subfolder removed or unreadable meanwhile
            for entry in entries:
                name = entry.name
                if name.startswith("."):
                    continue
                if name.endswith(LOCK_SUFFIX):
                    locks.append(entry.path)
                    continue
                if entry.is_symlink():
                    continue  # never followed: a link may lead out of the folder
                if entry.is_dir(follow_symlinks=False):
                    if endpoint.recursive and entry.path not in self._skip_folders:
                        folders.append((entry.path, f"{prefix}{name}/"))
                    continue
                if not entry.is_file(follow_symlinks=False) or name.endswith(TEMP_SUFFIX):
                    continue
                if endpoint.include and not any(
                    fnmatch.fnmatchcase(name, p) for p in endpoint.include
                ):
                    continue
                if any(fnmatch.fnmatchcase(name, p) for p in endpoint.exclude):
                    continue
                try:
                    info = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                relative = prefix + name
                found[relative] = _Candidate(relative, entry.path, info.st_size, info.st_mtime_ns)

    def _orphan(self, lock: str) -> os.stat_result | None:
        """The status of a lock whose process died (on this host) or that nobody touched
        for a while; None for a live lock."""
        try:
            info = os.stat(lock, follow_symlinks=False)
        except OSError:
            return None  # released meanwhile
        try:
            with open(lock, "rb") as handle:
                owner = json.loads(handle.read(4096) or b"{}")
        except (OSError, ValueError):
            owner = {}  # being written, or not ours: only its age tells
        if not isinstance(owner, dict):
            owner = {}
        return info if self._dead(owner, info) else None

    def _dead(self, owner: dict[str, Any], info: os.stat_result) -> bool:
        if owner.get("token") in _LIVE_TOKENS:
            return False
        if time.time() - info.st_mtime > self.endpoint.lock_timeout:
            return True
        pid = owner.get("pid")
        if owner.get("host") != _HOST or not isinstance(pid, int):
            return False
        if pid == os.getpid():
            return True  # a consumer of this process that stopped without releasing it
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    @staticmethod
    def _take_over(lock: str, seen: os.stat_result) -> bool:
        """Removes the stale lock ``seen``, atomically: it is renamed aside first, and of
        consumers racing for it only one renames that very lock. One that renamed another
        (the winner's fresh lock, or one touched meanwhile) puts it back and backs off."""
        folder, name = os.path.split(lock)
        aside = os.path.join(folder, f".{name}.{uuid.uuid4().hex[:12]}{TEMP_SUFFIX}")
        try:
            os.rename(lock, aside)
        except OSError:
            return False  # taken over (or released) by another consumer first
        try:
            info = os.stat(aside, follow_symlinks=False)
            same = (info.st_dev, info.st_ino, info.st_mtime_ns)
            if same == (seen.st_dev, seen.st_ino, seen.st_mtime_ns):
                return True
            with contextlib.suppress(OSError):
                os.link(aside, lock)  # never replaces a lock created meanwhile
            return False
        except OSError:
            return False
        finally:
            with contextlib.suppress(OSError):
                os.unlink(aside)

    async def _process_all(self, candidates: list[_Candidate]) -> None:
        limit = asyncio.Semaphore(self.endpoint.concurrent_consumers)

        async def one(candidate: _Candidate) -> None:
            async with limit:
                if self._stopping:
                    return
                try:
                    await self._process(candidate)
                except Exception:
                    log.exception("%s: %s failed", self.endpoint.uri.text, candidate.relative)

        await asyncio.gather(*(one(candidate) for candidate in candidates))

    async def _process(self, candidate: _Candidate) -> None:
        relative = candidate.relative
        repository = self._repository
        if repository is not None and await repository.contains(relative):
            return
        self._in_flight.add(relative)
        lock = candidate.path + LOCK_SUFFIX
        try:
            taken = await asyncio.to_thread(self._lock, lock)
            if taken is None:
                return
            try:
                # The lock keeps other consumers off while the route runs; the name is
                # recorded only once the route completed, so that a runtime killed
                # mid-route leaves the file to be taken again. Checked again under the
                # lock: another consumer may have completed it since the scan.
                if repository is not None and await repository.contains(relative):
                    return
                if await self._take(candidate, redelivered=taken) and repository is not None:
                    await repository.add(relative)
            finally:
                await asyncio.to_thread(_unlink_quietly, lock)
        finally:
            self._in_flight.discard(relative)

    def _lock(self, lock: str) -> bool | None:
        """Creates the lock; ``None`` when another consumer holds it, else whether a dead
        consumer's lock was taken over (the file is then redelivered)."""
        owner = json.dumps({"host": _HOST, "pid": os.getpid(), "token": self._token}).encode()
        for attempt in (False, True):
            try:
                descriptor = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW)
            except FileExistsError:
                seen = None if attempt else self._orphan(lock)
                if seen is None or not self._take_over(lock, seen):
                    return None
                log.warning(
                    "%s: taking over %s, left by a consumer that stopped mid-route",
                    self.endpoint.uri.text,
                    lock,
                )
                continue
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(owner)
            return attempt
        return None

    async def _take(self, candidate: _Candidate, redelivered: bool) -> bool:
        """Runs the route on the file, then moves it; whether the route completed."""
        endpoint = self.endpoint
        try:
            message = await asyncio.to_thread(self._read, candidate)
        except FileNotFoundError:
            return False  # taken by another consumer between the scan and the lock
        except _Refused as refused:
            log.error("%s: %s", endpoint.uri.text, refused)
            await self._fail(candidate, None, str(refused))
            return False
        exchange = Exchange(message, ExchangePattern.IN_ONLY)
        exchange.properties["redelivered"] = redelivered
        keeper = asyncio.create_task(self._keep_locked(candidate.path + LOCK_SUFFIX))
        try:
            try:
                await self.processor(exchange)
            except Exception as exc:
                exchange.exception = exc
        finally:
            keeper.cancel()
        if exchange.exception is None:
            await self._done(candidate, exchange)
            return True
        await self._fail(candidate, exchange, f"{exchange.exception}")
        return False

    def _read(self, candidate: _Candidate) -> Message:
        endpoint = self.endpoint
        if candidate.size > endpoint.max_size:
            raise _Refused(
                f"{candidate.relative} has {candidate.size} bytes, more than max_size"
                f" ({endpoint.max_size}): moved to the failed folder, not consumed"
            )
        try:
            descriptor = os.open(candidate.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise _Refused(f"cannot read {candidate.relative}: {exc.strerror}") from None
        with os.fdopen(descriptor, "rb") as handle:
            info = os.fstat(handle.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise _Refused(f"{candidate.relative} is no longer a regular file")
            try:
                data = handle.read(endpoint.max_size + 1)
            except OSError as exc:
                raise _Refused(f"cannot read {candidate.relative}: {exc.strerror}") from None
        if len(data) > endpoint.max_size:
            raise _Refused(
                f"{candidate.relative} grew past max_size ({endpoint.max_size} bytes):"
                " moved to the failed folder, not consumed"
            )
        body: bytes | str = data
        if endpoint.charset is not None:
            try:
                body = data.decode(endpoint.charset)
            except UnicodeDecodeError as exc:
                raise _Refused(
                    f"{candidate.relative} is not {endpoint.charset} text ({exc.reason}"
                    f" at byte {exc.start})"
                ) from None
        headers = _headers(candidate)
        headers["file_size"] = len(data)
        headers["file_modified"] = datetime.fromtimestamp(info.st_mtime, UTC).isoformat()
        return Message(body, headers)

    async def _keep_locked(self, lock: str) -> None:
        """Touches the lock so that no consumer takes a slow route's file for abandoned."""
        while True:
            await asyncio.sleep(self.endpoint.lock_timeout / 3)
            with contextlib.suppress(OSError):
                await asyncio.to_thread(os.utime, lock)

    async def _done(self, candidate: _Candidate, exchange: Exchange) -> None:
        endpoint = self.endpoint
        try:
            if endpoint.noop:
                return
            if endpoint.delete:
                await asyncio.to_thread(os.unlink, candidate.path)
            elif endpoint.move:
                target = self._target(candidate, exchange, endpoint.move, endpoint.move_template)
                await asyncio.to_thread(_move, candidate.path, target)
            elif self._repository is None:
                # move= (empty) without idempotent: nothing would keep it from coming back.
                self._given_up.add((candidate.relative, candidate.size, candidate.mtime_ns))
        except (OSError, ValueError, ExpressionError) as exc:
            self._given_up.add((candidate.relative, candidate.size, candidate.mtime_ns))
            log.error(
                "%s: %s was processed but could not be moved or deleted (%s);"
                " left in place, taken again only once it changes",
                endpoint.uri.text,
                candidate.relative,
                exc,
            )

    async def _fail(self, candidate: _Candidate, exchange: Exchange | None, cause: str) -> None:
        endpoint = self.endpoint
        if not endpoint.move_failed:
            log.warning(
                "%s: %s failed (%s); taken again at the next poll",
                endpoint.uri.text,
                candidate.relative,
                cause,
            )
            if exchange is None:
                self._given_up.add((candidate.relative, candidate.size, candidate.mtime_ns))
            return
        if exchange is None:
            exchange = Exchange(Message(None, _headers(candidate)))
        try:
            target = self._target(
                candidate, exchange, endpoint.move_failed, endpoint.move_failed_template
            )
            await asyncio.to_thread(_move, candidate.path, target)
        except (OSError, ValueError, ExpressionError) as exc:
            self._given_up.add((candidate.relative, candidate.size, candidate.mtime_ns))
            log.error(
                "%s: %s failed (%s) and could not be moved to the failed folder (%s);"
                " left in place until it changes",
                endpoint.uri.text,
                candidate.relative,
                cause,
                exc,
            )
            return
        log.warning(
            "%s: %s failed (%s); moved to %s", endpoint.uri.text, candidate.relative, cause, target
        )

    def _target(
        self, candidate: _Candidate, exchange: Exchange, folder: str, template: Template | None
    ) -> str:
        if template is None:
            return os.path.join(self._root, folder, candidate.relative)
        relative = safe_relative(template.render(exchange))
        return os.path.join(self._root, *relative.parts)

    async def release(self) -> None:
        _LIVE_TOKENS.discard(self._token)
        repository, self._repository = self._repository, None
        if repository is not None:
            try:
                await repository.close()
            except Exception:
                log.warning("%s: closing the repository failed", self.endpoint.uri.text)


def _headers(candidate: _Candidate) -> dict[str, Any]:
    modified = datetime.fromtimestamp(candidate.mtime_ns / 1e9, UTC)
    return {
        "file_name": candidate.relative,
        "file_path": candidate.path,
        "file_size": candidate.size,
        "file_modified": modified.isoformat(),
    }


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _move(source: str, target: str) -> None:
    """Renames ``source`` over ``target`` (replacing it), across file systems if need be."""
    os.makedirs(os.path.dirname(target), exist_ok=True)
    try:
        os.replace(source, target)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        temporary = _temporary(target)
        try:
            shutil.copy2(source, temporary, follow_symlinks=False)
            os.replace(temporary, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
        os.unlink(source)


def _temporary(target: str) -> str:
    folder, name = os.path.split(target)
    return os.path.join(folder, f".{name}.{uuid.uuid4().hex[:12]}{TEMP_SUFFIX}")


class _FileProducer(Producer):
    endpoint: FileEndpoint

    async def process(self, exchange: Exchange) -> None:
        endpoint = self.endpoint
        if endpoint.file_name_template is not None:
            name = endpoint.file_name_template.render(exchange)
        elif endpoint.file_name is not None:
            name = endpoint.file_name
        else:
            header = exchange.headers.get("file_name")
            name = str(header) if header is not None else exchange.id
        try:
            relative = safe_relative(name)
        except ValueError as exc:
            raise IntegrationError(f"{endpoint.uri.text}: {exc}") from None
        body = exchange.message.body
        if isinstance(body, str) and endpoint.charset is not None:
            data = body.encode(endpoint.charset)
        else:
            data = exchange.message.body_bytes()
        path = await asyncio.to_thread(self._write, relative, data)
        exchange.message.headers["file_path"] = path

    def _write(self, relative: PurePosixPath, data: bytes) -> str:
        endpoint = self.endpoint
        folder = endpoint.folder
        target = folder.joinpath(*relative.parts)
        # A symbolic link among the folders must not lead the write out of the folder;
        # checked before any folder is created.
        root = os.path.realpath(folder)
        parent = os.path.realpath(target.parent)
        if parent != root and not parent.startswith(root + os.sep):
            raise IntegrationError(f"{endpoint.uri.text}: {relative} leads out of the folder")
        if endpoint.mkdirs:
            os.makedirs(parent, exist_ok=True)
        elif not os.path.isdir(parent):
            raise IntegrationError(
                f"{endpoint.uri.text}: the folder {target.parent} does not exist (mkdirs=false)"
            )
        path = os.path.join(parent, target.name)
        if os.path.islink(path) or os.path.isdir(path):
            raise IntegrationError(f"{endpoint.uri.text}: {relative} is a link or a folder")
        if endpoint.file_exist == "append":
            descriptor = os.open(
                path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o644
            )
            with os.fdopen(descriptor, "ab") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            return path
        temporary = _temporary(path)
        try:
            with open(temporary, "xb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            if endpoint.file_exist == "override":
                os.replace(temporary, path)
                return path
            try:
                os.link(temporary, path)  # atomic, and never replaces an existing file
            except FileExistsError:
                if endpoint.file_exist == "fail":
                    raise IntegrationError(
                        f"{endpoint.uri.text}: {relative} exists already (file_exist=fail)"
                    ) from None
            return path
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
