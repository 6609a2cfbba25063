"""The HTTP floor: the smallest aiohttp handler that reads a JSON body and answers 201, in a
process of its own. What the same load generator reaches against it bounds any aiohttp API.

    python -m bench.floor --port 8790
"""

from __future__ import annotations

import argparse

from aiohttp import web


async def handle(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(status=201, body=b'{"status":"accepted"}', content_type="application/json")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args()
    app = web.Application()
    app.router.add_post("/", handle)
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
