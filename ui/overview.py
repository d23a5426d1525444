"""The overview pages: the served models (and their default versions), and the prediction log."""
import json
from collections import Counter
from datetime import datetime

import pandas as pd
import streamlit as st

from handlers.prediction_log import decode_pixels
from ui import shared

WEIGHTS = shared.ROOT / "training" / "weights"
MANIFEST = shared.ROOT / "model_store" / "manifest.json"
HISTORY_COLUMNS = {"Input": 1, "Time": 1.5, "Model": 2.2, "Client": 1, "Result": 1.3, "Confidence": 1.2,
                   "Handler time": 1.2, "": 1.3}


def models_page():
    st.title("Models")
    notice = st.session_state.pop("models_notice", None)
    if notice:  # left by set_default: the page has been redrawn since
        kind, text = notice
        (st.success if kind == "success" else st.error)(text)
    served = shared.attempt(shared.client().models)
    if served is None:
        return
    manifest = json.loads(MANIFEST.read_text()) if MANIFEST.exists() else []  # absent until `make archive`
    archives = {(a["model"], a["version"]): a for a in manifest}
    for model in served:
        model_section(model, archives)


def model_section(model: str, archives: dict):
    versions = shared.attempt(shared.client().describe, model, subject=model)
    default = shared.attempt(shared.client().default_version, model, subject=model)
    if versions is None or default is None:
        return
    with st.container(border=True, key=f"model_{model}"):
        st.subheader(model)
        facts, curves = st.columns(2, gap="large")
        with facts:
            st.markdown(f"Default version: **{default}**")
            st.table(version_table(model, versions, default, archives))
            st.caption(model_card_line(model))
        curve = WEIGHTS / f"{model}_curves.png"
        if curve.exists():
            curves.image(str(curve), caption="Training curves, from the model card")
        default_switch(model, [v["modelVersion"] for v in versions], default)


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


def model_card_line(model: str) -> str:
    metrics = WEIGHTS / f"{model}_metrics.json"
    if not metrics.exists():
        return f"No model card for {model} in training/weights/."
    card = json.loads(metrics.read_text())
    return (f"Model card (training/weights/{model}.md): test accuracy {card['shipped_test_acc']:.2%} with the "
            f"shipped weights, {card['test_images']} test images; trained in {card['wall_seconds'] / 60:.0f} min.")


def default_switch(model: str, versions: list[str], default: str):
    """Pick a version, confirm, set: a new default changes what every client without a version gets."""
    others = [v for v in versions if v != default]
    if not others:
        return
    with st.container(horizontal=True, vertical_alignment="bottom", gap="medium"):
        # The keys carry the default, so that the widgets start afresh once it has changed.
        new = st.radio("New default version", others, horizontal=True, key=f"new_default_{model}_{default}")
        confirmed = st.checkbox(f"Yes, make {new} the default", key=f"confirm_default_{model}_{default}")
        st.button("Set default", disabled=not confirmed, on_click=set_default, args=(model, new),
                  key=f"set_default_{model}")


def set_default(model: str, version: str):
    try:
        shared.client().set_default(model, version)
        st.session_state.models_notice = ("success", f"{model}: version {version} is now the default.")
    except shared.SERVE_ERRORS as e:
        st.session_state.models_notice = ("error", shared.explain(e, model))


def history_page():
    st.title("History")
    log = shared.prediction_log()
    if log is None:
        st.info("The prediction log is off (PREDICTION_LOG_URL=off).", icon=":material/history:")
        return
    saved = st.session_state.pop("history_saved", None)
    if saved:  # left by the Save of a correction: the page has been redrawn since
        st.success(saved, icon=":material/check:")
    model_filter, mine_filter, page_input = st.columns([2, 2, 1], vertical_alignment="bottom")
    models = shared.models_for("digit_handler.py") + shared.models_for("image_handler.py")  # served or not
    model = model_filter.selectbox("Model", ["every model", *models], key="history_model")
    mine = mine_filter.toggle("Only this UI's predictions", key="history_mine")
    where = {k: v for k, v in (("client", "ui" if mine else None),
                               ("model", None if model == "every model" else model)) if v}
    try:
        total = log.count(**where)
        pages = max(1, -(-total // shared.HISTORY_LENGTH))
        page = page_input.number_input(f"Page (of {pages})", 1, pages, 1, key="history_page")
        rows = log.recent(limit=shared.HISTORY_LENGTH, offset=(page - 1) * shared.HISTORY_LENGTH, **where)
    except shared.LOG_ERRORS as e:
        st.error(f"The prediction log cannot be read: {e}", icon=":material/error:")
        return
    if not rows:
        st.info("No predictions yet: draw a digit or upload a photo.", icon=":material/history:")
        return
    first = (page - 1) * shared.HISTORY_LENGTH
    st.caption(f"Predictions {first + 1:,} to {first + len(rows):,} of {total:,} that TorchServe served "
               f"({'this UI' if mine else 'every client'}, {model}), newest first, from the prediction log. "
               f"Mark a wrong one with the right label: `make corrections MODEL=...` exports them for fine-tuning.")
    for column, name in zip(st.columns(list(HISTORY_COLUMNS.values())), HISTORY_COLUMNS):
        column.markdown(f"**{name}**")
    for row in rows:
        history_row(row, log)


def history_row(row: dict, log):
    """One prediction. Its widgets are keyed by the request id, not the row's place: a prediction
    arriving while a correction is being chosen moves the rows, never the correction."""
    rid = row["request_id"]
    with st.container(key=f"prediction_{rid}"):
        cells = st.columns(list(HISTORY_COLUMNS.values()), vertical_alignment="center")
        cells[0].image(shared.enlarged(decode_pixels(row), 56))
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
            if st.button("Save", key=f"save_{rid}", disabled=right is None or not sure):
                log.correct(rid, right)
                st.session_state.history_saved = (f"Saved: the {row['model']} prediction "
                                                  f"{row['label']!r} should have been {right!r}.")
                st.rerun()
