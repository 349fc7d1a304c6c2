"""Remote archive sources: ranged, resumable reads over HTTP(S) (urllib) and S3 (boto3 ``get_object``).

Each source opens the object from a byte offset tied to a validator (If-Range for HTTP, If-Match for S3), so
a resumed download never stitches two versions together, and sorts failures into "try again later"
(:class:`Unreachable`: a cached archive may stand in) and refusals that name the object and the reason.
"""

from __future__ import annotations

import base64
import http.client
import io
import re
import urllib.error
import urllib.request
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import unquote, urlsplit, urlunsplit

from tasks import __version__
from tasks.errors import PersoncarError, TemporaryError, one_line
from tasks.logs import log

if TYPE_CHECKING:
    from tasks.download import _Source

TIMEOUT_S = 60.0


class Unreachable(TemporaryError):
    """No answer from the source (connection, timeout, 5xx, throttling): a cached archive may stand in."""


class Changed(TemporaryError):
    """The object is no longer the one a partial download came from (a new try starts afresh)."""


def http_retryable(status: int) -> bool:
    """Whether an HTTP error status may pass on a retry (timeout, too early, throttling, 5xx)."""
    return status in (408, 425, 429) or status >= 500


class Body(NamedTuple):
    offset: int  # where the body starts in the object
    total: int | None  # the whole object's size
    validator: str | None  # ETag (or Last-Modified)
    stream: Any  # read(n), close()


def _content_range(value: str | None) -> tuple[int, int | None] | None:
    m = re.fullmatch(r"\s*bytes\s+(\d+)-\d+/(\d+|\*)\s*", value or "")
    return (int(m[1]), None if m[2] == "*" else int(m[2])) if m else None


class Http:
    errors = (OSError, http.client.HTTPException)

    def __init__(self, src: _Source):
        parts, self.url, self.display = urlsplit(src.fetch), src.fetch, src.display
        self.headers = {"User-Agent": f"personcar/{__version__}", "Accept-Encoding": "identity"}
        if parts.username is not None:  # urllib does not send URL credentials by itself
            creds = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
            self.headers["Authorization"] = "Basic " + base64.b64encode(creds).decode("ascii")
            self.url = urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))

    def open(self, start: int, validator: str | None, *, probe: bool = False) -> Body:
        headers = dict(self.headers)
        if probe or start:
            headers["Range"] = "bytes=0-0" if probe else f"bytes={start}-"
        if start and validator:
            headers["If-Range"] = validator  # a changed object comes back whole, from byte 0
        try:
            resp = urllib.request.urlopen(urllib.request.Request(self.url, headers=headers), timeout=TIMEOUT_S)
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code == 416 and probe:  # an empty object has no byte 0
                return Body(0, 0, exc.headers.get("ETag"), io.BytesIO())
            if exc.code == 416 and start:
                raise Changed(f"HTTP 416: the server has no byte {start}") from exc
            cls = Unreachable if http_retryable(exc.code) else PersoncarError
            raise cls(f"cannot download {self.display}: HTTP {exc.code} {exc.reason}") from exc
        except urllib.error.URLError as exc:
            raise Unreachable(f"cannot download {self.display}: {one_line(exc.reason)}") from exc
        except self.errors as exc:
            raise Unreachable(f"cannot download {self.display}: {type(exc).__name__}: {one_line(exc)}") from exc
        validator = resp.headers.get("ETag") or resp.headers.get("Last-Modified")
        if resp.status != 206:
            length = resp.headers.get("Content-Length", "").strip()
            return Body(0, int(length) if length.isdigit() else None, validator, resp)
        if (cr := _content_range(resp.headers.get("Content-Range"))) is None:
            resp.close()
            raise PersoncarError(f"cannot download {self.display}: bad Content-Range {resp.headers['Content-Range']!r}")
        return Body(*cr, validator, resp)


class S3:
    def __init__(self, src: _Source, endpoint_url: str | None, key_id: str | None, secret: str | None,
                 token: str | None, region: str | None, anonymous: bool | None, session: Any = None):
        import boto3
        import urllib3
        from botocore import UNSIGNED
        from botocore import exceptions as bx
        from botocore.config import Config

        self.bucket, _, self.key = src.uri[5:].partition("/")
        self.display, self.bx, self.errors = src.display, bx, (OSError, bx.BotoCoreError, urllib3.exceptions.HTTPError)
        if bool(key_id) != bool(secret) or (anonymous and key_id):
            raise PersoncarError("give both aws_access_key_id and aws_secret_access_key or neither, and neither "
                                 "with anonymous access")
        try:
            session = session or boto3.session.Session(key_id or None, secret or None, token or None, region or None)
            creds = None if anonymous else session.get_credentials()
            if anonymous is False and creds is None:
                raise PersoncarError(f"no AWS credentials found for {src.display} and anonymous access is disabled; "
                                     "set an AWS connection or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY")
            self.anonymous = creds is None
            log.info("S3 access to %s: %s", src.display, "anonymous (unsigned requests)" if self.anonymous
                     else f"signed (credentials from {getattr(creds, 'method', 'unknown')})")
            config = Config(retries={"total_max_attempts": 1}, connect_timeout=20, read_timeout=TIMEOUT_S,
                            **({"signature_version": UNSIGNED} if self.anonymous else {}))
            self.client = session.client("s3", endpoint_url=endpoint_url or None, config=config)
        except (bx.BotoCoreError, ValueError) as exc:
            raise PersoncarError(f"cannot set up S3 access for {src.display}: {one_line(exc)}") from exc

    def open(self, start: int, validator: str | None, *, probe: bool = False) -> Body:
        kw: dict[str, Any] = {"Bucket": self.bucket, "Key": self.key}
        if probe or start:
            kw["Range"] = "bytes=0-0" if probe else f"bytes={start}-"
        if start and validator:
            kw["IfMatch"] = validator  # a changed object: 412, and the caller starts from byte 0
        try:
            r = self.client.get_object(**kw)
        except self.bx.ClientError as exc:
            err, meta = exc.response.get("Error") or {}, exc.response.get("ResponseMetadata") or {}
            code, status = str(err.get("Code", "")), int(meta.get("HTTPStatusCode") or 0)
            if probe and (code == "InvalidRange" or status == 416):  # an empty object has no byte 0
                return Body(0, 0, None, io.BytesIO())
            raise self._refusal(code, status, one_line(err.get("Message") or ""), start) from exc
        except self.bx.BotoCoreError as exc:
            network = isinstance(exc, (self.bx.ConnectionError, self.bx.HTTPClientError))
            raise (Unreachable if network else PersoncarError)(
                f"cannot download {self.display}: {type(exc).__name__}: {one_line(exc)}") from exc
        return Body(*(_content_range(r.get("ContentRange")) or (0, r.get("ContentLength"))), r.get("ETag"), r["Body"])

    def _refusal(self, code: str, status: int, msg: str, start: int) -> PersoncarError:
        detail = ": ".join(x for x in (code or str(status), msg) if x)
        if code == "NoSuchBucket":
            return PersoncarError(f"cannot download {self.display}: bucket '{self.bucket}' does not exist")
        if code in ("NoSuchKey", "NotFound") or status == 404:
            return PersoncarError(f"cannot download {self.display}: no object '{self.key}' in bucket '{self.bucket}'")
        if start and (code in ("PreconditionFailed", "InvalidRange") or status in (412, 416)):
            return Changed("the S3 object changed since the partial download (ETag differs)")
        if status == 403 or code in ("AccessDenied", "AllAccessDisabled"):
            how = ("an anonymous (unsigned) request; give credentials (an AWS connection or AWS_ACCESS_KEY_ID/"
                   "AWS_SECRET_ACCESS_KEY) for a private object") if self.anonymous else \
                f"the given credentials (S3 {detail})"
            return PersoncarError(f"access denied to {self.display} with {how}")
        cls = Unreachable if status >= 500 or code in ("SlowDown", "Throttling", "RequestTimeout") else PersoncarError
        return cls(f"cannot download {self.display}: S3 {detail}")
