"""``index.html``: a static gallery of a run, opened straight from its storage folder (no server).

Per concept: the training pictures beside the samples (a row per prompt), with the metrics.
Every link is relative to the folder the page sits in.
"""

from __future__ import annotations

import html
from collections import defaultdict
from typing import Any

STYLE = """
body { font-family: sans-serif; margin: 1.5em; background: #fafafa; }
section { background: white; border: 1px solid #ddd; border-radius: 6px; padding: 0.8em 1em; margin-bottom: 1em; }
h2 { margin: 0 0 0.3em 0; font-size: 1.1em; } .meta { color: #555; font-size: 0.9em; margin-bottom: 0.5em; }
.row { display: flex; gap: 1.5em; align-items: flex-start; } .label { font-size: 0.8em; color: #666; }
img { width: 96px; height: 96px; image-rendering: pixelated; border: 1px solid #ccc; margin: 1px; }
.error { color: #b00; } td { vertical-align: middle; padding: 0 0.4em 0 0; white-space: nowrap; }
"""


def _metrics(values: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in sorted(values.items()) if isinstance(v, float)) or "no metrics"


def gallery_html(title: str, concepts: list[Any]) -> str:
    """``concepts``: the evaluation results (with ``concept_id``, ``token``, ``status``, ``error``,
    ``learnable_property``, ``metrics``, ``train_images`` and ``rows``: each image's prompt, seed, path, metrics)."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"]
    for c in concepts:
        cid = html.escape(c.concept_id)
        parts.append(f"<section id='{cid}'><h2>{cid} <code>{html.escape(c.token or '')}</code></h2>")
        if c.status != "succeeded":
            parts.append(f"<div class='error'>failed: {html.escape(str(c.error))}</div></section>")
            continue
        parts.append(f"<div class='meta'>{html.escape(c.learnable_property)} · {_metrics(c.metrics)}</div>")
        parts.append("<div class='row'><div><div class='label'>training images</div>")
        parts += [f"<img src='{html.escape(u)}' alt='training image'>" for u in c.train_images]
        if not c.train_images:
            parts.append("<div class='label'>(none given)</div>")
        parts.append("</div><div><div class='label'>samples</div><table>")
        by_prompt: dict[str, list[dict]] = defaultdict(list)
        for row in c.rows:
            by_prompt[row["prompt"]].append(row)
        for prompt, rows in by_prompt.items():
            shown = html.escape(prompt.replace("{}", c.token or "*"))
            cells = "".join(f"<img src='{html.escape(r['image'])}' alt='{shown}' "
                            f"title='seed {r['seed']}: {_metrics(r['metrics'])}'>" for r in rows)
            parts.append(f"<tr><td class='label'>{shown}</td><td>{cells}</td></tr>")
        parts.append("</table></div></div></section>")
    parts.append("</body></html>")
    return "\n".join(parts)
