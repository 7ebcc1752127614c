"""`csearch serve`: the online stage over HTTP (FastAPI) plus a web page, safe under load,
faults and bad input.

Design, in brief (measurements in docs/results/service.md):

- Workers (`pool`): `workers` threads, each owning its own copy of the models (thread
  confinement), so no model has to be thread-safe and every stage, localization included, runs
  in parallel. A copy costs memory once at start (U²-Net-p 4.7 MB, MobileNet 17 MB), not per request.
- Reads never wait: a search reads one immutable `store.snapshot` (`Engine.search` takes one
  per query), so concurrent adds and removes can never show it half an update. Writes (add,
  remove, refresh) are serialised by one mutex in this process (`service.SharedStore`) and by
  the store's flock across processes; each is fsynced before the response, so an acknowledged
  change survives SIGKILL.
- Overload: at most `workers + queue_limit` requests hold a slot (running or queued FIFO); the
  next gets 503 at once, before its upload is read into memory. With the body size limit (413,
  `limits`) this bounds memory to about slots x max_upload_bytes plus the workers' decoded images.
- Paths never leave the server: items are addressed by id, errors are one-line JSON messages
  (`errors`).
- Writes (`auth`): POST /items and DELETE /items/{id} need the API key ($CSEARCH_API_KEY or
  --api-key-file; `Authorization: Bearer KEY` or `X-API-Key: KEY`) when one is set, 401 without
  it; --read-only answers them 403; a host other machines can reach needs one of the two. Reads
  stay open. /docs is the package's own page over /openapi.json (no CDN).
"""

from .app import create_app, run_server

__all__ = ["create_app", "run_server"]
