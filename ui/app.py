"""The web UI of the image-recognition service: `make ui` runs it (streamlit run ui/app.py).

Pages: draw a digit, upload a photo, the served models, the history of predictions (the log). Every answer comes
from TorchServe (serving/client.py: its addresses from config.properties or TS_* variables).
"""
import sys
from pathlib import Path

import streamlit as st

# streamlit puts ui/ on the path, not the repository root with catalog.py and serving/
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ui import overview, predict, shared  # noqa: E402

# The tab icon is a file of ours: a Material icon name would make the browser fetch it from the internet.
st.set_page_config(page_title="Digits and photos", page_icon=str(Path(__file__).parent / "favicon.png"), layout="wide")
draw = st.Page(predict.draw_page, title="Draw a digit", icon=":material/draw:", url_path="draw")
# Streamlit serves the default page at / only, and answers its own url_path with "Page not found":
# so the default is a hidden page that moves on to the drawing page, which then has /draw as well.
home = st.Page(lambda: st.switch_page(draw), title="Draw a digit", url_path="home", default=True, visibility="hidden")
page = st.navigation([
    home,
    draw,
    st.Page(predict.upload_page, title="Upload a photo", icon=":material/photo_camera:", url_path="upload"),
    st.Page(overview.models_page, title="Models", icon=":material/deployed_code:", url_path="models"),
    st.Page(overview.history_page, title="History", icon=":material/history:", url_path="history"),
])
shared.server_status()
page.run()
