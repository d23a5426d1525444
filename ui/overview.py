"""The overview pages: the served models (and their default versions), and this session's history."""
import json
from collections import Counter

import pandas as pd
import streamlit as st

from ui import shared

WEIGHTS = shared.ROOT / "training" / "weights"
MANIFEST = shared.ROOT / "model_store" / "manifest.json"
HISTORY_COLUMNS = {"Input": 1, "Time": 1.2, "Model": 2.2, "Version": 1, "Result": 1.4, "Confidence": 1.3,
                   "Latency": 1.1}


def models_page():
    st.title("Models")
    notice = st.session_state.pop("models_notice", None)
    if notice:  # left by set_default: the page has been redrawn since
        kind, text = notice
        (st.success if kind == "success" else st.error)(text)
    served = shared.attempt(shared.client().models)
    if served is None:
        return
    archives = {(a["model"], a["version"]): a for a in json.loads(MANIFEST.read_text())} if MANIFEST.exists() else {}
    for model in served:
        model_section(model, archives)


def model_section(model: str, archives: dict):
    versions = shared.attempt(shared.client().describe, model, subject=model)
    default = shared.attempt(shared.client().default_version, model, subject=model)
    if versions is None or default is None:
        return
    with st.container(border=True, key=f"model_{model}"):
        st.subheader(model)
        facts, curves = st.columns([3, 2], gap="large")
        with facts:
            st.markdown(f"Default version: **{default}**")
            st.table(version_table(model, versions, default, archives))
            st.caption(model_card_line(model))
            default_switch(model, [v["modelVersion"] for v in versions], default)
        curve = WEIGHTS / f"{model}_curves.png"
        if curve.exists():
            curves.image(str(curve), caption="Training curves, from the model card")


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
    choice, confirm, button = st.columns([1, 2, 1], vertical_alignment="bottom")
    # The keys carry the default, so that the widgets start afresh once it has changed.
    new = choice.radio("New default", others, horizontal=True, key=f"new_default_{model}_{default}")
    confirmed = confirm.checkbox(f"Yes, serve {model} {new} to requests without a version",
                                 key=f"confirm_default_{model}_{default}")
    button.button("Set default", disabled=not confirmed, on_click=set_default, args=(model, new),
                  key=f"set_default_{model}")


def set_default(model: str, version: str):
    try:
        shared.client().set_default(model, version)
        st.session_state.models_notice = ("success", f"{model}: version {version} is now the default.")
    except shared.SERVE_ERRORS as e:
        st.session_state.models_notice = ("error", shared.explain(e, model))


def history_page():
    st.title("History")
    history = st.session_state.get("history", [])
    if not history:
        st.info("No predictions yet in this session: draw a digit or upload a photo.", icon=":material/history:")
        return
    st.caption(f"The last {len(history)} predictions of this session, newest first "
               f"(at most {shared.HISTORY_LENGTH}).")
    for column, name in zip(st.columns(list(HISTORY_COLUMNS.values())), HISTORY_COLUMNS):
        column.markdown(f"**{name}**")
    for i, entry in enumerate(history):
        history_row(i, entry)


def history_row(i: int, entry: dict):
    with st.container(key=f"history_{i}"):
        cells = st.columns(list(HISTORY_COLUMNS.values()), vertical_alignment="center")
        cells[0].image(shared.enlarged(entry["input_png"], 56))
        cells[1].write(entry["time"].strftime("%H:%M:%S"))
        cells[2].write(entry["model"])
        cells[3].write(entry["version"])
        cells[4].write(f"**{entry['label']}**")
        cells[5].write(f"{entry['confidence']:.1%}")
        cells[6].write(f"{entry['latency_ms']:.0f} ms")
