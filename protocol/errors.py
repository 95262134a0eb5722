"""The protocol layer's own failure: a message that does not follow the Open Inference Protocol.

The codecs are shared by both ends of a call, and the same fault means different things at
each: a server reading a malformed *request* answers the caller "invalid input"
(:func:`cnnserve.gateway.dataplane.caller_input`), while a client reading a malformed *answer*
reports the server's fault (:class:`cnnserve.client.inference.MalformedResponseError`).
So the codecs raise this, and each side maps it.
"""

from __future__ import annotations


class CodecError(ValueError):
    """A tensor or message that cannot be decoded (or encoded); the message names the part."""
