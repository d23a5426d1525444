"""The overview pages: the served models (and their default versions), and the prediction log."""
import json
import time
from collections import Counter
from datetime import datetime

import pandas as pd
import sqlalchemy as sa
import streamlit as st

import catalog
from prediction_table import decode_pixels, predictions
from ui import shared

HISTORY_COLUMNS = {"Input": 1, "Time": 1.5, "Model": 2.2, "Client": 1, "Result": 1.3, "Confidence": 1.2,
                   "Handler time": 1.2, "": 1.3}


def models_page():
    st.title("Models", anchor=False)
    notice = st.session_state.pop("models_notice", None)
    if notice:  # left by set_default or manage: the page has been redrawn since
        kind, text = notice
        (st.success if kind == "success" else st.error)(text)
    served = shared.attempt(shared.client().models)
    if served is None:
        return
    archives = catalog.read_manifest()  # empty until `make archive`
    manifest = list(archives.values())
    for model in served:
        model_section(model, archives, manifest)


def model_section(model: str, archives: dict, manifest: list[dict]):
    versions = shared.attempt(shared.client().describe, model, subject=model)
    default = shared.attempt(shared.client().default_version, model, subject=model)
    if versions is None or default is None:
        return
    with st.container(border=True, key=f"model_{model}"):
        st.subheader(model)
        facts, curves = st.columns(2, gap="large")
        card = model_card(model)
        with facts:
            st.markdown(f"Default version: **{default}**")
            st.table(version_table(model, versions, default, archives))
            st.caption(model_card_line(model, card))
        curve = catalog.WEIGHTS_DIR / f"{model}_curves.png"
        if curve.exists():
            curves.image(str(curve), caption="Training curves, from the model card", alt=curves_alt(model, card))
        default_switch(model, [v["modelVersion"] for v in versions], default)
        model_card_figures(model, card)
        archived_versions(model, [v["modelVersion"] for v in versions], manifest)
        serving_figures(model, versions, default)


def version_table(model: str, versions: list[dict], default: str, archives: dict) -> pd.DataFrame:
    rows = []
    for v in versions:
        archive = archives.get((model, v["modelVersion"]), {})
        workers = Counter(w.get("status", "?") for w in v.get("workers", []))
        rows.append({
            "Version": v["modelVersion"],
            "Default": "yes" if v["modelVersion"] == default else "",
            "Format": archive.get("format", "?"),
            "Workers": ", ".join(f"{n} {status.lower()}" for status, n in workers.items()) or "none",
            "Test accuracy": f"{archive['test_accuracy']:.2%}" if archive.get("test_accuracy") else "?",
        })
    return pd.DataFrame(rows).set_index("Version")


def model_card(model: str) -> dict | None:
    """The model card's figures (training/weights/<model>_metrics.json), None without one."""
    metrics = catalog.WEIGHTS_DIR / f"{model}_metrics.json"
    return json.loads(metrics.read_text()) if metrics.exists() else None


def model_card_line(model: str, card: dict | None) -> str:
    if card is None:
        return f"No model card for {model} in training/weights/."
    return (f"Model card (training/weights/{model}.md): test accuracy {card['shipped_test_acc']:.2%} with the "
            f"shipped weights, {card['test_images']} test images; trained in {card['wall_seconds'] / 60:.0f} min.")


def curves_alt(model: str, card: dict | None) -> str:
    """The training curves in words, for screen readers: what they plot and where they end."""
    text = f"{model}'s training curves: loss (cross-entropy) and accuracy per epoch, for training and validation"
    history = (card or {}).get("history")
    if not history:
        return text + "."
    best = max(history, key=lambda epoch: epoch["val_acc"])
    return (f"{text}, over {len(history)} epochs. Validation accuracy {history[0]['val_acc']:.2%} after the first, "
            f"best {best['val_acc']:.2%} after epoch {best['epoch']}; training loss from "
            f"{history[0]['train_loss']:.3f} to {history[-1]['train_loss']:.3f}.")


def confusion_alt(model: str, card: dict | None) -> str:
    """The confusion matrix in words, for screen readers: how much lies on its diagonal, and its largest
    confusions."""
    text = f"{model}'s confusion matrix on the test split: true class down, predicted class across"
    matrix = (card or {}).get("confusion")
    if not matrix:
        return text + "."
    names = shared.class_names(model)
    errors = sorted(((n, names[t], names[p]) for t, row in enumerate(matrix) for p, n in enumerate(row)
                     if t != p and n), reverse=True)
    correct = sum(matrix[i][i] for i in range(len(matrix)))
    return (f"{text}. {correct:,} of {sum(map(sum, matrix)):,} images on the diagonal; the most frequent errors: "
            + ", ".join(f"{t} taken for {p} ({n} times)" for n, t, p in errors[:3]) + ".")


def default_switch(model: str, versions: list[str], default: str):
    """Pick a version, then confirm it in a dialog: a new default changes what every client that names
    no version gets."""
    others = [v for v in versions if v != default]
    if not others:
        return
    with st.container(horizontal=True, vertical_alignment="bottom", gap="medium"):
        # Keyed by the default too, so that the picker starts afresh once it has changed.
        new = st.radio("New default version", others, horizontal=True, key=f"new_default_{model}_{default}")
        if st.button("Set default…", key=f"set_default_{model}"):
            confirm("Change the default version", f"Make **{new}** the default version of **{model}**? Every "
                    f"client that names no version then gets {new} instead of {default}.",
                    "Set default", set_default, model, new)


def confirm(title: str, question: str, verb: str, action, *args):
    """A modal dialog that asks `question`: `verb` does action(*args), Cancel nothing, and either closes
    it (so do its X and Escape, which do nothing either)."""
    @st.dialog(title)
    def dialog():
        st.markdown(question)
        with st.container(horizontal=True):
            if st.button(verb, type="primary", key="confirm_yes"):
                action(*args)
                st.rerun()  # the whole page again, with the change and its notice, and no dialog
            if st.button("Cancel", key="confirm_no"):
                st.rerun()
    dialog()


def set_default(model: str, version: str):
    try:
        shared.client().set_default(model, version)
        st.session_state.models_notice = ("success", f"{model}: version {version} is now the default.")
    except shared.SERVE_ERRORS as e:
        st.session_state.models_notice = ("error", shared.explain(e, model))


def model_card_figures(model: str, card: dict | None):
    """The model card's confusion matrix (its figure) and per-class test accuracy (its metrics)."""
    confusion = catalog.WEIGHTS_DIR / f"{model}_confusion.png"
    if not confusion.exists() and card is None:
        return
    with st.expander("Confusion matrix and per-class accuracy (model card)", key=f"card_{model}"):
        matrix, per_class = st.columns([3, 2])
        if confusion.exists():
            matrix.image(str(confusion), caption=f"{model}: confusion matrix on the test split, from the model card",
                         alt=confusion_alt(model, card))
        if card is not None:
            accuracy = card.get("per_class_acc") or {}
            if isinstance(accuracy, list):
                accuracy = dict(zip(shared.class_names(model), accuracy))
            per_class.table(pd.DataFrame({"Class": list(accuracy),
                                          "Test accuracy": [f"{a:.2%}" for a in accuracy.values()]})
                            .set_index("Class"))


def archived_versions(model: str, registered: list[str], manifest: list[dict]):
    """Versions archived in model_store/ but not registered on TorchServe: register one; and a
    registered version's worker count. Each is confirmed in a dialog first."""
    unregistered = [a for a in manifest if a["model"] == model and a["version"] not in registered]
    with st.expander(f"Register or scale versions ({len(unregistered)} archived, not registered)",
                     key=f"manage_{model}"):
        if unregistered:
            st.table(pd.DataFrame([{"Version": a["version"], "Format": a.get("format", "?"),
                                    "Archive": a["archive"],
                                    "Test accuracy": f"{a['test_accuracy']:.2%}" if a.get("test_accuracy") else "?"}
                                   for a in unregistered]).set_index("Version"))
            with st.container(horizontal=True, vertical_alignment="bottom"):
                version = st.selectbox("Archived version", [a["version"] for a in unregistered], index=None,
                                       placeholder="choose a version", key=f"register_version_{model}")
                if st.button("Register…", disabled=version is None, key=f"register_{model}"):
                    archive = next(a for a in unregistered if a["version"] == version)
                    confirm("Register a version", f"Register **{model} {version}** ({archive.get('format', '?')}, "
                            f"`{archive['archive']}`) on TorchServe? Its workers start at once.", "Register",
                            manage, model, f"registered {version}", shared.client().register, archive["archive"])
        else:
            st.caption("Every archived version is registered.")
        with st.container(horizontal=True, vertical_alignment="bottom"):
            version = st.selectbox("Registered version", registered, key=f"scale_version_{model}")
            workers = st.number_input("Workers", 0, 4, 1, key=f"scale_workers_{model}")
            if st.button("Scale…", key=f"scale_{model}"):
                confirm("Scale a version", f"Run **{workers}** worker(s) for **{model} {version}**?"
                        + (" With none, it answers no request." if workers == 0 else ""), "Scale",
                        manage, model, f"version {version} scaled to {workers} worker(s)", shared.client().scale,
                        model, version, workers)


def manage(model: str, done: str, call, *args):
    try:
        call(*args)
        st.session_state.models_notice = ("success", f"{model}: {done}.")
    except shared.SERVE_ERRORS as e:
        st.session_state.models_notice = ("error", shared.explain(e, model))


def serving_figures(model: str, versions: list[dict], default: str):
    """What TorchServe's Prometheus endpoint says about this model, read whenever the page runs (Refresh
    runs it: a periodic rerun would redraw the page under the visitor's clicks): requests, mean latency
    and queue time per version, the request rate since the previous reading, errors server-wide and
    worker health."""
    snapshots = st.session_state.setdefault(f"figures_{model}", [])
    with st.container(horizontal=True, vertical_alignment="center"):
        st.markdown("**Serving now** (TorchServe's metrics endpoint)")
        st.button("Refresh", icon=":material/refresh:", key=f"refresh_{model}")  # a rerun reads them again
    try:  # read on every run of the page: one local GET
        snapshots.append((time.time(), shared.serving_metrics()))
    except shared.SERVE_ERRORS as e:
        st.warning(f"The metrics endpoint did not answer: {e}", icon=":material/warning:")
        return
    del snapshots[:-2]
    (now, metrics), before = snapshots[-1], (snapshots[0] if len(snapshots) > 1 else None)
    rows = []
    for v in versions:
        # A request without a version in its path is labelled model_version="default": the default's.
        names = [v["modelVersion"]] + (["default"] if v["modelVersion"] == default else [])

        def total(samples, name):
            return sum(shared.metric(samples, name, {"model_name": model, "model_version": n}) for n in names)
        requests = total(metrics, "ts_inference_requests_total")
        latency = total(metrics, "ts_inference_latency_microseconds")
        queue = total(metrics, "ts_queue_latency_microseconds")
        rate = "?"
        if before:
            earlier = total(before[1], "ts_inference_requests_total")
            rate = f"{(requests - earlier) / max(now - before[0], 1e-9):.2f}/s"
        workers = Counter(w.get("status", "?") for w in v.get("workers", []))
        rows.append({"Version": v["modelVersion"], "Requests": f"{requests:.0f}",
                     "Rate since last reading": rate,
                     "Mean latency": f"{latency / requests / 1000:.1f} ms" if requests else "no requests",
                     "Mean queue time": f"{queue / requests / 1000:.1f} ms" if requests else "no requests",
                     "Workers": ", ".join(f"{n} {s.lower()}" for s, n in workers.items()) or "none"})
    st.table(pd.DataFrame(rows).set_index("Version"))
    errors = {kind: shared.metric(metrics, f"Requests{kind}", {}) for kind in ("4XX", "5XX")}
    st.caption(f"Server-wide: {errors['4XX']:.0f} client errors (4XX), {errors['5XX']:.0f} server errors (5XX); "
               f"read {time.strftime('%H:%M:%S', time.localtime(now))}. TorchServe exports sums, not latency "
               "histograms: mean latency is what it can tell, not p50/p95.")


def history_page():
    st.title("History", anchor=False)
    log = shared.prediction_log()
    if log is None:
        st.info("The prediction log is off (PREDICTION_LOG_URL=off).", icon=":material/history:")
        return
    saved = st.session_state.pop("history_saved", None)
    if saved:  # left by the Save of a correction: the page has been redrawn since
        kind, text = saved
        (st.success if kind == "success" else st.error)(text, icon=":material/check:" if kind == "success"
                                                         else ":material/error:")
    # The toggles' column fits their labels, which were cut short ("Only this UI's pr…").
    model_filter, version_filter, search, mine_filter, page_input = st.columns([2, 1.2, 2, 2.2, 1],
                                                                              vertical_alignment="bottom")
    models = shared.models_for("digit_handler.py") + shared.models_for("image_handler.py")  # served or not
    model = model_filter.selectbox("Model", ["every model", *models], key="history_model")
    versions = logged_versions(model) if model != "every model" else []
    version = version_filter.selectbox("Version", ["every version", *versions], key=f"history_version_{model}",
                                       disabled=not versions)
    rid = search.text_input("Request id", key="history_request_id", placeholder="find one prediction",
                            help="The request id TorchServe answered with (X-Request-Id, or the History row's).")
    rid = rid.strip()
    mine = mine_filter.toggle("Only this UI", key="history_mine",
                              help="Predictions asked for on these pages (client ui).")
    live = mine_filter.toggle(f"Live previews ({shared.LIVE_CLIENT})", key="history_live",
                              help='What "Predict while drawing" answered while a digit was being drawn.')
    where = {k: v for k, v in (("model", None if model == "every model" else model),
                               ("version", None if version == "every version" else version),
                               ("request_id", rid or None)) if v}
    query = history_query(where, mine, live)
    try:
        total = count_rows(log, query)
        anything = total or log.count()
        pages = max(1, -(-total // shared.HISTORY_LENGTH))
        # Keyed by the filters: a new filter starts at page 1 (and never past its last page).
        page = page_input.number_input(f"Page (of {pages})", 1, pages, 1,
                                       key=f"history_page_{sorted(where.items())}_{mine}_{live}")
        rows = newest_rows(log, query, shared.HISTORY_LENGTH, (page - 1) * shared.HISTORY_LENGTH)
    except shared.LOG_ERRORS as e:
        st.error(f"The prediction log cannot be read: {e}", icon=":material/error:")
        return
    if not rows:
        st.info(f"No prediction with the request id {rid} matches these filters." if rid else
                "No predictions yet: draw a digit or upload a photo." if not anything else
                "No predictions match these filters.", icon=":material/history:")
        return
    first = (page - 1) * shared.HISTORY_LENGTH
    st.caption(f"Predictions {first + 1:,} to {first + len(rows):,} of {total:,} that TorchServe served "
               f"({'this UI' if mine else 'every client'}, {model}, {version}, live previews "
               f"{'shown' if live else 'hidden'}), newest first, from the prediction log. "
               f"Mark a wrong one with the right label: `make corrections MODEL=...` exports them for fine-tuning.")
    for column, name in zip(st.columns(list(HISTORY_COLUMNS.values())), HISTORY_COLUMNS):
        if name:  # "****" (the correction column's empty heading) is Markdown for a horizontal line
            column.markdown(f"**{name}**")
    for row in rows:
        history_row(row, log)


def history_query(where: dict, mine: bool, live: bool) -> sa.Select:
    """The rows the History's filters let through: the columns of `where` equal to their values, this
    UI's callers alone when `mine`, the live previews only when `live` (PredictionTable's recent and
    count filter by equal columns alone: hiding the previews takes a "not")."""
    query = sa.select(predictions).where(*(predictions.c[column] == value for column, value in where.items()))
    if mine:
        return query.where(predictions.c.client.in_(["ui", shared.LIVE_CLIENT] if live else ["ui"]))
    return query if live else query.where(predictions.c.client != shared.LIVE_CLIENT)


def count_rows(log, query: sa.Select) -> int:
    with log.engine.connect() as connection:
        return connection.execute(sa.select(sa.func.count()).select_from(query.subquery())).scalar_one()


def newest_rows(log, query: sa.Select, limit: int, offset: int) -> list[dict]:
    query = query.order_by(predictions.c.created.desc()).limit(limit).offset(offset)
    with log.engine.connect() as connection:
        return [dict(r._mapping) for r in connection.execute(query)]


def logged_versions(model: str) -> list[str]:
    """The versions of `model` TorchServe serves now: the History's version filter."""
    try:
        return [v["modelVersion"] for v in shared.client().describe(model)]
    except shared.SERVE_ERRORS:
        return []


def history_row(row: dict, log):
    """One prediction. Its widgets are keyed by the request id, not the row's place: a prediction
    arriving while a correction is being chosen moves the rows, never the correction."""
    rid = row["request_id"]
    with st.container(key=f"prediction_{rid}"):
        cells = st.columns(list(HISTORY_COLUMNS.values()), vertical_alignment="center")
        cells[0].image(shared.enlarged(decode_pixels(row), 56),
                       alt=f"What {row['model']} saw for this prediction, which it read as {row['label']}")
        cells[1].write(datetime.fromtimestamp(row["created"]).strftime("%Y-%m-%d %H:%M:%S"))
        cells[2].write(f"{row['model']} {row['version']}")
        cells[3].write(row["client"])
        cells[4].write(f"**{row['label']}**" + (f" → {row['true_label']}" if row["true_label"] else ""))
        cells[5].write(f"{row['confidence']:.1%}")
        cells[6].write(f"{row['latency_ms']:.0f} ms")
        # Keyed (and its open state kept by Streamlit): a popover without a key is the row's place on
        # the page, so a prediction arriving while it is open would show another row's correction in it.
        with cells[7].popover("Wrong?", key=f"wrong_{rid}", on_change="rerun"):
            right = st.selectbox("Right label", shared.class_names(row["model"]), index=None,
                                 placeholder="choose the right label", key=f"right_{rid}")
            sure = st.checkbox(f"Yes, {right} is right" if right is not None else "Yes, that is right",
                               key=f"sure_{rid}", disabled=right is None)
            st.button("Save", key=f"save_{rid}", disabled=right is None or not sure,
                      on_click=save_correction, args=(log, row, right))


def save_correction(log, row: dict, right: str):
    """Save's callback: record the right label, say so on the redrawn page, close the row's popover."""
    rid = row["request_id"]
    try:
        log.correct(rid, right)
    except shared.LOG_ERRORS as e:
        st.session_state.history_saved = ("error", f"The correction was not saved: {e}")
        return
    st.session_state.history_saved = ("success", f"Saved: the {row['model']} prediction {row['label']!r} "
                                                 f"should have been {right!r}.")
    st.session_state[f"wrong_{rid}"] = False
