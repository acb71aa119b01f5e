"""Ranged GETs of one object, each range's body handed over chunk by chunk as it
arrives (``read_range``), on any fsspec filesystem.

On S3 two paths send the same GET. The reference path calls the client's
``get_object``. The presigned path (``storage.direct_ranges``, the default) asks
the same client for a presigned URL and sends it over the client's own HTTP
session. On loopback botocore's per-request work (events, user agent, endpoint
rules, header signing, parsing the answer) costs ~1.9 client CPU-ms; a presigned
GET costs ~0.75. That is ~0.15 CPU-ms per MiB at 8 MiB ranges, paid for every
byte a node reads.

The presigned path keeps what a user configured on the client: credentials
(session tokens travel in the URL), region, endpoint and addressing style, FIPS
and dual-stack endpoints, connection pool, TLS, proxies and timeouts. Two
handlers on the client keep its URLs where its own calls go: SigV4 (botocore
would presign SigV2 in older AWS regions, which buckets made since 2020 refuse),
and the client's regional endpoint, not the global one botocore presigns for.
Anything it cannot do the same way goes through the client: requester pays and
other per-request parameters, access-point ARNs, S3 Express buckets, and
redirects (301, 307, and the 400 of a bucket in another region: the client
follows them). botocore signs a presigned URL for the client's own region even
where it knows the bucket's is another, so after a 301 or such a 400 the bucket's
ranges keep going through that client (with the bucket's region set in
``client_kwargs.region_name``, or s3fs's ``cache_regions: true``, which gives each
region its client, the URLs work). Other 400s (a timed-out request, an expired
token) are the client's errors, as on the reference path. Presigned GETs send
the client's User-Agent. The handlers also apply to URLs the same client
presigns for ``fs.url()`` or ``fs.sign()``.
An error answer becomes the exception the client raises (``s3fs.errors``), so the
retry policy treats both paths alike; one that names no S3 error code (a proxy's
HTML page) is read by its HTTP status on both paths. The URL holds a signature:
errors raised here carry the URL without its query, in their message, their
fields and their context.
"""

from __future__ import annotations

import asyncio
import errno
import html
import http.client
import logging
import re
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

import fsspec
from fsspec.asyn import sync

from pipeline.storage.objects import MIN_TRANSFER_BYTES_PER_S

log = logging.getLogger(__name__)
STREAM_CHUNK = 1 << 20  # the most one read takes where the client cannot hand over its own chunks
PRESIGN_S = 3600  # a presigned URL's life; each attempt signs its own and sends it at once
ERROR_BODY_LIMIT = 64 * 1024  # the most of an error answer read for its Code and Message
# A bucket in another region than the client's answers 301, or 400 with one of
# these codes (or its region in a header); 307 is S3's while a new bucket's DNS
# spreads. The client follows all of them.
REGION_ERRORS = {"PermanentRedirect", "AuthorizationHeaderMalformed", "AuthorizationQueryParametersError"}
_ERROR_FIELD = re.compile(rb"<(Code|Message)>([^<]*)</\1>")
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/")
# a presigned URL's query (SigV4's X-Amz-*, SigV2's AWSAccessKeyId and Signature), up to a quote or space
_SIGNED_QUERY = re.compile(r"\?[^\s'\"<>]*(?:X-Amz-|AWSAccessKeyId=|Signature=)[^\s'\"<>]*", re.IGNORECASE)
_HEADERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # client -> what its presigned GETs send
_REDIRECTED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # client -> buckets it reads itself

Put = Callable[[int, bytes], None]


def read_range(fs: fsspec.AbstractFileSystem, path: str, start: int, end: int, put: Put,
               limit_s: float | None = None, direct: bool = True) -> int:
    """Bytes ``[start, end)`` of an object, handed to ``put(offset, chunk)`` as they
    arrive: on S3 the response body's own chunks, so no buffer of the whole range is
    allocated (page faults, zeroing) and none is joined (a copy of every byte): on
    loopback that is ~1/3 of a fetch's CPU. Elsewhere one ``cat_file``. On S3
    ``direct`` sends a presigned GET (see the module's docstring).

    Returns how many bytes the server answered with; compare it with ``end - start``.
    Nothing past ``end`` is handed over: an answer longer than asked (a server that
    ignores ranges), or one whose ``Content-Range`` names other bytes than asked,
    stops the read and returns ``end - start + 1``. An answer that
    announces fewer bytes than asked returns that number without reading them (the
    object is shorter); a body that ends short of the range without saying so raises
    ConnectionError (a cut connection: worth a retry). On S3, an answer still
    arriving after ``limit_s`` is cancelled (no chunk is handed over after this
    returns) and raises ConnectionError; the client's own timeouts (a read timeout,
    S3's RequestTimeout) raise as they are."""
    if getattr(fs, "async_impl", False) and hasattr(fs, "_call_s3"):
        ranged = _presigned_range if direct and not _needs_the_client(fs) else _client_range
        return sync(fs.loop, _range_within, limit_s, ranged, fs, path, start, end, put)
    data = fs.cat_file(path, start=start, end=end)
    if data and len(data) <= end - start:
        put(start, data)
    return min(len(data), end - start + 1)


async def _range_within(limit_s: float | None, ranged: Callable[..., Awaitable[int]], fs: Any, path: str,
                        start: int, end: int, put: Put) -> int:
    began = asyncio.get_running_loop().time()
    try:  # cancelled inside the loop, and waited for: nothing of it runs on beside a retry
        return await asyncio.wait_for(ranged(fs, path, start, end, put), limit_s)
    except asyncio.TimeoutError:
        if limit_s is None or asyncio.get_running_loop().time() - began < limit_s:
            raise  # a timeout of the transfer itself, not this limit
        raise ConnectionError(f"bytes {start}-{end} still arriving after {limit_s:.0f} s (a stalled transfer: "
                              f"less than {MIN_TRANSFER_BYTES_PER_S // 2**20} MiB/s after the timeouts)") from None


async def _client_range(fs: Any, path: str, start: int, end: int, put: Put) -> int:
    """One ranged GET through the S3 client (``get_object``): the reference path."""
    from botocore.exceptions import BotoCoreError

    bucket, key, version = fs.split_path(path)
    try:
        resp = await fs._call_s3("get_object", Bucket=bucket, Key=key, Range=f"bytes={start}-{end - 1}",
                                 **({"VersionId": version} if version else {}))
    except BotoCoreError as e:  # the aiohttp error it wraps holds the request's headers: the session token
        error = _unsigned(e)
    except OSError as e:
        error = _by_status(e)
        if error is e:
            raise
    else:
        error = None
    if error is not None:
        raise error
    body = resp["Body"]
    try:
        content = getattr(getattr(body, "_raw_stream", None), "content", None)  # aiohttp's stream, when it is one
        if content is not None and hasattr(content, "readany"):
            read = content.readany  # one received chunk as it is: no copy
        else:
            async def read() -> bytes:
                return await body.read(STREAM_CHUNK)
        if not _answers(resp.get("ContentRange"), start, end):
            return end - start + 1
        return await _deliver(resp.get("ContentLength"), read, start, end, put)
    finally:
        body.close()


def _by_status(error: OSError) -> OSError:
    """s3fs's error for an answer that named no S3 error code (a proxy's HTML page:
    an OSError EIO, which would be retried whatever its status) read by its HTTP
    status instead, as the presigned path reads it: a 403 is then access denied."""
    response = getattr(error.__cause__, "response", None)
    if error.errno != errno.EIO or not isinstance(response, dict) or response.get("Error", {}).get("Code"):
        return error
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return _client_error(status, response.get("Error", {})) if isinstance(status, int) else error


def _answers(content_range: object, start: int, end: int) -> bool:
    """False when the answer's ``Content-Range`` names bytes outside ``[start, end)``
    or not from ``start`` (fewer, to the object's end, is a shorter object: the
    body's length decides, as it does where the header is absent)."""
    named = _CONTENT_RANGE.match(content_range) if isinstance(content_range, str) else None
    return named is None or (int(named[1]) == start and int(named[2]) < end)


def _needs_the_client(fs: Any) -> bool:
    """Options that add parameters to each request (requester pays, SSE-C keys):
    the client knows how to send them."""
    return bool(getattr(fs, "req_kw", None) or getattr(fs, "s3_additional_kwargs", None))


def _for_the_client(bucket: str) -> bool:
    """Buckets whose requests the client signs in ways a presigned URL does not
    carry the same: access-point and Multi-Region ARNs (SigV4a), S3 Express."""
    return bucket.startswith("arn:") or bucket.endswith("--x-s3")


async def _client_for(fs: Any, bucket: str) -> Any:
    await fs.set_session()
    return await fs.get_s3(bucket)


async def presigned_range_url(fs: Any, bucket: str, key: str, version: str | None = None) -> str:
    """A GET URL that ``fs``'s client for ``bucket`` presigned for ``key``."""
    return await _presign(await _client_for(fs, bucket), bucket, key, version)


async def _presign(s3: Any, bucket: str, key: str, version: str | None) -> str:
    """A GET URL the client ``s3`` presigned for ``key``, valid ``PRESIGN_S``
    seconds, any range."""
    _headers_of(s3)
    return await s3.generate_presigned_url("get_object", ExpiresIn=PRESIGN_S, Params={
        "Bucket": bucket, "Key": key, **({"VersionId": version} if version else {})})


def _headers_of(s3: Any) -> dict[str, str]:
    """The headers every presigned GET of client ``s3`` sends besides its range: the
    client's own User-Agent (S3's access logs and request metrics, and policies
    that match on it, see the same caller either way). The first call also puts
    the two presigning handlers on the client."""
    if s3 not in _HEADERS:
        events = s3.meta.events
        events.register_first("choose-signer.s3.GetObject", _sigv4_presign, unique_id="maescale-sigv4-presign")
        events.register_first("before-endpoint-resolution.s3", _regional_presign,
                              unique_id="maescale-regional-presign")
        agent = getattr(s3, "_user_agent_creator", None)  # botocore builds the header from it per call
        _HEADERS[s3] = {"User-Agent": agent.to_string()} if agent is not None else {}
    return _HEADERS[s3]


def _sigv4_presign(signature_version: str, **kwargs: Any) -> str | None:
    """SigV4 for presigned URLs of a client left at its default, where botocore
    would pick SigV2 (older AWS regions); a version the user set is kept."""
    return "s3v4-query" if signature_version in ("v4-query", "s3v4-query") else None


def _regional_presign(context: dict, **kwargs: Any) -> None:
    """A presigned URL resolves its endpoint as the client's own calls do (botocore
    would use the global ``s3.amazonaws.com``, which bypasses FIPS hosts and
    private endpoints that a network may require)."""
    if context.get("is_presign_request"):
        context["use_global_endpoint"] = False


async def _presigned_range(fs: Any, path: str, start: int, end: int, put: Put) -> int:
    """The GET of ``_client_range``, presigned by the same client and sent over its
    HTTP session (see the module's docstring)."""
    from botocore.awsrequest import AWSPreparedRequest
    from botocore.exceptions import BotoCoreError

    bucket, key, version = fs.split_path(path)
    if _for_the_client(bucket):
        return await _client_range(fs, path, start, end, put)
    s3 = await _client_for(fs, bucket)
    session = getattr(getattr(s3, "_endpoint", None), "http_session", None)
    if session is None or not hasattr(session, "send") or bucket in _REDIRECTED.get(s3, ()):
        return await _client_range(fs, path, start, end, put)  # a client built some other way, or a redirect
    url = await _presign(s3, bucket, key, version)
    try:
        headers = {**_headers_of(s3), "Range": f"bytes={start}-{end - 1}"}
        resp = await session.send(AWSPreparedRequest("GET", url, headers, None, True))
    except BotoCoreError as e:  # connection and HTTP errors: their message and fields hold the signed URL
        error = _unsigned(e, url)
    else:
        error = None
    if error is not None:
        raise error  # raised here, not in the except: its context would hold the signed URL
    raw = resp.raw
    try:
        status = resp.status_code
        if status not in (200, 206):
            fields = await _error_fields(raw)
            moved_to = resp.headers.get("x-amz-bucket-region")
            if status in (301, 307) or (status == 400 and (fields.get("Code") in REGION_ERRORS or (
                    moved_to and moved_to != s3.meta.region_name))):
                raw.close()
                if status != 307:
                    _remember_redirect(s3, bucket, status, fields.get("Code"))
                return await _client_range(fs, path, start, end, put)
            raise _client_error(status, fields)
        if not _answers(resp.headers.get("content-range"), start, end):
            return end - start + 1
        length = resp.headers.get("content-length", "")
        return await _deliver(int(length) if length.isdigit() else None, raw.content.readany, start, end, put)
    finally:
        raw.close()


def _unsigned(error: Exception, url: str = "") -> Exception:
    """``error`` (botocore's, from sending a GET) rebuilt from the text of its
    fields, a presigned URL's query cut: the message of a connection error, or of
    the aiohttp error an HTTP client error wraps, holds the signed URL (signature,
    credential, session token), and that aiohttp error holds the request's
    headers. ``url``: the presigned URL sent, cut wherever it appears as it is."""
    def cut(value: object) -> object:
        if isinstance(value, BaseException):
            value = str(value)
        if not isinstance(value, str):
            return value
        return _SIGNED_QUERY.sub("", value.replace(url, url.split("?")[0]) if url else value)

    try:
        return type(error)(**{name: cut(value) for name, value in getattr(error, "kwargs", {}).items()})
    except Exception:  # a kind built some other way
        return ConnectionError(cut(str(error)))


def _remember_redirect(s3: Any, bucket: str, status: int, code: str | None) -> None:
    """From now on this client reads ``bucket`` itself: botocore would sign its
    URLs for the client's region again."""
    if bucket not in _REDIRECTED.setdefault(s3, set()):
        _REDIRECTED[s3].add(bucket)
        log.info("s3://%s answered a presigned GET with HTTP %d %s (the bucket is in another region than the "
                 "client's %s): its ranges go through the S3 client from now on; set the storage option "
                 "client_kwargs.region_name to the bucket's region (or cache_regions: true) for presigned GETs",
                 bucket, status, code or "", s3.meta.region_name)


async def _error_fields(raw: Any) -> dict[str, str]:
    """``Code`` and ``Message`` of an error answer, from at most ``ERROR_BODY_LIMIT``
    bytes of its body."""
    body = b""
    while len(body) < ERROR_BODY_LIMIT and (chunk := await raw.content.read(ERROR_BODY_LIMIT - len(body))):
        body += chunk
    return {k.decode(): html.unescape(v.decode("utf-8", "replace")) for k, v in _ERROR_FIELD.findall(body)}


def _client_error(status: int, fields: dict[str, str]) -> Exception:
    """The exception the S3 client raises for this error answer: from its ``Code``,
    else from the status."""
    from botocore.exceptions import ClientError
    from s3fs.errors import translate_boto_error

    error = ClientError({"Error": {"Code": fields.get("Code") or str(status),
                                   "Message": fields.get("Message") or http.client.responses.get(status, "")},
                         "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")
    return translate_boto_error(error)


async def _deliver(announced: object, read: Callable[[], Awaitable[bytes]], start: int, end: int, put: Put) -> int:
    """A ranged answer's body handed to ``put`` chunk by chunk (``read_range``'s contract)."""
    if isinstance(announced, int) and announced != end - start:
        return min(announced, end - start + 1)
    pos = start
    while chunk := await read():
        if len(chunk) > end - pos:
            return end - start + 1
        put(pos, chunk)
        pos += len(chunk)
    if pos < end:
        raise ConnectionError(f"the body ended after {pos - start} of the {end - start} bytes asked")
    return end - start
