"""The bare HTTP baseline of bench/receiver.py: aiohttp on uvloop that reads the body and answers 200.

    python bench/bare_http.py PORT

Same server stack as the receiver (aiohttp, uvloop, no access log), none of its work: the ceiling a
receiver built on aiohttp can approach on this machine.
"""

from __future__ import annotations

import sys

import uvloop
from aiohttp import web

OK = b'{"status":"ok"}'


async def handle(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=OK, content_type="application/json")


def main() -> None:
    app = web.Application(client_max_size=5_242_881)
    app.router.add_post("/{tail:.*}", handle)
    app.router.add_get("/{tail:.*}", handle)
    uvloop.install()
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None, backlog=1024)


if __name__ == "__main__":
    main()
