"""The `csearch` command: index | add | list | remove | optimize | query | serve | export | models | demo.

Only machine-readable output goes to stdout (`--json`); logs, progress bars and the models' own
chatter go to stderr. Every user error ends in one line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Optional

from .commands import (
    cmd_add,
    cmd_demo,
    cmd_export,
    cmd_index,
    cmd_list,
    cmd_models,
    cmd_models_fetch,
    cmd_optimize,
    cmd_query,
    cmd_remove,
    cmd_serve,
)
from .console import (
    add_model_flags,
    quiet_frameworks,
    run_command,
)
from .errors import CSearchError

log = logging.getLogger("csearch")

EPILOG = "Settings: built-in defaults < --config FILE < --set KEY=VALUE < explicit flags (every key: docs/config.md)."


def build_parser() -> argparse.ArgumentParser:
    from .config import allowed_values

    parser = argparse.ArgumentParser(
        prog="csearch",
        description="Find the same product in a catalogue from one photo. By default a query localizes the "
        "object (U²-Net-p), embeds its cut-out and the whole photo, searches only the predicted category when "
        "the index has a classifier, and ranks by exact KNN. Every setting and its default: docs/config.md.",
        epilog="Start with `csearch demo`; `csearch COMMAND --help` describes each command. " + EPILOG,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "index",
        help="offline stage: index a catalogue",
        epilog=EPILOG,
        description="Localize every catalogue image, extract its feature vector and mask, "
        "and store them with category and product in INDEX_DIR. Work is committed every 256 images "
        "or 30 s, so an interrupted run resumes when rerun with the same CATALOGUE and --out; another "
        "catalogue at an existing --out is refused (use `csearch add`). Images that cannot be read are "
        "skipped and listed in INDEX_DIR/failures.txt (path TAB reason).",
    )
    p.add_argument(
        "catalogue",
        metavar="CATALOGUE",
        help="folder ROOT/<category>/[<product>/]<image>, a CSV "
        "manifest (path,category,product) or a Grocery Store list file (see data_README.md)",
    )
    p.add_argument("--out", required=True, metavar="INDEX_DIR", help="index directory to create (or resume)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing index at --out")
    p.add_argument(
        "--store",
        metavar="STORE",
        help="where the items live (config store.uri): local (default: files in INDEX_DIR), milvus-lite:PATH "
        "(a Milvus Lite .db, relative to INDEX_DIR unless absolute) or milvus://HOST:PORT/COLLECTION (a Milvus "
        "server; credentials from $CSEARCH_MILVUS_TOKEN or $CSEARCH_MILVUS_TOKEN_FILE). Milvus needs "
        '`pip install -e ".[milvus]"`; later commands on INDEX_DIR use the store it was built with',
    )
    p.add_argument(
        "--workers",
        type=int,
        default=2,
        help="threads decoding and localizing (default 2); with --ray, the localizer actors (embedding gets half "
        "as many, classifying a quarter, at least one each)",
    )
    p.add_argument(
        "--ray",
        nargs="?",
        const="local",
        metavar="ADDRESS",
        help="run decode, localize, classify and embed as a Ray Data pipeline (one actor pool per model; needs "
        '`pip install -e ".[ray]"`): --ray alone starts a private local Ray for this run; --ray HOST:PORT (the '
        "head node's address), ray://HOST:PORT or auto joins that cluster, whose nodes must see the images and "
        "model files at the same paths. This process writes the index and commits as without --ray, so a rerun "
        "resumes. Without --ray: one process (the fast default on one machine)",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="exit with an error (code 2) if any image could not be indexed; the others are still "
        "indexed, and a rerun after fixing the files indexes only those",
    )
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    add_model_flags(p)
    p.set_defaults(func=cmd_index)

    p = sub.add_parser(
        "list",
        help="list the items of an index (id, product, category, path)",
        description="One row per item of INDEX_DIR: the id that `csearch remove` and DELETE /items/ID take, "
        "its product, category and image path. Loads no model.",
    )
    p.add_argument("index", metavar="INDEX_DIR", help="an index made by `csearch index`")
    p.add_argument("--json", action="store_true", help='print exactly one JSON object: {"items": [...], "count": N}')
    p.set_defaults(func=cmd_list)

    p = sub.add_parser(
        "add",
        help="add catalogue images to an existing index (no rebuild)",
        description="Index the images of CATALOGUE that INDEX_DIR does not hold yet, with the models and "
        "settings the index was built with, and add them. Images already in the index are skipped.",
    )
    p.add_argument("index", metavar="INDEX_DIR", help="an index built by `csearch index`")
    p.add_argument("catalogue", metavar="CATALOGUE", help="images to add, in any form `csearch index` reads")
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    p.set_defaults(func=cmd_add)

    p = sub.add_parser(
        "remove",
        help="remove items from an index by id",
        description="Remove items from INDEX_DIR by id (the ids that `csearch list` and query results show). "
        "Loads no model.",
    )
    p.add_argument("index", metavar="INDEX_DIR", help="an index built by `csearch index`")
    p.add_argument("ids", metavar="ID", nargs="+", type=int, help="item ids to remove")
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    p.set_defaults(func=cmd_remove)

    p = sub.add_parser(
        "optimize",
        help="build the approximate-search (ANN) index of an index",
        description="Build INDEX_DIR's FAISS ANN index (store.ann: hnsw or ivf) over its current items, so that "
        "searches not restricted to a category rank only its candidates (and the items added since) exactly. "
        "Rerun it after many adds or removes: results stay complete and removed items never come back, but "
        "added items are searched exactly until then. Category-restricted searches always stay exact. An "
        "interrupted run leaves the index as it was. Loads no model.",
    )
    p.add_argument("index", metavar="INDEX_DIR", help="an index built by `csearch index`")
    p.add_argument(
        "--ann",
        choices=allowed_values("store.ann"),
        help="the kind to build, recorded as the index's store.ann (default: the recorded store.ann); none deletes it",
    )
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    p.set_defaults(func=cmd_optimize)

    p = sub.add_parser(
        "query",
        help="online stage: find the catalogue items matching a photo",
        description="Uses the models the index recorded (no model flags needed), found by name and sha256 at "
        "their recorded place, in INDEX_DIR/models or in $CSEARCH_HOME, so an index and its models can move.",
    )
    p.add_argument("index", metavar="INDEX_DIR", help="an index made by `csearch index`")
    p.add_argument("image", metavar="IMAGE", help="the photo to search with (any format Pillow reads)")
    p.add_argument("-k", type=int, help="number of results, 1 to 100 (default: the index's search.k, 5)")
    p.add_argument("--category", help="search this category (one the index holds) instead of the predicted one")
    p.add_argument(
        "--restrict",
        choices=["on", "off"],
        help="restrict to the predicted category (needs an index built with --classifier)",
    )
    p.add_argument(
        "--rerank",
        choices=allowed_values("search.rerank"),
        help="re-rank the top candidates by mask IoU (the paper: iou; default none: it did not help here)",
    )
    p.add_argument("--rerank-top", type=int, help="how many KNN candidates to re-rank, 1 to 1000 (default 10)")
    p.add_argument(
        "--set",
        metavar="search.KEY=VALUE",
        action="append",
        help="override a search setting (only search.* keys: the rest is fixed by the index)",
    )
    p.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    p.set_defaults(func=cmd_query)

    p = sub.add_parser(
        "serve",
        help="HTTP API and web page for the online stage",
        description="Serve INDEX_DIR over HTTP: the web page at /, the API docs at /docs (no CDN needed). "
        "Searches and reads are open; adding and removing items (POST /items, DELETE /items/ID) need the "
        "API key from $CSEARCH_API_KEY or --api-key-file, sent as 'Authorization: Bearer KEY' or "
        "'X-API-Key: KEY'. Without a key, writes are open on a loopback --host only.",
    )
    p.add_argument("index", metavar="INDEX_DIR", help="the index to serve (made by csearch index)")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1); any other than localhost/127.0.0.1/::1 needs an API key "
        "or --read-only",
    )
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    p.add_argument(
        "--api-key-file",
        metavar="FILE",
        help="file holding the API key that writes need (overrides $CSEARCH_API_KEY; never pass a key itself "
        "on the command line)",
    )
    p.add_argument("--read-only", action="store_true", help="refuse every write with 403 (no API key needed)")
    p.add_argument("--workers", type=int, default=2, help="search workers, each with its own model copies (default 2)")
    p.add_argument(
        "--queue-limit",
        type=int,
        default=32,
        help="requests that may wait for a worker before new ones get 503 (default 32)",
    )
    p.add_argument(
        "--max-upload-mb", type=float, default=10.0, metavar="MIB", help="upload size limit in MiB (default 10)"
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "export",
        help="export a classifier RUN_DIR or a registered extractor to ONNX",
        description="Convert a Keras model to ONNX, run both on the same input and report the largest "
        "difference. A classifier RUN_DIR gets RUN_DIR/model.onnx, which ONNX Runtime then runs instead of Keras "
        "(in indexes built after the export); a registered Keras extractor (e.g. mobilenet) becomes an .onnx file "
        "that --extractor accepts.",
    )
    p.add_argument(
        "target",
        metavar="RUN_DIR|EXTRACTOR",
        help="a RUN_DIR of `python -m csearch.train classifier`, or a registered Keras extractor (`csearch models`)",
    )
    p.add_argument("--format", choices=["onnx"], default="onnx", help="output format (default onnx)")
    p.add_argument(
        "--weights",
        default="imagenet",
        metavar="imagenet|PATH",
        help="weights of a registered extractor (default imagenet, looked up in $CSEARCH_HOME)",
    )
    p.add_argument("--out", metavar="FILE", help="output file of an extractor export (default EXTRACTOR.onnx)")
    p.add_argument("--json", action="store_true", help="print the file and the difference as JSON on stdout")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "models",
        help="list the registered models, or fetch their files (`csearch models fetch`)",
        description="`csearch models` (or `csearch models list`) lists every registered model, whether its file "
        "was found and, if not, the command that gets it. `csearch models fetch` gets model files into "
        "$CSEARCH_HOME (default ~/.cache/csearch); nothing else in csearch downloads.",
    )
    p.add_argument("--json", action="store_true", help="print the list as JSON on stdout")
    p.set_defaults(func=cmd_models)
    actions = p.add_subparsers(dest="models_action", metavar="ACTION")
    q = actions.add_parser(
        "list",
        help="list the models and where their files are (the default)",
        description="Every registered model: its role, the weights file it needs, whether that file was found "
        "(and where), and where a missing one comes from (`csearch models fetch NAME`).",
    )
    q.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print the list as JSON on stdout")
    q = actions.add_parser(
        "fetch",
        help="download (or copy, with --from) model files into $CSEARCH_HOME",
        description="Get each model's file from its official source into $CSEARCH_HOME, with a progress bar, "
        "checked against the sha256 (or the publisher's md5) pinned in the registry; written atomically, and "
        "an interrupted download resumes when rerun. efficientnet_lite0 has no ready-made file: it is built from "
        "Google's official EfficientNet-Lite0 release (TFLite, converted with tf2onnx) and checked by its outputs "
        "against the TFLite model; its sha256 is recorded in FILE.json. Files already in place are kept.",
    )
    q.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help="registered models (`csearch models`); default: the models of the default config",
    )
    q.add_argument(
        "--from",
        dest="source",
        metavar="DIR|URL",
        help="copy from a local folder (or download from an http(s) mirror) holding the same file names, instead "
        "of the official URLs; still checked (default: $CSEARCH_MODEL_MIRROR)",
    )
    q.add_argument("--force", action="store_true", help="fetch again even when the file is already there")
    q.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="print what was fetched as JSON on stdout"
    )
    q.set_defaults(func=cmd_models_fetch)

    p = sub.add_parser(
        "demo",
        help="generate a small demo catalogue, index it and run a few queries",
        description="Draw 18 catalogue images of 9 look-alike products, index them with the default models "
        "(or the model flags below), then search with 9 photo-like variants and show whether each found its "
        "product. Then it trains a product embedding on the demo catalogue (under a minute) and shows what "
        "it changes. Needs the default models' weights in $CSEARCH_HOME (`csearch models`).",
    )
    p.add_argument(
        "--out",
        metavar="DIR",
        help="folder for the demo catalogue, queries and index (default: a new temporary folder, kept and printed)",
    )
    p.add_argument(
        "--no-embedder", action="store_true", help="skip training the demo's product embedding (saves ~30 s)"
    )
    add_model_flags(p)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    quiet_frameworks()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except CSearchError as exc:
        parser.error(str(exc))
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.verbose:
        logging.getLogger().setLevel(logging.DEBUG)
    return run_command(args.func, args, "what was committed is safe (rerun `csearch index` to resume)")


if __name__ == "__main__":
    sys.exit(main())
