"""Control-plane mode: pull configuration snapshots, apply them, cache them, report status.

The protocol, over HTTP with ``Authorization: Bearer <token>``:

- ``GET {url}/dp/v1/snapshot?env=ENV&wait=30`` with ``If-None-Match`` (the last ETag seen)
  and ``X-Meshgate-Dataplane: <id>``: 200 with a snapshot (a configuration document holding
  ``products`` and ``version``) and its ``ETag``, or 304 when nothing changed within
  ``wait`` seconds (the server holds the request: a long poll).
- ``POST {url}/dp/v1/status``: the version applied, the last refusal, who and where we
  are; after every snapshot applied or refused, and every 10 s as a heartbeat.

A snapshot replaces the products and version of the local settings and is validated as a
file is. One that is refused keeps the last good one serving, and its ETag is remembered
so that it is not fetched again and again. The last good snapshot is cached on disk so that
the gateway starts and serves while the control plane is down.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from meshgate.config import Config, ConfigError, Product, validate_snapshot
from meshgate.config.loader import assemble_snapshot, validate_snapshot_product
from meshgate.gateway._files import write_atomically
from meshgate.gateway._gateway import Gateway
from meshgate.policies import schemas
from meshgate.proxy.client import HttpError, HttpResponse, ResponseTooLarge, request

if TYPE_CHECKING:
    from meshgate.gateway._runner import GatewayProcess

__all__ = [
    "ControlPlaneOptions",
    "ControlPlaneSync",
    "SnapshotRefused",
    "cache_file",
    "default_dataplane_id",
    "merge_snapshot",
    "write_cache",
]

log = logging.getLogger("meshgate.gateway.control_plane")

SNAPSHOT_MAX_BYTES = 256 * 2**20
LONG_POLL_SECONDS = 30
HEARTBEAT_SECONDS = 10.0
# The first fetch gets this long before the gateway starts from its cache (or empty).
START_WAIT_SECONDS = 3.0
BACKOFF_MIN, BACKOFF_MAX = 0.5, 5.0
STATUS_TIMEOUT = 5.0
# A 304 sooner than this means the server did not hold the poll: do not spin.
_MIN_POLL_SECONDS = 1.0
_SNAPSHOT_FIELDS = frozenset({"products", "version"})
_CACHE_FORMAT = 1
_MAX_ERROR = 8000
# The switch interval while a snapshot is decoded (Python's default is 5 ms).
_SWITCH_INTERVAL = 0.001


class SnapshotRefused(Exception):
    """A snapshot this gateway cannot apply; the message says why."""


@dataclass(frozen=True)
class ControlPlaneOptions:
    """Where the snapshots come from and where the last good one is kept."""

    url: str
    token: str
    env: str
    cache_dir: Path
    name: str | None = None
    # With it, the gateway obtains its workload identity (service meshgate-gateway) from the
    # control plane's CA, and follows its trust bundle every ``bundle_interval`` seconds.
    bootstrap_token: str | None = None
    bundle_interval: float = 15.0


def cache_file(cache_dir: Path, env: str) -> Path:
    """The cache file of an environment's last good snapshot."""
    return Path(cache_dir) / f"snapshot-{env}.json"


def merge_snapshot(settings: Config, snapshot: Any, source: str) -> Config:
    """The local settings with the snapshot's products and version, validated as a file is."""
    if not isinstance(snapshot, dict):
        raise SnapshotRefused(f"{source}: a snapshot must be a JSON object")
    extra = sorted(set(snapshot) - _SNAPSHOT_FIELDS)
    if extra:
        raise SnapshotRefused(
            f"{source}: a snapshot holds only products and version, not {', '.join(extra)} "
            "(the other settings are the gateway's own)"
        )
    try:
        validated = validate_snapshot(snapshot, source, policy_schemas=schemas())
    except ConfigError as exc:
        raise SnapshotRefused(str(exc)) from None
    # Both parts are validated; the copy checks nothing again (a snapshot can be 10 MB).
    return settings.model_copy(
        update={"products": validated.products, "version": validated.version}
    )


def decode_snapshot(settings: Config, body: bytes, source: str) -> Config:
    """The snapshot merged with the local settings (run off the loop).

    A control plane writes each product on a line of its own: such a body is parsed and
    validated product by product, handing the GIL over between products (one ``json.loads``
    and one validation of 10 MB would hold it for tens of milliseconds each, stalling the
    requests of the event loop). Any other body, or one with any problem, is decoded as a
    whole: a refusal says what is wrong as it always did, every problem listed."""
    interval = sys.getswitchinterval()
    with collector_paused():
        # The event loop gets the GIL within a millisecond of asking (not the default 5 ms)
        # while this thread works between its short C calls.
        sys.setswitchinterval(min(interval, _SWITCH_INTERVAL))
        try:
            config = _decode_by_product(settings, body, source)
        finally:
            sys.setswitchinterval(interval)
        if config is not None:
            return config
        return merge_snapshot(settings, _parse_body(body, source), source)


_PRODUCTS_OPEN = b'"products":['
_PRODUCTS_CLOSE = b"\n]}"


def _decode_by_product(settings: Config, body: bytes, source: str) -> Config | None:
    """``{...,"products":[`` NL, a product a line ending with a comma but the last, NL ``]}``:
    the same ``Config`` as the whole document; None for any other layout or any problem."""
    head_end = body.find(b"\n")
    stop = len(body) - len(_PRODUCTS_CLOSE)  # the line break before ]}
    if (
        head_end < 0
        or head_end >= stop
        or not body.endswith(_PRODUCTS_CLOSE)
        or not body[:head_end].endswith(_PRODUCTS_OPEN)
    ):
        return None
    top: list[tuple[str, Any]] = []

    def pairs_hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        top[:] = pairs  # the top level is the last object to end
        return dict(pairs)

    try:
        head = json.loads(body[:head_end] + b"]}", object_pairs_hook=pairs_hook)
    except (ValueError, RecursionError):
        return None
    # The array opened at the end of the first line must be the last value of products.
    if not isinstance(head, dict) or not top or top[-1] != ("products", []):
        return None
    if set(head) - _SNAPSHOT_FIELDS:
        return None
    policy_schemas = schemas()
    products: list[Product] = []
    start = head_end + 1
    while True:
        end = body.find(b"\n", start, stop)
        last = end < 0
        if last:
            line = body[start:stop]
        elif body[end - 1 : end] == b",":
            line = body[start : end - 1]
        else:
            return None
        try:
            data = json.loads(line)
            del line
            products.append(
                validate_snapshot_product(
                    data, len(products), source, policy_schemas=policy_schemas
                )
            )
        except (ValueError, RecursionError, ConfigError):
            return None
        del data
        # Hand the GIL over: the event loop waiting for it serves its requests.
        time.sleep(0)
        if last:
            break
        start = end + 1
    del head["products"]
    try:
        validated = assemble_snapshot(products, head, source)
    except ConfigError:
        return None
    return settings.model_copy(
        update={"products": validated.products, "version": validated.version}
    )


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Run a large build with the cyclic collector off, then freeze what it made.

    A snapshot of 100,000 keys is half a million objects and none of them is in a cycle:
    collections during the build would traverse them over and over while holding the GIL,
    and later full collections would traverse them again, stalling requests for hundreds
    of milliseconds. Frozen objects are still freed by reference counting when a newer
    snapshot replaces them (a test checks a dropped gateway leaves no cycle behind)."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if collecting:
            gc.enable()


def _parse_body(body: bytes, source: str) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise SnapshotRefused(f"{source}: not a JSON document: {exc}") from None


def write_cache(path: Path, snapshot: bytes | Any, etag: str | None, env: str, url: str) -> None:
    """Write atomically: a temporary file beside it, fsync, rename, fsync the folder.

    ``snapshot`` is the body as received (spliced in as it is: re-encoding 10 MB of JSON
    would hold the GIL for a good part of a second) or a parsed document."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {
        "format": _CACHE_FORMAT,
        "env": env,
        "control_plane": url,
        "etag": etag,
        "saved_at": time.time(),
    }
    body = snapshot if isinstance(snapshot, bytes) else json.dumps(snapshot).encode()
    write_atomically(path, (json.dumps(header)[:-1].encode() + b', "snapshot": ', body, b"}"))


def _read_cache(path: Path) -> tuple[Any, str | None]:
    """The cached snapshot and its ETag; OSError or SnapshotRefused when unusable."""
    with open(path, "rb") as file:
        body = file.read(SNAPSHOT_MAX_BYTES + 1)
    if len(body) > SNAPSHOT_MAX_BYTES:
        raise SnapshotRefused(f"{path}: larger than {SNAPSHOT_MAX_BYTES} bytes")
    document = _parse_body(body, str(path))
    if not isinstance(document, dict) or "snapshot" not in document:
        raise SnapshotRefused(f"{path}: not a meshgate snapshot cache file")
    etag = document.get("etag")
    return document["snapshot"], etag if isinstance(etag, str) else None


def _problem_detail(response: HttpResponse) -> str:
    """What a problem+json (or any) error answer says, in one line."""
    try:
        doc = json.loads(response.body)
    except ValueError:
        doc = None
    if isinstance(doc, dict):
        parts = [str(doc[k]) for k in ("title", "detail") if isinstance(doc.get(k), str)]
        if parts:
            return ": ".join(parts)
    text = response.body[:200].decode("utf-8", "replace").strip()
    return " ".join(text.split()) or "(no body)"


def default_dataplane_id(settings: Config) -> str:
    """This host and the gateway's port: stable across restarts."""
    listen = settings.listen or (settings.tls.listen if settings.tls is not None else "")
    return f"{socket.gethostname()}-{listen.rpartition(':')[2]}"


class ControlPlaneSync:
    """Keeps a gateway process on its environment's latest snapshot."""

    def __init__(self, options: ControlPlaneOptions, settings: Config) -> None:
        self.options = options
        self.settings = settings
        self.url = options.url.rstrip("/")
        self.id = options.name or default_dataplane_id(settings)
        self.cache_path = cache_file(options.cache_dir, options.env)
        self.source: str | None = None  # "control_plane" or "cache" once a snapshot applies
        self.etag: str | None = None  # the last snapshot seen, applied or refused
        self.applied_etag: str | None = None
        self.last_contact: float | None = None
        self.contact_error: str | None = None
        self.process: GatewayProcess | None = None
        self._report = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def describe(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "env": self.options.env,
            "id": self.id,
            "etag": self.etag,
            "last_contact": self.last_contact,
            "contact_error": self.contact_error,
            "cache": str(self.cache_path),
        }

    async def initial(
        self, process: GatewayProcess, build: Callable[[Config], Gateway]
    ) -> tuple[Gateway, str]:
        """The first gateway and its version: from the control plane if it answers within
        a few seconds, else from the cache, else with no products."""
        self.process = process
        fetched = await self._first_fetch()
        refused_etag = None
        if fetched is not None:
            snapshot, etag = fetched
            source = self._source_name(etag)
            try:
                config = merge_snapshot(self.settings, snapshot, source)
                gateway = build(config)
            except Exception as exc:  # refused: validation, or a policy that fails to build
                self._refused(_reason(exc), etag)
                refused_etag = etag
            else:
                self._applied("control_plane", etag)
                await self._save(snapshot, etag)
                return gateway, self.version_of(config, etag)
        try:
            snapshot, etag = await asyncio.to_thread(_read_cache, self.cache_path)
        except FileNotFoundError:
            log.warning("no cached snapshot at %s: starting with no products", self.cache_path)
        except (OSError, SnapshotRefused) as exc:
            log.error("cached snapshot unusable, starting with no products: %s", _reason(exc))
        else:
            try:
                config = merge_snapshot(self.settings, snapshot, f"cached snapshot {etag}")
                gateway = build(config)
            except Exception as exc:
                log.error("cached snapshot refused, starting with no products: %s", _reason(exc))
                process.last_error = _reason(exc)
            else:
                log.info("serving the cached snapshot %s from %s", config.version, self.cache_path)
                self._applied("cache", etag)
                if refused_etag is not None:
                    self.etag = refused_etag  # not to be fetched again
                return gateway, self.version_of(config, etag)
        return build(self.settings), ""

    def start(self) -> None:
        """Poll and report in the background until :meth:`stop`."""
        loop = asyncio.get_running_loop()
        self._report.set()
        self._tasks = [loop.create_task(self._poll()), loop.create_task(self._heartbeat())]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    @staticmethod
    def version_of(config: Config, etag: str | None) -> str:
        return config.version or (etag or "").strip('"') or "unversioned"

    def _source_name(self, etag: str | None) -> str:
        return f"snapshot {etag or '(no etag)'} of {self.options.env}"

    def headers(self) -> dict[str, str]:
        """What every request to the control plane carries: the token and who we are."""
        return self._headers()

    def _headers(self) -> dict[str, str]:
        return {
            "Authorization": f"Bearer {self.options.token}",
            "X-Meshgate-Dataplane": self.id,
            "Accept": "application/json",
            "User-Agent": "meshgate-gateway",
        }

    async def _get_snapshot(self, timeout: float, wait: int, etag: str | None) -> HttpResponse:
        query = f"env={quote(self.options.env)}&wait={wait}"
        headers = self._headers()
        if etag is not None:
            headers["If-None-Match"] = etag
        return await request(
            "GET",
            f"{self.url}/dp/v1/snapshot?{query}",
            headers=headers,
            timeout=timeout,
            max_body=SNAPSHOT_MAX_BYTES,
        )

    async def _first_fetch(self) -> tuple[Any, str | None] | None:
        """The control plane's snapshot as it answers within START_WAIT_SECONDS; None else."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_WAIT_SECONDS
        backoff = BACKOFF_MIN
        while True:
            left = deadline - loop.time()
            try:
                # No If-None-Match: the control plane answers at once.
                response = await self._get_snapshot(max(left, 0.1), LONG_POLL_SECONDS, None)
            except ResponseTooLarge as exc:
                if exc.status == 200:
                    self._refused(f"snapshot refused: {exc}", exc.headers.get("etag"))
                    return None
                self._unreachable(f"answered {exc.status}: {exc}")
            except HttpError as exc:
                self._unreachable(str(exc))
            else:
                if response.status == 200:
                    self._reached()
                    etag = response.headers.get("etag")
                    try:
                        return _parse_body(response.body, self._source_name(etag)), etag
                    except SnapshotRefused as exc:
                        self._refused(str(exc), etag)
                        return None
                self._unreachable(self._answered(response))
                if 400 <= response.status < 500:
                    return None
            if deadline - loop.time() < backoff:
                return None
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)

    async def _poll(self) -> None:
        loop = asyncio.get_running_loop()
        backoff = BACKOFF_MIN
        while True:
            started = loop.time()
            try:
                response = await self._get_snapshot(
                    LONG_POLL_SECONDS + 10, LONG_POLL_SECONDS, self.etag
                )
            except ResponseTooLarge as exc:
                if exc.status == 200:
                    self._reached()
                    self._refused(f"snapshot refused: {exc}", exc.headers.get("etag"))
                else:
                    self._unreachable(f"answered {exc.status}: {exc}")
                await asyncio.sleep(BACKOFF_MAX)
                continue
            except HttpError as exc:
                self._unreachable(str(exc))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            if response.status == 304:
                self._reached()
                backoff = BACKOFF_MIN
                if self.source == "cache" and self.etag == self.applied_etag:
                    self.source = "control_plane"  # the cached snapshot is the current one
                if loop.time() - started < _MIN_POLL_SECONDS:
                    await asyncio.sleep(_MIN_POLL_SECONDS)
                continue
            if response.status == 200:
                self._reached()
                backoff = BACKOFF_MIN
                etag = response.headers.get("etag")
                await self._receive(response.body, etag)
                if etag is None:
                    # Without an ETag every poll would be answered at once.
                    await asyncio.sleep(BACKOFF_MAX)
                continue
            self._unreachable(self._answered(response))
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)

    async def _receive(self, body: bytes, etag: str | None) -> None:
        if etag is not None and etag == self.applied_etag:
            return
        process = self.process
        assert process is not None
        source = self._source_name(etag)
        # Off the loop: decoding a large snapshot must not stall requests.
        try:
            config = await asyncio.to_thread(decode_snapshot, self.settings, body, source)
        except SnapshotRefused as exc:
            self._refused(str(exc), etag)
            return
        if await process.apply_async(config, self.version_of(config, etag)):
            self._applied("control_plane", etag)
            await self._save(body, etag)
        else:
            self.etag = etag
            self._report.set()

    def _applied(self, source: str, etag: str | None) -> None:
        self.source = source
        self.etag = self.applied_etag = etag
        self._report.set()

    def _refused(self, reason: str, etag: str | None) -> None:
        """A snapshot that cannot apply: keep serving, report it, do not fetch it again."""
        self.etag = etag
        assert self.process is not None
        self.process.refuse(reason)
        self._report.set()

    def _reached(self) -> None:
        if self.contact_error is not None:
            log.info("control plane %s reachable again", self.url)
        self.contact_error = None
        self.last_contact = time.time()

    def _unreachable(self, reason: str) -> None:
        if reason != self.contact_error:
            log.warning(
                "control plane %s: %s; still serving %s",
                self.url,
                reason,
                self.process.version if self.process and self.process.version else "nothing",
            )
        self.contact_error = reason

    @staticmethod
    def _answered(response: HttpResponse) -> str:
        if response.status in (401, 403):
            return f"the token was refused ({response.status}: {_problem_detail(response)})"
        return f"answered {response.status}: {_problem_detail(response)}"

    async def _save(self, snapshot: bytes | Any, etag: str | None) -> None:
        try:
            await asyncio.to_thread(
                write_cache, self.cache_path, snapshot, etag, self.options.env, self.url
            )
        except OSError as exc:
            log.warning("cannot cache the snapshot in %s: %s", self.cache_path, exc)

    async def _heartbeat(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._report.wait(), HEARTBEAT_SECONDS)
            except TimeoutError:
                pass
            self._report.clear()
            await self._send_status()

    def status(self) -> dict[str, Any]:
        process = self.process
        assert process is not None
        return {
            "id": self.id,
            "env": self.options.env,
            "version": process.version[:64] if self.source is not None else None,
            "error": process.last_error[:_MAX_ERROR] if process.last_error else None,
            "hostname": socket.gethostname(),
            "listen": self.settings.listen,
            "pid": os.getpid(),
        }

    async def _send_status(self) -> None:
        headers = self._headers()
        headers["Content-Type"] = "application/json"
        try:
            response = await request(
                "POST",
                f"{self.url}/dp/v1/status",
                headers=headers,
                body=json.dumps(self.status()).encode(),
                timeout=STATUS_TIMEOUT,
                max_body=65536,
            )
        except HttpError as exc:
            log.debug("status report not sent: %s", exc)
            return
        if response.status >= 300:
            log.debug("status report refused: %s", self._answered(response))


def _reason(exc: BaseException) -> str:
    if isinstance(exc, SnapshotRefused | ConfigError | OSError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"
