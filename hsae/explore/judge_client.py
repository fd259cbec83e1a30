"""A small OpenAI-compatible chat-completions client for the judge, on the standard library.

* Settings come from flags or the environment: HSAE_JUDGE_BASE_URL (else OPENAI_BASE_URL,
  else OpenAI's), HSAE_JUDGE_MODEL, HSAE_JUDGE_API_KEY (else OPENAI_API_KEY).
* The API key travels only in the Authorization header: it is not part of a cache key, a
  cache file, a report, a log line or an error message (any text we show is scrubbed).
* Timeouts, connection errors, HTTP 408 / 429 / 5xx and bodies that are not a chat
  completion are retried with exponential back-off and jitter (429's Retry-After is
  honoured); a 4xx that retrying cannot fix stops at once. When retries run out the run
  stops with one line naming the endpoint and the last problem.
* Answers are cached on disk, one JSON file per request, named by the SHA-256 of (model,
  messages, temperature) and written atomically, so a rerun costs no request and two runs
  sharing a cache never see half an entry.
"""

from __future__ import annotations

import contextlib
import email.utils
import hashlib
import http.client
import json
import os
import random
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tqdm.auto import tqdm

from hsae.io import FormatError, atomic_write_json, load_json, one_line

ENV_BASE_URL = ("HSAE_JUDGE_BASE_URL", "OPENAI_BASE_URL")
ENV_MODEL = ("HSAE_JUDGE_MODEL",)
ENV_API_KEY = ("HSAE_JUDGE_API_KEY", "OPENAI_API_KEY")
DEFAULT_BASE_URL = "https://api.openai.com/v1"
MAX_WAIT = 120.0
"""Longest single pause between attempts, whatever Retry-After asks for."""

Message = dict[str, str]
T = TypeVar("T")
R = TypeVar("R")


class EndpointError(ValueError):
    """The judge endpoint cannot give an answer; the message is one line and has no key."""


class _Transient(Exception):
    """A failure worth another attempt (timeout, refused connection, 429, 5xx, bad body)."""

    def __init__(self, reason: str, retry_after: float | None = None):
        super().__init__(reason)
        self.retry_after = retry_after


def _first_env(names: Sequence[str]) -> str | None:
    for name in names:
        if os.environ.get(name):
            return os.environ[name]
    return None


@dataclass(frozen=True)
class JudgeSettings:
    base_url: str
    model: str
    api_key: str | None = field(default=None, repr=False)
    temperature: float = 0.0
    timeout: float = 60.0
    retries: int = 4
    backoff: float = 1.0

    @classmethod
    def resolve(
        cls, base_url: str | None, model: str | None, api_key: str | None, **rest: Any
    ) -> JudgeSettings:
        """Flags first, then the environment; a missing model or a bad URL is one line."""
        base_url = base_url or _first_env(ENV_BASE_URL) or DEFAULT_BASE_URL
        model = model or _first_env(ENV_MODEL)
        if not model:
            raise ValueError(f"no judge model: pass --judge_model or set {ENV_MODEL[0]}")
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"judge base URL must be http(s)://host[:port]/..., got {base_url!r}")
        settings = cls(base_url.rstrip("/"), model, api_key or _first_env(ENV_API_KEY), **rest)
        if settings.timeout <= 0 or settings.retries < 0 or settings.backoff < 0:
            raise ValueError("--timeout must be > 0, --retries and --backoff >= 0")
        return settings

    @property
    def url(self) -> str:
        """The chat-completions URL (a base that already ends with it is taken as is)."""
        if self.base_url.endswith("/chat/completions"):
            return self.base_url
        return self.base_url + "/chat/completions"

    @property
    def shown_url(self) -> str:
        """The URL without user:password@ or a query string, for messages and reports."""
        parts = urllib.parse.urlsplit(self.url)
        host = parts.hostname or ""
        netloc = f"[{host}]" if ":" in host else host
        if parts.port:
            netloc += f":{parts.port}"
        return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))

    def describe(self) -> dict:
        return {"url": self.shown_url, "model": self.model, "temperature": self.temperature}


# ------------------------------------------------------------------ the cache


class AnswerCache:
    """One JSON file per answered request, ``<dir>/<sha[:2]>/<sha>.json``."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)

    @staticmethod
    def key(model: str, messages: list[Message], temperature: float) -> str:
        text = json.dumps([model, messages, temperature], sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.json"

    def get(self, key: str) -> str | None:
        path = self._path(key)
        if not path.exists():
            return None
        try:
            content = load_json(path).get("content")
        except FormatError:  # damaged by hand: ask again and overwrite it
            return None
        return content if isinstance(content, str) else None

    def put(self, key: str, model: str, content: str) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {"model": model, "content": content})


# ------------------------------------------------------------------ the client


class ChatClient:
    """Cached, retried chat completions; ``abort`` stops every thread's retries at once."""

    def __init__(self, settings: JudgeSettings, cache: AnswerCache):
        self.settings = settings
        self.cache = cache
        self.abort = threading.Event()
        self.counts = {"sent": 0, "cached": 0, "retried": 0}
        self._lock = threading.Lock()
        self._jitter = random.Random()

    def _count(self, name: str) -> None:
        with self._lock:
            self.counts[name] += 1

    def scrub(self, text: str) -> str:
        """``text`` on one line with the API key, should an endpoint echo it, masked."""
        key = self.settings.api_key
        if key:
            text = text.replace(key, "[api key]")
        return one_line(text)

    def complete(self, messages: list[Message]) -> str:
        """The assistant's reply to ``messages``: from the cache, else from the endpoint."""
        s = self.settings
        key = self.cache.key(s.model, messages, s.temperature)
        cached = self.cache.get(key)
        if cached is not None:
            self._count("cached")
            return cached
        content = self._fetch(messages)
        if s.api_key:  # an endpoint that echoes the key must not get it written to disk
            content = content.replace(s.api_key, "[api key]")
        self.cache.put(key, s.model, content)
        return content

    def _fetch(self, messages: list[Message]) -> str:
        s = self.settings
        body = json.dumps({"model": s.model, "messages": messages, "temperature": s.temperature})
        last = "no attempt"
        for attempt in range(s.retries + 1):
            if self.abort.is_set():
                raise EndpointError("stopped: another request failed")
            if attempt:
                self._count("retried")
            try:
                return self._post(body.encode("utf-8"))
            except _Transient as err:
                last = str(err)
                if attempt == s.retries:
                    break
                wait = err.retry_after if err.retry_after is not None else self._backoff(attempt)
                if self.abort.wait(min(wait, MAX_WAIT)):
                    raise EndpointError("stopped: another request failed") from None
        tries = f"{s.retries + 1} attempt" + ("s" if s.retries else "")
        raise EndpointError(self.scrub(f"judge at {s.shown_url}: no answer after {tries} ({last})"))

    def _backoff(self, attempt: int) -> float:
        return self.settings.backoff * 2**attempt * self._jitter.uniform(0.5, 1.5)

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "User-Agent": "hsae-judge"}
        if self.settings.api_key:
            headers["Authorization"] = f"Bearer {self.settings.api_key}"
        return headers

    def _post(self, body: bytes) -> str:
        s = self.settings
        request = urllib.request.Request(s.url, data=body, method="POST", headers=self._headers())
        self._count("sent")
        try:
            with urllib.request.urlopen(request, timeout=s.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as err:
            raise self._http_error(err) from None
        except TimeoutError:
            raise _Transient(f"no answer within {s.timeout:g} s") from None
        except urllib.error.URLError as err:
            if isinstance(err.reason, TimeoutError):
                raise _Transient(f"no connection within {s.timeout:g} s") from None
            raise _Transient(f"cannot connect: {err.reason}") from None
        except (OSError, http.client.HTTPException) as err:
            raise _Transient(f"connection failed: {type(err).__name__} {err}") from None
        return _reply_content(raw)

    def _http_error(self, err: urllib.error.HTTPError) -> Exception:
        with contextlib.closing(err):
            try:
                detail = _error_detail(err.read())
            except (OSError, http.client.HTTPException):
                detail = ""
        code, where = err.code, self.settings.shown_url
        if code in (408, 429) or code >= 500:
            return _Transient(f"HTTP {code}", _retry_after(err.headers.get("Retry-After")))
        if code in (401, 403):
            problem = f"refused the request (HTTP {code}; check the API key): {detail}"
        else:
            problem = f"answered HTTP {code}: {detail}"
        return EndpointError(self.scrub(f"judge at {where} {problem}"))


def _retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    with contextlib.suppress(TypeError, ValueError):
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time())
    return None


def _error_detail(raw: bytes) -> str:
    """The message of an OpenAI-style error body, or the start of the body."""
    text = raw.decode("utf-8", "replace")
    with contextlib.suppress(ValueError, AttributeError, TypeError):
        error = json.loads(text).get("error")
        text = error.get("message", text) if isinstance(error, dict) else str(error or text)
    return one_line(text)[:200]


def _reply_content(raw: bytes) -> str:
    """The first choice's message text; a body that is no chat completion is retried."""
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        start = one_line(raw[:80].decode("utf-8", "replace"))
        raise _Transient(f"the body is not JSON: {start!r}") from None
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise _Transient("the reply has no 'choices'")
    message = choices[0].get("message")
    if not isinstance(message, dict):
        raise _Transient("the reply's first choice has no 'message'")
    content = message.get("content")
    # A refusal or a tool call has no text: an answer we cannot parse, not a broken endpoint.
    return content if isinstance(content, str) else ""


# ------------------------------------------------------------------ bounded concurrency


def map_bounded(
    client: ChatClient,
    fn: Callable[[T], R],
    items: Sequence[T],
    concurrency: int,
    desc: str,
    progress: bool,
) -> list[R]:
    """``[fn(x) for x in items]`` on ``concurrency`` threads, so at most that many requests
    are in flight. The first failure stops the rest (their retries end at once) and is
    raised."""
    if concurrency < 1:
        raise ValueError(f"--concurrency must be at least 1, got {concurrency}")
    results: list[Any] = [None] * len(items)
    with (
        ThreadPoolExecutor(max_workers=concurrency) as pool,
        tqdm(total=len(items), desc=desc, unit="req", disable=not progress) as bar,
    ):
        futures = {pool.submit(fn, item): i for i, item in enumerate(items)}
        try:
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                bar.update()
        except BaseException:
            client.abort.set()
            for future in futures:
                future.cancel()
            raise
    return results
