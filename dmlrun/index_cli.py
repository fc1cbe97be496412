"""``dmlrun-index``: build an index of images with a trained run, add to it, search it.

torch is imported inside the commands, deliberately: ``--help`` and argument errors
answer at once.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dmlrun.errors import UserError, run_command

EXAMPLES = """examples:
  dmlrun-index build outputs/2026-12-06/10-00-00 dataset=mnist split=test --out mnist-test
  dmlrun-index build outputs/2026-12-06/10-00-00 ~/photos --out photos --kind hnsw
  dmlrun-index add photos ~/more-photos
  dmlrun-index search photos query.jpg -k 5 --html neighbours.html
  dmlrun-index search mnist-test item:17 item:42 --json
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dmlrun-index", epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Embed a folder of images (or a dataset split) with a trained dmlrun "
                    "model and search it by image.")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="embed a source into a new index folder")
    b.add_argument("run", help="a run folder (best.pt, else last.pt) or a checkpoint file")
    _source_args(b)
    b.add_argument("--out", required=True, help="the index folder to create (must not exist)")
    b.add_argument("--kind", default="exact", choices=("exact", "ivf", "hnsw"),
                   help="exact search (default), or an approximate faiss index whose recall "
                        "and speed-up against exact search are measured and printed")
    b.add_argument("--nlist", type=int, help="ivf: cells (default about 4 sqrt(N))")
    b.add_argument("--nprobe", type=int, default=16, help="ivf: cells searched (16)")
    b.add_argument("--ef-search", type=int, default=64, help="hnsw: candidates kept (64)")
    a = sub.add_parser("add", help="embed more images into an existing index")
    a.add_argument("index", help="an index folder")
    _source_args(a)
    a.add_argument("--run", help="check that the index was built with this run's model")
    s = sub.add_parser("search", help="the nearest indexed images of query images")
    s.add_argument("index", help="an index folder")
    s.add_argument("queries", nargs="+",
                   help="image files, or item:N for the index's own item N (left out of its "
                        "own results)")
    s.add_argument("-k", type=int, default=10, help="neighbours per query (10)")
    s.add_argument("--json", action="store_true", help="print the results as JSON")
    s.add_argument("--html", help="also write a self-contained page of each query with its "
                                  "neighbours (a new file)")
    s.add_argument("--run", help="check that the index was built with this run's model")
    for cmd in (b, a, s):
        cmd.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    return p


def _source_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", nargs="+",
                   help="an image folder (any depth), or dataset settings such as "
                        "dataset=mnist split=test (split: test, val, train or all)")
    p.add_argument("--labels", action="store_true",
                   help="folder source: label each image by its first-level sub-folder")


def _source(args, run) -> object:
    from dmlrun.sources import parse_source

    return parse_source(args.source, run.config, run.image_size, run.channels, args.labels)


def build(args) -> int:
    from dmlrun.embedder import RunEmbedding
    from dmlrun.index import Index

    run = RunEmbedding(args.run, args.device)
    options = {"nlist": args.nlist, "nprobe": args.nprobe} if args.kind == "ivf" else \
        {"ef_search": args.ef_search} if args.kind == "hnsw" else {}
    index = Index.build(run, _source(args, run), args.out, args.kind, **options)
    _report_built(index, "built")
    return 0


def add(args) -> int:
    from dmlrun.index import Index

    index = Index.load(args.index, args.run, args.device)
    added = index.add(_source(args, index.run()))
    _report_built(index, f"added {added} images to")
    return 0


def _report_built(index, what: str) -> None:
    meta = index.meta
    print(f"{what} {index.folder}: {meta['count']} images, {meta['dim']}-D, "
          f"{meta['distance']['name']} distance, {meta['kind']} search")
    if meta["skipped_count"]:
        names = ", ".join(s["name"] for s in meta["skipped"][:5])
        print(f"skipped {meta['skipped_count']} unreadable images (e.g. {names}; all named "
              f"in index.json, up to 50)")
    if "ann" in meta:
        a = meta["ann"]
        print(f"{meta['kind']}: recall@{a['k']} {a['recall_at_k']:.4f} of exact search on "
              f"{a['sample']} items, {a['speedup']:.1f}x its speed ({a['approx_s']:.3f} s "
              f"against {a['exact_s']:.3f} s)")


def search(args) -> int:
    import torch

    from dmlrun.index import Index

    index = Index.load(args.index, args.run, args.device)
    items = [q for q in args.queries if q.startswith("item:")]
    files = [q for q in args.queries if not q.startswith("item:")]
    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        raise UserError(f"no such query file: {', '.join(missing)}")
    if args.html and Path(args.html).exists():
        raise UserError(f"{args.html} exists; refusing to overwrite it")
    try:
        ids = [int(q.split(":", 1)[1]) for q in items]
    except ValueError as exc:
        raise UserError(f"item:N needs a number, got {items}") from exc
    results = []
    if files:
        hits = index.search_files(files, args.k)
        results += _rows(files, hits, None)
    if ids:
        hits = index.search_items(torch.tensor(ids), args.k)
        results += _rows([f"item:{i} ({index.names[i]})" for i in ids], hits, ids)
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        _print_table(results)
    if args.html:
        from dmlrun.pages import write_search_page

        write_search_page(index, results, files, Path(args.html))
        print(f"page: {args.html}")
    return 0


def _rows(queries: list[str], hits, items: list[int] | None) -> list[dict]:
    out = []
    for q, (qi, idx, dist, names) in enumerate(zip(
            queries, hits.indices.tolist(), hits.distances.tolist(), hits.names, strict=True)):
        row = {"query": qi, "neighbours": [
            {"rank": r + 1, "item": i, "name": n, "distance": round(d, 6)}
            for r, (i, d, n) in enumerate(zip(idx, dist, names, strict=True))]}
        if hits.labels is not None:
            for nb, label in zip(row["neighbours"], hits.labels[q].tolist(), strict=True):
                nb["label"] = label
        if items is not None:
            row["item"] = items[q]
        out.append(row)
    return out


def _print_table(results: list[dict]) -> None:
    for row in results:
        print(f"query {row['query']}")
        for nb in row["neighbours"]:
            label = f"  label {nb['label']}" if "label" in nb else ""
            print(f"  {nb['rank']:>3}  {nb['distance']:>10.4f}  {nb['name']}{label}")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    commands = {"build": build, "add": add, "search": search}
    return run_command("dmlrun-index", lambda: commands[args.command](args))


if __name__ == "__main__":
    sys.exit(main())
