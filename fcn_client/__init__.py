"""The client package: the Python SDK, the ``fcn-segment`` command line, and the wire names.

``fcn_client.wire`` holds the names both ends of the HTTP API must spell the same way (query
values, headers, form fields); the server imports them from here, so a client never has to
import the server to agree with it. The package needs the standard library and httpx alone:
it never imports torch, numpy or ``service``, so talking to a server stays a light install.
The one exception is ``fcn-segment --local`` (``fcn_client.local``), which runs the server's
own stages in process and is imported only when asked for.
"""
