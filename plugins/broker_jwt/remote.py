"""Signing keys fetched from an identity provider (``jwks_url``, or OIDC
discovery from ``issuer``), kept fresh, refetched when a token names a key
the cache does not know.

:class:`RemoteKeys` is the jwt plugin's service (``broker_services``, see
docs/plugins.md): its task owns an httpx client (on trio) and does every
fetch; the handshakes only read :attr:`RemoteKeys.ring` and, for an
unknown ``kid``, ask for a refetch and wait for it (:meth:`refetch`), within
``limits.auth_timeout``. So a slow or unreachable provider delays only the
handshakes that need a key the cache does not have, and never past that
bound; everyone else is verified with the cached keys.

* **Start**: the first fetch is done before the service reports started,
  so before the broker accepts clients (or before a reload swaps the new
  plugin in). If it fails, ``jwks_startup = "fail"`` stops the start (or
  refuses the reload) with the key, the URL and the reason;
  ``jwks_startup = "wait"`` starts anyway, not ready (``/readyz`` 503)
  until the keys are loaded, retrying meanwhile (a reload that cannot
  load them is refused either way while the broker is ready).
* **Refresh**: after a fetch, the next one comes after the response's
  ``Cache-Control: max-age`` (``no-cache``, ``no-store``: 0), bounded by
  ``jwks_refresh_min`` and ``jwks_refresh_max`` (no ``max-age``:
  ``jwks_refresh_max``), revalidated with ``If-None-Match`` when the
  provider gave an ``ETag``. After a failure, retries come after 1, 2, 4...
  seconds, at most ``jwks_refresh_min``; the cached keys keep serving,
  the failure is logged and counted, and ``status()`` reports it.
* **Unknown kid**: a token whose ``kid`` the cache lacks asks for a
  refetch, granted at most once per ``jwks_refetch_interval`` (tokens with
  made-up kids cannot make the broker hammer the provider); handshakes that
  come while a fetch is in flight wait for that one.
* **Bounds**: each request (discovery, key set) must be answered in full
  within ``jwks_timeout`` (a response that trickles in is cut off at that
  deadline, not only one that stalls) and is at most ``jwks_max_bytes``
  long (``Content-Length`` checked first, then the bytes as they arrive;
  no content coding is accepted, so no decompression bomb). HTTPS only
  (``allow_insecure_jwks`` for a loopback test server), verified against
  the system's CAs or ``jwks_ca_file``; redirects are not followed.
* **Discovery** (``discovery = true``): ``ISSUER/.well-known/openid-configuration``
  gives ``jwks_uri``; its ``issuer`` must be the configured one exactly
  (OpenID Connect Discovery 1.0, section 4.3). It is read again at every
  scheduled refresh, and at an unknown kid's refetch only until it was
  read once.
"""

from __future__ import annotations

import json
import logging
import random
import ssl
import time
from dataclasses import dataclass
from typing import Final, Literal
from urllib.parse import urlsplit

import httpx
import trio

from broker import ConfigError, ServiceMetric, ServiceStatus

from .keys import JWKSError, KeyRing, parse_jwks

__all__ = [
    "FetchError",
    "RemoteKeys",
    "RemoteOptions",
    "check_url",
    "describe",
    "discovery_url",
    "max_age",
    "shown",
]

log = logging.getLogger("broker.plugins.jwt")

#: The first retry after a failed fetch, in seconds (then doubling, up to
#: ``jwks_refresh_min``).
FIRST_RETRY: Final = 1.0
#: Where OpenID Connect Discovery 1.0 puts the provider's metadata.
WELL_KNOWN: Final = "/.well-known/openid-configuration"
USER_AGENT: Final = "trio-broker-jwt"


class FetchError(Exception):
    """A fetch failed, for the reason given (one line)."""


def max_age(cache_control: str | None) -> float | None:
    """The freshness lifetime ``Cache-Control`` gives, in seconds: its
    ``max-age``, 0 for ``no-cache`` or ``no-store``, None if it says nothing
    of it (RFC 9111 section 5.2.2)."""
    if not cache_control:
        return None
    found: float | None = None
    for directive in cache_control.split(","):
        name, _, value = directive.strip().partition("=")
        name = name.strip().lower()
        if name in ("no-cache", "no-store"):
            return 0.0
        if name == "max-age" and found is None:
            value = value.strip().strip('"')
            if value.isdigit():
                found = float(value)
    return found


def describe(error: BaseException) -> str:
    """One line for a failed request: the exception's name, and the first
    message found along its causes (httpx wraps a refused certificate or
    connection in an error of its own, sometimes without a message)."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, ssl.SSLError) or str(seen):
            text = str(seen).splitlines()[0] if str(seen) else ""
            if seen is not error:
                text = f"{type(seen).__name__}: {text}" if text else type(seen).__name__
            return f"{type(error).__name__}: {text}" if text else type(error).__name__
        seen = seen.__cause__ or seen.__context__
    return type(error).__name__


def discovery_url(issuer: str) -> str:
    """Where the provider *issuer* publishes its metadata."""
    return issuer.rstrip("/") + WELL_KNOWN


def shown(url: str) -> str:
    """*url* for logs and status: without user info or query."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def check_url(url: str, *, insecure: bool) -> str | None:
    """Why *url* may not be fetched, or None."""
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        return "must be an https:// URL"
    if parts.scheme == "http" and not insecure:
        return "must be https:// (http:// only with allow_insecure_jwks, for a test server)"
    if parts.username is not None or parts.password is not None:
        return "must not carry user info"
    if parts.fragment:
        return "must not have a fragment"
    try:
        parts.port  # noqa: B018 - validates the port
    except ValueError:
        return "has an invalid port"
    return None


@dataclass(frozen=True, slots=True, kw_only=True)
class RemoteOptions:
    """How :class:`RemoteKeys` fetches (from ``[plugin.jwt]``)."""

    #: The key set's URL (``jwks_url``); None with discovery.
    url: str | None
    #: The issuer whose discovery document names the key set (``discovery``).
    issuer: str | None = None
    #: The configured ``algorithms`` (None: each key's usual one).
    algorithms: tuple[str, ...] | None = None
    ssl_context: ssl.SSLContext
    allow_insecure: bool = False
    timeout: float = 5.0
    max_bytes: int = 1024 * 1024
    refresh_min: float = 60.0
    refresh_max: float = 3600.0
    refetch_interval: float = 30.0
    startup: Literal["fail", "wait"] = "fail"

    @property
    def setting(self) -> str:
        """The key errors name: ``jwks_url``, or ``issuer`` with discovery."""
        return "jwks_url" if self.url is not None else "issuer"

    @property
    def where(self) -> str:
        """Where the keys come from, for logs and status."""
        if self.url is not None:
            return shown(self.url)
        assert self.issuer is not None
        return shown(discovery_url(self.issuer))


@dataclass(frozen=True, slots=True)
class _Answer:
    """A response read in full."""

    data: bytes
    cache_control: str | None
    etag: str | None
    #: 304: the cached key set is still current (*data* is empty).
    not_modified: bool = False


class RemoteKeys:
    """The key set of an identity provider, kept fresh (see the module doc)."""

    #: The service's name (``jwt/jwks`` in /readyz, metrics, stats).
    name = "jwks"

    def __init__(self, options: RemoteOptions, *, plugin: str = "jwt") -> None:
        self.options = options
        self.plugin = plugin
        #: The keys in force; None until the first successful fetch.
        self.ring: KeyRing | None = None
        #: What the last document left out (``parse_jwks``).
        self.skipped: tuple[str, ...] = ()
        #: The key set's URL: ``jwks_url``, or what discovery said.
        self.jwks_uri: str | None = options.url
        self.fetches = 0
        self.failures = 0
        #: Failures since the last success.
        self.failing = 0
        self.last_error: str | None = None
        #: time.time() of the first failure of the current run of failures.
        self.failing_since: float | None = None
        #: time.time() of the last successful fetch.
        self.fetched_at: float | None = None
        #: Refetches granted for an unknown kid, and those refused by the rate.
        self.refetches = 0
        self.throttled = 0
        self._etag: str | None = None
        self._discovered = False
        self._last_refetch = -float("inf")
        #: trio.current_time() of the next scheduled fetch.
        self._next_at = 0.0
        #: Set to wake the fetching task for a refetch.
        self._wake = trio.Event()
        #: The fetch in flight, or asked for: set once it is done.
        self._pending: trio.Event | None = None
        self._client: httpx.AsyncClient | None = None
        #: Whether run() is fetching (refetch() waits for nothing otherwise).
        self._running = False
        self._rng = random.Random()
        #: Set after each fetch, successful or not (then replaced): what
        #: tests wait on.
        self.fetched = trio.Event()

    # -- the service -------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        opts = self.options
        if opts.allow_insecure:
            log.warning(
                "plugin %s: allow_insecure_jwks: the signing keys may come over plain http, "
                "where anyone on the path can replace them; for test servers only",
                self.plugin,
            )
        async with httpx.AsyncClient(
            verify=opts.ssl_context,
            follow_redirects=False,
            timeout=opts.timeout,
            headers={"User-Agent": USER_AGENT},
        ) as client:
            self._client = client
            self._running = True
            try:
                await self._fetch(scheduled=True)
                if self.ring is None and opts.startup == "fail":
                    raise ConfigError(
                        opts.setting,
                        f"cannot load the signing keys: {self.last_error} "
                        '(jwks_startup = "wait" starts anyway, not ready until they load)',
                    )
                task_status.started()
                while True:
                    with trio.move_on_at(self._next_at) as timer:
                        await self._wake.wait()
                    self._wake = trio.Event()
                    await self._fetch(scheduled=timer.cancelled_caught)
            finally:
                # Nobody fetches any more: release the handshakes waiting.
                self._running = False
                if self._pending is not None:
                    self._pending.set()
                    self._pending = None

    def status(self) -> ServiceStatus:
        now = time.time()
        opts = self.options
        ring = self.ring
        age = None if self.fetched_at is None else round(now - self.fetched_at, 3)
        problem: str | None = None
        if ring is None:
            problem = (
                f"no signing keys yet: {self.last_error}"
                if self.last_error
                else f"no signing keys yet from {opts.where}"
            )
        elif self.failing:
            since = round(now - (self.failing_since or now))
            problem = (
                f"cannot refresh the signing keys for {since} s ({self.failing} failed "
                f"attempts, the last: {self.last_error}); using the {len(ring.kids)} keys "
                f"fetched {age:.0f} s ago"
            )
        try:
            next_in: float | None = round(max(0.0, self._next_at - trio.current_time()), 3)
        except RuntimeError:  # read outside trio (a registry collected from a thread)
            next_in = None
        detail: dict[str, object] = {
            "source": opts.where,
            "jwks_uri": shown(self.jwks_uri) if self.jwks_uri else None,
            "kids": sorted(str(k) for k in ring.kids) if ring is not None else [],
            "fetched_at": self.fetched_at,
            "age_seconds": age,
            "next_fetch_in": next_in,
            "fetches": self.fetches,
            "failures": self.failures,
            "consecutive_failures": self.failing,
            "last_error": self.last_error,
            "refetches": self.refetches,
            "refetches_throttled": self.throttled,
            "skipped_keys": list(self.skipped),
        }
        metrics = [
            ServiceMetric(
                "jwks_keys", len(ring.kids) if ring else 0, "Signing keys (kids) in the JWKS cache."
            ),
            ServiceMetric(
                "jwks_fetches",
                self.fetches,
                "Successful JWKS fetches (a 304 Not Modified included).",
                "counter",
            ),
            ServiceMetric(
                "jwks_fetch_failures",
                self.failures,
                "Failed JWKS (or discovery) fetches; the cached keys kept serving.",
                "counter",
            ),
            ServiceMetric(
                "jwks_refetches",
                self.refetches,
                "Refetches for a token whose kid the cache lacked.",
                "counter",
            ),
            ServiceMetric(
                "jwks_refetches_throttled",
                self.throttled,
                "Unknown-kid refetches refused by jwks_refetch_interval.",
                "counter",
            ),
            ServiceMetric(
                "jwks_keys_skipped",
                len(self.skipped),
                "Keys of the last JWKS left out (unsupported type or algorithm...).",
            ),
        ]
        if age is not None:
            metrics.append(
                ServiceMetric("jwks_age_seconds", age, "Seconds since the last successful fetch.")
            )
        return ServiceStatus(
            ready=ring is not None, problem=problem, detail=detail, metrics=tuple(metrics)
        )

    # -- for the handshakes ------------------------------------------------------

    def may_refetch(self) -> bool:
        """Whether a token whose ``kid`` the cache lacks may have the key set
        fetched again: a fetch is in flight (it waits for that one), or the
        last refetch was ``jwks_refetch_interval`` ago. A refusal is counted
        (``throttled``)."""
        if not self._running:
            return False
        if self._pending is not None:
            return True
        if trio.current_time() - self._last_refetch >= self.options.refetch_interval:
            return True
        self.throttled += 1
        return False

    async def refetch(self) -> None:
        """Fetch the key set again for a token whose ``kid`` the cache lacks
        (after :meth:`may_refetch` said yes), and wait until that fetch is
        done: the one in flight, or a new one."""
        if not self._running:
            return
        done = self._pending
        if done is None:
            self._last_refetch = trio.current_time()
            self.refetches += 1
            done = self._pending = trio.Event()
            self._wake.set()
        await done.wait()

    # -- fetching ----------------------------------------------------------------

    async def _fetch(self, *, scheduled: bool) -> None:
        """One attempt: discovery (if due), then the key set. Never raises
        but cancellation: a failure is counted, logged and reported."""
        done = self._pending if self._pending is not None else trio.Event()
        self._pending = done
        opts = self.options
        try:
            if opts.issuer is not None and (scheduled or not self._discovered):
                await self._discover()
            assert self.jwks_uri is not None
            etag = self._etag if self.ring is not None else None
            answer = await self._get(self.jwks_uri, etag=etag)
            if not answer.not_modified:
                self._load(answer, self.jwks_uri)
        except FetchError as e:
            self._failed(str(e))
        except Exception as e:
            # A bug here must not take the cached keys down with it.
            log.exception("plugin %s: fetching the signing keys failed", self.plugin)
            self._failed(f"{opts.where}: {type(e).__name__}: {e}")
        else:
            self._succeeded(answer)
        finally:
            self._pending = None
            done.set()
            self.fetched.set()
            self.fetched = trio.Event()

    async def _discover(self) -> None:
        opts = self.options
        assert opts.issuer is not None
        url = discovery_url(opts.issuer)
        answer = await self._get(url)
        try:
            document = json.loads(answer.data)
        except (ValueError, UnicodeDecodeError) as e:
            raise FetchError(f"{shown(url)}: not valid JSON: {e}") from None
        if not isinstance(document, dict):
            raise FetchError(f"{shown(url)}: not a JSON object")
        issuer = document.get("issuer")
        if issuer != opts.issuer:
            raise FetchError(
                f"{shown(url)} names the issuer {str(issuer)[:100]!r}, "
                f"not the configured {opts.issuer!r}"
            )
        uri = document.get("jwks_uri")
        if not isinstance(uri, str):
            raise FetchError(f"{shown(url)} has no jwks_uri")
        why = check_url(uri, insecure=opts.allow_insecure)
        if why is not None:
            raise FetchError(f"{shown(url)}: its jwks_uri {why}")
        if uri != self.jwks_uri:
            if self.jwks_uri is not None:
                log.info("plugin %s: the key set moved to %s (discovery)", self.plugin, shown(uri))
            self.jwks_uri = uri
            self._etag = None
        self._discovered = True

    async def _get(self, url: str, *, etag: str | None = None) -> _Answer:
        """GET *url* (revalidating *etag*): a 200's body, or a 304 for
        *etag*, read within the time and size bounds; FetchError for
        anything else, its reason starting with the URL."""
        try:
            return await self._exchange(url, etag)
        except (httpx.HTTPError, httpx.InvalidURL, ssl.SSLError, OSError) as e:
            raise FetchError(f"{shown(url)}: {describe(e)}") from e

    async def _exchange(self, url: str, etag: str | None) -> _Answer:
        opts = self.options
        client = self._client
        assert client is not None
        headers = {
            "Accept": "application/json, application/jwk-set+json",
            # No content coding: the size bound is the bytes kept, and no
            # small compressed body can expand into a huge one.
            "Accept-Encoding": "identity",
        }
        if etag is not None:
            headers["If-None-Match"] = etag
        # One deadline for the whole exchange: httpx's own timeouts bound
        # each read, and a server sending a byte a second would pass them.
        with trio.move_on_after(opts.timeout):
            async with client.stream("GET", url, headers=headers) as response:
                if response.status_code == 304 and etag is not None:
                    cache_control = response.headers.get("cache-control")
                    return _Answer(b"", cache_control, etag, not_modified=True)
                if response.status_code != 200:
                    moved = " (redirects are not followed)" if response.is_redirect else ""
                    raise FetchError(
                        f"{shown(url)} answered {response.status_code} "
                        f"{response.reason_phrase}{moved}"
                    )
                coding = response.headers.get("content-encoding", "identity").strip().lower()
                if coding not in ("", "identity"):
                    raise FetchError(f"{shown(url)} sent Content-Encoding {coding[:40]}")
                length = response.headers.get("content-length", "")
                if length.isdigit() and int(length) > opts.max_bytes:
                    raise FetchError(
                        f"{shown(url)}: a response of {length} bytes, "
                        f"over jwks_max_bytes ({opts.max_bytes})"
                    )
                data = bytearray()
                async for chunk in response.aiter_raw():
                    data += chunk
                    if len(data) > opts.max_bytes:
                        raise FetchError(
                            f"{shown(url)}: response over jwks_max_bytes ({opts.max_bytes}), "
                            "cut off"
                        )
                return _Answer(
                    bytes(data),
                    response.headers.get("cache-control"),
                    response.headers.get("etag"),
                )
        raise FetchError(f"{shown(url)}: no complete answer within {opts.timeout:g} s, cut off")

    def _load(self, answer: _Answer, url: str) -> None:
        try:
            document = json.loads(answer.data)
        except (ValueError, UnicodeDecodeError) as e:
            raise FetchError(f"{shown(url)}: not valid JSON: {e}") from None
        try:
            parsed = parse_jwks(document, self.options.algorithms, strict=False)
        except JWKSError as e:
            raise FetchError(f"{shown(url)}: {e}") from None
        before = self.ring.kids if self.ring is not None else None
        if parsed.skipped != self.skipped:
            for reason in parsed.skipped:
                log.warning("plugin %s: key left out of the JWKS: %s", self.plugin, reason)
        self.ring, self.skipped = parsed.ring, parsed.skipped
        self._etag = answer.etag
        if parsed.ring.kids != before:
            kids = ", ".join(sorted(str(k) for k in parsed.ring.kids))
            log.info(
                "plugin %s: %d signing keys from %s (kid %s)",
                self.plugin,
                len(parsed.ring.kids),
                shown(self.jwks_uri or ""),
                kids,
            )

    def _succeeded(self, answer: _Answer) -> None:
        opts = self.options
        if self.failing:
            log.info(
                "plugin %s: the signing keys are fetched again from %s (after %d failures)",
                self.plugin,
                opts.where,
                self.failing,
            )
        self.fetches += 1
        self.failing = 0
        self.failing_since = None
        self.last_error = None
        self.fetched_at = time.time()
        lifetime = max_age(answer.cache_control)
        delay = opts.refresh_max if lifetime is None else lifetime
        delay = min(max(delay, opts.refresh_min), opts.refresh_max)
        self._next_at = trio.current_time() + delay

    def _failed(self, reason: str) -> None:
        opts = self.options
        self.failures += 1
        self.failing += 1
        if self.failing_since is None:
            self.failing_since = time.time()
        self.last_error = reason
        cap = min(opts.refresh_min, FIRST_RETRY * 2.0 ** min(self.failing - 1, 30))
        delay = self._rng.uniform(cap / 2, cap)
        self._next_at = trio.current_time() + delay
        kept = (
            f"the {len(self.ring.kids)} cached keys serve meanwhile"
            if self.ring is not None
            else "no keys yet"
        )
        log.warning(
            "plugin %s: cannot fetch the signing keys: %s; %s; retrying in %.1f s (failure %d)",
            self.plugin,
            reason,
            kept,
            delay,
            self.failing,
        )
