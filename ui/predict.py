"""The prediction pages: draw a digit on a canvas, or upload a photo."""
import hashlib
import time

import pandas as pd
import streamlit as st

from ui import shared
from ui.canvas import st_canvas

CANVAS_PX = 280  # ten times MNIST's 28 px: room to draw with a mouse or a finger
SEEN_PX = 224  # the model's input, enlarged (8x a digit, 7x a CIFAR image)
# "Predict while drawing" waits for the pen to rest this long on a drawing before predicting it. The
# canvas reports a drawing only at pen-up (its frontend sends it 200 ms after the last mouse-up and
# nothing while the pen moves), so the pause counts from there: a stroke that ends within it replaces
# the drawing before it is sent. Longer feels sluggish; shorter predicts a two-stroke 4 after its first stroke.
LIVE_PAUSE_S = 0.5
# Only the predicted digit is shown large; the other metrics keep Streamlit's size.
BIG_DIGIT_CSS = "<style>.st-key-digit [data-testid='stMetricValue'] {font-size: 6rem; line-height: 1.1}</style>"
# The chart's axis labels and titles in the page's own text colour: Streamlit's chart theme greys
# them (#808495, 3.7:1 on white; WCAG AA asks 4.5:1). currentColor follows a dark theme too, which a
# colour in the chart's config would not. Vega draws them as SVG text, whose fill CSS sets.
CHART_TEXT_CSS = ("<style>[data-testid='stVegaLiteChart'] :is(.role-axis-label, .role-axis-title) text "
                  "{fill: currentColor}</style>")


def draw_page():
    # No anchor link beside the title: a link to the top of this very page, and one more Tab stop
    # before Predict.
    st.title("Draw a digit", anchor=False)
    picked = shared.pick_model("digit_handler.py", "draw")
    if picked is None:
        return
    model, version = picked
    pad, answer = st.columns([1, 1.5], gap="large")
    with pad:
        canvas, predict_now, live = drawing_pad()
    with answer:
        image = canvas.image_bytes
        strokes = len((canvas.json_data or {}).get("objects", []))
        # A drawing already answered (its hash, model and version) is not sent again, live or not.
        result = shared.answered("draw", model, version, image, top_k=10)
        asked = image is not None and (predict_now or (live and strokes > 0 and result is None))
        # The canvas PNG goes as it is (transparent background): the handler reads alpha as ink.
        if asked and predict_now:
            result = shared.predict("draw", model, version, image, top_k=10)
        elif asked:
            pen_rested()
            result = shared.predict("draw", model, version, image, top_k=10, live=True)
        if result:
            digit_result(result, image)
            every_answer("digit_handler.py", image)
        elif not asked:
            st.info("Draw one digit, large and centred, then press **Predict**.", icon=":material/draw:")


def drawing_pad():
    """The canvas and its controls -> (canvas result, Predict pressed, live prediction on)."""
    st.session_state.setdefault("canvas_generation", 0)
    brush = st.slider("Brush width", 6, 40, 20, format="%d px")
    # A new key is a new, empty canvas: how Clear empties it.
    canvas = st_canvas(stroke_width=brush, stroke_color="#111111", height=CANVAS_PX, width=CANVAS_PX,
                       return_image_data=True, key=f"canvas_{st.session_state.canvas_generation}")
    with st.container(horizontal=True, vertical_alignment="center"):
        # Nothing to send until the canvas has sent its first drawing.
        predict_now = st.button("Predict", type="primary", icon=":material/send:",
                                disabled=canvas.image_bytes is None)
        st.button("Clear", icon=":material/delete:", on_click=clear_canvas)
        live = st.toggle("Predict while drawing", key="live")
    if live:
        st.caption(f"Each stroke is answered once the pen has rested {LIVE_PAUSE_S:.1f} s. These answers are "
                   "previews, logged as client ui-live (History hides them); **Predict** logs the finished digit.")
    return canvas, predict_now, live


def pen_rested():
    """Wait until the pen has rested LIVE_PAUSE_S on this drawing. A stroke that ends meanwhile sends
    a newer drawing, and Streamlit (fast reruns) then stops this run at its next element and runs the
    page again with it: strokes drawn in quick succession get one prediction, not one each."""
    time.sleep(LIVE_PAUSE_S)
    st.empty()  # that next element: where a newer drawing stops this run, before it predicts


def clear_canvas():
    st.session_state.canvas_generation += 1


def digit_result(result: dict, image: bytes):
    st.html(BIG_DIGIT_CSS + CHART_TEXT_CSS)
    digit, facts = st.columns([1, 2], vertical_alignment="center")
    with digit.container(key="digit"):
        st.metric("Prediction", result["label"])
    facts.metric("Confidence", f"{result['confidence']:.1%}")
    facts.metric("Round trip", f"{result['latency_ms']:.0f} ms")
    st.caption(f"{result['model']} version {result['version']} ({result['format']})")
    chart, seen = st.columns([3, 2], vertical_alignment="bottom")
    probabilities = pd.DataFrame([(c["label"], c["probability"]) for c in result["top_k"]],
                                 columns=["digit", "probability"]).sort_values("digit")
    described = ", ".join(f"{d} {p:.1%}" for d, p in probabilities.itertuples(index=False))
    chart.bar_chart(probabilities, x="digit", y="probability", sort=False, height=240,
                    alt=f"Bar chart of the probability of each digit: {described}")
    seen.image(shared.enlarged(result["input_png"], SEEN_PX), caption="What the model saw: 28×28, enlarged",
               alt=f"Your drawing as the model saw it, 28 by 28 pixels, enlarged: it reads {result['label']}")
    with seen:
        explained("draw", result, image)


def upload_page():
    st.title("Upload a photo", anchor=False)
    picked = shared.pick_model("image_handler.py", "upload")
    if picked is None:
        return
    model, version = picked
    photo = st.file_uploader("A photo (JPEG, PNG or WebP)", type=["jpg", "jpeg", "png", "webp"],
                             help=f"Photos over {shared.MAX_UPLOAD_BYTES >> 20} MiB or "
                                  f"{2 * shared.MAX_UPLOAD_SIDE_PX} px are shrunk here before they are sent.")
    if photo is None:
        st.info("The model names one of the ten CIFAR-10 classes: airplane, automobile, bird, cat, deer, "
                "dog, frog, horse, ship or truck.", icon=":material/photo_camera:")
        return
    data = photo.getvalue()
    picture = shared.readable_photo(data)
    if picture is None:
        st.error(f"{photo.name} is not an image this page can read: upload a JPEG, PNG or WebP photo.",
                 icon=":material/error:")
        return
    sent = shared.fit_for_upload(data, picture)
    original, answer = st.columns([1, 1.5], gap="large")
    shrunk = "" if sent is data else f", shrunk to {shared.MAX_UPLOAD_SIDE_PX} px on its long side to send"
    original.image(sent, caption=f"{photo.name} ({picture.width}x{picture.height}{shrunk})", width=320,
                   alt=f"The photo you uploaded, {photo.name}")
    with answer:
        result = shared.predict("upload", model, version, sent, top_k=3, force=False)
        if result:
            photo_result(result, sent)


def photo_result(result: dict, image: bytes):
    label, seen = st.columns([3, 2])
    with label:
        st.metric("Prediction", result["label"])
        for choice in result["top_k"]:
            st.progress(choice["probability"], text=f"{choice['label']}: {choice['probability']:.1%}")
        st.caption(f"{result['model']} version {result['version']} ({result['format']}) · "
                   f"round trip {result['latency_ms']:.0f} ms")
    seen.image(shared.enlarged(result["input_png"], SEEN_PX), caption="As the model saw it: 32×32, enlarged",
               alt=f"Your photo as the model saw it, 32 by 32 pixels, enlarged: it reads {result['label']}")
    with seen:
        explained("upload", result, image)


def explained(page: str, result: dict, image: bytes):
    """On request, the explanation of the answer overlaid on what the model saw."""
    if not st.toggle("Explain", key=f"{page}_explain",
                     help="Which parts of what the model saw made it answer this: red for, blue against "
                          "(TorchServe's explanations API, Occlusion)."):
        return
    explanation = shared.explanation(page, result["model"], result["version"], image)
    if explanation:
        st.image(shared.overlay(explanation, SEEN_PX), caption=f"Why {explanation['label']}: red for, blue against",
                 alt=f"What the model saw, tinted red where it made {explanation['label']} more likely and blue "
                     "where it spoke against it")


def every_answer(handler: str, image: bytes):
    """On request, every served model's answer for this very drawing, side by side (each model's
    default version): the answer above stays as it is."""
    key = hashlib.sha256(image).hexdigest()
    answers = st.session_state.setdefault("every_answer", {})
    if st.button("Every model's answer for this drawing", icon=":material/compare:", key="every_answer_button"):
        served = shared.attempt(shared.client().models)
        if served is None:
            return
        answers.clear()  # one drawing's answers at a time
        answers[key] = {model: shared.attempt(shared.client().predict, model, image, top_k=1, subject=model)
                        for model in shared.models_for(handler) if model in served}
    if key not in answers:
        return
    with st.container(key="every_answer"):
        for column, (model, answer) in zip(st.columns(max(1, len(answers[key]))), answers[key].items()):
            with column.container(border=True):
                if answer is None:
                    st.caption(f"{model}: no answer")
                    continue
                st.metric(model, answer["label"], help=f"version {answer['version']} (its default)")
                st.caption(f"version {answer['version']} · confidence {answer['confidence']:.1%}")
