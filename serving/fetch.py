# Copyright 2026 The OpenChroma authors. Licensed under the Apache License, Version 2.0.
"""Fetching client-named audio URLs (only with --allow-url-fetch), off the preprocessing path.

Every fetch runs on the fetcher's own small thread pool, never on the "chroma-prep" thread, so a slow server
delays only the request that named it. Rules:

    * a total deadline (connect, headers and body together) and a size cap;
    * the host name is resolved once and only public (globally routable) addresses are contacted, unless the
      operator allows private ones (--allow-private-urls); the connection goes to the checked address, so a
      second DNS answer cannot redirect it to loopback;
    * redirects are not followed;
    * every network failure (refused, unreachable, timed out, HTTP error, too large) gets the same message, so the
      errors never tell whether a port is open.

Not a hub file (needs the `server` extra).
"""

import asyncio
import http.client
import ipaddress
import socket
import ssl
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, Iterable

from .schemas import APIError, bad_request


READ_BLOCK = 64 * 1024


class UrlFetcher:
    """Downloads audio URLs under the rules above; `fetch_all` is awaited on the event loop."""

    def __init__(self, timeout_s: float, max_bytes: int, allow_private: bool = False, workers: int = 4):
        self.timeout_s, self.max_bytes, self.allow_private = timeout_s, max_bytes, allow_private
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="chroma-fetch")

    async def fetch_all(self, urls: Iterable[tuple]) -> Dict[str, bytes]:
        """(url, param) pairs -> {url: bytes}, fetched concurrently; the first failure raises its APIError."""
        unique = {}
        for url, param in urls:
            unique.setdefault(url, param)
        results = await asyncio.gather(*(self.fetch(url, param) for url, param in unique.items()))
        return dict(zip(unique, results))

    async def fetch(self, url: str, param: str) -> bytes:
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + self.timeout_s
        work = loop.run_in_executor(self.pool, self.download, url, param, deadline)
        try:
            return await asyncio.wait_for(work, self.timeout_s + 1.0)
        except asyncio.TimeoutError:
            raise fetch_failed(param) from None

    def shutdown(self):
        self.pool.shutdown(wait=False, cancel_futures=True)

    # -- fetch thread ----------------------------------------------------------------------------------------------

    def download(self, url: str, param: str, deadline: float) -> bytes:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise bad_request(f"'{param}': only http(s) URLs with a host name can be fetched.", param,
                              code="invalid_audio_source")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        address = self.public_address(parts.hostname, port, param)
        remaining = max(deadline - time.monotonic(), 0.1)
        connection = PinnedHTTPSConnection(parts.hostname, port, address, remaining) if parts.scheme == "https" \
            else PinnedHTTPConnection(parts.hostname, port, address, remaining)
        target = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
        try:
            connection.connect()
            sock = connection.sock  # kept: the response may take the socket over from the connection
            connection.request("GET", target, headers={"User-Agent": "openchroma", "Accept": "audio/*"})
            response = connection.getresponse()
            if response.status != 200:  # redirects included: they are not followed
                raise OSError(f"status {response.status}")
            return self.read_body(sock, response, deadline)
        except (OSError, http.client.HTTPException, ValueError):
            raise fetch_failed(param) from None
        finally:
            connection.close()

    def public_address(self, host: str, port: int, param: str) -> str:
        """The address to connect to: the first one DNS gives, refused when any of them is not public."""
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError):
            raise fetch_failed(param) from None
        addresses = [info[4][0] for info in infos]
        if not self.allow_private:
            for text in addresses:
                address = ipaddress.ip_address(text.split("%")[0])
                mapped = getattr(address, "ipv4_mapped", None)
                if not (mapped or address).is_global:
                    raise bad_request(f"'{param}': URLs of loopback, private or link-local hosts are not fetched.",
                                      param, code="url_not_allowed")
        return addresses[0]

    def read_body(self, sock, response, deadline: float) -> bytes:
        declared = response.getheader("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            raise OSError("too large")
        chunks, size = [], 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise OSError("deadline")
            sock.settimeout(remaining)  # one read never outlives the deadline
            chunk = response.read1(READ_BLOCK)
            if not chunk:
                return b"".join(chunks)
            size += len(chunk)
            if size > self.max_bytes:
                raise OSError("too large")
            chunks.append(chunk)


def fetch_failed(param: str) -> APIError:
    return bad_request(f"'{param}': could not fetch audio from this URL.", param, code="url_fetch_failed")


class PinnedHTTPConnection(http.client.HTTPConnection):
    """An HTTP connection to `host` that connects to the already checked `address` (no second DNS lookup)."""

    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self.address = address

    def connect(self):
        self.sock = socket.create_connection((self.address, self.port), self.timeout)


class PinnedHTTPSConnection(http.client.HTTPSConnection):
    """The same for https: TLS is verified against the host name."""

    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self.address = address
        self.tls = ssl.create_default_context()  # certificate and host name verified

    def connect(self):
        sock = socket.create_connection((self.address, self.port), self.timeout)
        self.sock = self.tls.wrap_socket(sock, server_hostname=self.host)
