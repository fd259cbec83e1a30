"""`hsae explore`: a static site to read the feature forest, opened straight from disk.

A site is a directory::

    index.html app.js style.css    the page (copied from hsae/explore/static/)
    site.json                      what it was built from; also marks the directory as a site
    data/forest.js                 the skeleton, loaded first: level sizes, parents,
                                   frequencies, judge labels (~12 bytes a feature)
    data/f/{level}_{chunk}.js      CHUNK features each: max activation, histogram, top and
                                   sampled contexts; loaded when one of them is opened
    data/t/{shard}.js              inverted index: a token (stripped, lower-case) -> the
                                   features whose top contexts have it at an activating
                                   position, most strongly activating first

Browsers refuse fetch() of file:// URLs, so each data file is a script calling
``HSAE_LOAD(key, value)``, loaded lazily with a <script> tag. The JSON inside is escaped so
that no token can end the script (``<``, ``>``, ``&``, U+2028/9 become \\u escapes), and the
page puts data into the DOM with textContent only.

Roots are the level-0 features and the deeper features with no parent, ordered by their own
frequency: in HSAE a parent fires whenever one of its children does, so its frequency is the
share of tokens its whole subtree covers.
"""

from __future__ import annotations

import functools
import http.server
import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from hsae.explore.contexts import ContextStore, LevelContexts, check_store_matches
from hsae.flags import Command, model_dir_option, option
from hsae.io import FormatError, load_json, replaced_directory, to_json_text
from hsae.trained import TrainedHSAE

SITE_FORMAT = "hsae-site/1"
CHUNK = 128
"""Features per detail file: a few hundred kB, small enough to load on a click."""
ASSETS = ("index.html", "app.js", "style.css")
_ESCAPES = {c: f"\\u{ord(c):04x}" for c in "<>&\u2028\u2029"}
"""Characters that could end a <script> or a JS string, written as JSON \\u escapes."""


# ---------------------------------------------------------------- encoding


def js_payload(key: str, value: object) -> bytes:
    """A data file: ``HSAE_LOAD(key, value);`` with JSON that cannot close a <script>."""
    text = json.dumps([key, value], ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    for char, escape in _ESCAPES.items():  # outside strings JSON has none of these characters
        text = text.replace(char, escape)
    return f"HSAE_LOAD({text[1:-1]});\n".encode("ascii")


def token_key(token: str) -> str:
    """What token search compares: the token stripped of spaces, lower-case (as app.js)."""
    return token.strip().lower()


def shard_of(key: str, n_shards: int) -> int:
    """FNV-1a of the key's UTF-8 bytes: app.js computes the same to find the shard."""
    h = 0x811C9DC5
    for byte in key.encode("utf-8", "surrogatepass"):
        h = ((h ^ byte) * 0x01000193) & 0xFFFFFFFF
    return h % n_shards


def _sig(x: float) -> float:
    """Three significant digits: float16 activations carry about that much."""
    return float(f"{x:.3g}")


def _sig_array(x: np.ndarray) -> np.ndarray:
    """:func:`_sig` of positive values, vectorised: each is the double nearest its 3-digit
    decimal, so JSON prints it short (0.123, not 0.12299999)."""
    x = x.astype(np.float64)
    digits = 2 - np.floor(np.log10(np.maximum(x, 1e-300)))
    up = np.maximum(digits, 0)  # scale by 10**up or divide by 10**down: both exact powers
    down = np.maximum(-digits, 0)
    return np.round(x * 10**up / 10**down) * 10**down / 10**up


# ---------------------------------------------------------------- inputs


def load_labels(path: str | Path, sizes: list[int]) -> dict[str, list]:
    """The judge's labels file as {"level:index": [label, score]}; FormatError if malformed."""
    labels = load_json(path).get("labels")
    if not isinstance(labels, dict):
        raise FormatError(f"{path}: needs a 'labels' object")
    out = {}
    for key, entry in labels.items():
        level, _, index = str(key).partition(":")
        if not (level.isdecimal() and index.isdecimal()):
            raise FormatError(f"{path}: label key {key!r} is not 'level:feature'")
        if int(level) >= len(sizes) or int(index) >= sizes[int(level)]:
            raise FormatError(f"{path}: label {key!r} names no feature of the model {sizes}")
        label = entry.get("label") if isinstance(entry, dict) else None
        score = entry.get("score") if isinstance(entry, dict) else None
        number = isinstance(score, int | float) and not isinstance(score, bool)
        if not isinstance(label, str) or not (score is None or number and math.isfinite(score)):
            raise FormatError(f"{path}: label {key!r} needs a string 'label' and a number 'score'")
        out[f"{int(level)}:{int(index)}"] = [label, score]
    return out


def _load_inputs(model_dir: str | Path, contexts_dir: str | Path):
    """Parents (hierarchy.json layout) and the context store, checked against each other."""
    trained = TrainedHSAE.load(model_dir)
    store = ContextStore.load(contexts_dir)
    check_store_matches(store, trained, contexts_dir)
    return [None, *[p.tolist() for p in trained.parents]], store


# ---------------------------------------------------------------- data files


def _shown(value: object) -> bool:
    """Meta values the page's header shows: plain JSON scalars (no NaN, nothing nested)."""
    finite = not isinstance(value, float) or math.isfinite(value)
    return (value is None or isinstance(value, str | int | float)) and finite


def forest_data(parents: list, store: ContextStore, labels: dict, n_shards: int) -> dict:
    meta = {k: v for k, v in store.meta.items() if _shown(v)}
    return {
        "format": SITE_FORMAT,
        "sizes": store.sizes,
        "chunk": CHUNK,
        "shards": n_shards,
        "meta": meta,
        "parents": parents,
        "freq": [[_sig(f) for f in lv.frequency.tolist()] for lv in store.levels],
        "labels": labels,
    }


def _contexts(ids: np.ndarray, acts: np.ndarray) -> list[dict]:
    """Per feature: {"ids": its contexts' token ids, "at": context * window + position of
    each non-zero activation, "act": those activations}. Rows lose their trailing -1s and
    trailing empty rows are dropped; interior -1s stay (app.js skips them)."""
    m, _, window = ids.shape
    real = ids >= 0
    lengths = np.where(real.any(axis=2), window - np.argmax(real[..., ::-1], axis=2), 0)
    flat_acts = acts.reshape(m, -1)
    feature, at = np.nonzero((real & (acts > 0)).reshape(m, -1))  # sorted by feature, at
    bounds = np.searchsorted(feature, np.arange(1, m))
    ats = np.split(at, bounds)
    values = np.split(_sig_array(flat_acts[feature, at]), bounds)
    out = []
    for rows, lens, a, v in zip(ids.tolist(), lengths.tolist(), ats, values):
        kept = [row[:n] for row, n in zip(rows, lens)]
        while kept and not kept[-1]:
            kept.pop()
        out.append({"ids": kept, "at": a.tolist(), "act": v.tolist()})
    return out


def chunk_data(lv: LevelContexts, start: int, vocab: list[str]) -> dict:
    """The details of features start .. start + CHUNK of one level, with a local vocabulary."""
    part = slice(start, start + CHUNK)
    ids = {k: getattr(lv, f"{k}_ids")[part].numpy() for k in ("top", "sample")}
    acts = {k: getattr(lv, f"{k}_acts")[part].float().numpy() for k in ("top", "sample")}
    used = np.unique(np.concatenate([ids["top"].ravel(), ids["sample"].ravel()]))
    used = used[used >= 0]
    local = {k: np.where(v >= 0, np.searchsorted(used, v), -1) for k, v in ids.items()}
    top, sample = (_contexts(local[k], acts[k]) for k in ("top", "sample"))
    hists = zip(lv.histogram[part].tolist(), lv.histogram_max[part].tolist())
    features = [
        {"max": _sig(m), "hist": h if any(h) else [], "hmax": _sig(hm), "top": t, "sample": s}
        for m, (h, hm), t, s in zip(lv.max_act[part].tolist(), hists, top, sample)
    ]
    window = int(ids["top"].shape[2])
    return {"vocab": [vocab[t] for t in used.tolist()], "window": window, "features": features}


def token_index(store: ContextStore) -> dict[str, list[int]]:
    """token key -> global feature ids (level offset + index), strongest activation first.

    A feature is listed under a token when one of its top contexts has that token at a
    position where the feature fires; its score is that activation over its max activation.
    """
    keys = [token_key(t) for t in store.vocab]
    names, key_of_token = np.unique(np.array(keys, dtype=object), return_inverse=True)
    cols: list[list[np.ndarray]] = [[], [], [], []]  # key, global feature, score, frequency
    offset = 0
    for lv in store.levels:
        acts = lv.top_acts.float()
        f, c, p = torch.nonzero((acts > 0) & (lv.top_ids >= 0), as_tuple=True)
        score = (acts[f, c, p] / lv.max_act[f].clamp_min(1e-12)).numpy()
        cols[0].append(key_of_token[lv.top_ids[f, c, p].numpy()])
        cols[1].append(f.numpy() + offset)
        cols[2].append(score)
        cols[3].append(lv.frequency[f].numpy())
        offset += lv.n_features
    key, feature, score, freq = (np.concatenate(col) for col in cols)
    keep = np.array([bool(names[k]) for k in range(len(names))], dtype=bool)[key]
    key, feature, score, freq = key[keep], feature[keep], score[keep], freq[keep]
    # Best score of each (key, feature) pair, then each key's features by score, frequency.
    order = np.lexsort((-score, feature, key))
    key, feature, score, freq = key[order], feature[order], score[order], freq[order]
    first = np.ones(len(key), dtype=bool)
    first[1:] = (key[1:] != key[:-1]) | (feature[1:] != feature[:-1])
    key, feature, score, freq = key[first], feature[first], score[first], freq[first]
    order = np.lexsort((feature, -freq, -score, key))
    key, feature = key[order], feature[order]
    bounds = np.flatnonzero(np.diff(key)) + 1
    return {
        str(names[k[0]]): ids.tolist()
        for k, ids in zip(np.split(key, bounds), np.split(feature, bounds))
        if len(k)
    }


# ---------------------------------------------------------------- the build


def _refuse_foreign(out: Path) -> None:
    """Replacing --out deletes it: only ever do that to an earlier site."""
    if out.exists() and not out.is_dir():
        raise FormatError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        marker = out / "site.json"
        if not marker.is_file() or load_json(marker).get("format") != SITE_FORMAT:
            raise FormatError(f"{out}: exists and is not an hsae explore site; refusing to replace")


def build_site(
    model_dir: str | Path,
    contexts_dir: str | Path,
    out: str | Path,
    labels_path: str | Path | None = None,
    progress: bool = True,
) -> Path:
    """Write the site to ``out`` as one unit (built beside it, then renamed into place)."""
    out = Path(out).absolute()
    _refuse_foreign(out)
    parents, store = _load_inputs(model_dir, contexts_dir)
    labels = load_labels(labels_path, store.sizes) if labels_path else {}
    index = token_index(store)
    n_shards = max(1, min(256, math.ceil(len(index) / 1000)))
    with replaced_directory(out) as staging:
        _write_site(staging, parents, store, labels, index, n_shards, progress)
        source = {"model": str(model_dir), "contexts": str(contexts_dir), "labels": labels_path}
        info = {"format": SITE_FORMAT, "sizes": store.sizes, **source, "tokens": len(index)}
        (staging / "site.json").write_text(to_json_text(info))
    return out


def _write_site(staging, parents, store, labels, index, n_shards, progress) -> None:
    """Everything but site.json; the directory is invisible until swapped in, so plain writes."""
    static = resources.files("hsae.explore") / "static"
    for name in ASSETS:
        (staging / name).write_bytes((static / name).read_bytes())
    data = staging / "data"
    (data / "f").mkdir(parents=True)
    (data / "t").mkdir()
    forest = forest_data(parents, store, labels, n_shards)
    (data / "forest.js").write_bytes(js_payload("forest", forest))
    shards: list[dict[str, list[int]]] = [{} for _ in range(n_shards)]
    for key, ids in index.items():
        shards[shard_of(key, n_shards)][key] = ids
    for i, shard in enumerate(shards):
        (data / "t" / f"{i}.js").write_bytes(js_payload(f"t/{i}", shard))
    chunks = [(lv, s) for lv in range(len(store.levels)) for s in range(0, store.sizes[lv], CHUNK)]
    for level, start in tqdm(chunks, desc="explore", unit="chunk", disable=not progress):
        key = f"f/{level}_{start // CHUNK}"
        payload = chunk_data(store.levels[level], start, store.vocab)
        (data / f"{key}.js").write_bytes(js_payload(key, payload))


# ---------------------------------------------------------------- serving and the command


def make_server(site: str | Path, port: int) -> http.server.ThreadingHTTPServer:
    """An HTTP server for the site on 127.0.0.1 only (port 0: any free port)."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args) -> None:  # no line per request
            pass

    handler = functools.partial(Quiet, directory=str(site))
    try:
        return http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    except OSError as err:
        raise ValueError(f"cannot serve on 127.0.0.1:{port}: {err.strerror or err}") from None


def cmd_explore(args: ExploreOptions) -> None:
    site = build_site(args.model_dir, args.contexts, args.out, args.labels, not args.quiet)
    print(f"wrote {site}; open {(site / 'index.html').as_uri()}")
    if not args.serve:
        return
    server = make_server(site, args.port)
    print(f"serving on http://127.0.0.1:{server.server_address[1]}/ (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped")
    finally:
        server.server_close()


@dataclass(kw_only=True)
class ExploreOptions:
    model_dir: str = model_dir_option()
    contexts: str = option(help="context store directory (hsae contexts)")
    labels: str | None = option(None, "the judge's labels JSON (hsae judge --labels)")
    out: str = option(help="site directory (replaced atomically)", output="dir")
    serve: bool = option(False, "also serve it on 127.0.0.1")
    port: int = option(8000, "port for --serve (0: any free)", low=0, high=65535)
    quiet: bool = option(False, "no progress bar")


COMMANDS = [Command("explore", "write a static site to read the feature forest",
                    ExploreOptions, cmd_explore)]  # fmt: skip
