"""Interpretation written as files: plots people look at, tables they can diff."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Sequence

from kimchi_edge.runtime.fsutil import atomic_write_json, atomic_write_text


def setup_matplotlib() -> None:
    """Headless backend and a font with Hangul, so Korean class names render (not as boxes)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    try:
        import koreanize_matplotlib  # noqa: F401  (registers NanumGothic and selects it)
    except ImportError:  # plots still work; Korean glyphs may show as boxes
        pass
    import logging

    import matplotlib.pyplot as plt

    # DejaVu Sans first (it has U+2212, the minus of log-scale ticks like lr_find's 10^-3), NanumGothic as
    # the per-glyph fallback for Hangul: both Korean class names and tick labels render.
    plt.rcParams["font.family"] = ["DejaVu Sans", "NanumGothic"]
    logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)


def save_current_figure(path: Path, dpi: int = 110) -> None:
    import matplotlib.pyplot as plt

    fig = plt.gcf()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close("all")


def write_csv(path: Path, rows: list[dict[str, Any]], fields: list[str]) -> None:
    """Rows of dicts as a CSV file (UTF-8), written atomically."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields)
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def write_history(reports: Path, history: list[dict[str, Any]]) -> None:
    """``history.csv`` and ``history.json``: one row per epoch, with its phase."""
    atomic_write_json(reports / "history.json", history)
    if history:
        write_csv(reports / "history.csv", history, list(history[0].keys()))


def plot_history(reports: Path, history: list[dict[str, Any]], best_epoch: int | None) -> None:
    import matplotlib.pyplot as plt

    if not history:
        return
    ep = [h["epoch"] for h in history]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    ax[0].plot(ep, [h["train_loss"] for h in history], "o-", label="train loss")
    ax[0].plot(ep, [h["valid_loss"] for h in history], "o-", label="valid loss")
    if best_epoch is not None:
        ax[0].axvline(best_epoch, color="green", ls="--", label=f"exported (epoch {best_epoch})")
    ax[0].set_xlabel("epoch")
    ax[0].legend()
    ax[1].plot(ep, [h.get("accuracy", float("nan")) for h in history], "o-", label="accuracy")
    ax[1].set_xlabel("epoch")
    ax[1].set_ylim(0, 1.02)
    ax[1].legend()
    save_current_figure(reports / "history.png")


def classification_report(targets: Sequence[int], preds: Sequence[int], vocab: Sequence[str]) -> list[dict[str, Any]]:
    """Per-class precision/recall/F1/support, plus macro and weighted averages."""
    from sklearn.metrics import precision_recall_fscore_support

    labels = list(range(len(vocab)))
    p, r, f, s = precision_recall_fscore_support(targets, preds, labels=labels, zero_division=0)
    rows = [
        {"class": vocab[i], "precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
        for i in labels
    ]
    for avg in ("macro", "weighted"):
        pa, ra, fa, _ = precision_recall_fscore_support(targets, preds, labels=labels, average=avg, zero_division=0)
        rows.append({"class": f"{avg} avg", "precision": float(pa), "recall": float(ra), "f1": float(fa), "support": int(sum(s))})
    return rows


def write_classification_report(reports: Path, rows: list[dict[str, Any]]) -> None:
    atomic_write_json(reports / "classification_report.json", rows)
    write_csv(reports / "classification_report.csv", rows, ["class", "precision", "recall", "f1", "support"])


def interpretation(learn, reports: Path, *, top_losses: int = 9) -> dict[str, Any]:
    """Confusion matrix, top losses, most confused and the per-class report for the validation set.

    The model runs over the validation set once; fastai's ``ClassificationInterpretation`` would run
    it again for every confusion matrix it draws or reads (three times here).
    """
    import matplotlib.pyplot as plt
    import numpy as np
    from fastai.vision.all import ClassificationInterpretation

    vocab = list(learn.dls.vocab)
    n = len(vocab)
    dl = learn.dls.valid.new(shuffle=False, drop_last=False)
    preds, targs, losses = learn.get_preds(dl=dl, with_loss=True)
    decoded = preds.argmax(dim=1)
    cm = np.zeros((n, n), dtype=np.int64)
    np.add.at(cm, (targs.numpy().astype(int), decoded.numpy().astype(int)), 1)
    interp = ClassificationInterpretation(learn, dl, losses)
    interp.confusion_matrix = lambda: cm  # the one pass above, instead of a new one per call
    interp.plot_confusion_matrix(figsize=(max(5, 0.6 * n + 3),) * 2, dpi=80)
    save_current_figure(reports / "confusion_matrix.png")
    k = min(top_losses, len(interp.losses))
    if k:
        interp.plot_top_losses(k, nrows=max(1, int(k ** 0.5)), figsize=(11, 11))
        save_current_figure(reports / "top_losses.png")
    plt.close("all")
    confused = [{"actual": a, "predicted": p, "count": int(c)} for a, p, c in interp.most_confused(min_val=1)]
    atomic_write_json(reports / "most_confused.json", confused)
    rows = classification_report(targs.tolist(), decoded.tolist(), vocab)
    write_classification_report(reports, rows)
    return {"most_confused": confused, "classification_report": rows}


def metrics_table(valid: dict[str, float], test: dict[str, float] | None) -> list[str]:
    """Markdown rows: one column for validation, one for test when there is a test split."""
    rows = [("accuracy", "accuracy"), ("error_rate", "error_rate"), ("macro recall", "recall_macro"),
            ("macro precision", "precision_macro"), ("loss", None)]
    head = ["| metric | validation |" + (" test |" if test else ""), "|---|---|" + ("---|" if test else "")]
    out = []
    for title, key in rows:
        v = valid["valid_loss"] if key is None else valid[key]
        cell = f"| {title} | {v:.4f} |"
        if test:
            cell += f" {test['loss'] if key is None else test[key]:.4f} |"
        out.append(cell)
    return head + out


def write_summary(path: Path, info: dict[str, Any]) -> None:
    """A short markdown summary a person reads first."""
    m = info["metrics"]
    lines = [
        f"# Training run: {info['arch']} on {info['data_root']}",
        "",
        f"- classes ({len(info['labels'])}): {', '.join(info['labels'])}",
        f"- images: {info['n_train']} train / {info['n_valid']} valid / {info.get('n_test', 0)} test ({info['layout']} split"
        + (f", valid_pct={info['valid_pct']}" if info["layout"] == "random" else "")
        + (f", test_pct={info['test_pct']}" if info.get("test_pct") else "")
        + (f", seed={info['seed']}" if info["layout"] == "random" or info.get("test_pct") else "") + ")",
        f"- left out as unreadable: {len(info['excluded'])}" + (" (see split.json)" if info["excluded"] else ""),
        f"- starting weights: {info['pretrained'] or 'random init'}",
        f"- input: Resize({info['item_size']}) then {info['size']} px; mean {info['mean']}, std {info['std']}",
        f"- learning rate: {info['lr']:.2e}" + (f" (lr_find valley after {info['lr_find'].get('iterations', '?')} iterations; minimum/10 {info['lr_find'].get('minimum', float('nan')):.2e})"
                                             if info.get("lr_find") else " (given)"),
        f"- schedule: {info['schedule']}",
        f"- device: {info['device']}; wall time {info['wall_s']:.0f} s",
        "",
        "## Results (exported epoch {})".format(info["best_epoch"]),
        "",
        *metrics_table(m, info.get("test_metrics")),
        "",
        "The exported learner is the epoch with the lowest validation loss"
        + (f" (epoch {info['best_epoch']}, counting from 0, of {info['epochs_run']})." if info["best_epoch"] is not None else ".")
        + (" The test images chose nothing: their accuracy is the one to quote." if info.get("test_metrics") else
           " No test split (DATA/test/ or --test-pct): validation chose the epoch, so its accuracy is slightly optimistic."),
        "",
        "Files: `learner.pkl` (a pickle: load only if you trust it), `model_meta.json`, `split.json`, "
        "`reports/` (lr_find.png if lr_find ran, history.csv/json/png, confusion_matrix.png, top_losses.png, most_confused.json, "
        "classification_report.csv/json, metrics.json).",
        "",
        "Next: `kimchi-edge convert " + info["run_dir"] + "`",
        "",
    ]
    atomic_write_text(path, "\n".join(lines))
