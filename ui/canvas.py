"""The drawing canvas (streamlit-drawable-canvas) without its toolbar.

The component's toolbar is invisible until the pointer hovers the canvas, yet it lies over the top
~30 px of the canvas's right ~140 px: a stroke started there (after Clear, and always with touch, which
never hovers) pressed an invisible button instead of drawing. Its buttons (send, undo, redo, reset) were
also the first Tab stops of the page. The page has one Clear of its own, so the toolbar goes: the
component is declared again from its installed frontend, with a style that removes the toolbar inside
its (style-isolated) shadow root. st_canvas itself is unchanged and draws with this declaration.
"""
import streamlit as st
import streamlit_drawable_canvas as drawable

NO_TOOLBAR_CSS = ".dc-toolbar {display: none !important}"

drawable.out = st.components.v2.component(
    "streamlit-drawable-canvas.streamlit_drawable_canvas",  # the package's name: its frontend/build assets
    js="index-*.js",
    css="index-*.css",
    html=f'<style>{NO_TOOLBAR_CSS}</style><div class="canvas-root"></div>',
    isolate_styles=True,
)
st_canvas = drawable.st_canvas
